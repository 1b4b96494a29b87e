"""Preprocessing throughput (images/s): JPEG decode + ADM crop, VAE encode, and the whole encode CLI."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import cli  # noqa: E402
from preprocessing import encode  # noqa: E402

# Random-weight stand-ins (timing only): the tests' 2-level VAE (downsampling 2, so its mid-block attention
# runs over (R/2)^2 tokens), a tiny 4-level one (downsampling 8 like SD-VAE), and SD-VAE's kl-f8 architecture.
ARCHS = {
    "tiny": dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8),
    "tiny-f8": dict(block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=8),
    "sd-random": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32),
}


def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout
        commit += " (uncommitted changes)" if dirty.strip() else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "uncommitted"
    import diffusers

    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "numpy": np.__version__,
        "git_commit": commit,
    }


def vae_path(name: str, tmp: Path) -> str:
    if name not in ARCHS:
        return name
    from diffusers.models import AutoencoderKL

    torch.manual_seed(0)
    levels = len(ARCHS[name]["block_out_channels"])
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * levels,
                        up_block_types=("UpDecoderBlock2D",) * levels, latent_channels=4, **ARCHS[name])
    vae.save_pretrained(tmp / name)
    return str(tmp / name)


def make_jpegs(folder: Path, count: int, size: tuple[int, int]) -> None:
    """ImageNet-like input: `count` JPEGs of `size` (w, h) in 2 class folders."""
    rng = np.random.default_rng(0)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 127 // (w + h)], -1)
    for i in range(count):
        (folder / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        noisy = (base + rng.integers(0, 40, base.shape)).clip(0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(folder / f"c{i % 2}" / f"{i:06d}.jpg", quality=90)


def main() -> None:
    p = cli.parser(__doc__)
    p.add_argument("--vae", default="tiny",
                   help="'tiny', 'tiny-f8' or 'sd-random' (random weights, timing only), or a hub id / local folder")
    p.add_argument("--resolution", type=int, default=256, help="image side")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="VAE compute precision")
    p.add_argument("--batch-size", type=int, default=32, help="images per VAE forward pass")
    p.add_argument("--batches", type=int, default=5, help="timed VAE batches (after one warm-up batch)")
    p.add_argument("--flip", action="store_true", help="also encode the mirrored images (as encode --flip)")
    p.add_argument("--images", type=int, default=200, help="JPEGs for the decode and whole-CLI measurements")
    p.add_argument("--jpeg-size", default="500x375", help="size of the synthetic JPEGs (ImageNet's median)")
    p.add_argument("--num-workers", type=int, default=None, help="decoding processes of the CLI run (CLI default)")
    p.add_argument("--skip-cli", action="store_true", help="skip the whole-CLI measurement")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="JSON file to append this run to (machine description included)")
    args = p.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.precision]
    record = {"vae": args.vae, "resolution": args.resolution, "precision": args.precision,
              "batch_size": args.batch_size, "flip": args.flip, "device": str(device),
              "torch_threads": torch.get_num_threads(), "load_average_at_start": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        vae_name = vae_path(args.vae, tmp)

        # 1. One process: JPEG decode + RGB + ADM center crop.
        make_jpegs(tmp / "src", args.images, tuple(int(s) for s in args.jpeg_size.split("x")))
        files = sorted((tmp / "src").rglob("*.jpg"))
        start = time.perf_counter()
        for f in files:
            encode.load_image(f, args.resolution)
        record["decode_crop_images_per_s_one_process"] = len(files) / (time.perf_counter() - start)

        # 2. VAE encode of random uint8 images (the GPU-bound part on a GPU machine).
        vae = encode.load_vae(vae_name, device, dtype)
        images = np.random.default_rng(0).integers(0, 256, (args.batch_size, args.resolution, args.resolution, 3),
                                                   dtype=np.uint8)
        encode.encode_batch(vae, images, args.flip, dtype)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.batches):
            encode.encode_batch(vae, images, args.flip, dtype)  # returns host arrays: includes the copy back
        record["vae_encode_images_per_s"] = args.batches * args.batch_size / (time.perf_counter() - start)
        if device.type == "cuda":
            record["gpu_peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
        del vae

        # 3. The whole CLI: listing, VAE load, decoding workers, encode, shards with checksums, manifest.
        if not args.skip_cli:
            argv = ["--source", str(tmp / "src"), "--dest", str(tmp / "out"), "--vae", vae_name,
                    "--resolution", str(args.resolution), "--precision", args.precision,
                    "--batch-size", str(args.batch_size)] + (["--flip"] if args.flip else [])
            if args.num_workers is not None:
                argv += ["--num-workers", str(args.num_workers)]
            start = time.perf_counter()
            assert encode.main(argv) == 0
            total = time.perf_counter() - start
            record["cli_seconds_including_vae_load"] = total
            record["cli_images_per_s_including_vae_load"] = args.images / total
            record["cli_num_images"] = args.images
    record["load_average_at_end"] = os.getloadavg()
    print(json.dumps(record, indent=1))
    if args.out:
        out = Path(args.out)
        results = json.loads(out.read_text()) if out.exists() else {"machine": info, "runs": []}
        results["runs"].append(record)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
