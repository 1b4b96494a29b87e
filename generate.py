"""Sample images from a SiT checkpoint (ours or REPA's) on one or many processes: a PNG folder and an ADM-format .npz.

    torchrun --nproc_per_node 8 generate.py --ckpt runs/vae-repa-xl --cfg-scale 1.8 --guidance-high 0.7

Sample i depends only on (--global-seed, i): its label, initial noise and SDE noise come from generators seeded
by that pair, so the images do not depend on the number of processes or the batch size, and a killed run
resumes where it stopped (PNGs that exist are kept). Layout, for --sample-dir samples:

    samples/<name>/000000.png ...   one PNG per sample, written atomically
    samples/<name>/config.json      the sampling configuration; a different one in the same folder is an error
    samples/<name>.npz              arr_0: uint8 (N, H, W, 3), what ADM's evaluator reads
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import sys
import time
import zipfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cli
from cli import MODEL_NAMES, PATH_TYPES, PIXEL_ROUNDINGS, TRUST_FLAG, TRUST_HELP

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
REPA_LATENT_SCALE, REPA_LATENT_SHIFT = 0.18215, 0.0  # REPA's SD-VAE latents: x = 0.18215 * z
NOISE_STREAM, LABEL_STREAM = 0, 1  # per-sample random streams
CONFIG_NAME = "config.json"
PNG_NAME = re.compile(r"^\d{6}\.png$")


def build_parser() -> argparse.ArgumentParser:
    """The command line (no torch import: `--help` and usage errors answer at once)."""
    p = cli.parser(__doc__)
    g = p.add_argument_group("checkpoint")
    g.add_argument("--ckpt", required=True,
                   help="checkpoint file (ours, REPA's, or a .safetensors export of EMA weights), or a run directory: "
                        "then the highest step in checkpoints/")
    g.add_argument(TRUST_FLAG, action="store_true", help=TRUST_HELP)
    g.add_argument("--no-ema", action="store_true", help="sample from the online weights instead of the EMA weights")
    g.add_argument("--model", choices=MODEL_NAMES, default=None, metavar="NAME",
                   help=f"REPA's and LightningDiT's checkpoints only: architecture, one of {', '.join(MODEL_NAMES)}; "
                        f"LightningDiT-* reads LightningDiT's released checkpoints (with --vae, --latent-stats) "
                        f"(default: the checkpoint's args, else SiT-XL/2)")
    g.add_argument("--resolution", type=int, default=None,
                   help="REPA-format checkpoints only: image side in pixels; latent side = resolution // 8 "
                        "(default: the checkpoint's args, else 256)")
    g.add_argument("--num-classes", type=int, default=None,
                   help="REPA-format checkpoints only: number of classes (default: the checkpoint's args, else 1000)")
    g.add_argument("--qk-norm", action=argparse.BooleanOptionalAction, default=None,
                   help="REPA-format checkpoints only: the model uses qk-norm "
                        "(default: the checkpoint's args, else off)")
    g.add_argument("--encoder-depth", type=int, default=None,
                   help="REPA's flag: the block of REPA's projectors. Sampling does not run them, so it only is "
                        "checked against the checkpoint (a note when they disagree)")
    g.add_argument("--projector-embed-dims", default=None,
                   help="REPA's flag: its projectors' widths, comma-separated (e.g. 768); checked against the "
                        "checkpoint's projector weights like --encoder-depth")
    g.add_argument("--vae", default=None,
                   help=f"VAE id on the Hugging Face hub or local folder; 'ema' / 'mse' mean stabilityai/sd-vae-ft-*; "
                        f"or an LDM-format file (VA-VAE's vavae-imagenet256-f16d32-dinov2.pt) "
                        f"(default: the checkpoint's args, else {DEFAULT_VAE})")
    g.add_argument("--latent-stats", default=None,
                   help="LightningDiT's released checkpoints only: its latents_stats.pt (channel-wise mean and std) "
                        "(default: latents_stats.pt or *latents-stats.pt beside the --vae weights)")

    g = p.add_argument_group("sampler")
    g.add_argument("--mode", choices=("sde", "ode"), default="sde",
                   help="sde: REPA's Euler-Maruyama sampler; ode: Euler (or Heun) probability-flow ODE")
    g.add_argument("--num-steps", type=int, default=250, help="number of sampler steps")
    g.add_argument("--heun", action=argparse.BooleanOptionalAction, default=False,
                   help="ODE only: Heun's second-order corrector")
    g.add_argument("--time-shift", type=float, default=1.0,
                   help="ODE only: timestep shift of the grid, t' = s t / (1 + (s - 1) t) (1: uniform; > 1: more "
                        "steps near the noise). LightningDiT's timestep_shift a is 1/a here (its 0.3: 3.33)")
    g.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale (1: no guidance)")
    g.add_argument("--guidance-low", "--guidance_low", type=float, default=0.0,
                   help="guidance applies at times t >= this (t = 1 is noise)")
    g.add_argument("--guidance-high", "--guidance_high", type=float, default=1.0,
                   help="guidance applies at times t <= this (paper, guided XL: 0.7)")
    g.add_argument("--path-type", choices=PATH_TYPES, default=None,
                   help="interpolant the model was trained with (default: the checkpoint's args, else linear)")

    g = p.add_argument_group("samples")
    g.add_argument("--num-fid-samples", type=int, default=50_000, help="number of images")
    g.add_argument("--label-sampling", choices=("balanced", "random"), default="random",
                   help="random: a uniform class drawn from (global seed, i), the protocol of REPA and the paper; "
                        "balanced: sample i has class i %% num_classes (50 per class for 50K samples; this lowers "
                        "FID a little, so do not compare it with random-label figures)")
    g.add_argument("--global-seed", type=int, default=0, help="seed; sample i depends only on (seed, i)")
    g.add_argument("--per-proc-batch-size", type=int, default=64, help="images per batch on each process")
    g.add_argument("--pixel-rounding", choices=PIXEL_ROUNDINGS, default="repa",
                   help="decoder output x in [-1, 1] -> 8-bit pixels: repa = floor(127.5 x + 127.5) (REPA's "
                        "generate.py, the paper's protocol); dit = floor(127.5 x + 128) (DiT's and SiT's). FID and "
                        "the other metrics see these bytes: compare figures made with the same rounding")
    g.add_argument("--sample-dir", default="samples",
                   help="parent folder; samples go to <sample-dir>/<name derived from checkpoint and settings>")

    g = p.add_argument_group("hardware")
    g.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="SiT forward precision (bf16 autocast, with the matmul weights stored in bf16 once, which "
                        "gives the same outputs; or fp32). Integration is float64 and VAE decoding fp32 either way; "
                        "auto: bf16 on CUDA, fp32 on CPU")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model: two graphs, the guided and the unguided batch, compiled when "
                        "first met (a last partial batch is filled up to the full size). "
                        "Samples change only within the precision's rounding, as with another batch size, so it is "
                        "not part of the folder name (default: on with CUDA, off on the CPU)")
    g.add_argument("--device", default=None,
                   help="cuda or cpu (default: cuda when available); under torchrun each process takes cuda:LOCAL_RANK")
    g.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=False,
                   help="REPA's flag: TF32 matmuls on CUDA (faster, less precise; on in REPA by default, off here so "
                        "that fp32 sampling is fp32). Recorded in the folder name and config.json")

    g = p.add_argument_group("REPA's other flags")
    g.add_argument("--fused-attn", action=argparse.BooleanOptionalAction, default=None,
                   help="accepted: attention always runs as F.scaled_dot_product_attention here, the same sums, so it "
                        "changes nothing (a note says so)")
    g.add_argument("--legacy", action=argparse.BooleanOptionalAction, default=False,
                   help="REPA's conversion of its pre-release checkpoints: not supported (refused with a message)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.num_fid_samples < 1 or args.per_proc_batch_size < 1 or args.num_steps < 1:
        p.error("--num-fid-samples, --per-proc-batch-size and --num-steps must be positive")
    if args.legacy:
        p.error("--legacy converts REPA's pre-release checkpoint layout, which this generate.py does not read; load "
                "the file with REPA's utils.load_legacy_checkpoints, save its state dict as {'ema': ...}, and pass "
                "that file (without --legacy)")
    if args.global_seed < 0:
        p.error("--global-seed must be non-negative")
    if args.cfg_scale < 1.0:
        p.error(f"--cfg-scale must be >= 1 (1 means no guidance), got {args.cfg_scale}")
    if not 0.0 <= args.guidance_low <= args.guidance_high <= 1.0:
        p.error("need 0 <= --guidance-low <= --guidance-high <= 1")
    if not args.time_shift > 0 or args.time_shift != 1 and args.mode != "ode":
        p.error(f"--time-shift {args.time_shift}: must be positive, and applies to --mode ode only")
    if args.resolution is not None and (args.resolution < 8 or args.resolution % 8):
        p.error(f"--resolution must be a positive multiple of 8, got {args.resolution}")
    if args.num_classes is not None and args.num_classes < 1:
        p.error("--num-classes must be positive")
    if args.device is not None:
        if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
            p.error(f"--device must be cuda, cuda:N or cpu, got {args.device!r}")
    return args


if __name__ == "__main__":
    parse_args()  # --help and usage errors answer here, before torch is imported (main parses again: cheap)

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

import samplers
from alignment import model_from_args
from checkpoints import list_checkpoints, load_checkpoint, sampling_weights
from cli import UsageError
from devices import barrier, init_processes, on_rank0, resolve_compile
from evaluations.data import NpzImageWriter
from integrity import atomic_write, remove_stale_temps
from latent_codecs.autoencoder import decode_latents, load_vae
from models import model_family
from models.heads import strip_wrapper_prefixes
from models.sit import SiT
from sampling.images import to_uint8

# ----------------------------------------------------------------------------------------------
# Checkpoint -> model


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file, or the highest-step `NNNNNNN.pt` of a run directory (in `checkpoints/` or itself)."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        for folder in (path / "checkpoints", path):
            steps = list_checkpoints(folder)
            if steps:
                return steps[max(steps)]
        raise UsageError(f"--ckpt {path}: a directory without step checkpoints (checkpoints/NNNNNNN.pt)")
    raise UsageError(f"--ckpt {path}: no such file or directory")


def _repa_arch(args: argparse.Namespace, ckpt_args: dict) -> dict:
    """Architecture of a REPA-format checkpoint: flags, else the checkpoint's own args, else REPA's defaults."""
    def pick(flag: Any, key: str, default: Any) -> Any:
        return flag if flag is not None else ckpt_args.get(key, default)

    resolution = pick(args.resolution, "resolution", 256)
    return {
        "model": pick(args.model, "model", "SiT-XL/2"),
        "num_classes": pick(args.num_classes, "num_classes", 1000),
        "qk_norm": bool(pick(args.qk_norm, "qk_norm", False)),
        "latent_shape": [4, resolution // 8, resolution // 8],
    }


def _latent_shape_of(state: dict, ckpt: Path) -> list[int]:
    """[C, H, W] of the latents a (LightningDiT) checkpoint was trained on, from its patch embedding and its
    position embedding: channels, and grid side x patch size."""
    keys = strip_wrapper_prefixes(state)
    if "x_embedder.proj.weight" not in keys or "pos_embed" not in keys:
        raise UsageError(f"checkpoint {ckpt}: no x_embedder.proj.weight / pos_embed, so not a LightningDiT")
    _, channels, patch, _ = keys["x_embedder.proj.weight"].shape
    side = math.isqrt(keys["pos_embed"].shape[1]) * patch
    return [int(channels), side, side]


def _lightningdit_tokenizer(args: argparse.Namespace) -> tuple[str, list[float], list[float]]:
    """VAE and channel-wise normalisation of a released LightningDiT: --vae (VA-VAE's file) and its statistics,
    x = (z - mean) / std, i.e. scale = 1 / std and shift = -mean (LightningDiT's latent_multiplier is 1)."""
    from latent_codecs import read_latent_stats, stats_beside

    if args.vae is None:
        raise UsageError("LightningDiT's checkpoints sample VA-VAE latents: pass --vae PATH/vavae-imagenet256-f16d32-"
                         "dinov2.pt (from the Hugging Face repository hustvl/vavae-imagenet256-f16d32-dinov2, with "
                         "its latents_stats.pt beside it)")
    stats = args.latent_stats or stats_beside(args.vae) or str(Path(args.vae).expanduser().parent / "latents_stats.pt")
    try:
        mean, std = read_latent_stats(stats)
    except (OSError, KeyError, ValueError, RuntimeError) as e:
        raise UsageError(f"--latent-stats {stats}: {e}") from e
    return args.vae, (1 / std.flatten().double()).tolist(), (-mean.flatten().double()).tolist()


def _check_arch_flags(args: argparse.Namespace, arch: dict, ckpt: Path) -> None:
    """Our checkpoints carry their architecture; a flag that contradicts it is a mistake."""
    given = {"--model": (args.model, arch["model"]), "--num-classes": (args.num_classes, arch["num_classes"]),
             "--qk-norm": (args.qk_norm, bool(arch.get("qk_norm", False)))}
    for flag, (value, stored) in given.items():
        if value is not None and value != stored:
            raise UsageError(f"{flag} {value} contradicts checkpoint {ckpt}, whose run used {stored}; "
                                f"drop the flag (it is only for REPA-format checkpoints)")


def _projector_notes(args: argparse.Namespace, state: dict, ckpt_args: dict, ours: bool, ckpt: Path) -> list[str]:
    """REPA's --encoder-depth / --projector-embed-dims against what the checkpoint holds: notes, not errors (REPA's
    sampling scripts pass them, and the projectors they describe play no part in sampling)."""
    keys = strip_wrapper_prefixes(state)
    dims = [int(keys[f"projectors.{i}.4.weight"].shape[0]) for i in range(len(keys))
            if f"projectors.{i}.4.weight" in keys]
    align = ckpt_args.get("align")  # our older checkpoints: a bool, and encoder_depth was VAE-REPA's block
    has_repa = bool(dims) or not ours or (isinstance(align, list) and "repa" in align)
    depth = ckpt_args.get("encoder_depth") if has_repa and not isinstance(align, bool) else None
    notes = []
    if args.projector_embed_dims is not None:
        given = [int(d) for d in str(args.projector_embed_dims).split(",") if d.strip()]
        if given != dims:
            notes.append(f"--projector-embed-dims {args.projector_embed_dims}: checkpoint {ckpt} holds "
                         f"{'projectors of widths ' + ','.join(map(str, dims)) if dims else 'no REPA projectors'}")
    if args.encoder_depth is not None and depth is not None and args.encoder_depth != depth:
        notes.append(f"--encoder-depth {args.encoder_depth}: checkpoint {ckpt} placed REPA's projectors after block "
                     f"{depth}")
    return [n + "; sampling does not run the projectors, so the images are the same" for n in notes]


def load_model(args: argparse.Namespace, ckpt: Path) -> tuple[SiT, dict]:
    """The backbone (no projector heads, eval mode, on the CPU) and what sampling needs to know about the run:
    {"arch", "vae", "latent_scale", "latent_shift", "path_type", "format", "notes"}."""
    try:
        checkpoint = load_checkpoint(ckpt, trust=args.trust_checkpoint)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"--ckpt: {e}") from e
    ours = "format" in checkpoint
    if args.no_ema and "model" not in checkpoint:
        raise UsageError(f"--no-ema: checkpoint {ckpt} holds no online weights ('model')")
    try:
        state, ckpt_args = sampling_weights(checkpoint, use_ema=not args.no_ema)
    except (KeyError, ValueError) as e:
        raise UsageError(f"checkpoint {ckpt}: {e}") from e
    ckpt_args = dict(ckpt_args or {})

    if ours:
        missing = [k for k in ("model", "num_classes", "latent_shape") if k not in ckpt_args]
        if missing:
            raise UsageError(f"checkpoint {ckpt}: its args lack {missing}")
        arch = {k: ckpt_args[k] for k in ("model", "depth", "hidden_size", "num_heads", "qk_norm", "num_classes",
                                          "latent_shape") if k in ckpt_args}
        _check_arch_flags(args, arch, ckpt)
        vae = ckpt_args.get("vae") or DEFAULT_VAE
        scale, shift = ckpt_args.get("latent_scale", REPA_LATENT_SCALE), ckpt_args.get("latent_shift", 0.0)
        fix_hint = "the checkpoint may be corrupt"
    elif model_family((arch := _repa_arch(args, ckpt_args))["model"]) == "LightningDiT":  # LightningDiT's release
        arch["latent_shape"] = _latent_shape_of(state, ckpt)
        vae, scale, shift = _lightningdit_tokenizer(args)
        fix_hint = "set --model / --num-classes / --qk-norm to the architecture it was trained with"
    else:  # REPA's
        vae, scale, shift = DEFAULT_VAE, REPA_LATENT_SCALE, REPA_LATENT_SHIFT
        fix_hint = "set --model / --resolution / --num-classes / --qk-norm to the architecture it was trained with"
    arch["latent_shape"] = [int(s) for s in arch["latent_shape"]]
    notes = _projector_notes(args, state, ckpt_args, ours, ckpt)

    try:
        model = model_from_args(arch, with_heads=False)
    except (KeyError, ValueError) as e:
        raise UsageError(f"checkpoint {ckpt}: cannot build {arch['model']} ({e})") from e
    try:
        model.load_backbone_state_dict(state)
    except (KeyError, RuntimeError) as e:
        detail = str(e).replace("\n", " ")
        raise UsageError(
            f"checkpoint {ckpt} does not fit {arch['model']} (latent {'x'.join(map(str, arch['latent_shape']))}, "
            f"{arch['num_classes']} classes, qk-norm {arch.get('qk_norm', False)}): {fix_hint}. "
            f"Details: {detail[:400]}"
        ) from e
    del checkpoint, state
    info = {
        "arch": arch,
        "vae": args.vae or vae,
        "latent_scale": scale,
        "latent_shift": shift,
        "path_type": args.path_type or ckpt_args.get("path_type") or "linear",
        "format": "vae-repa" if ours else "repa",
        "notes": notes,
    }
    if info["path_type"] not in PATH_TYPES:
        raise UsageError(f"checkpoint {ckpt}: unknown path type {info['path_type']!r}; set --path-type")
    return model.eval(), info


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 of a module's state dict (names, dtypes, shapes, bytes): same digest, same weights."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Per-sample randomness: everything about sample i comes from (global seed, i).


def sample_generator(global_seed: int, index: int, stream: int) -> torch.Generator:
    """A CPU generator for one sample and one purpose (noise or label), seeded by hashing (seed, index, stream)."""
    seed = np.random.SeedSequence([global_seed, index, stream]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(seed))


def sample_labels(indices: list[int], num_classes: int, mode: str, global_seed: int) -> torch.Tensor:
    """Class of each sample: `i % num_classes` (balanced) or uniform from the sample's own label stream."""
    if mode == "balanced":
        return torch.tensor([i % num_classes for i in indices], dtype=torch.long)
    if mode == "random":
        draws = [torch.randint(num_classes, (1,), generator=sample_generator(global_seed, i, LABEL_STREAM))
                 for i in indices]
        return torch.cat(draws)
    raise ValueError(f"unknown label sampling {mode!r}")


# ----------------------------------------------------------------------------------------------
# Pixels and files


def save_png(image: np.ndarray, path: Path) -> None:
    """Write a PNG through a temporary file and a rename: a killed run never leaves a truncated image."""
    with atomic_write(path) as f:
        Image.fromarray(image).save(f, format="PNG")


def read_png(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            image = np.asarray(im)
    except OSError as e:
        raise UsageError(f"{path} is unreadable ({e}); delete it and rerun to sample it again") from e
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise UsageError(f"{path} is not an 8-bit RGB image (shape {image.shape}); delete it and rerun")
    return image


def npz_count(path: Path) -> int | None:
    """Number of images in an existing .npz (read from the header only), None if absent or unreadable."""
    try:
        with zipfile.ZipFile(path) as zf, zf.open("arr_0.npy") as f:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            return int(read_header[version](f)[0][0])
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None


def write_npz(folder: Path, num: int, npz_path: Path, show_progress: bool = True) -> tuple[int, ...]:
    """Stream PNGs 000000..num-1 of `folder` into an .npz holding arr_0 (uint8 NHWC), as `np.savez` would
    write it, without holding the images in memory; the file appears atomically. Returns the array shape."""
    first = read_png(folder / f"{0:06d}.png")
    writer = NpzImageWriter(npz_path, num, first.shape)
    chunk = 256
    try:
        with ThreadPoolExecutor(8) as pool, tqdm(total=num, unit="img", desc="npz", disable=not show_progress,
                                                  dynamic_ncols=True) as bar:
            for start in range(0, num, chunk):
                paths = [folder / f"{i:06d}.png" for i in range(start, min(start + chunk, num))]
                images = list(pool.map(read_png, paths))
                for path, image in zip(paths, images):
                    if image.shape != first.shape:
                        raise UsageError(f"{path} has shape {image.shape}, sample 0 has {first.shape}")
                writer.write(np.stack(images))
                bar.update(len(paths))
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return (num, *first.shape)


def folder_name(args: argparse.Namespace, ckpt: Path, info: dict, image_size: int, precision: str) -> str:
    """REPA's naming (model-ckpt-size-vae-cfg-seed-mode) plus every other setting that changes the images."""
    ckpt_name = ckpt.stem if ckpt.parent.name != "checkpoints" else f"{ckpt.parent.parent.name}-{ckpt.stem}"
    parts = [
        info["arch"]["model"].replace("/", "-"), ckpt_name, "online" if args.no_ema else "ema",
        f"size-{image_size}", f"vae-{Path(info['vae']).name}", f"cfg-{args.cfg_scale}",
    ]
    if args.cfg_scale > 1 and (args.guidance_low, args.guidance_high) != (0.0, 1.0):
        parts.append(f"interval-{args.guidance_low}-{args.guidance_high}")
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
    for stale in folder.glob(".*.tmp"):  # the folder is ours: anything temporary in it was left by a killed run
        stale.unlink(missing_ok=True)
    remove_stale_temps(folder.parent, re.compile(re.escape(npz_path.name) + "$"))
    existing = {int(f[:6]) for f in os.listdir(folder) if PNG_NAME.match(f)}
    return [i for i in range(num) if i not in existing]


@torch.inference_mode()
def sample_batch(model: SiT, vae: torch.nn.Module, indices: list[int], args: argparse.Namespace, info: dict,
                 device: torch.device, precision: str) -> np.ndarray:
    """uint8 images (B, H, W, 3) of samples `indices`."""
    latent_shape = info["arch"]["latent_shape"]
    generators = [sample_generator(args.global_seed, i, NOISE_STREAM) for i in indices]
    z = samplers.randn((len(indices), *latent_shape), generators, device, dtype=torch.float32)
    y = sample_labels(indices, model.num_classes, args.label_sampling, args.global_seed).to(device)
    kwargs = dict(model=model, latents=z, y=y, num_steps=args.num_steps, heun=args.heun, cfg_scale=args.cfg_scale,
                  guidance_low=args.guidance_low, guidance_high=args.guidance_high, path_type=info["path_type"])
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision.startswith("bf16")):
        if args.mode == "ode":
            x = samplers.euler_sampler(**kwargs, time_shift=args.time_shift)
        else:
            # the SDE noise of sample i continues its own generator, after its initial noise
            x = samplers.euler_maruyama_sampler(**kwargs, generator=generators)
    images = decode_latents(vae, x, info["latent_scale"], info["latent_shift"])
    return to_uint8(images, args.pixel_rounding).cpu().numpy()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank, world = 0, 1
    try:
        rank, world, device = init_processes(args.device)
        return _generate(args, rank, world, device)
    except (UsageError, OSError) as e:
        prefix = f"[rank {rank}] " if world > 1 else ""
        cli.print_error(f"{prefix}generate.py: error: {e}")
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _generate(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> int:
    log = (lambda msg: print(msg, flush=True)) if rank == 0 else (lambda msg: None)
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    if args.tf32 and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # REPA's --tf32
        precision += "-tf32"  # in the folder name and config.json: the images differ
    elif args.tf32:
        log("note: --tf32 changes nothing on the CPU")
    if args.fused_attn is not None:
        log(f"note: --{'' if args.fused_attn else 'no-'}fused-attn changes nothing here: attention always runs as "
            "F.scaled_dot_product_attention")
    ckpt = resolve_checkpoint(args.ckpt)
    model, info = load_model(args, ckpt)
    for note in info["notes"]:
        log(f"note: {note}")
    vae = on_rank0(lambda: load_vae(info["vae"]), rank, world, then_others=True)  # rank 0 downloads it once
    image_size = info["arch"]["latent_shape"][1] * 2 ** (len(vae.config.block_out_channels) - 1)
    if vae.config.latent_channels != info["arch"]["latent_shape"][0]:
        raise UsageError(f"--vae {info['vae']}: {vae.config.latent_channels} latent channels, the model "
                            f"expects {info['arch']['latent_shape'][0]}")
    if info["format"] == "vae-repa" and args.resolution not in (None, image_size):
        raise UsageError(f"--resolution {args.resolution} contradicts checkpoint {ckpt}, whose images are "
                            f"{image_size} px; drop the flag (it is only for REPA-format checkpoints)")

    name = folder_name(args, ckpt, info, image_size, precision)
    folder = Path(args.sample_dir) / name
    npz_path = Path(args.sample_dir) / f"{name}.npz"
    config = on_rank0(lambda: sampling_config(args, info, model, vae, precision), rank, world)
    sources = {"ckpt": str(ckpt.resolve()), "vae": info["vae"]}
    pending = on_rank0(lambda: prepare_folder(folder, npz_path, args.num_fid_samples, config, sources), rank, world)
    mine = pending[rank::world]  # every world-th missing index: the images do not depend on the split
    compile_model = resolve_compile(args.compile, device)
    net = samplers.sampling_model(model.to(device), precision, compile_model)  # after the weights' digest
    vae.to(device)
    log(f"Sampling {len(pending)} of {args.num_fid_samples} images ({args.num_fid_samples - len(pending)} already "
        f"there) from {ckpt} ({info['arch']['model']}, {'online' if args.no_ema else 'EMA'} weights) on {world} "
        f"process(es), {precision}{', compiled' if compile_model else ''}, into {folder}")

    start = time.time()
    bar = tqdm(total=len(pending), unit="img", desc="sampling", disable=rank != 0, dynamic_ncols=True)
    saves: list[Future] = []
    with ThreadPoolExecutor(4) as pool:  # PNG encoding overlaps the next batch
        for b in range(0, len(mine), args.per_proc_batch_size):
            indices = mine[b:b + args.per_proc_batch_size]
            # compiled: a last partial batch after full ones is filled up with copies of its last sample, so that it
            # runs their graphs instead of compiling two more (each sample depends only on its own index)
            fill = args.per_proc_batch_size - len(indices) if compile_model and b > 0 else 0
            images = sample_batch(net, vae, indices + indices[-1:] * fill, args, info, device, precision)[:len(indices)]
            for future in saves:
                future.result()
            saves = [pool.submit(save_png, image, folder / f"{i:06d}.png") for i, image in zip(indices, images)]
            bar.update(min(len(indices) * world, bar.total - bar.n))  # rank 0 extrapolates to all ranks
        for future in saves:
            future.result()
    bar.close()
    elapsed = time.time() - start
    barrier(world)

    def finish() -> tuple[int, ...]:
        missing = [i for i in range(args.num_fid_samples) if not (folder / f"{i:06d}.png").is_file()]
        if missing:
            raise UsageError(f"{len(missing)} samples missing in {folder} (first: {missing[0]:06d}.png)")
        if npz_count(npz_path) == args.num_fid_samples and not pending:
            return (args.num_fid_samples, image_size, image_size, 3)
        return write_npz(folder, args.num_fid_samples, npz_path)

    shape = on_rank0(finish, rank, world)
    rate = len(pending) / elapsed if elapsed > 0 else 0.0
    log(f"Done: {len(pending)} new images in {elapsed:.1f}s ({rate:.2f} img/s on {world} process(es)); "
        f"{args.num_fid_samples} PNGs in {folder}; {npz_path} holds arr_0 {tuple(shape)} uint8")
    # Leave together: a rank that tears its process group down while another is still in the last broadcast can
    # abort it (seen with gloo: "terminate called without an active exception").
    barrier(world)
    return 0


if __name__ == "__main__":
    sys.exit(main())
