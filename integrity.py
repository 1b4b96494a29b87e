"""File integrity, torch-free: the one atomic writer, sha256 checksums, clean-up of interrupted writes, latent-shard
verification in the background, and worker processes that die with their parent. See docs/integrity.md."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import re
import secrets
import signal
import sys
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

# The atomic writer's temporary files: ".<final name>.<8 hex digits>.tmp" in the folder of the final file, e.g.
# checkpoints/.0000020.pt.3fa4b2c1.tmp. Only names of this pattern are ever removed as leftovers.
TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.[0-9a-f]{8}\.tmp$")
CHECKSUM_SUFFIX = ".sha256"  # sidecar "<file>.sha256": "<hex digest>  <file name>\n", as sha256sum writes it
CHUNK = 1 << 24


def sha256_hex(chunks: Iterable[bytes]) -> str:
    """Hex sha256 of the concatenated chunks: the one hash of files, listings and weights."""
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 16 MiB chunks."""
    with open(path, "rb") as f:
        return sha256_hex(iter(lambda: f.read(CHUNK), b""))


def checksum_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + CHECKSUM_SUFFIX)


class _HashingWriter:
    """A binary file that also hashes what is written to it (torch.save, np.save and json only call write)."""

    def __init__(self, f: IO[bytes]):
        self._f, self.digest = f, hashlib.sha256()

    def write(self, data) -> int:
        self.digest.update(data)
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a directory be opened or synced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", checksum: bool = False) -> Iterator[IO[Any]]:
    """Write a file so that it appears complete or not at all: yields a file object (mode "wb" or "w") on a
    temporary name in the same folder (TEMP_NAME), then fsync and rename over `path`. The file gets the mode
    open() would give it (0666 less the umask), not mkstemp's 0600.

    With `checksum` (binary mode), what was written is hashed on the way and read back from the disk; the two must
    agree, and "<path>.sha256" is written before the file takes its name, so a file of ours that has a name always
    has its checksum beside it. A failure or a kill leaves at most a temporary file, removed by
    `remove_stale_temps` on the next start."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write: mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, flags, 0o666)  # the umask applies, as for open()
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            out = _HashingWriter(f) if checksum else f
            yield out
            f.flush()
            os.fsync(f.fileno())
        if checksum:
            written, on_disk = out.digest.hexdigest(), sha256_file(tmp)
            if written != on_disk:
                raise OSError(f"{path}: the bytes read back differ from those written (sha256 {on_disk} vs "
                              f"{written}); the storage is failing, the file was not kept")
            with atomic_write(checksum_path(path), "w") as side:
                side.write(f"{written}  {path.name}\n")
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_write(path) as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def recorded_checksum(path: str | os.PathLike) -> str | None:
    """The sha256 recorded in "<path>.sha256", or None when there is no sidecar (an older file)."""
    side = checksum_path(path)
    try:
        text = side.read_text().split()
    except FileNotFoundError:
        return None
    if not text or not re.fullmatch(r"[0-9a-f]{64}", text[0]):
        raise ValueError(f"{side}: not a sha256 checksum file")
    return text[0]


def verify_file(path: str | os.PathLike) -> bool | None:
    """True if the file matches its recorded sha256, False if it does not, None if none is recorded."""
    expected = recorded_checksum(path)
    if expected is None:
        return None
    return sha256_file(path) == expected


def inside(folder: str | os.PathLike, name: Any) -> Path | None:
    """`folder / name` for a path read from a file (a manifest, a labels file, a sidecar), or None when it leaves
    the folder: an absolute path, `..`, or a symbolic link leading out (both resolved, links followed). A name
    that is not a non-empty string is None too."""
    if not isinstance(name, str) or not name or "\0" in name:
        return None
    folder = Path(folder)
    path = folder / name
    try:
        if not path.resolve().is_relative_to(folder.resolve()):
            return None
    except (OSError, RuntimeError):  # a loop of links
        return None
    return path


def leaving(folder: str | os.PathLike, names: Iterable[Any]) -> list[Any]:
    """The names among `names` that `inside` refuses, with one resolve per directory (a million image paths of a
    labels file take seconds, not minutes): a file's own name is resolved only when it is a symbolic link."""
    folder = Path(folder)
    directories: dict[str, bool] = {}
    refused = []
    for name in names:
        if not isinstance(name, str) or not name or "\0" in name:
            refused.append(name)
            continue
        head, _, tail = name.rpartition("/")
        if tail in ("", ".", "..") or not head and name.startswith("/"):
            ok = inside(folder, name) is not None
        else:
            if head not in directories:
                directories[head] = inside(folder, head or ".") is not None
            link = os.path.islink(os.path.join(folder, name))
            ok = directories[head] and (not link or inside(folder, name) is not None)
        if not ok:
            refused.append(name)
    return refused


def remove_stale_temps(folder: str | os.PathLike, names: re.Pattern | None = None) -> list[Path]:
    """Delete the temporary files that interrupted atomic writes left in `folder` (TEMP_NAME; when `names` is
    given, only those whose final name it matches). Call it where no other process of ours writes into the folder
    at the same time. Returns the removed paths."""
    folder, removed = Path(folder), []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = TEMP_NAME.match(p.name)
        if m and p.is_file() and (names is None or names.match(m["name"])):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


# ----------------------------------------------------------------------------------------------
# Worker processes


def die_with_parent(worker_id: int | None = None, parent_pid: int | None = None) -> None:
    """DataLoader `worker_init_fn`: ask Linux to SIGKILL this process when its parent dies (PR_SET_PDEATHSIG),
    so that a killed run leaves no worker behind. Elsewhere a no-op (other systems fall back on torch's own
    watchdog). `parent_pid` closes the race where the parent died before this call. Linux sends the signal when the
    *thread* that started the worker ends: iterate the loader from a thread that outlives it (the main thread)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if parent_pid is not None and os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGKILL)


def as_list(items: list) -> list:
    """A DataLoader's collate_fn for items that stay as they are (paths, arrays, error strings): the list itself."""
    return items


def worker_init(parent_pid: int | None = None):
    """A picklable worker_init_fn that calls `die_with_parent` for this process's workers."""
    import functools

    return functools.partial(die_with_parent, parent_pid=os.getpid() if parent_pid is None else parent_pid)


# ----------------------------------------------------------------------------------------------
# Latent shards


class ShardVerifier:
    """Hash a dataset's shard files against the sha256 its manifest records, in a background thread.

    `files`: [(path, expected hex digest)]. `problem()` is None while all is well (or still running), else one line
    naming the first damaged file and `repair`, the command that rewrites it."""

    def __init__(self, files: list[tuple[Path, str]], repair: str):
        self.files, self.repair = files, repair
        self.bytes = 0
        self.seconds = 0.0
        self._problem: str | None = None
        self._thread = threading.Thread(target=self._run, name="verify-data", daemon=True)

    def start(self) -> ShardVerifier:
        self._thread.start()
        return self

    def _run(self) -> None:
        import time

        start = time.perf_counter()
        for path, expected in self.files:
            try:
                actual = sha256_file(path)
            except OSError as e:
                self._problem = f"{path} cannot be read ({e.strerror or e}); {self.repair}"
                return
            self.bytes += path.stat().st_size
            if actual != expected:
                self._problem = (f"{path} is damaged: its sha256 {actual[:16]}... differs from the {expected[:16]}... "
                                 f"recorded in manifest.json. Repair it with {self.repair}")
                return
        self.seconds = time.perf_counter() - start

    def problem(self, wait: bool = False, timeout: float | None = None) -> str | None:
        """The first damaged file's line, or None; with `wait`, after the check has ended or `timeout` seconds."""
        if wait:
            self._thread.join(timeout)
        return self._problem

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()
