"""The model and settings to sample from any checkpoint: ours (which records its architecture and tokenizer), REPA's
and SRA's (architecture from generate.py's flags, SD-VAE latents), and LightningDiT's releases (VA-VAE latents with
channel-wise statistics). `args` is generate.py's parsed command line (its "checkpoint" group)."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any

from alignment import model_from_args
from checkpoints import check_integrity, list_checkpoints, load_checkpoint, sampling_weights
from cli import PATH_TYPES, UsageError
from latent_data.format import REPA_DEFAULTS
from models import model_config, model_family
from models.heads import strip_wrapper_prefixes
from models.sit import SiT


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


def _check_against_tensors(arch: dict, state: dict, ckpt: Path, fix_hint: str) -> None:
    """The sizes that the architecture's arguments give the model (width, latent channels and grid, classes, blocks)
    against the checkpoint's own tensors, before anything is allocated: a file whose metadata claims 10^9 classes
    is refused here instead of building a 100 GB embedding table."""
    keys = strip_wrapper_prefixes(state)
    config = model_config(arch["model"])
    hidden = arch.get("hidden_size") or config["hidden_size"]
    depth = arch.get("depth") or config["depth"]
    channels, side = arch["latent_shape"][0], arch["latent_shape"][1]
    expected = {"x_embedder.proj.weight": lambda s: (s[0], s[1], s[2]) == (hidden, channels, config["patch_size"]),
                "pos_embed": lambda s: (s[-2], s[-1]) == ((side // config["patch_size"]) ** 2, hidden),
                "y_embedder.embedding_table.weight": lambda s: tuple(s) == (arch["num_classes"] + 1, hidden)}
    wrong = [f"{k} {tuple(keys[k].shape)}" for k, fits in expected.items() if k in keys and not fits(keys[k].shape)]
    blocks = len({k.split(".")[1] for k in keys if k.startswith("blocks.")})
    if blocks != depth:
        wrong.append(f"{blocks} blocks")
    if wrong:
        latent = "x".join(map(str, arch["latent_shape"]))
        raise UsageError(f"checkpoint {ckpt} does not fit {arch['model']} (hidden size {hidden}, {depth} blocks, "
                         f"latent {latent}, {arch['num_classes']} classes): size mismatch with its tensors, which hold "
                         f"{', '.join(wrong)}; {fix_hint}")


def verify_checkpoint(ckpt: Path) -> None:
    """Refuse an empty checkpoint or one that differs from its sha256 sidecar (reads the whole file: rank 0 does it
    once, and the other processes load without it)."""
    try:
        check_integrity(ckpt)
    except ValueError as e:
        raise UsageError(f"--ckpt: {e}") from e


def load_model(args: argparse.Namespace, ckpt: Path, verify: bool = True) -> tuple[SiT, dict]:
    """The backbone (no projector heads, eval mode, on the CPU) and what sampling needs to know about the run:
    {"arch", "vae", "latent_scale", "latent_shift", "path_type", "format", "notes"}; `verify=False` when
    verify_checkpoint has checked the file."""
    try:
        checkpoint = load_checkpoint(ckpt, trust=args.trust_checkpoint, verify=verify)
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
        vae = ckpt_args.get("vae") or REPA_DEFAULTS["vae"]
        scale, shift = ckpt_args.get("latent_scale", REPA_DEFAULTS["scale"]), ckpt_args.get("latent_shift", 0.0)
        fix_hint = "the checkpoint may be corrupt"
    elif model_family((arch := _repa_arch(args, ckpt_args))["model"]) == "LightningDiT":  # LightningDiT's release
        arch["latent_shape"] = _latent_shape_of(state, ckpt)
        vae, scale, shift = _lightningdit_tokenizer(args)
        fix_hint = "set --model / --num-classes / --qk-norm to the architecture it was trained with"
    else:  # REPA's
        vae, scale, shift = REPA_DEFAULTS["vae"], REPA_DEFAULTS["scale"], REPA_DEFAULTS["shift"]
        fix_hint = "set --model / --resolution / --num-classes / --qk-norm to the architecture it was trained with"
    arch["latent_shape"] = [int(s) for s in arch["latent_shape"]]
    _check_against_tensors(arch, state, ckpt, fix_hint)  # before anything is built from the (untrusted) args
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
