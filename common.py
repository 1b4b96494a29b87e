"""Code shared by train.py and generate.py: model construction from run arguments, checkpoint writing and layouts."""

from __future__ import annotations

import argparse
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

from models import build_model
from models.sit import SiT

CHECKPOINT_FORMAT = "vae-repa/1"


STEP_FILE = re.compile(r"^\d{7,}\.pt$")  # checkpoints/NNNNNNN.pt


class UsageError(ValueError):
    """A problem with the command line or the files it names; entry points report it without a traceback."""
# Run arguments that determine the architecture; saved in every checkpoint.
ARCH_KEYS = ("model", "depth", "hidden_size", "num_heads", "qk_norm", "encoder_depth", "head_layers", "head_width",
             "num_classes", "latent_shape", "align")


def model_from_args(args: dict, with_heads: bool = True) -> SiT:
    """Build the SiT a run describes (keys of ARCH_KEYS); `with_heads=False` builds the backbone only."""
    channels, size, _ = args["latent_shape"]
    align = with_heads and args.get("align", True)
    return build_model(
        args["model"],
        input_size=size,
        in_channels=channels,
        num_classes=args["num_classes"],
        depth=args.get("depth"),
        hidden_size=args.get("hidden_size"),
        num_heads=args.get("num_heads"),
        qk_norm=args.get("qk_norm", False),
        encoder_depth=args.get("encoder_depth"),
        vae_head_layers=args.get("head_layers", 5) if align else 0,
        vae_head_width=args.get("head_width"),
    )


def atomic_save(obj: Any, path: str | os.PathLike,
                write: Callable[[Any, BinaryIO], object] = torch.save) -> None:
    """`write(obj, file)` (torch.save by default) to a temporary file in the same folder, then rename: a crash never
    leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def list_checkpoints(folder: str | os.PathLike) -> dict[int, Path]:
    """{step: path} of the step checkpoints (`NNNNNNN.pt`) in a folder; other files are ignored."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    return {int(f.stem): f for f in folder.iterdir() if STEP_FILE.match(f.name)}


def sampling_weights(checkpoint: dict, use_ema: bool = True) -> tuple[dict, dict | None]:
    """(state dict, run args or None) to sample from, for our checkpoints and REPA's.

    Ours: {"format", "ema", "model", "args", ...}. REPA's training checkpoints: {"model", "ema", "opt",
    "args" (argparse.Namespace), "steps"}; REPA's released weights may also be a bare state dict.
    """
    if "format" in checkpoint or "ema" in checkpoint or "model" in checkpoint:
        state = checkpoint.get("ema" if use_ema else "model")
        if state is None:
            raise ValueError(f"the checkpoint holds no {'ema' if use_ema else 'model'} weights")
        args = checkpoint.get("args")
        if isinstance(args, argparse.Namespace):
            args = vars(args)
        if args is not None and not isinstance(args, dict):
            raise ValueError(f"its args are a {type(args).__name__}, expected a dict or an argparse.Namespace")
        return state, args
    if all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return checkpoint, None
    raise ValueError("unrecognised checkpoint: expected our format or REPA's ({'ema': ...} or a state dict)")


def load_vae(name: str) -> torch.nn.Module:
    """diffusers AutoencoderKL from a hub id or a local folder ('ema' / 'mse': REPA's short names)."""
    from diffusers.models import AutoencoderKL  # slow import: keep `--help` fast

    if name in ("ema", "mse") and not Path(name).exists():
        name = f"stabilityai/sd-vae-ft-{name}"
    where = "from --vae, the checkpoint or the dataset manifest"
    if name.startswith(("/", ".", "~")):
        name = str(Path(name).expanduser())
        if not Path(name).is_dir():
            raise UsageError(f"VAE {name} ({where}): no such folder")
    try:
        return AutoencoderKL.from_pretrained(name).eval()
    except (OSError, ValueError) as e:
        raise UsageError(f"VAE {name} ({where}): cannot load an AutoencoderKL ({e}). Offline, download it once "
                         f"(e.g. `huggingface-cli download {name} --local-dir vae/`) and pass the folder") from e


def decode_latents(vae: torch.nn.Module, x: torch.Tensor, scale, shift) -> torch.Tensor:
    """Diffusion-space latents -> images in [-1, 1]: z = x / scale - shift (scale, shift: numbers or per channel)."""
    scale = torch.as_tensor(scale, dtype=torch.float32, device=x.device).reshape(-1, 1, 1)
    shift = torch.as_tensor(shift, dtype=torch.float32, device=x.device).reshape(-1, 1, 1)
    return vae.decode(x.float() / scale - shift).sample
