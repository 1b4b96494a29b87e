"""Preprocessing throughput (images/s): JPEG decode + ADM crop, VAE encode, and the whole encode CLI.

With --loader-ranks R [R ...], the CPU side alone instead of the VAE and CLI parts: for each R, R rank processes at once
on this machine (as `torchrun --nproc-per-node=R -m preprocessing.encode` starts them, LOCAL_WORLD_SIZE=R), each
reading its 1/R share of the --images JPEGs through encode's DataLoader (ImageFiles: decode + RGB + ADM crop, encode's
batches and collate, --num-workers or encode's default decoding processes per rank). Timed from the start signal,
given when every rank has started and built its DataLoader, to the last rank's last batch (the workers' start-up is
inside). Use a few thousand --images on a 16-core machine, so that the start-up is small against the decoding.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import cli  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli.parser(__doc__)
    p.add_argument("--vae", default="tiny",
                   help="'tiny', 'tiny-f8' or 'sd-random' (random weights, timing only), or a hub id / local folder")
    p.add_argument("--resolution", type=int, default=256, help="image side")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="VAE compute precision")
    p.add_argument("--batch-size", type=int, default=32, help="images per VAE forward pass")
    p.add_argument("--batches", type=int, default=5, help="timed VAE batches (after one warm-up batch)")
    p.add_argument("--flip", action="store_true", help="also encode the mirrored images (as encode --flip)")
    p.add_argument("--images", type=int, default=200,
                   help="JPEGs for the decode, whole-CLI and --loader-ranks measurements (for --loader-ranks on a "
                   "16-core machine: a few thousand)")
    p.add_argument("--jpeg-size", default="500x375", help="size of the synthetic JPEGs (ImageNet's median)")
    p.add_argument("--num-workers", type=int, default=None,
                   help="decoding processes of the CLI run, and per rank of --loader-ranks (encode's default: CPU "
                   "cores / ranks - 1, at most 16)")
    p.add_argument("--skip-cli", action="store_true", help="skip the whole-CLI measurement")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--loader-ranks", type=int, nargs="+", default=None, metavar="R",
                   help="instead of the VAE and CLI parts: time R ranks' data loading at once, for each R given "
                   "(e.g. 1 2 4 8; include 1 for the scaling efficiency)")
    p.add_argument("--loader-rank", nargs=2, default=None, metavar=("SOURCE", "DIR"),
                   help="internal, started by --loader-ranks: be one loader rank (LOCAL_RANK, LOCAL_WORLD_SIZE from "
                   "the environment) reading SOURCE, synchronised through files in DIR")
    p.add_argument("--out", default=None, help="JSON file to append this run to (machine description included)")
    return p.parse_args(argv)


if __name__ == "__main__":
    parse_args()  # --help and usage errors answer here, before the slow imports below (main parses again)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from integrity import as_list, atomic_write, worker_init  # noqa: E402
from latent_codecs.autoencoder import load_vae  # noqa: E402
from preprocessing import encode  # noqa: E402
from preprocessing.images import ImageFiles, load_image  # noqa: E402
from profiling import git_commit  # noqa: E402

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
        "git_commit": git_commit(),
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


def loader_rank(source: Path, sync: Path, resolution: int, batch_size: int, num_workers: int | None) -> None:
    """One rank of a --loader-ranks measurement (LOCAL_RANK of LOCAL_WORLD_SIZE, from the environment): read the
    rank's contiguous share of the JPEGs under `source` as encode_shards does, after the start file appears in `sync`;
    write the indices read, the unreadable count and the end time to sync/rank-<LOCAL_RANK>.json."""
    rank, ranks = int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"])
    paths = sorted(str(f.relative_to(source)) for f in source.rglob("*.jpg"))
    lo, hi = rank * len(paths) // ranks, (rank + 1) * len(paths) // ranks
    batches = [list(range(i, min(i + batch_size, hi))) for i in range(lo, hi, batch_size)]
    workers = encode.default_num_workers() if num_workers is None else num_workers
    loader = DataLoader(ImageFiles(source, paths, resolution), batch_sampler=batches, num_workers=workers,
                        collate_fn=as_list, worker_init_fn=worker_init() if workers > 0 else None)
    (sync / f"ready-{rank}").touch()
    while not (sync / "start").exists():
        time.sleep(0.001)
    read, unreadable = [], 0
    for batch in loader:
        read += [i for i, _, _ in batch]
        unreadable += sum(img is None for _, img, _ in batch)
    end = time.time()
    (sync / f"rank-{rank}.json").write_text(json.dumps({"workers": workers, "read": read, "unreadable": unreadable,
                                                        "end": end}))


def measure_loader(source: Path, sync: Path, ranks: int, args) -> dict:
    """Start `ranks` processes of this script as loader ranks, give the start signal once all are ready, and time
    them to the last rank's end. Also checks that the ranks together read every image exactly once."""
    sync.mkdir()
    procs = []
    try:
        for rank in range(ranks):
            env = {**os.environ, "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(ranks)}
            cmd = [sys.executable, str(Path(__file__).resolve()), "--loader-rank", str(source), str(sync),
                   "--resolution", str(args.resolution), "--batch-size", str(args.batch_size)]
            if args.num_workers is not None:
                cmd += ["--num-workers", str(args.num_workers)]
            procs.append(subprocess.Popen(cmd, env=env))
        while not all((sync / f"ready-{rank}").exists() for rank in range(ranks)):
            if any(proc.poll() not in (None, 0) for proc in procs):
                raise RuntimeError(f"a loader rank failed before the start (ranks {ranks})")
            time.sleep(0.01)
        start = time.time()
        (sync / "start").touch()
        if any(proc.wait() != 0 for proc in procs):
            raise RuntimeError(f"a loader rank failed (ranks {ranks})")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    done = [json.loads((sync / f"rank-{rank}.json").read_text()) for rank in range(ranks)]
    images = sum(len(d["read"]) for d in done)
    seconds = max(d["end"] for d in done) - start
    return {"ranks": ranks, "workers_per_rank": done[0]["workers"], "images": images, "seconds": seconds,
            "images_per_s": images / seconds, "per_rank_images": [len(d["read"]) for d in done],
            "each_image_read_once": sorted(i for d in done for i in d["read"]) == list(range(args.images)),
            "unreadable": sum(d["unreadable"] for d in done)}


def loader_scaling(source: Path, tmp: Path, args) -> list[dict]:
    rows = [measure_loader(source, tmp / f"ranks-{ranks}", ranks, args) for ranks in args.loader_ranks]
    one = next((r["images_per_s"] for r in rows if r["ranks"] == 1), None)
    print(f"{'ranks':>5} {'workers/rank':>12} {'images':>7} {'seconds':>8} {'img/s':>8} {'efficiency':>10}")
    for r in rows:
        r["efficiency"] = r["images_per_s"] / (r["ranks"] * one) if one else None
        efficiency = "" if r["efficiency"] is None else f"{r['efficiency']:.2f}"
        print(f"{r['ranks']:>5} {r['workers_per_rank']:>12} {r['images']:>7} {r['seconds']:>8.2f} "
              f"{r['images_per_s']:>8.1f} {efficiency:>10}")
    return rows


def vae_and_cli(args, tmp: Path, device: torch.device, dtype: torch.dtype, record: dict) -> None:
    """Parts 2 and 3: VAE encode of random images, and the whole encode CLI on the JPEGs in tmp/src."""
    vae_name = vae_path(args.vae, tmp)
    # 2. VAE encode of random uint8 images (the GPU-bound part on a GPU machine).
    vae = load_vae(vae_name, dtype).to(device)
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.loader_rank:
        loader_rank(Path(args.loader_rank[0]), Path(args.loader_rank[1]), args.resolution, args.batch_size,
                    args.num_workers)
        return 0

    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.precision]
    command = " ".join(["python", "scripts/benchmark_encode.py", *(sys.argv[1:] if argv is None else argv)])
    record = {"command": command, "resolution": args.resolution, "batch_size": args.batch_size,
              "images": args.images, "jpeg_size": args.jpeg_size}
    if not args.loader_ranks:
        record.update({"vae": args.vae, "precision": args.precision, "flip": args.flip, "device": str(device)})
    record.update({"torch_threads": torch.get_num_threads(), "load_average_at_start": os.getloadavg()})
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)

        # 1. One process: JPEG decode + RGB + ADM center crop.
        make_jpegs(tmp / "src", args.images, tuple(int(s) for s in args.jpeg_size.split("x")))
        files = sorted((tmp / "src").rglob("*.jpg"))
        start = time.perf_counter()
        for f in files:
            load_image(f, args.resolution)
        record["decode_crop_images_per_s_one_process"] = len(files) / (time.perf_counter() - start)

        if args.loader_ranks:  # the CPU side alone: R ranks' DataLoaders at once
            record["loader_scaling"] = loader_scaling(tmp / "src", tmp, args)
        else:
            vae_and_cli(args, tmp, device, dtype, record)
    record["load_average_at_end"] = os.getloadavg()
    print(json.dumps(record, indent=1))
    if args.out:
        out = Path(args.out)
        results = json.loads(out.read_text()) if out.exists() else {"machine": info, "runs": []}
        results["runs"].append(record)
        with atomic_write(out, "w") as f:
            f.write(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
