"""Encode an image folder (ImageNet layout) into VAE latent shards plus a manifest; see docs/data.md."""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the repository root (cli.py, common.py) goes on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cli  # noqa: E402

if __package__ in (None, ""):  # run as a file: python preprocessing/encode.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from integrity import atomic_write, remove_stale_temps, worker_init  # noqa: E402

FORMAT = "vae-repa-latents"
FORMAT_VERSION = 1
# torchvision's ImageFolder extensions, so that the file list and the labels are the ones ImageFolder gives.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
NP_DTYPES = {"fp16": "float16", "fp32": "float32"}
# Manifest entries that must agree between two runs writing into one --dest, and the flag that sets each.
CONFIG_FLAGS = {
    "vae": "--vae",
    "resolution": "--resolution",
    "precision": "--precision",
    "dtype": "--dtype",
    "flip": "--flip",
    "images": "--save-images",
    "shard_size": "--shard-size",
    "scale": "--scale",
    "shift": "--shift",
    "latent_norm": "--latent-norm",
    "latent_stats": "--latent-stats",
    "latent_multiplier": "--latent-multiplier",
    "num_classes": "--num-classes",
    "source_sha256": "--source/--labels (the list of image files and their labels)",
}
OUR_FILES = re.compile(
    r"^(((flip-)?(mean|std)|images)-\d+\.npy|shard-\d+\.json|labels\.npy|manifest\.json)(\.tmp)?$"
)


class UsageError(Exception):
    """A problem with the flags, the input or the destination: printed as one message, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    """The command line (no torch import: `--help` and usage errors answer at once)."""
    p = cli.parser(
        "Encode an ImageNet-style image folder into VAE latent shards (posterior mean and std) plus manifest.json.\n"
        "Multi-GPU: torchrun --nproc-per-node=8 -m preprocessing.encode ... Rerun the same command to resume after "
        "a crash."
    )
    p.add_argument("--source", required=True,
                   help="image folder: one sub-folder per class (class index = sorted folder order, as "
                   "torchvision's ImageFolder), or any folder of images together with --labels")
    p.add_argument("--dest", required=True, help="output folder for the shards and manifest.json")
    p.add_argument("--labels", default=None,
                   help="labels file for a folder without class sub-folders: JSON {\"labels\": [[relpath, label], "
                   "...]} or text lines 'relpath label'; paths are relative to --source")
    p.add_argument("--num-classes", type=int, default=None,
                   help="number of classes (default: number of class folders, or largest label + 1)")
    p.add_argument("--resolution", type=int, default=256, help="image side after the ADM center crop (multiple of 8)")
    p.add_argument("--vae", default="stabilityai/sd-vae-ft-ema",
                   help="diffusers AutoencoderKL: Hugging Face hub id or local folder (save_pretrained format)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="VAE compute precision")
    p.add_argument("--dtype", choices=list(NP_DTYPES), default="fp16", help="storage type of the mean and std")
    p.add_argument("--flip", action="store_true", help="also store the latents of the horizontally flipped image")
    p.add_argument("--save-images", action="store_true",
                   help="also store the center-cropped uint8 images (N, H, W, 3): 196 KB per image at 256 px, and "
                   "a shard is held in RAM until written (lower --shard-size if needed)")
    p.add_argument("--latent-norm", choices=["auto", "scale", "channelwise"], default="auto",
                   help="how latents become the model's input: scale = (z + --shift) * --scale (SD-VAE's); "
                   "channelwise = (z - mean_c) / std_c * --latent-multiplier, LightningDiT's, with per-channel "
                   "statistics (--latent-stats); auto = channelwise when released statistics lie beside the VAE's "
                   "weights (see --latent-stats) or its latents have other than 4 channels (VA-VAE), else scale "
                   "(the SD-VAE family)")
    p.add_argument("--scale", type=float, default=0.18215,
                   help="--latent-norm scale: latent scale recorded in the manifest (SD-VAE)")
    p.add_argument("--shift", type=float, default=0.0,
                   help="--latent-norm scale: latent shift recorded in the manifest: model input = (z + shift) * scale")
    p.add_argument("--latent-stats", default="auto",
                   help="--latent-norm channelwise: a latents_stats.pt ({'mean', 'std'}, LightningDiT's and REPA-E's "
                   "layout); 'compute' = over this dataset (exact per-channel moments of the posterior samples); "
                   "'auto' = latents_stats.pt or *latents-stats.pt beside the VAE's weights when there is one, else "
                   "compute")
    p.add_argument("--latent-multiplier", type=float, default=1.0,
                   help="--latent-norm channelwise: factor after standardising (LightningDiT's 1.0)")
    p.add_argument("--shard-size", type=int, default=10000, help="images per shard (the unit of work and resume)")
    p.add_argument("--batch-size", type=int, default=64, help="images per VAE forward pass, per rank")
    p.add_argument("--num-workers", type=int, default=None,
                   help="image decoding processes per rank (default: CPU cores / ranks on this node - 1, at most 16)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the latent-dataset files already in --dest (other files are kept) and start over")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None,
                   help="where the VAE runs (default: cuda when a GPU is visible, else cpu); each process takes the "
                   "GPU of its local rank")
    return p


if __name__ == "__main__":
    build_parser().parse_args()  # --help and usage errors answer here, before torch is imported

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

# ----------------------------------------------------------------------------------------------------------
# Images


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's center crop (guided-diffusion `center_crop_arr`): BOX halving, BICUBIC resize, center crop."""
    while min(pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(side // 2 for side in pil_image.size), resample=Image.BOX)
    scale = image_size / min(pil_image.size)
    # Python's round() (half to even), as ADM uses it.
    pil_image = pil_image.resize(tuple(round(side * scale) for side in pil_image.size), resample=Image.BICUBIC)
    arr = np.asarray(pil_image)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size]


def load_image(path: str | os.PathLike, resolution: int) -> np.ndarray:
    """Read any PIL-readable image, convert it to RGB and center-crop it: (resolution, resolution, 3) uint8."""
    with Image.open(path) as img:
        img.load()
        return center_crop_arr(img.convert("RGB"), resolution)


class ImageFiles(Dataset):
    """Center-cropped source images; an unreadable file gives its error message instead of pixels."""

    def __init__(self, root: Path, paths: list[str], resolution: int):
        self.root, self.paths, self.resolution = root, paths, resolution

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | None, str | None]:
        try:
            return i, load_image(self.root / self.paths[i], self.resolution), None
        except Exception as e:  # any decoder failure: the file is skipped and listed in the manifest
            return i, None, f"{type(e).__name__}: {e}"


def _as_list(batch: list) -> list:
    return batch


def read_labels_file(path: Path) -> dict[str, int]:
    """`{"labels": [[relpath, label], ...]}` (EDM/REPA dataset.json) or text lines `relpath label`."""
    try:
        text = path.read_text()
    except OSError as e:
        raise UsageError(f"--labels {path}: cannot be read ({e})") from e
    try:
        if path.suffix.lower() == ".json":
            entries = json.loads(text)["labels"]
        else:
            entries = []
            for line in text.splitlines():
                if line.strip():
                    match = re.fullmatch(r"\s*(.+?)\s*[,\s]\s*(-?\d+)\s*", line)
                    if match is None:
                        raise ValueError(f"cannot parse line {line!r}")
                    entries.append(match.groups())
        table = {str(p).replace("\\", "/"): int(label) for p, label in entries}
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(
            f"--labels {path}: expected a JSON file {{\"labels\": [[relative_path, label], ...]}} "
            f"or a text file with one 'relative_path label' per line ({e})"
        ) from e
    if any(label < 0 for label in table.values()):
        raise UsageError(f"--labels {path}: labels must be non-negative integers")
    return table


def list_images(source: Path, labels_file: Path | None = None) -> tuple[list[str], list[int], list[str] | None]:
    """Sorted relative image paths, their labels, and class names (ImageFolder order; None with --labels)."""
    if labels_file is not None:
        table = read_labels_file(labels_file)
        paths = sorted(table)
        return paths, [table[p] for p in paths], None
    classes = sorted(entry.name for entry in os.scandir(source) if entry.is_dir())
    paths, labels = [], []
    for label, name in enumerate(classes):
        for root, _, files in sorted(os.walk(source / name, followlinks=True)):
            for fname in sorted(files):
                if fname.lower().endswith(IMG_EXTENSIONS):
                    paths.append(os.path.relpath(os.path.join(root, fname), source).replace(os.sep, "/"))
                    labels.append(label)
    return paths, labels, classes


# ----------------------------------------------------------------------------------------------------------
# Files


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _atomic_write(path: Path, write: Callable) -> None:
    with atomic_write(path) as f:  # integrity's one writer: temporary ".<name>.<8 hex>.tmp", fsync, rename
        write(f)


def save_npy(path: Path, arr: np.ndarray) -> str:
    """Write `arr` atomically (temporary name, then rename) and return the file's sha256."""
    _atomic_write(path, lambda f: np.save(f, arr))
    return sha256_file(path)


def save_json(path: Path, obj: dict) -> None:
    _atomic_write(path, lambda f: f.write((json.dumps(obj, indent=1) + "\n").encode()))


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: cannot be read as JSON ({e}); pass --overwrite to replace it") from e


def shard_files(k: int, flip: bool, images: bool) -> dict[str, str]:
    """File name of each array of shard k, by kind."""
    kinds = ["mean", "std"] + (["flip-mean", "flip-std"] if flip else []) + (["images"] if images else [])
    return {kind: f"{kind}-{k:05d}.npy" for kind in kinds}


def sidecar_path(dest: Path, k: int) -> Path:
    return dest / f"shard-{k:05d}.json"


def check_destination(dest: Path, config: dict) -> dict | None:
    """Refuse a --dest that holds another dataset; return its manifest when this run continues it."""
    if not dest.exists():
        return None
    if not dest.is_dir():
        raise UsageError(f"--dest {dest} exists and is not a directory")
    manifest_path = dest / "manifest.json"
    if not manifest_path.exists():
        ours = sorted(p.name for p in dest.iterdir() if OUR_FILES.match(p.name))
        if ours:
            raise UsageError(
                f"--dest {dest} holds {ours[0]} ({len(ours)} latent-dataset files in all) but no manifest.json, "
                "so they cannot be checked against this run. Choose another --dest, or pass --overwrite to "
                "replace them."
            )
        return None
    manifest = read_json(manifest_path)
    if manifest.get("format") != FORMAT:
        raise UsageError(
            f"{manifest_path} is not a manifest written by this tool (format {manifest.get('format')!r}, "
            f"expected {FORMAT!r}). Choose another --dest, or pass --overwrite to replace it."
        )
    differences = [
        f"{CONFIG_FLAGS[key]}: {manifest_path} records {manifest.get(key)!r}, this run asks for {value!r}"
        for key, value in config.items()
        if manifest.get(key) != value
    ]
    if differences:
        raise UsageError(
            f"--dest {dest} already holds a different dataset:\n  " + "\n  ".join(differences)
            + "\nChoose another --dest, or pass --overwrite to replace it."
        )
    return manifest


def check_writable(dest: Path) -> None:
    """Make sure --dest (or, while it does not exist, the folder it would be created in) takes files; UsageError
    naming it otherwise. Creates nothing that stays."""
    import tempfile

    probe = dest
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        if not probe.is_dir():
            raise NotADirectoryError(20, f"{probe} is not a directory")
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise UsageError(f"--dest {dest}: cannot write there ({e.strerror or e}); choose a folder you can write "
                         "to") from e


def shard_is_done(dest: Path, k: int, config: dict, latent_shape: list[int]) -> bool:
    """True when shard k's sidecar exists, matches this run and every file matches its checksum."""
    side = sidecar_path(dest, k)
    if not side.exists():
        return False
    try:
        info = json.loads(side.read_text())
        ok = info["config"] == config and info["latent_shape"] == latent_shape
        for kind, name in info["files"].items():
            ok = ok and (dest / name).is_file() and sha256_file(dest / name) == info["sha256"][kind]
    except (OSError, ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        print(f"warning: shard {k} does not match {side.name} (damaged or changed); encoding it again",
              file=sys.stderr)
    return ok


# ----------------------------------------------------------------------------------------------------------
# VAE


def _repository_on_path() -> None:
    """The repository root on sys.path (run as a file, or with -m from elsewhere), for common and latent_codecs."""
    if __package__ in (None, ""):
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def load_vae(name: str, device: torch.device, dtype: torch.dtype):
    """`AutoencoderKL.from_pretrained(name)` (hub id or local folder), or an LDM-format weights file (VA-VAE f16d32,
    `vavae-imagenet256-f16d32-dinov2.pt`) converted into one, in eval mode; a clear error offline."""
    from diffusers.models import AutoencoderKL  # imported here so that --help stays fast

    local = os.path.expanduser(name)
    if os.path.isfile(local):
        _repository_on_path()
        from latent_codecs import load_vavae

        try:
            return load_vavae(local, device, dtype)
        except (OSError, RuntimeError, KeyError, ValueError) as e:
            raise UsageError(f"--vae {name}: {e}") from e
    if not os.path.isdir(local) and (name.startswith((".", "/", "~")) or name.count("/") != 1):
        raise UsageError(
            f"--vae {name}: no such directory. Pass a Hugging Face hub id (default stabilityai/sd-vae-ft-ema) "
            "or a folder written by AutoencoderKL.save_pretrained()."
        )
    try:
        vae = AutoencoderKL.from_pretrained(local if os.path.isdir(local) else name, torch_dtype=dtype)
    except Exception as e:  # network, missing files, wrong format: all end the run with the same advice
        short = name.rstrip("/").split("/")[-1]
        raise UsageError(
            f"--vae {name}: could not load the VAE ({type(e).__name__}: {e}).\n"
            "If this machine has no network access, download the VAE on one that has, for example\n"
            f"  python -c \"from diffusers import AutoencoderKL; "
            f"AutoencoderKL.from_pretrained('{name}').save_pretrained('vae/{short}')\"\n"
            f"(or: huggingface-cli download {name} --local-dir vae/{short}), copy the folder here and pass "
            f"--vae vae/{short}"
        ) from e
    return vae.to(device).eval().requires_grad_(False)


@torch.no_grad()
def encode_batch(vae, images: np.ndarray, flip: bool, dtype: torch.dtype) -> list[np.ndarray]:
    """Posterior mean and std (float32, NCHW) of uint8 NHWC images; then those of the mirrored images."""
    device = next(vae.parameters()).device
    x = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1
    if flip:
        x = torch.cat([x, x.flip(3)])
    posterior = vae.encode(x.to(dtype)).latent_dist
    mean, std = posterior.mean.float().cpu().numpy(), posterior.std.float().cpu().numpy()
    n = len(images)
    return [mean[:n], std[:n], mean[n:], std[n:]] if flip else [mean, std]


def resolve_normalisation(args: argparse.Namespace, channels: int) -> dict:
    """The manifest's "normalization" entry: {"type": "scale"} (SD-VAE's (z + shift) * scale), or
    {"type": "channelwise", "stats": "compute" or a file, "multiplier", and "mean" / "std" when read from a file}."""
    _repository_on_path()
    from latent_codecs import read_latent_stats, stats_beside

    mode, beside = args.latent_norm, stats_beside(args.vae)
    if mode == "auto":
        mode = "scale" if channels == 4 and beside is None else "channelwise"
    if mode == "scale":
        return {"type": "scale"}
    if not (math.isfinite(args.latent_multiplier) and args.latent_multiplier > 0):
        raise UsageError(f"--latent-multiplier {args.latent_multiplier}: must be a positive number")
    source = args.latent_stats
    if source == "auto":
        source = beside or "compute"
    out = {"type": "channelwise", "stats": source, "multiplier": args.latent_multiplier}
    if source != "compute":
        try:
            mean, std = read_latent_stats(source)
        except (OSError, KeyError, ValueError, RuntimeError) as e:
            raise UsageError(f"--latent-stats {source}: {e}") from e
        if mean.shape[1] != channels:
            raise UsageError(f"--latent-stats {source}: statistics of {mean.shape[1]} channels, but --vae {args.vae} "
                             f"gives {channels}")
        out.update(mean=mean.flatten().tolist(), std=std.flatten().tolist())
    return out


# ----------------------------------------------------------------------------------------------------------
# The run


def encode_dataset(
    args: argparse.Namespace,
    rank: int = 0,
    world_size: int = 1,
    local_rank: int = 0,
    barrier: Callable[[], object] = lambda: None,
) -> dict | None:
    """Encode this rank's shards (shard k belongs to rank k % world_size); rank 0 then writes the manifest."""
    source, dest = Path(args.source), Path(args.dest)
    if not source.is_dir():
        raise UsageError(f"--source {source}: no such directory")
    if args.resolution <= 0 or args.resolution % 8:
        raise UsageError(f"--resolution {args.resolution}: must be a positive multiple of 8")
    if args.shard_size < 1 or args.batch_size < 1:
        raise UsageError("--shard-size and --batch-size must be at least 1")
    paths, labels, class_names = list_images(source, Path(args.labels) if args.labels else None)
    if not paths:
        where = f"listed in --labels {args.labels}" if args.labels else "in class sub-folders"
        raise UsageError(
            f"--source {source}: no images found {where} (extensions {' '.join(IMG_EXTENSIONS)}). Expected an "
            "ImageNet-style folder (one sub-folder per class) or an image folder with --labels FILE."
        )
    num_classes = args.num_classes or (len(class_names) if class_names else max(labels) + 1)
    if num_classes <= max(labels):
        raise UsageError(f"--num-classes {num_classes}: the labels go up to {max(labels)}")
    if class_names is None:
        class_names = [str(i) for i in range(num_classes)]
    listing = "".join(f"{p}\t{label}\n" for p, label in zip(paths, labels)) + "\t".join(class_names)
    config = {
        "vae": args.vae,
        "resolution": args.resolution,
        "precision": args.precision,
        "dtype": NP_DTYPES[args.dtype],
        "flip": args.flip,
        "images": args.save_images,
        "shard_size": args.shard_size,
        "scale": args.scale,
        "shift": args.shift,
        "num_classes": num_classes,
        "source_sha256": hashlib.sha256(listing.encode()).hexdigest(),
    }
    check_writable(dest)

    if getattr(args, "device", None) != "cpu" and torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        # Same bits on every run and rank count: no autotuning, no TF32 in fp32 mode.
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    else:
        device = torch.device("cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.precision]
    vae = load_vae(args.vae, device, dtype)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if args.resolution % factor:
        raise UsageError(f"--resolution {args.resolution}: must be a multiple of the VAE's downsampling {factor}")
    latent_shape = [vae.config.latent_channels, args.resolution // factor, args.resolution // factor]
    normalisation = resolve_normalisation(args, latent_shape[0])
    if normalisation["type"] == "channelwise":  # --scale / --shift play no part; SD-VAE datasets keep their config
        config.update(scale=None, shift=None, latent_norm=args.latent_norm, latent_stats=args.latent_stats,
                      latent_multiplier=args.latent_multiplier)
    recorded = dest / "manifest.json"
    recorded = read_json(recorded) if not args.overwrite and recorded.is_file() else None
    same_vae = recorded is not None and (recorded.get("vae"), recorded.get("resolution")) == (args.vae, args.resolution)
    if same_vae and recorded.get("latent_shape") != latent_shape:
        raise UsageError(
            f"--vae {args.vae} now gives latents of shape {latent_shape} ({latent_shape[0]} channels), but "
            f"{dest / 'manifest.json'} records latent_shape {recorded.get('latent_shape')} from the first run: the "
            "VAE behind this name changed. Choose another --dest, or pass --overwrite to replace the dataset."
        )
    manifest = None if args.overwrite else check_destination(dest, config)

    config_scale, config_shift = vae.config.get("scaling_factor"), vae.config.get("shift_factor")
    if normalisation["type"] == "scale" and rank == 0 and config_scale is not None and config_scale != args.scale:
        print(f"warning: the VAE's config has scaling_factor {config_scale}, this run records --scale {args.scale}",
              file=sys.stderr)
    # diffusers: (z - shift_factor) * scale
    if normalisation["type"] == "scale" and rank == 0 and config_shift and -config_shift != args.shift:
        print(f"warning: the VAE's config has shift_factor {config_shift}, i.e. --shift {-config_shift}; this run "
              f"records --shift {args.shift}", file=sys.stderr)

    num_shards = math.ceil(len(paths) / args.shard_size)
    base = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "complete": False,
        **config,
        "latent_shape": latent_shape,
        "stored": list(shard_files(0, args.flip, args.save_images)),
        "latent": "x = (z + shift) * scale with z = mean + std * eps; target = (mean + shift) * scale",
        "normalization": normalisation,
        "pixels": "ADM center crop, RGB, x / 127.5 - 1",
        "class_names": class_names,
        "source": str(source.resolve()),
        "source_files": len(paths),
        "num_shards": num_shards,
    }
    if rank == 0:
        if args.overwrite and dest.is_dir():
            for p in dest.iterdir():
                if OUR_FILES.match(p.name):
                    p.unlink()
            remove_stale_temps(dest, OUR_FILES)
        dest.mkdir(parents=True, exist_ok=True)
        if manifest is None:
            save_json(dest / "manifest.json", base)
        print(f"{len(paths):,} images in {len(class_names)} classes from {source} -> {num_shards} shard(s) "
              f"in {dest}, {world_size} rank(s), device {device}")
    barrier()

    dest.mkdir(parents=True, exist_ok=True)
    todo = [k for k in range(rank, num_shards, world_size) if not shard_is_done(dest, k, config, latent_shape)]
    start = time.perf_counter()
    count = encode_shards(vae, dtype, source, dest, todo, paths, labels, args, config, latent_shape, rank == 0)
    elapsed = time.perf_counter() - start
    barrier()
    if rank != 0:
        return None
    manifest = finalize(dest, base, num_shards, world_size)
    size = sum((dest / name).stat().st_size for s in manifest["shards"] for name in s["files"].values())
    print(f"done: {manifest['num_images']:,} images, latents {'x'.join(map(str, latent_shape))} "
          f"{config['dtype']}, {size / 1e9:.2f} GB of shards in {dest}")
    if count:
        print(f"this run: rank 0 encoded {count:,} images in {elapsed:.1f} s ({count / elapsed:.1f} images/s"
              + (f", about {world_size}x that over all ranks)" if world_size > 1 else ")"))
    else:
        print("this run: nothing to encode, all shards were already complete and match their checksums")
    if manifest["skipped"]:
        first = manifest["skipped"][0]
        print(f"skipped {len(manifest['skipped'])} unreadable file(s), listed under \"skipped\" in manifest.json "
              f"(first: {first['path']}: {first['error']})")
    return manifest


def default_num_workers(local_world_size: int | None = None) -> int:
    """Decoding processes per rank when --num-workers is not given: the CPU cores this job may use (cli.usable_cpus)
    / its ranks on this machine - 1, at least 1, at most 16. `local_world_size` defaults to LOCAL_WORLD_SIZE (set by
    torchrun and accelerate), else 1."""
    if local_world_size is None:
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return min(16, max(1, cli.usable_cpus() // local_world_size - 1))


def encode_shards(vae, dtype: torch.dtype, source: Path, dest: Path, shards: list[int], paths: list[str],
                  labels: list[int], args: argparse.Namespace, config: dict, latent_shape: list[int],
                  progress: bool) -> int:
    """Encode and write the given shards; batches never straddle two shards. Returns the images read."""
    size = args.shard_size
    batches, owner = [], []
    for k in shards:
        stop = min((k + 1) * size, len(paths))
        for i in range(k * size, stop, args.batch_size):
            batches.append(list(range(i, min(i + args.batch_size, stop))))
            owner.append(k)
    if not batches:
        return 0
    workers = default_num_workers() if args.num_workers is None else args.num_workers
    loader = DataLoader(ImageFiles(source, paths, args.resolution), batch_sampler=batches, num_workers=workers,
                        collate_fn=_as_list, worker_init_fn=worker_init() if workers > 0 else None)
    bar = tqdm(total=sum(map(len, batches)), unit="img", disable=not progress, desc="encode", dynamic_ncols=True)
    parts, kept, skipped, count = [], [], [], 0
    for batch, k in zip(loader, owner):
        good = [(i, img) for i, img, _ in batch if img is not None]
        skipped += [{"path": paths[i], "error": err} for i, img, err in batch if img is None]
        if good:
            kept += [i for i, _ in good]
            images = np.stack([img for _, img in good])
            latents = [a.astype(config["dtype"]) for a in encode_batch(vae, images, args.flip, dtype)]
            if latents[0].shape[1:] != tuple(latent_shape):
                raise UsageError(f"--vae {args.vae}: gives latents of shape {list(latents[0].shape[1:])}, but its "
                                 f"config implies {latent_shape}; this VAE architecture is not supported")
            parts.append(latents + ([images] if args.save_images else []))
        bar.update(len(batch))
        count += len(batch)
        if batch[-1][0] == min((k + 1) * size, len(paths)) - 1:  # last batch of shard k
            write_shard(dest, k, parts, kept, skipped, paths, labels, args, config, latent_shape)
            parts, kept, skipped = [], [], []
    bar.close()
    return count


def write_shard(dest: Path, k: int, parts: list[list[np.ndarray]], kept: list[int], skipped: list[dict],
                paths: list[str], labels: list[int], args: argparse.Namespace, config: dict,
                latent_shape: list[int]) -> None:
    """Write shard k's arrays, then its sidecar JSON: the sidecar's presence marks the shard complete."""
    names = shard_files(k, args.flip, args.save_images)
    empty = {"images": (0, args.resolution, args.resolution, 3)}
    sha, stored = {}, {}
    for j, kind in enumerate(names):
        if parts:
            arr = np.concatenate([p[j] for p in parts])
        else:
            arr = np.zeros(empty.get(kind, (0, *latent_shape)))
        arr = arr.astype(np.uint8 if kind == "images" else config["dtype"], copy=False)
        sha[kind] = save_npy(dest / names[kind], arr)
        if kind in ("mean", "std"):
            stored[kind] = arr
    save_json(sidecar_path(dest, k), {
        "shard": k,
        "count": len(kept),
        "config": config,
        "latent_shape": latent_shape,
        "files": names,
        "sha256": sha,
        "labels": [labels[i] for i in kept],
        "paths": [paths[i] for i in kept],
        "skipped": skipped,
        "moments": channel_moments(stored["mean"], stored["std"]),  # of the stored values, which training reads
    })


def channel_moments(mean: np.ndarray, std: np.ndarray) -> dict:
    """Per-channel moments of the posterior samples z = mean + std * eps of a block of latents (N, C, H, W):
    count (values per channel), the mean of `mean`, the sum of squared deviations of `mean` (m2), and the sum of
    std^2 (the expected squared noise). Merged over shards by `merge_moments`; in float64."""
    m = mean.astype(np.float64).transpose(1, 0, 2, 3).reshape(mean.shape[1], -1)
    s = std.astype(np.float64).transpose(1, 0, 2, 3).reshape(std.shape[1], -1)
    mu = m.mean(axis=1) if m.shape[1] else np.zeros(m.shape[0])
    return {"count": int(m.shape[1]), "mean": mu.tolist(), "m2": ((m - mu[:, None]) ** 2).sum(axis=1).tolist(),
            "noise": (s**2).sum(axis=1).tolist()}


def merge_moments(parts: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) per channel of the posterior samples over all parts: mean = E[mean], var = Var(mean) (with
    count - 1, as torch.std) + E[std^2]. The means and m2 are merged by latent_codecs.LatentStats (Chan et al.)."""
    _repository_on_path()
    from latent_codecs import LatentStats

    stats, noise = LatentStats(), 0.0
    for part in parts:
        stats.merge(part["count"], part["mean"], part["m2"])
        noise = noise + np.asarray(part["noise"], dtype=np.float64)
    if stats.mean is None or stats.count < 2:
        raise UsageError("channel-wise latent statistics need at least two latent values per channel")
    return stats.mean.numpy(), np.sqrt(stats.m2.numpy() / (stats.count - 1) + noise / stats.count)


def finalize(dest: Path, base: dict, num_shards: int, world_size: int) -> dict:
    """Rank 0, once every shard exists: labels.npy and the complete manifest.json."""
    shards, labels, skipped, moments = [], [], [], []
    for k in range(num_shards):
        side = sidecar_path(dest, k)
        if not side.exists():
            raise UsageError(
                f"{side} is missing: rank {k % world_size} did not finish shard {k}. Run the same command again "
                "to encode the missing shards (finished shards are kept)."
            )
        info = read_json(side)
        shards.append({"count": info["count"], "files": info["files"], "sha256": info["sha256"]})
        labels += info["labels"]
        skipped += info["skipped"]
        moments.append(info.get("moments"))
    labels_sha = save_npy(dest / "labels.npy", np.asarray(labels, dtype=np.int64))
    manifest = {**base, "complete": True, "num_images": len(labels), "labels": "labels.npy",
                "labels_sha256": labels_sha, "shards": shards, "skipped": skipped}
    norm = dict(base["normalization"])
    if norm["type"] == "channelwise":
        if norm["stats"] == "compute":
            if None in moments:
                raise UsageError(f"a shard sidecar in {dest} predates the latent statistics; rerun with --overwrite")
            mean, std = merge_moments(moments)
            norm.update(mean=mean.tolist(), std=std.tolist(), count=sum(m["count"] for m in moments))
        mean, std = np.asarray(norm["mean"]), np.asarray(norm["std"])
        manifest.update(normalization=norm, scale=(norm["multiplier"] / std).tolist(), shift=(-mean).tolist())
    save_json(dest / "manifest.json", manifest)
    for p in dest.glob("*.tmp"):  # leftovers of a killed run whose shard has been rewritten since (older names)
        if OUR_FILES.match(p.name):
            p.unlink()
    remove_stale_temps(dest, OUR_FILES)
    return manifest


def _launch_problem(device: str | None) -> str | None:
    """common.gpu_launch_problem (the repository root is on sys.path when run as a file or with -m)."""
    _repository_on_path()
    from devices import gpu_launch_problem

    return gpu_launch_problem(device)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    problem = _launch_problem(args.device)  # before the process group: every rank stops, none hangs
    if problem is not None:
        cli.print_error(f"error: {problem}")
        return 2
    if world_size > 1:
        # gloo only synchronises the ranks (two barriers); each rank writes its own shards.
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=2))
    try:
        encode_dataset(args, rank, world_size, local_rank, dist.barrier if world_size > 1 else lambda: None)
    except UsageError as e:
        cli.print_error(f"error: {e}")
        return 2
    finally:
        if world_size > 1:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
