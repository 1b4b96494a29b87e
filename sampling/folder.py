"""A sample folder: its name (every setting that changes the images), its config.json (checked on resume), the PNGs
that are still missing, and the ADM-format .npz streamed from the PNGs. Layout, for --sample-dir samples:

    samples/<name>/000000.png ...   one PNG per sample, written atomically
    samples/<name>/config.json      the sampling configuration; a different one in the same folder is an error
    samples/<name>.npz              arr_0: uint8 (N, H, W, 3), what ADM's evaluator reads
"""

from __future__ import annotations

import argparse
import json
import os
import re
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cli import UsageError, cfg_channels_in_effect
from evaluations.data import NpzImageWriter
from integrity import atomic_write, remove_stale_temps, sha256_hex
from sampling.images import read_png

CONFIG_NAME = "config.json"
PNG_NAME = re.compile(r"^\d{6}\.png$")
PART_NAME = re.compile(r"^npz-part-\d{5}-of-\d{5}\.npy$")  # a rank's share of the .npz (part_path)
# Keys of config.json that folders sampled before the key existed lack, with the value those folders had.
OLD_FOLDER_DEFAULTS = {"cfg_channels": "all"}


def npz_count(path: Path) -> int | None:
    """Number of images in an existing .npz (read from the header only), None if absent or unreadable."""
    try:
        with zipfile.ZipFile(path) as zf, zf.open("arr_0.npy") as f:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            return int(read_header[version](f)[0][0])
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None


def _read_pngs(folder: Path, indices: range, shape: tuple[int, ...], pool: ThreadPoolExecutor,
               chunk: int = 256) -> Iterator[np.ndarray]:
    """PNGs `indices` of `folder` in order, in stacked chunks; UsageError for one whose shape is not `shape`."""
    for start in range(indices.start, indices.stop, chunk):
        paths = [folder / f"{i:06d}.png" for i in range(start, min(start + chunk, indices.stop))]
        images = list(pool.map(read_png, paths))
        for path, image in zip(paths, images):
            if image.shape != shape:
                raise UsageError(f"{path} has shape {image.shape}, sample 0 has {shape}")
        yield np.stack(images)


def write_npz(folder: Path, num: int, npz_path: Path, show_progress: bool = True) -> tuple[int, ...]:
    """Stream PNGs 000000..num-1 of `folder` into an .npz holding arr_0 (uint8 NHWC), as `np.savez` would
    write it, without holding the images in memory; the file appears atomically. Returns the array shape."""
    first = read_png(folder / f"{0:06d}.png")
    writer = NpzImageWriter(npz_path, num, first.shape)
    try:
        with ThreadPoolExecutor(8) as pool, tqdm(total=num, unit="img", desc="npz", disable=not show_progress,
                                                  dynamic_ncols=True) as bar:
            for images in _read_pngs(folder, range(num), first.shape, pool):
                writer.write(images)
                bar.update(len(images))
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return (num, *first.shape)


def npz_share(num: int, rank: int, world: int) -> range:
    """The contiguous PNG indices whose pixels rank `rank` of `world` reads for the .npz (rank order = index order)."""
    return range(rank * num // world, (rank + 1) * num // world)


def part_path(folder: Path, rank: int, world: int) -> Path:
    """Rank `rank`'s share of the .npz's pixels, a .npy in the sample folder until rank 0 merges it (PART_NAME)."""
    return folder / f"npz-part-{rank:05d}-of-{world:05d}.npy"


def write_npz_part(folder: Path, num: int, rank: int, world: int) -> Path:
    """Read this rank's share of the PNGs (`npz_share`) into `part_path`, a uint8 .npy written through the atomic
    writer (a kill leaves at most a temporary file, or a part that the next `prepare_folder` removes)."""
    shape = read_png(folder / f"{0:06d}.png").shape
    share, path = npz_share(num, rank, world), part_path(folder, rank, world)
    with atomic_write(path) as f, ThreadPoolExecutor(8) as pool:
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False,
                                                 "shape": (len(share), *shape)})
        for images in _read_pngs(folder, share, shape, pool):
            f.write(np.ascontiguousarray(images, dtype=np.uint8).tobytes())
    return path


def merge_npz_parts(folder: Path, num: int, world: int, npz_path: Path, chunk: int = 256) -> tuple[int, ...]:
    """Rank 0: the parts of every rank (`write_npz_part`), in rank order, into the .npz that `write_npz` writes from
    the same PNGs (the same bytes); the parts are removed once it has its name. Returns the array shape."""
    parts = [np.load(part_path(folder, r, world), mmap_mode="r", allow_pickle=False) for r in range(world)]
    shape = read_png(folder / f"{0:06d}.png").shape
    for rank, part in enumerate(parts):
        if part.dtype != np.uint8 or part.shape != (len(npz_share(num, rank, world)), *shape):
            raise UsageError(f"{part_path(folder, rank, world)} holds {part.dtype} {part.shape}, expected uint8 "
                             f"({len(npz_share(num, rank, world))}, {', '.join(map(str, shape))})")
    writer = NpzImageWriter(npz_path, num, shape)
    try:
        for part in parts:
            for start in range(0, len(part), chunk):
                writer.write(part[start:start + chunk])
        writer.close()
    except BaseException:
        writer.abort()
        raise
    del parts
    for rank in range(world):
        part_path(folder, rank, world).unlink(missing_ok=True)
    return (num, *shape)


def guided_channels(args: argparse.Namespace, info: dict) -> str | int:
    """generate.py's --cfg-channels as it acts (cli.cfg_channels_in_effect)."""
    return cfg_channels_in_effect(args.cfg_scale, getattr(args, "cfg_channels", "all"), info["arch"]["latent_shape"][0])


def folder_name(args: argparse.Namespace, ckpt: Path, info: dict, image_size: int, precision: str) -> str:
    """REPA's naming (model-ckpt-size-vae-cfg-seed-mode) plus every other setting that changes the images."""
    ckpt_name = ckpt.stem if ckpt.parent.name != "checkpoints" else f"{ckpt.parent.parent.name}-{ckpt.stem}"
    parts = [
        info["arch"]["model"].replace("/", "-"), ckpt_name, "online" if args.no_ema else "ema",
        f"size-{image_size}", f"vae-{Path(info['vae']).name}", f"cfg-{args.cfg_scale}",
    ]
    if args.cfg_scale > 1 and (args.guidance_low, args.guidance_high) != (0.0, 1.0):
        parts.append(f"interval-{args.guidance_low}-{args.guidance_high}")
    if guided_channels(args, info) != "all":
        parts.append(f"cfg-channels-{guided_channels(args, info)}")
    parts += [f"seed-{args.global_seed}", args.mode + ("-heun" if args.heun and args.mode == "ode" else ""),
              f"{args.num_steps}steps", info["path_type"], f"{args.label_sampling}-labels", precision]
    if args.time_shift != 1:
        parts.append(f"shift-{args.time_shift}")
    if args.pixel_rounding != "repa":
        parts.append(f"{args.pixel_rounding}-pixels")
    return "-".join(parts)


def sampling_config(args: argparse.Namespace, info: dict, model: torch.nn.Module, vae: torch.nn.Module,
                    precision: str) -> dict:
    """Everything that determines the images (compared on resume); paths are kept out so files can move."""
    return {
        "model_sha256": weights_digest(model),
        "vae_sha256": weights_digest(vae),
        "weights": "online" if args.no_ema else "ema",
        "arch": info["arch"],
        "latent_scale": info["latent_scale"],
        "latent_shift": info["latent_shift"],
        "mode": args.mode,
        "num_steps": args.num_steps,
        "heun": bool(args.heun and args.mode == "ode"),
        "cfg_scale": args.cfg_scale,
        "cfg_channels": guided_channels(args, info),
        "guidance_low": args.guidance_low,
        "guidance_high": args.guidance_high,
        "path_type": info["path_type"],
        "global_seed": args.global_seed,
        "label_sampling": args.label_sampling,
        "precision": precision,
        "pixel_rounding": args.pixel_rounding,
        **({"time_shift": args.time_shift} if args.time_shift != 1 else {}),  # folders made before it still match
    }


def prepare_folder(folder: Path, npz_path: Path, num: int, config: dict, sources: dict) -> list[int]:
    """Create the sample folder or check that it holds samples of this configuration; clear stale temporary
    files. Returns the indices below `num` that have no PNG yet."""
    config_path = folder / CONFIG_NAME
    if config_path.is_file():
        stored = json.loads(config_path.read_text()).get("config") or {}
        stored = {**OLD_FOLDER_DEFAULTS, **stored}  # an older folder: the behaviour it was sampled with
        if stored != json.loads(json.dumps(config)):
            keys = sorted(k for k in set(stored) | set(config) if stored.get(k) != config.get(k))
            raise UsageError(
                f"{folder} holds samples of another configuration (differs in {', '.join(keys)}); "
                f"use another --sample-dir or move that folder away"
            )
    else:
        if npz_path.exists():
            raise UsageError(f"{npz_path} exists but {config_path} does not: refusing to overwrite it; move it away")
        if folder.is_dir() and any(PNG_NAME.match(f) for f in os.listdir(folder)):
            raise UsageError(f"{folder} holds PNGs but no {CONFIG_NAME}: their configuration is unknown; "
                                f"use another --sample-dir or move that folder away")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with atomic_write(config_path, "w") as f:
                json.dump({"config": config, "sources": sources}, f, indent=2)
        except OSError as e:
            raise UsageError(f"--sample-dir {folder.parent}: cannot write to {folder} ({e.strerror or e})") from e
    # what a killed run's atomic writes left: only temporaries of our own names (a user's other .tmp files stay)
    remove_stale_temps(folder, re.compile(rf"(\d{{6}}\.png|{re.escape(CONFIG_NAME)}|{PART_NAME.pattern[1:-1]})$"))
    for name in os.listdir(folder):  # a rank's share of an .npz that a kill left unmerged: made again at the end
        if PART_NAME.match(name):
            (folder / name).unlink(missing_ok=True)
    remove_stale_temps(folder.parent, re.compile(re.escape(npz_path.name) + "$"))
    existing = {int(f[:6]) for f in os.listdir(folder) if PNG_NAME.match(f)}
    return [i for i in range(num) if i not in existing]


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 of a module's state dict (names, dtypes, shapes, bytes): same digest, same weights."""
    def chunks() -> Iterator[bytes]:
        for name, tensor in sorted(module.state_dict().items()):
            tensor = tensor.detach().cpu().contiguous()
            yield f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode()
            yield tensor.reshape(-1).view(torch.uint8).numpy().tobytes()

    return sha256_hex(chunks())
