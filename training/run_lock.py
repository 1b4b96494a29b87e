"""One train.py at a time in a run directory: the lock file `run.lock` (docs/integrity.md, "The run directory's lock").

The lock is created with O_CREAT | O_EXCL: of two processes creating it, exactly one succeeds, on a local file system
and on the shared ones clusters use (NFSv3 and later, Lustre, GPFS, which carry the exclusive create to the server).
It records who holds it: host, pid, when it was taken, and what tells a live holder from a dead one on the same
machine (the boot id, the pid namespace and the process's start time). The holder also refreshes the file's
modification time every HEARTBEAT_SECONDS, from a thread, for as long as it holds the lock. A lock whose holder is gone
is stale and taken over, with a line in the log: on the same host when the pid has ended, or belongs to a process
started later, or the machine has restarted since; from anywhere when the lock has not been refreshed for
STALE_AFTER_SECONDS (a node that failed or a job killed outright, then requeued elsewhere: the file's time is set by the
file server, so this works across nodes with clocks within minutes of each other). Torch-free."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import secrets
import shlex
import socket
import threading
import time
from pathlib import Path

from cli import UsageError

LOCK_NAME = "run.lock"
HEARTBEAT_SECONDS = 60.0
STALE_AFTER_SECONDS = 600.0  # ten heartbeats missed: far longer than NFS attribute caching (60 s at most by default)


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux's /proc/PID/stat, field 22), None elsewhere or when
    the process has ended or is a zombie."""
    stat = _read(f"/proc/{pid}/stat")
    if not stat:
        return None
    fields = stat.rsplit(")", 1)[-1].split()  # after the command name, which may hold spaces
    return None if fields[0] in ("Z", "X") else fields[19]


def _here() -> dict:
    """What names this machine and pid namespace (a pid means the same process only within both)."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = None
    return {"host": socket.gethostname(), "boot_id": _read("/proc/sys/kernel/random/boot_id"),
            "pid_namespace": namespace}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return not os.path.isdir("/proc/self") or _process_start(pid) is not None  # a zombie has ended


def holder_text(holder: dict) -> str:
    return f"host {holder.get('host')}, pid {holder.get('pid')}, since {holder.get('since')}"


def lock_age(path: Path) -> float | None:
    """Seconds since the lock at `path` was last refreshed (None without one)."""
    try:
        return max(0.0, time.time() - path.stat().st_mtime)
    except OSError:
        return None


def stale_reason(holder: dict, age: float | None = None) -> str | None:
    """Why the holder is gone, when this machine can tell (None: it may be alive); `age`: lock_age of the lock. A
    holder on this machine whose process is alive keeps its lock whatever the age (a suspended job, a heartbeat that
    missed a beat); any other holder's lock is stale once not refreshed for STALE_AFTER_SECONDS."""
    here = _here()
    if holder.get("host") == here["host"] and isinstance(holder.get("pid"), int):
        if holder.get("boot_id") and here["boot_id"] and holder["boot_id"] != here["boot_id"]:
            return "this machine has restarted since"
        if holder.get("pid_namespace") == here["pid_namespace"]:  # else another container: its pids are not ours
            if not _alive(holder["pid"]):
                return f"its process {holder['pid']} has ended"
            start = _process_start(holder["pid"])
            if holder.get("start") and start and start != holder["start"]:
                return f"pid {holder['pid']} now belongs to another process"
            return None
    if age is not None and age > STALE_AFTER_SECONDS:
        return (f"its lock has not been refreshed for {age / 60:.0f} minutes (a running train.py refreshes it every "
                f"{HEARTBEAT_SECONDS:g} s)")
    return None


def read_holder(path: Path) -> dict | None:
    """The lock's record; None without a lock, {} for one that holds no record (being written, or damaged)."""
    text = _read(str(path))
    if text is None:
        return None
    try:
        holder = json.loads(text)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def in_use_message(run_dir: Path, holder: dict) -> str:
    """One line: who holds the run directory, and what to do."""
    path = run_dir / LOCK_NAME
    if not holder:
        return (f"run directory {run_dir} is locked ({path} holds no owner: a start interrupted while taking it?); "
                f"if no train.py uses this directory, remove the lock (rm {shlex.quote(str(path))}) and run again")
    where = holder_text(holder)
    if holder.get("host") == socket.gethostname():
        return (f"run directory {run_dir} is in use by train.py ({where}); wait for that run to end, or choose "
                "another --exp-name (nothing was changed)")
    return (f"run directory {run_dir} is in use by train.py ({where}); wait for that run to end, or choose another "
            f"--exp-name (nothing was changed). A lock not refreshed for {STALE_AFTER_SECONDS / 60:g} minutes is "
            f"taken over; if no such process runs on {holder.get('host')} any more, remove the lock now: "
            f"rm {shlex.quote(str(path))}")


class RunLock:
    """The lock of `run_dir`: `acquire` (UsageError naming the holder if it is taken), `release` (only a lock that is
    still ours). As a context manager, released however the block ends."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.record: dict | None = None
        self._stop = threading.Event()

    def acquire(self) -> list[str]:
        """Take the lock; returns lines for the log (a stale lock taken over)."""
        notes = []
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
            except FileExistsError:
                holder = self._holder()
                reason = stale_reason(holder, lock_age(self.path)) if holder else None
                if reason is None:
                    if holder is None:
                        continue  # released in between: try again
                    raise UsageError(in_use_message(self.run_dir, holder)) from None
                if self._take_over(holder):
                    notes.append(f"run directory lock {self.path}: left by train.py ({holder_text(holder)}), and "
                                 f"{reason}: taken over")
                continue
            self._write(fd)
            self._stop.clear()
            threading.Thread(target=self._refresh, name="run-lock-heartbeat", daemon=True).start()
            return notes
        raise UsageError(f"run directory {self.run_dir}: could not take its lock {self.path} (other processes keep "
                         "taking it); run again")

    def _holder(self) -> dict | None:
        holder = read_holder(self.path)
        if holder == {}:  # the holder may be writing its record this instant
            time.sleep(0.2)
            holder = read_holder(self.path)
        return holder

    def _write(self, fd: int) -> None:
        pid = os.getpid()
        since = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        record = {**_here(), "pid": pid, "start": _process_start(pid), "since": since, "token": secrets.token_hex(8)}
        try:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            self.path.unlink(missing_ok=True)
            raise
        self.record = record

    def _take_over(self, holder: dict) -> bool:
        """Remove the stale lock `holder`, unless another process has replaced it meanwhile (then it is put back)."""
        aside = self.path.with_name(f".{LOCK_NAME}.{secrets.token_hex(4)}.stale")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False  # another process took it over first
        if read_holder(aside) == holder:
            aside.unlink(missing_ok=True)
            return True
        with contextlib.suppress(OSError):  # a live holder's fresh lock: back under its name, unless taken again
            os.link(aside, self.path)
        aside.unlink(missing_ok=True)
        return False

    def _refresh(self) -> None:
        """Touch the lock every HEARTBEAT_SECONDS while it is ours (the file server sets the time)."""
        while not self._stop.wait(HEARTBEAT_SECONDS):
            holder = read_holder(self.path)
            if self.record is None or (holder and holder != self.record):
                return  # released, or another holder's now (taken over): never touch another's lock
            if holder == self.record:  # None or {}: unreadable this instant (NFS, a take-over's rename): next beat
                with contextlib.suppress(OSError):
                    os.utime(self.path)

    def release(self) -> None:
        self._stop.set()
        if self.record is not None and read_holder(self.path) == self.record:
            self.path.unlink(missing_ok=True)
        self.record = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
