"""Entry point `python -m preprocessing.encode`: the command line, the run's steps and the loop that encodes an image
folder into VAE latent shards plus a manifest (see docs/data.md)."""

from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the repository root (cli.py, preprocessing/) goes on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cli
from latent_data.format import REPA_DEFAULTS  # torch-free

NP_DTYPES = {"fp16": "float16", "fp32": "float32"}  # --dtype: the numpy type the mean and std are stored in


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
    p.add_argument("--vae", default=REPA_DEFAULTS["vae"],
                   help="diffusers AutoencoderKL: Hugging Face hub id or local folder (save_pretrained format)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="VAE compute precision")
    p.add_argument("--dtype", choices=list(NP_DTYPES), default=None,
                   help="storage type of the stored latents (default: fp16 for --posterior moments, fp32 for sample)")
    p.add_argument("--posterior", choices=["moments", "sample"], default="moments",
                   help="moments: store the posterior mean and std, and training draws a new sample z = mean + std "
                        "eps each epoch (ours); sample: store one sample per image (and one per flip), drawn once "
                        "from (--posterior-seed, image index), and train on it every epoch (LightningDiT's "
                        "extract_features.py). With sample, VAE-REPA's --vae-repa-target mean sees the sample")
    p.add_argument("--posterior-seed", type=int, default=0,
                   help="--posterior sample: image i's noise comes from this seed and i, so a resumed or "
                        "multi-process encode stores the same samples")
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
    p.add_argument("--scale", type=float, default=REPA_DEFAULTS["scale"],
                   help="--latent-norm scale: latent scale recorded in the manifest (SD-VAE)")
    p.add_argument("--shift", type=float, default=REPA_DEFAULTS["shift"],
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
from torch.utils.data import DataLoader
from tqdm import tqdm

from cli import UsageError
from devices import end_processes, gpu_launch_problem
from integrity import as_list, sha256_hex, worker_init
from latent_codecs.autoencoder import load_vae
from latent_data.format import FORMAT, FORMAT_VERSION, MANIFEST
from preprocessing.images import IMG_EXTENSIONS, ImageFiles, list_images
from preprocessing.normalization import resolve_normalisation
from preprocessing.shards import (
    check_destination,
    check_writable,
    finalize,
    open_destination,
    read_json,
    sample_posterior,
    shard_files,
    shard_is_done,
    write_shard,
)

# ----------------------------------------------------------------------------------------------------------
# The run's steps


def list_source(args: argparse.Namespace) -> tuple[list[str], list[int], list[str], int]:
    """Check the flags that need no VAE and list the images: (paths, labels, class names, number of classes)."""
    source, res, finite = Path(args.source), args.resolution, (lambda v: math.isfinite(v) and v > 0)
    for bad, message in (
        (not source.is_dir(), f"--source {source}: no such directory"),
        (res <= 0 or res % 8, f"--resolution {res}: must be a positive multiple of 8"),
        (args.shard_size < 1, f"--shard-size {args.shard_size}: must be at least 1"),
        (args.batch_size < 1, f"--batch-size {args.batch_size}: must be at least 1"),
        ((args.num_workers or 0) < 0, f"--num-workers {args.num_workers}: must be at least 0"),
        (not finite(args.scale), f"--scale {args.scale}: must be positive"),
        (not finite(args.latent_multiplier), f"--latent-multiplier {args.latent_multiplier}: must be positive"),
        (Path(args.dest).resolve() == source.resolve(), f"--dest {args.dest} is the --source folder: give the latents "
                                                          "a folder of their own"),
    ):
        if bad:
            raise UsageError(message)
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
    return paths, labels, class_names, num_classes


def dataset_config(args: argparse.Namespace, paths: list[str], labels: list[int], class_names: list[str],
                   num_classes: int) -> dict:
    """The settings two runs writing into one --dest must share (shards.CONFIG_FLAGS), before normalisation."""
    listing = "".join(f"{p}\t{label}\n" for p, label in zip(paths, labels)) + "\t".join(class_names)
    return {
        "vae": args.vae,
        "resolution": args.resolution,
        "precision": args.precision,
        "dtype": NP_DTYPES[args.dtype or ("fp32" if args.posterior == "sample" else "fp16")],
        "flip": args.flip,
        "images": args.save_images,
        "shard_size": args.shard_size,
        "scale": args.scale,
        "shift": args.shift,
        "num_classes": num_classes,
        "source_sha256": sha256_hex([listing.encode()]),
        # older datasets lack the key: they hold moments
        **({"posterior": "sample", "posterior_seed": args.posterior_seed} if args.posterior == "sample" else {}),
    }


def select_device(args: argparse.Namespace, local_rank: int) -> torch.device:
    """--device (default: the GPU of this local rank when one is visible), set up for bitwise-repeatable encodes."""
    if getattr(args, "device", None) == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    # Same bits on every run and rank count: no autotuning, no TF32 in fp32 mode.
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    return device


def open_vae(args: argparse.Namespace, device: torch.device) -> tuple[torch.nn.Module, torch.dtype, list[int]]:
    """--vae on `device` in --precision: (vae, compute dtype, latent shape at --resolution)."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.precision]
    vae = load_vae(args.vae, dtype).requires_grad_(False).to(device)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if args.resolution % factor:
        raise UsageError(f"--resolution {args.resolution}: must be a multiple of the VAE's downsampling {factor}")
    return vae, dtype, [vae.config.latent_channels, args.resolution // factor, args.resolution // factor]


def check_latent_shape(args: argparse.Namespace, dest: Path, latent_shape: list[int]) -> None:
    """Refuse a --vae whose latents changed shape since the first run into --dest under the same name."""
    recorded = dest / MANIFEST
    recorded = read_json(recorded) if not args.overwrite and recorded.is_file() else None
    same_vae = recorded is not None and (recorded.get("vae"), recorded.get("resolution")) == (args.vae, args.resolution)
    if same_vae and recorded.get("latent_shape") != latent_shape:
        raise UsageError(
            f"--vae {args.vae} now gives latents of shape {latent_shape} ({latent_shape[0]} channels), but "
            f"{dest / MANIFEST} records latent_shape {recorded.get('latent_shape')} from the first run: the "
            "VAE behind this name changed. Choose another --dest, or pass --overwrite to replace the dataset."
        )


def warn_about_vae_config(vae: torch.nn.Module, args: argparse.Namespace) -> None:
    """Warn where the VAE's own config names another --scale or --shift than this run records."""
    config_scale, config_shift = vae.config.get("scaling_factor"), vae.config.get("shift_factor")
    if config_scale is not None and config_scale != args.scale:
        print(f"warning: the VAE's config has scaling_factor {config_scale}, this run records --scale {args.scale}",
              file=sys.stderr)
    # diffusers: (z - shift_factor) * scale
    if config_shift and -config_shift != args.shift:
        print(f"warning: the VAE's config has shift_factor {config_shift}, i.e. --shift {-config_shift}; this run "
              f"records --shift {args.shift}", file=sys.stderr)


def manifest_base(config: dict, latent_shape: list[int], normalisation: dict, class_names: list[str], source: Path,
                  num_files: int, num_shards: int) -> dict:
    """The manifest while shards are written (complete: false); `finalize` adds the shards, labels and statistics."""
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "complete": False,
        **config,
        "latent_shape": latent_shape,
        "stored": list(shard_files(0, config["flip"], config["images"], config.get("posterior") != "sample")),
        "latent": "x = (z + shift) * scale with z = mean + std * eps; target = (mean + shift) * scale",
        "normalization": normalisation,
        "pixels": "ADM center crop, RGB, x / 127.5 - 1",
        "class_names": class_names,
        "source": str(source.resolve()),
        "source_files": num_files,
        "num_shards": num_shards,
    }


def report(dest: Path, manifest: dict, count: int, elapsed: float, world_size: int) -> None:
    """Rank 0's closing lines: the dataset, this run's speed, the unreadable files."""
    size = sum((dest / name).stat().st_size for s in manifest["shards"] for name in s["files"].values())
    print(f"done: {manifest['num_images']:,} images, latents {'x'.join(map(str, manifest['latent_shape']))} "
          f"{manifest['dtype']}, {size / 1e9:.2f} GB of shards in {dest}")
    if count:
        print(f"this run: rank 0 encoded {count:,} images in {elapsed:.1f} s ({count / elapsed:.1f} images/s"
              + (f", about {world_size}x that over all ranks)" if world_size > 1 else ")"))
    else:
        print("this run: nothing to encode, all shards were already complete and match their checksums")
    if manifest["skipped"]:
        first = manifest["skipped"][0]
        print(f"skipped {len(manifest['skipped'])} unreadable file(s), listed under \"skipped\" in manifest.json "
              f"(first: {first['path']}: {first['error']})")


def encode_dataset(
    args: argparse.Namespace,
    rank: int = 0,
    world_size: int = 1,
    local_rank: int = 0,
    barrier: Callable[[], object] = lambda: None,
) -> dict | None:
    """Encode this rank's shards (shard k belongs to rank k % world_size); rank 0 then writes the manifest."""
    source, dest = Path(args.source), Path(args.dest)
    paths, labels, class_names, num_classes = list_source(args)
    config = dataset_config(args, paths, labels, class_names, num_classes)
    check_writable(dest)
    device = select_device(args, local_rank)
    vae, dtype, latent_shape = open_vae(args, device)
    normalisation = resolve_normalisation(args, latent_shape[0])
    if normalisation["type"] == "channelwise":  # --scale / --shift play no part; SD-VAE datasets keep their config
        config.update(scale=None, shift=None, latent_norm=args.latent_norm, latent_stats=args.latent_stats,
                      latent_multiplier=args.latent_multiplier)
    check_latent_shape(args, dest, latent_shape)
    manifest = None if args.overwrite else check_destination(dest, config, normalisation)
    if normalisation["type"] == "scale" and rank == 0:
        warn_about_vae_config(vae, args)

    num_shards = math.ceil(len(paths) / args.shard_size)
    base = manifest_base(config, latent_shape, normalisation, class_names, source, len(paths), num_shards)
    if rank == 0:
        open_destination(dest, base, overwrite=args.overwrite, resumed=manifest is not None)
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
    report(dest, manifest, count, elapsed, world_size)
    return manifest


# ----------------------------------------------------------------------------------------------------------
# The encoding loop


def default_num_workers(local_world_size: int | None = None) -> int:
    """Decoding processes per rank when --num-workers is not given: the CPU cores this job may use (cli.usable_cpus)
    / its ranks on this machine - 1, at least 1, at most 16. `local_world_size` defaults to LOCAL_WORLD_SIZE (set by
    torchrun and accelerate), else 1."""
    if local_world_size is None:
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return min(16, max(1, cli.usable_cpus() // local_world_size - 1))


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


def shard_batches(shards: list[int], num_images: int, shard_size: int,
                  batch_size: int) -> tuple[list[list[int]], list[int]]:
    """The image indices of each batch of the given shards (no batch straddles two shards), and each one's shard."""
    batches, owner = [], []
    for k in shards:
        stop = min((k + 1) * shard_size, num_images)
        for i in range(k * shard_size, stop, batch_size):
            batches.append(list(range(i, min(i + batch_size, stop))))
            owner.append(k)
    return batches, owner


def encode_shards(vae, dtype: torch.dtype, source: Path, dest: Path, shards: list[int], paths: list[str],
                  labels: list[int], args: argparse.Namespace, config: dict, latent_shape: list[int],
                  progress: bool) -> int:
    """Encode and write the given shards; batches never straddle two shards. Returns the images read."""
    size = args.shard_size
    batches, owner = shard_batches(shards, len(paths), size, args.batch_size)
    if not batches:
        return 0
    workers = default_num_workers() if args.num_workers is None else args.num_workers
    loader = DataLoader(ImageFiles(source, paths, args.resolution), batch_sampler=batches, num_workers=workers,
                        collate_fn=as_list, worker_init_fn=worker_init() if workers > 0 else None)
    bar = tqdm(total=sum(map(len, batches)), unit="img", disable=not progress, desc="encode", dynamic_ncols=True)
    parts, kept, skipped, count = [], [], [], 0
    for batch, k in zip(loader, owner):
        good = [(i, img) for i, img, _ in batch if img is not None]
        skipped += [{"path": paths[i], "error": err} for i, img, err in batch if img is None]
        if good:
            kept += [i for i, _ in good]
            images = np.stack([img for _, img in good])
            latents = encode_batch(vae, images, args.flip, dtype)
            if config.get("posterior") == "sample":
                latents = sample_posterior(latents, [i for i, _ in good], config["posterior_seed"])
            latents = [a.astype(config["dtype"]) for a in latents]
            if latents[0].shape[1:] != tuple(latent_shape):
                raise UsageError(f"--vae {args.vae}: gives latents of shape {list(latents[0].shape[1:])}, but its "
                                 f"config implies {latent_shape}; this VAE architecture is not supported")
            parts.append(latents + ([images] if args.save_images else []))
        bar.update(len(batch))
        count += len(batch)
        if batch[-1][0] == min((k + 1) * size, len(paths)) - 1:  # last batch of shard k
            write_shard(dest, k, parts, kept, skipped, paths, labels, config, latent_shape)
            parts, kept, skipped = [], [], []
    bar.close()
    return count


# ----------------------------------------------------------------------------------------------------------
# The command


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    problem = gpu_launch_problem(args.device)  # before the process group: every rank stops, none hangs
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
        end_processes()
    return 0


if __name__ == "__main__":
    sys.exit(main())
