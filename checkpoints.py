"""Opening checkpoints and weights without running code from them: weights-only loads, a named allowlist, safetensors.

A pickled checkpoint can name any Python function and have it called while it is read; `torch.load(weights_only=True)`
rebuilds only tensors and plain types (numbers, strings, None, lists, tuples, dicts). What else a file may hold is
the short list below, for old checkpoints of ours (numpy RNG state arrays) and REPA's (`args` as an
`argparse.Namespace`). Anything more is refused, naming what was found, unless the user passes `--trust-checkpoint`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import random
import re
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from cli import TRUST_FLAG, TRUST_HELP  # noqa: F401  (defined without torch, for the command lines)
from integrity import atomic_write, checksum_path, verify_file

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "vae-repa/1"
STEP_FILE = re.compile(r"^\d{7,}\.pt$")  # checkpoints/NNNNNNN.pt


_reconstruct = np.zeros(0).__reduce__()[0]  # numpy's ndarray rebuilder (numpy._core in numpy 2, numpy.core before)
# The allowlist, as `(object, name in the pickle)`: numpy 1 and numpy 2 pickle the rebuilder under different modules.
ALLOWED_GLOBALS: list[tuple[Any, str]] = [
    (_reconstruct, "numpy.core.multiarray._reconstruct"),
    (_reconstruct, "numpy._core.multiarray._reconstruct"),
    (np.ndarray, "numpy.ndarray"),
    (np.dtype, "numpy.dtype"),
    (type(np.dtype(np.uint32)), f"{type(np.dtype(np.uint32)).__module__}.{type(np.dtype(np.uint32)).__qualname__}"),
    (argparse.Namespace, "argparse.Namespace"),
]


class UntrustedCheckpointError(ValueError):
    """A checkpoint that only code from the file itself could rebuild; refused unless the user trusts the file."""


def _unsafe_globals(path: Path, message: str) -> list[str]:
    """Names of the functions and classes outside the allowlist that the file's pickle refers to (read, not run)."""
    names: list[str] = []
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS):
            names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # noqa: BLE001 - a file torch cannot disassemble (old format): the error message names one
        pass
    if not names:
        names = re.findall(r"GLOBAL (\S+) was not an allowed global", message)
        names += re.findall(r"Can only build .* but got <class '([^']+)'>", message)
    return sorted(set(names))


def _reason(message: str) -> str:
    """The weights-only unpickler's own reason, from torch's long refusal message."""
    detail = message.split("WeightsUnpickler error:", 1)[-1].split("Check the documentation", 1)[0]
    return " ".join(detail.split()) or "unknown reason"


def _torch_load(path: Path, weights_only: bool) -> Any:
    # mmap (zip format only): eight ranks resuming an XL run do not each read the whole file into RAM
    return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=zipfile.is_zipfile(path))


def _load_pickled(path: Path, trust: bool, flag: str) -> Any:
    """`torch.load` on the CPU with weights_only=True and the allowlist. Anything else is refused with one line naming
    the objects found and `flag` (the option that sets `trust`), or, with `trust`, loaded unrestricted."""
    refusal = None
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS):
            return _torch_load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise ValueError(f"checkpoint {path} could not be read (UnpicklingError: {_first_line(e)})") from e
        refusal = str(e)
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        raise ValueError(f"checkpoint {path} could not be read ({type(e).__name__}: {_first_line(e)})") from e

    found = ", ".join(_unsafe_globals(path, refusal))
    if not trust:
        opt_in = f"if you trust where the file comes from, pass {flag} (which lets it run code)"
        if not found:  # no code named: damaged, or an encoding the weights-only reader does not know
            raise UntrustedCheckpointError(f"checkpoint {path} could not be read as plain data "
                                           f"({_reason(refusal)}); {opt_in}")
        raise UntrustedCheckpointError(f"checkpoint {path} holds {found}: reading it would run code from the file, "
                                       f"so it was not opened; {opt_in}")
    logger.warning("checkpoint %s: opening it with %s although it holds %s (this runs code from the file)", path,
                   flag, found or "data the weights-only reader refused")
    try:
        return _torch_load(path, weights_only=False)
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        raise ValueError(f"checkpoint {path} could not be read ({type(e).__name__}: {_first_line(e)})") from e


def _check_torch_file(path: Path) -> None:
    """ValueError when `path` is neither torch.save's zip archive nor a pickle (protocol 2 or later starts with 0x80):
    a text file, an image, a .npy passed as a checkpoint, which the pickle reader would report as data it refuses
    (advising the opt-in that runs code)."""
    with open(path, "rb") as f:
        head = f.read(8)
    # torch.save's zip (a damaged one is left to torch, which says what is wrong), a pickle of protocol 2 or later,
    # or torch's legacy format under protocol 0 or 1 (its magic number, written as text)
    if head and head[:2] != b"PK" and head[0] != 0x80 and not head.startswith(b"L1195470"):
        raise ValueError(f"{path} is not a checkpoint: expected torch.save's zip file (or a pickle) or a "
                         f".safetensors file, and it starts with {head!r}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def load_plain_file(path: str | os.PathLike, expected: str) -> Any:
    """A weights or statistics file read without running code from it: a `.safetensors` file, or any other through
    `torch.load(weights_only=True)` with no allowlist (tensors and plain types only). Anything else (a pickle that
    names functions or classes, a damaged file) is a ValueError of one line naming the file and `expected`."""
    path = Path(path)
    if path.is_file() and path.stat().st_size == 0:
        raise ValueError(f"{path} is an empty file (0 bytes); expected {expected}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ...: one line naming the file
            raise ValueError(f"{path} could not be read as safetensors ({_first_line(e)}); expected {expected}") from e
    try:
        with warnings.catch_warnings():  # torch's note on a pickle protocol it was not written with: not ours to show
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise ValueError(f"{path} could not be read (UnpicklingError: {_first_line(e)}); expected {expected}") \
                from e
        found = ", ".join(_unsafe_globals(path, str(e)))
        if not found:
            raise ValueError(f"{path} could not be read as plain data ({_reason(str(e))}); expected {expected}") from e
        raise ValueError(f"{path} holds {found}: reading it would run code from the file, so it was not opened; "
                         f"expected {expected}") from e
    except Exception as e:  # noqa: BLE001 - EOFError, RuntimeError (not a torch file), ...: one line naming the file
        raise ValueError(f"{path} could not be read ({type(e).__name__}: {_first_line(e)}); expected {expected}") \
            from e


class DamagedCheckpointError(ValueError):
    """A checkpoint whose bytes are not those written (its sha256 sidecar disagrees), or an empty file."""


def check_integrity(path: Path) -> bool:
    """Refuse an empty file or one that differs from its "<path>.sha256" (DamagedCheckpointError); True when the
    checksum was checked, False for a file without one (older checkpoints, others' files: loaded unverified)."""
    if path.stat().st_size == 0:
        raise DamagedCheckpointError(f"checkpoint {path} is an empty file (0 bytes): a copy or a write that did not "
                                     "finish; use another checkpoint")
    try:
        verified = verify_file(path)
    except ValueError as e:
        raise DamagedCheckpointError(f"checkpoint {path}: {e}") from e
    if verified is False:
        raise DamagedCheckpointError(f"checkpoint {path} is damaged: its sha256 differs from the one recorded in "
                                     f"{checksum_path(path)} when it was written, so it was not opened")
    return bool(verified)


def load_checkpoint(path: str | os.PathLike, trust: bool = False, flag: str = TRUST_FLAG, verify: bool = True) -> dict:
    """A checkpoint as a dict, on the CPU: a `.safetensors` file, or a torch file read with weights_only=True and the
    allowlist (anything else is refused, naming `flag`, unless `trust`). An empty file, or one that differs from its
    sha256 sidecar, is refused (DamagedCheckpointError); one without a sidecar is read unverified. `verify=False`
    skips that check, for processes whose rank 0 has just made it (check_integrity)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if verify:
        check_integrity(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    _check_torch_file(path)
    checkpoint = _load_pickled(path, trust, flag)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"checkpoint {path}: expected a dict, got {type(checkpoint).__name__}")
    return checkpoint


# ----------------------------------------------------------------------------------------------
# safetensors: EMA weights, with the run's arguments as JSON in the metadata


def write_safetensors(state: dict[str, torch.Tensor], args: dict, step: int, path: str | os.PathLike) -> None:
    """Write EMA weights and the run's arguments (metadata "args", JSON) as a .safetensors file, atomically."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    metadata = {"format": CHECKPOINT_FORMAT, "weights": "ema", "step": str(int(step)), "args": json.dumps(args)}
    atomic_save(tensors, path, write=lambda obj, f: f.write(save(obj, metadata=metadata)))


def read_safetensors(path: str | os.PathLike) -> dict:
    """A .safetensors file as a checkpoint dict: ours {"format", "ema", "args", "step"} when the metadata carries the
    run's arguments, else {"ema": weights} (a bare state dict, like REPA's released files)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"checkpoint {path} could not be read as safetensors ({e})") from e
    if "args" not in metadata:
        return {"ema": state}
    try:
        args = json.loads(metadata["args"])
    except json.JSONDecodeError as e:
        raise ValueError(f"checkpoint {path}: the 'args' metadata is not JSON ({e})") from e
    return {"format": metadata.get("format", CHECKPOINT_FORMAT), "ema": state, "args": args,
            "step": int(metadata.get("step", 0))}


# ----------------------------------------------------------------------------------------------
# RNG states as tensors and plain values (loadable with weights_only=True, no allowlist needed)


def rng_state(device: torch.device) -> dict:
    """Python's, numpy's, torch's (and CUDA's) global RNG states, stored as tensors and plain values."""
    version, words, gauss_next = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": {"version": version, "state": torch.tensor(words, dtype=torch.int64), "gauss_next": gauss_next},
        "numpy": {"bit_generator": np_state["bit_generator"],
                  "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore what `rng_state` saved; also reads older checkpoints (Python's tuple, numpy's legacy tuple)."""
    python = state["python"]
    if isinstance(python, dict):
        python = (python["version"], tuple(python["state"].tolist()), python["gauss_next"])
    random.setstate(python)
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        numpy_state = {"bit_generator": numpy_state["bit_generator"],
                       "state": {"key": numpy_state["key"].numpy().astype(np.uint32), "pos": numpy_state["pos"]},
                       "has_gauss": numpy_state["has_gauss"], "gauss": numpy_state["gauss"]}
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


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
