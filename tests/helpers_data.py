"""Test helpers for the data pipeline: a tiny image folder, a tiny VAE and latent datasets on disk."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
from PIL import Image

# (relative path, PIL mode, (width, height)); the class folders are deliberately not created in sorted order.
IMAGES = [
    ("n10/g.jpg", "RGB", (300, 200)),
    ("n10/f.bmp", "RGB", (129, 65)),
    ("n01/a.JPEG", "RGB", (50, 37)),
    ("n01/b.png", "L", (33, 45)),
    ("n01/sub/c.png", "P", (40, 40)),
    ("n02/d.jpg", "CMYK", (64, 48)),
    ("n02/e.png", "RGBA", (70, 41)),
]
CORRUPT = "n02/broken.jpg"
CLASSES = ["n01", "n02", "n10"]


# train.py's flags for a tiny run on the CPU (SiT-S/2 cut to 2 blocks of width 32, a step a second or less), for the
# tests that run its main on tiny data
TINY_TRAIN = ["--model", "SiT-S/2", "--depth", "2", "--hidden-size", "32", "--num-heads", "2", "--vae-repa-depth",
              "1", "--mixed-precision", "no", "--num-workers", "0", "--sample-every", "0", "--logging-steps", "1",
              "--batch-size", "4", "--learning-rate", "1e-3", "--ema-decay", "0.9", "--device", "cpu"]


def make_image_folder(root: Path) -> Path:
    """ImageNet-style folder: 3 classes, odd sizes, L/P/CMYK/RGBA modes, one truncated JPEG, one non-image."""
    rng = np.random.default_rng(0)
    for rel, mode, (w, h) in IMAGES:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        yy, xx = np.mgrid[0:h, 0:w]
        rgb = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 127 // (w + h)], -1)
        rgb = (rgb + rng.integers(0, 60, rgb.shape)).clip(0, 255).astype(np.uint8)
        img = Image.fromarray(rgb)
        if mode == "P":
            img = img.quantize(16)
        elif mode == "RGBA":
            img = img.convert("RGBA")
            img.putalpha(Image.fromarray((yy * 255 // h).astype(np.uint8)))
        else:
            img = img.convert(mode)
        img.save(path)
    whole = (root / "n10/g.jpg").read_bytes()
    (root / CORRUPT).write_bytes(whole[: len(whole) // 3])  # a JPEG cut short: opens, fails to decode
    (root / "n02/notes.txt").write_text("not an image")
    return root


def make_tiny_vae(path: Path, latent_channels: int = 4, seed: int = 0) -> Path:
    """A randomly initialised 2-level AutoencoderKL (downsampling 2) saved with save_pretrained."""
    import torch
    from diffusers.models import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=32,
    )
    vae.save_pretrained(path)
    return path


def write_latent_dataset(
    dest: Path,
    mean: np.ndarray,
    std: np.ndarray,
    labels: np.ndarray,
    flip_mean: np.ndarray | None = None,
    flip_std: np.ndarray | None = None,
    shard_size: int = 4,
    scale: float = 0.18215,
    shift: float = 0.0,
    num_classes: int | None = None,
    dtype: str = "float32",
    images: np.ndarray | None = None,
) -> Path:
    """Write the on-disk format described in docs/data.md directly with numpy (no encoder involved); `images`:
    uint8 (N, R, R, 3) center crops, as `--save-images` stores them."""
    dest.mkdir(parents=True, exist_ok=True)
    flip = flip_mean is not None
    arrays = {"mean": mean, "std": std, **({"flip-mean": flip_mean, "flip-std": flip_std} if flip else {})}
    if images is not None:
        arrays["images"] = images
    shards = []
    for k, start in enumerate(range(0, len(mean), shard_size)):
        files = {}
        for kind, arr in arrays.items():
            files[kind] = f"{kind}-{k:05d}.npy"
            np.save(dest / files[kind], arr[start : start + shard_size].astype(np.uint8 if kind == "images" else dtype))
        shards.append({"count": len(mean[start : start + shard_size]), "files": files})
    np.save(dest / "labels.npy", labels.astype(np.int64))
    manifest = {
        "format": "vae-repa-latents",
        "version": 1,
        "complete": True,
        "vae": "test-vae",
        "scale": scale,
        "shift": shift,
        "dtype": dtype,
        "flip": flip,
        "images": images is not None,
        "latent_shape": list(mean.shape[1:]),
        "num_images": len(mean),
        "num_classes": int(num_classes if num_classes is not None else labels.max() + 1),
        "labels": "labels.npy",
        "shards": shards,
    }
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return dest


def write_repa_layout(root: Path, mean: np.ndarray, std: np.ndarray, labels: np.ndarray,
                      images: np.ndarray | None = None) -> Path:
    """REPA's `dataset_tools.py encode` output: vae-sd/XXXXX/img-mean-std-XXXXXXXX.npy (2C, H, W) + dataset.json;
    with `images`, also its images/XXXXX/img-XXXXXXXX.png."""
    if images is not None:
        from PIL import Image

        for i, image in enumerate(images):
            name = f"{i:08d}"
            path = root / "images" / name[:5] / f"img{name}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(path)
    vae_dir = root / "vae-sd"
    entries = []
    for i in range(len(mean)):
        name = f"{i:08d}"
        rel = f"{name[:5]}/img-mean-std-{name}.npy"
        (vae_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        np.save(vae_dir / rel, np.concatenate([mean[i], std[i]]).astype(np.float32))
        entries.append([rel, int(labels[i])])
    (vae_dir / "dataset.json").write_text(json.dumps({"labels": entries}))
    return root


def load_shards(dest: Path, kind: str) -> np.ndarray:
    """One array kind ("mean", "std", "flip-mean", "images", ...) of every shard of a dataset, in manifest order."""
    manifest = json.loads((dest / "manifest.json").read_text())
    return np.concatenate([np.load(dest / s["files"][kind]) for s in manifest["shards"]])


def record_checksums(root: Path) -> Path:
    """Record in manifest.json the sha256 of every shard file and of labels.npy, as preprocessing does."""
    manifest = json.loads((root / "manifest.json").read_text())
    for shard in manifest["shards"]:
        shard["sha256"] = {kind: hashlib.sha256((root / name).read_bytes()).hexdigest()
                           for kind, name in shard["files"].items()}
    manifest["labels_sha256"] = hashlib.sha256((root / "labels.npy").read_bytes()).hexdigest()
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def error_lines(stderr: str) -> list[str]:
    """The error lines of a command's stderr (a progress bar may precede one on its line)."""
    return [line[line.index("error: "):] for line in stderr.splitlines() if "error: " in line]


FULL_DISK = re.compile(r"checkpoint (\S+) could not be written \(no space left on device: it needs about "
                       r"(?:[\d.]+ [kMGT]B \()?(\d+) bytes\)?, (?:[\d.]+ [kMGT]B \()?(\d+) bytes\)? free there\); the "
                       r"checkpoints written before it are intact: free space there and continue with --resume latest")


def full_disk_line(line: str) -> tuple[Path, int, int]:
    """(checkpoint, bytes needed, bytes free) of the writer's full-disk line; AssertionError for any other line."""
    match = FULL_DISK.fullmatch(line)
    assert match, line
    return Path(match[1]), int(match[2]), int(match[3])


def free_bytes(folder: Path) -> int:
    """The bytes an unprivileged user may still write in `folder`'s file system (statvfs)."""
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize
