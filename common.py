"""Code shared by train.py and generate.py: model construction from run arguments, checkpoint writing and layouts."""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch

from cli import PIXEL_ROUNDINGS  # noqa: F401  (imported from here by older code)
from integrity import atomic_write
from models import build_model, model_config

CHECKPOINT_FORMAT = "vae-repa/1"


STEP_FILE = re.compile(r"^\d{7,}\.pt$")  # checkpoints/NNNNNNN.pt


class UsageError(ValueError):
    """A problem with the command line or the files it names; entry points report it without a traceback."""
# Run arguments that determine the architecture (backbone and alignment heads); saved in every checkpoint.
ARCH_KEYS = ("model", "depth", "hidden_size", "num_heads", "qk_norm", "num_classes", "latent_shape", "align",
             "vae_repa_depth", "vae_repa_head_layers", "vae_repa_head_width", "enc_type", "encoder_depth",
             "sra_student_depth", "sra_teacher_depth")


def model_from_args(args: dict, with_heads: bool = True) -> torch.nn.Module:
    """Build the backbone (SiT or LightningDiT) a run describes (keys of ARCH_KEYS), with the heads of its
    alignment methods; `with_heads=False` builds the backbone only."""
    from alignment import build_methods, head_specs  # alignment imports loss, which imports models

    channels, size, _ = args["latent_shape"]
    config = model_config(args["model"])
    config.update({k: args[k] for k in ("depth", "hidden_size") if args.get(k) is not None})
    heads = []
    if with_heads:
        heads = head_specs(build_methods(args), config["hidden_size"], config["patch_size"], channels,
                           config["depth"])
    return build_model(
        args["model"],
        input_size=size,
        in_channels=channels,
        num_classes=args["num_classes"],
        depth=args.get("depth"),
        hidden_size=args.get("hidden_size"),
        num_heads=args.get("num_heads"),
        qk_norm=args.get("qk_norm", False),
        vae_head_layers=0,
        heads=heads,
    )


def atomic_save(obj: Any, path: str | os.PathLike,
                write: Callable[[Any, BinaryIO], object] = torch.save, checksum: bool = False) -> None:
    """`write(obj, file)` (torch.save by default) through integrity.atomic_write: a temporary file in the same
    folder, fsync, rename; a crash never leaves half a file. `checksum`: also "<path>.sha256", checked on write."""
    with atomic_write(path, checksum=checksum) as f:
        write(obj, f)


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
    """diffusers AutoencoderKL from a hub id or a local folder ('ema' / 'mse': REPA's short names), or from an
    LDM-format weights file such as VA-VAE's vavae-imagenet256-f16d32-dinov2.pt (latent_codecs.load_vavae)."""
    from diffusers.models import AutoencoderKL  # slow import: keep `--help` fast

    if name in ("ema", "mse") and not Path(name).exists():
        name = f"stabilityai/sd-vae-ft-{name}"
    where = "from --vae, the checkpoint or the dataset manifest"
    if Path(name).expanduser().is_file():
        from latent_codecs import load_vavae

        try:
            return load_vavae(Path(name).expanduser())
        except (OSError, RuntimeError, KeyError, ValueError) as e:
            raise UsageError(f"VAE {name} ({where}): {e}") from e
    if name.startswith(("/", ".", "~")):
        name = str(Path(name).expanduser())
        if not Path(name).is_dir():
            raise UsageError(f"VAE {name} ({where}): no such folder")
    try:
        return AutoencoderKL.from_pretrained(name).eval()
    except (OSError, ValueError) as e:
        raise UsageError(f"VAE {name} ({where}): cannot load an AutoencoderKL ({e}). Offline, download it once "
                         f"(e.g. `huggingface-cli download {name} --local-dir vae/`) and pass the folder") from e


# How decoder output x in [-1, 1] becomes 8-bit pixels (the metrics are computed on these bytes).
# "repa": uint8(clamp(255 (x + 1) / 2)) = floor(127.5 x + 127.5), REPA's generate.py and so the paper's protocol;
# "dit": uint8(clamp(127.5 x + 128)), DiT's and SiT's sample_ddp.py: about half of all pixels one level brighter.
# (PIXEL_ROUNDINGS, the names, live in cli.py so that generate.py's flags need no torch.)


def resolve_compile(requested: bool | None, device: torch.device, deterministic: bool = False) -> bool:
    """--compile's value in train.py and generate.py: as given, or by default (None) on with CUDA, where it is
    measured faster, and off on the CPU and under train.py's --deterministic (whose exact resume on CUDA is checked
    with eager kernels)."""
    return device.type == "cuda" and not deterministic if requested is None else bool(requested)


def to_uint8(images: torch.Tensor, rounding: str = "repa") -> torch.Tensor:
    """Decoder output in [-1, 1], (N, 3, H, W) -> uint8 (N, H, W, 3), truncated after clamping to [0, 255]."""
    x = images.float()
    if rounding == "repa":
        x = 255.0 * ((x + 1) / 2)  # REPA's order of float32 operations, so the bytes match on ties too
    elif rounding == "dit":
        x = x * 127.5 + 128
    else:
        raise ValueError(f"unknown pixel rounding {rounding!r}; choose one of {PIXEL_ROUNDINGS}")
    return x.clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def decode_latents(vae: torch.nn.Module, x: torch.Tensor, scale, shift) -> torch.Tensor:
    """Diffusion-space latents -> images in [-1, 1]: z = x / scale - shift (scale, shift: numbers or per channel)."""
    scale = torch.as_tensor(scale, dtype=torch.float32, device=x.device).reshape(-1, 1, 1)
    shift = torch.as_tensor(shift, dtype=torch.float32, device=x.device).reshape(-1, 1, 1)
    return vae.decode(x.float() / scale - shift).sample


# ----------------------------------------------------------------------------------------------
# Processes and GPUs (train.py, generate.py and preprocessing/encode.py check these before any process group)


def _names_gpus(visible: str) -> bool:
    """True if a CUDA_VISIBLE_DEVICES value asks for at least one GPU (an index >= 0, a GPU- or MIG- UUID)."""
    first = visible.split(",")[0].strip()
    return first.isdigit() or first.startswith(("GPU-", "MIG-"))


def gpu_launch_problem(device: str | None = None, env: Mapping[str, str] | None = None) -> str | None:
    """One line saying why this process cannot have a GPU of its own as launched, or None if it can (or runs on
    the CPU). `device`: 'cpu', 'cuda' or None (CUDA when a GPU is visible).

    Every rank reaches the same verdict from the launcher's environment (LOCAL_WORLD_SIZE, set by torchrun and
    accelerate launch; LOCAL_RANK otherwise), so all of them stop before any collective instead of one failing
    inside it with `invalid device ordinal`."""
    env = os.environ if env is None else env
    if device is not None and torch.device(device).type == "cpu":
        return None
    visible = env.get("CUDA_VISIBLE_DEVICES")
    shown = f"CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else "CUDA_VISIBLE_DEVICES unset"
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        if device is not None:
            return f"--device {device}: no CUDA device is visible ({shown}); use --device cpu"
        if visible is not None and _names_gpus(visible):
            return (f"{shown} names GPUs, but none is visible (a wrong index, or no driver): correct it, or "
                    "run on the CPU with --device cpu")
        return None
    index = torch.device(device).index if device is not None else None
    if index is not None and index >= count:
        return f"--device {device}: only {count} GPU(s) visible ({shown})"
    local_rank = int(env.get("LOCAL_RANK", 0) or 0)
    local_world = int(env.get("LOCAL_WORLD_SIZE", 0) or 0) or local_rank + 1
    if index is not None and local_world > 1:
        return f"--device {device}: {local_world} processes on this node would share one GPU; pass --device cuda"
    if local_world > count:
        return (f"{local_world} processes on this node but {count} visible GPU(s) ({shown}): start at most {count} "
                f"per node (e.g. torchrun --nproc_per_node {count}), or run on the CPU with --device cpu")
    return None


def enable_deterministic_mode() -> None:
    """Bitwise-reproducible CUDA kernels for this process: deterministic algorithms (an error for an op that has
    none), cuBLAS with a fixed workspace, cuDNN without autotuning, and the math attention backend, whose
    backward has no atomics (flash, memory-efficient and cuDNN attention are switched off). Slower; set it
    before the first CUDA operation, because cuBLAS reads CUBLAS_WORKSPACE_CONFIG when it starts."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_mem_efficient_sdp(False)
    if hasattr(torch.backends.cuda, "enable_cudnn_sdp"):  # torch >= 2.4
        torch.backends.cuda.enable_cudnn_sdp(False)
    torch.backends.cuda.enable_math_sdp(True)
