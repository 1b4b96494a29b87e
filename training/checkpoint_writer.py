"""Checkpoints written in the background: rank 0 snapshots the state to CPU memory, one thread writes it through
checkpoints.atomic_save (checksum, sidecar, rename) and then applies the retention rule; at most one write in flight."""

from __future__ import annotations

import copy
import errno
import logging
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from checkpoints import atomic_save, list_checkpoints
from integrity import checksum_path

logger = logging.getLogger("train")


# ----------------------------------------------------------------------------------------------
# Retention


def checkpoint_steps_to_keep(steps: list[int], keep_last: int, keep_every: int) -> set[int]:
    """The retention rule: the newest `keep_last` checkpoints and every multiple of `keep_every` (the checkpoint
    just written is always kept as well)."""
    steps = sorted(steps)
    keep = set(steps[-keep_last:]) if keep_last > 0 else set()
    if keep_every > 0:
        keep |= {s for s in steps if s % keep_every == 0}
    return keep


def written_by_us(path: Path) -> bool:
    """True when `path` has the sidecar our writer gives every checkpoint, naming it ("<sha256>  <name>")."""
    try:
        words = checksum_path(path).read_text().split()
    except OSError:
        return False
    return len(words) == 2 and len(words[0]) == 64 and words[1] == path.name


def prune_checkpoints(folder: Path, step: int, keep_last: int, keep_every: int, eval_every: int = 0) -> None:
    """Delete, with their sidecars, the checkpoints the retention rule drops; `step` (just written) stays, and so do
    files our writer's sidecar does not prove it wrote."""
    existing = list_checkpoints(folder)
    keep = checkpoint_steps_to_keep(list(existing), keep_last, keep_every) | {step}
    if eval_every > 0:  # each logged metric stays reproducible from its checkpoint
        keep |= {s for s in existing if s % eval_every == 0}
    for s in sorted(set(existing) - keep):
        if not written_by_us(existing[s]):
            logger.info("retention: kept %s, which has no sidecar of ours (delete it by hand if it is not needed)",
                        existing[s])
            continue
        existing[s].unlink()
        checksum_path(existing[s]).unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------
# The snapshot


def snapshot(state: Any, pin: bool = False) -> Any:
    """A copy of `state` that training may not touch: nested dicts, lists and tuples copied (a state dict's class and
    `_metadata` kept), every tensor's storage copied to CPU memory once (pinned with `pin`) with the tensor's view of
    it, so that torch.save writes the same bytes as from the live state. Copies from a GPU are queued on its current
    stream: call `torch.cuda.current_stream().synchronize()` (or an event recorded after) before reading them."""
    storages: dict[tuple, torch.UntypedStorage] = {}

    def copy_tensor(t: torch.Tensor) -> torch.Tensor:
        source = t.untyped_storage()
        key = (source.device, source.data_ptr(), source.nbytes())
        target = storages.get(key) if source.nbytes() else None
        if target is None:
            target = torch.empty(source.nbytes(), dtype=torch.uint8, pin_memory=pin).untyped_storage()
            target.copy_(source, non_blocking=pin)
            storages[key] = target
        out = torch.empty(0, dtype=t.dtype).set_(target, t.storage_offset(), t.size(), t.stride())
        return out.requires_grad_(t.requires_grad)

    def walk(obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            return copy_tensor(obj)
        if isinstance(obj, dict):
            out = copy.copy(obj)  # the same class, with its attributes (a state dict's _metadata)
            if hasattr(out, "__dict__"):
                out.__dict__ = copy.deepcopy(obj.__dict__)
            for k, v in obj.items():
                out[k] = walk(v)
            return out
        if isinstance(obj, list):
            return [walk(v) for v in obj]
        if type(obj) is tuple:
            return tuple(walk(v) for v in obj)
        return copy.deepcopy(obj)

    return walk(state)


# ----------------------------------------------------------------------------------------------
# The writer


def write_checkpoint(state: Any, path: Path) -> None:
    """The write itself: atomically, with the sha256 sidecar, read back and compared before the file takes its name."""
    atomic_save(state, path, checksum=True)


def state_bytes(state: Any) -> int:
    """The bytes of the tensors' storages in `state`, each storage counted once: about the size torch.save writes."""
    seen: dict[tuple, int] = {}
    for t in _tensors(state):
        storage = t.untyped_storage()
        seen[(storage.device, storage.data_ptr(), storage.nbytes())] = storage.nbytes()
    return sum(seen.values())


def _size(n: int) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit} ({n} bytes)"
    return f"{n} bytes"


def _os_error(error: BaseException) -> OSError | None:
    """The OSError behind `error`: torch.save reports a failed write as a RuntimeError ("[enforce fail at
    inline_container.cc:...]") raised while the file's OSError was being handled."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def failure_line(path: Path, error: BaseException, needed: int | None = None) -> str:
    """One line naming the checkpoint that could not be written, why, and what is left; for a full disk, the bytes
    the checkpoint needs (`needed`, its tensors' bytes) and the bytes free there."""
    cause = _os_error(error)
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    full = (cause is not None and cause.errno == errno.ENOSPC) or (
        needed is not None and free is not None and free < needed)
    if full:
        why = "no space left on device: it needs about " + (_size(needed) if needed is not None else "more") + (
            f", {_size(free)} free there" if free is not None else "")
    elif cause is not None:
        why = cause.strerror or str(cause)
    else:
        why = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    fix = "free space there" if full else "fix the cause"
    return (f"checkpoint {path} could not be written ({why}); the checkpoints written before it are intact: "
            f"{fix} and continue with --resume latest")


class CheckpointWriter:
    """Writes checkpoints in one background thread (or on the caller's, with `background=False`), one at a time.

    `submit` waits for the write in flight, snapshots the state (training may change the live one as soon as it
    returns) and starts the next write; after it, `after` (the retention rule) runs, only once the file is written
    and verified. `failure` is the one-line reason of a failed write (the guard stops the run on it); a writer that
    failed writes nothing more. As a context manager it waits for the write in flight however the block ends."""

    def __init__(self, background: bool = True):
        self.background = background
        self.failure: str | None = None
        self._thread: threading.Thread | None = None

    @property
    def in_flight(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the write in flight (at most `timeout` seconds); True when none is in flight any more."""
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.in_flight

    def submit(self, state: dict, path: str | Path, after: Callable[[], None] | None = None) -> None:
        self.wait()
        if self.failure is not None:
            return
        path = Path(path)
        if not self.background:
            self._write(state, path, after, None)
            return
        gpu = next((t.device for t in _tensors(state) if t.is_cuda), None)
        copied = snapshot(state, pin=gpu is not None)
        ready = torch.cuda.current_stream(gpu).record_event() if gpu is not None else None
        self._thread = threading.Thread(target=self._write, args=(copied, path, after, ready), name="write-checkpoint")
        self._thread.start()

    def _write(self, state: Any, path: Path, after: Callable[[], None] | None, ready) -> None:
        try:
            if ready is not None:
                ready.synchronize()  # the copies from the GPU have landed
            write_checkpoint(state, path)
            if after is not None:
                after()
            logger.info("saved checkpoint %s", path)
        except Exception as e:  # noqa: BLE001 - reported through `failure`, and by the guard on every rank
            self.failure = failure_line(path, e, state_bytes(state))

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.wait()
        if self.failure is not None and (error is None or self.failure not in str(error)):
            logger.error("error: %s", self.failure)  # not the error that ends the run: logged all the same


def _tensors(obj: Any):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)
