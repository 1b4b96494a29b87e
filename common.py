"""Code shared by train.py and generate.py: model construction from run arguments, checkpoint I/O."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

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


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the same folder, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
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


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint on the CPU; a clear error for a missing or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        # mmap: eight ranks resuming an XL run do not each read the whole file (optimizer included) into RAM
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        raise ValueError(f"checkpoint {path} could not be read ({type(e).__name__}: {e})") from e


def sampling_weights(checkpoint: dict, use_ema: bool = True) -> tuple[dict, dict | None]:
    """(state dict, run args or None) to sample from, for our checkpoints and REPA's.

    Ours: {"format", "ema", "model", "args", ...}. REPA's training checkpoints: {"model", "ema", "opt",
    "args" (argparse.Namespace), "steps"}; REPA's released weights may also be a bare state dict.
    """
    if "format" in checkpoint:
        return checkpoint["ema" if use_ema else "model"], checkpoint["args"]
    if "ema" in checkpoint or "model" in checkpoint:
        state = checkpoint.get("ema" if use_ema else "model")
        if state is None:
            raise ValueError(f"the checkpoint holds no {'ema' if use_ema else 'model'} weights")
        args = checkpoint.get("args")
        return state, (vars(args) if args is not None and not isinstance(args, dict) else args)
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
