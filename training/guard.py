"""What stops or protects a training run: damaged data and checkpoints, leftovers of interrupted writes, and a refused
run's directory (see docs/integrity.md); the settings a resume may change are in training/run_settings.py."""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
from pathlib import Path

import torch

from checkpoints import list_checkpoints
from cli import UsageError
from devices import first_fault
from integrity import CHECKSUM_SUFFIX, ShardVerifier, checksum_path, remove_stale_temps, verify_file
from training.run_lock import LOCK_NAME

logger = logging.getLogger("train")
# The longest a rank waits on its own work (the background data check) while the others wait in a collective; far
# below any process-group timeout, so a slow check on a slow file system is many short waits, never one long one.
POLL_SECONDS = 5.0



class DataFault(UsageError):
    """The training data is damaged (a shard that differs from its checksum, non-finite values in a batch)."""


def _one_line(error: Exception) -> str:
    """A DatasetError's message; one raised in a loader worker arrives as the worker's whole traceback."""
    text = str(error).strip()
    if "Original Traceback" in text:  # torch's DataLoader: "Caught DatasetError in ...\nOriginal Traceback..."
        text = text.splitlines()[-1].split("DatasetError: ", 1)[-1]
    return text


class DataStream:
    """The (batch, epoch, position) triples of `stream`. A damaged data file met while reading (DatasetError, in this
    process or a loader worker) ends a single process at once, as a DataFault of one line.

    With several processes this rank must not leave alone: the others would wait in the next collective until the
    process group's timeout. It notes the fault and hands out its last batch again, so every rank keeps entering the
    same collectives, until the guard's next gather (Watch.check: the next logging or checkpoint step, before any
    checkpoint is written), where every rank stops (`stopped`). The run's first batch has no earlier one to repeat:
    after fetching it, every rank gathers whether it has it (once per run; no collective on later steps)."""

    def __init__(self, stream, accelerator):
        self.stream, self.accelerator = stream, accelerator
        self.last = None
        self.fault: str | None = None  # this rank's line for the damaged file it met, once it met one

    def __iter__(self):
        return self

    def __next__(self):
        from dataset import DatasetError

        world = self.accelerator.num_processes
        if self.fault is None:
            try:
                self.last, first = next(self.stream), self.last is None
            except DatasetError as e:
                self.fault, first = f"damaged training data: {_one_line(e)}", self.last is None
                if world == 1:
                    raise DataFault(self.fault) from e
            if first and world > 1 and (found := first_fault(self.fault, world)) is not None:
                raise self.stopped("before its first step", found)
        return self.last

    def stopped(self, when: str, found: tuple[int, str] | None = None) -> DataFault:
        """Every rank calls this together once any rank met a damaged file (`found`: the first such rank and its
        line, gathered here if not given): each rank that met one names its own file, the others the first rank's,
        so rank 0's line and log.txt name a file too."""
        found = found or first_fault(self.fault, self.accelerator.num_processes)
        if self.fault is not None:
            return DataFault(f"{self.fault} (the run stopped {when}, every process with it)")
        return DataFault(f"process {found[0]} met {found[1]} (the run stopped {when}, every process with it)")


class CheckpointWriteError(UsageError):
    """The main process could not write a checkpoint (a full disk, failing storage); the earlier ones are intact."""


# ----------------------------------------------------------------------------------------------
# Checkpoints


def intact_alternative(damaged: Path) -> str:
    """One sentence naming the newest checkpoint before `damaged` that matches its checksum, and how to resume."""
    earlier = sorted(((s, p) for s, p in list_checkpoints(damaged.parent).items() if p != damaged), reverse=True)
    step = int(damaged.stem) if damaged.stem.isdigit() else None
    unverified = None
    for s, path in earlier:
        if step is not None and s > step:
            continue
        try:
            verified = verify_file(path)
        except (OSError, ValueError):
            continue
        if verified is None and path.stat().st_size > 0:
            unverified = unverified or path
        if verified:
            return (f"The newest intact one before it is {path}: to continue from it, move the damaged file away "
                    f"(mv {damaged} {damaged}.damaged) and run the same command with --resume latest")
    if unverified is not None:
        return (f"No earlier checkpoint has a checksum; {unverified} is the newest earlier one (unverified): move "
                f"the damaged file away (mv {damaged} {damaged}.damaged) and run with --resume latest")
    return f"No intact earlier checkpoint is in {damaged.parent}"


def clean_run_dir(run_dir: Path) -> None:
    """Remove what interrupted writes of an earlier attempt left: temporary files and checksums without their file."""
    removed = remove_stale_temps(run_dir) + remove_stale_temps(run_dir / "checkpoints")
    folder = run_dir / "checkpoints"
    if folder.is_dir():
        for side in folder.glob(f"*.pt{CHECKSUM_SUFFIX}"):
            if re.fullmatch(r"\d{7,}\.pt", side.name[: -len(CHECKSUM_SUFFIX)]) and not side.with_suffix("").exists():
                side.unlink()
                removed.append(side)
    for path in removed:
        logger.info("removed %s, left by an interrupted write", path)


def checkpoint_status(path: Path) -> str:
    return "verified against its sha256" if checksum_path(path).is_file() else "unverified (written without a checksum)"


# ----------------------------------------------------------------------------------------------
# Data and non-finite values


def start_data_verification(dataset, args: argparse.Namespace, is_main: bool) -> ShardVerifier | None:
    """The background hash of the dataset's files against its manifest (main process), or None with a log line."""
    if not args.verify_data:
        logger.info("data: not verified (--no-verify-data)")
        return None
    files = dataset.checksummed_files()
    if files is None:
        logger.info("data: %s carries no checksums (REPA's layout or an older manifest): unverified", args.data_dir)
        return None
    if not is_main:
        return None
    size = sum(p.stat().st_size for p, _ in files)
    logger.info("data: checking %d files (%.2f GB) against the checksums of manifest.json in the background",
                len(files), size / 1e9)
    return ShardVerifier(files, dataset.repair_command()).start()


class Watch:
    """Faults that stop the run before any checkpoint is written: a damaged shard (the verifier), a damaged file one
    rank met while reading (DataStream), non-finite values in a batch (the data is at fault), a non-finite loss, and a
    checkpoint the main process failed to write (the background writer, training/checkpoint_writer.py). Per step
    only device operations; the flags are read where the loop synchronises anyway (logging and checkpoint steps) and,
    in a single process, the verifier's and the writer's verdicts at every step."""

    def __init__(self, accelerator, dataset, verifier: ShardVerifier | None, run_dir: Path, writer=None,
                 stream: DataStream | None = None):
        self.accelerator, self.dataset, self.verifier, self.run_dir = accelerator, dataset, verifier, run_dir
        self.writer = writer  # a CheckpointWriter (rank 0 writes; the others' stays idle), or None
        self.stream = stream  # the training batches, whose damaged file one rank may have met
        device = accelerator.device
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        self.bad_index = torch.full((), -1, dtype=torch.int64, device=device)
        self.logged_done = self.logged_wait = False

    def note_batch(self, x: torch.Tensor, index: torch.Tensor) -> None:
        finite = torch.isfinite(x).flatten(1).all(1)
        bad = torch.where(finite, -1, index.to(x.device, non_blocking=True)).max()
        torch.maximum(self.bad_index, bad, out=self.bad_index)

    def note_loss(self, parts: torch.Tensor) -> None:
        self.nonfinite |= ~torch.isfinite(parts).all()

    def _verifier_state(self, wait: float = 0.0) -> tuple[str | None, bool]:
        """(the check's problem or None, whether it is still running), after waiting at most `wait` seconds for it.
        `running` is read first: a check that ends in between reports its problem, never "done and fine"."""
        if self.verifier is None:
            return None, False
        if wait > 0:
            self.verifier.problem(wait=True, timeout=wait)
        running = not self.verifier.done
        problem = self.verifier.problem()
        if problem is None and not running and not self.logged_done:
            self.logged_done = True
            seconds = self.verifier.seconds
            logger.info("data: all %d files match their checksums (%.2f GB in %.1f s, %.0f MB/s)",
                        len(self.verifier.files), self.verifier.bytes / 1e9, seconds,
                        self.verifier.bytes / 1e6 / max(seconds, 1e-9))
        return problem, running

    def _writer_state(self, wait: float = 0.0) -> tuple[str | None, bool]:
        """(the failed checkpoint write's line or None, whether a write is in flight), after waiting at most `wait`
        seconds for it; `in flight` is read first, as for the data check."""
        if self.writer is None:
            return None, False
        if wait > 0:
            self.writer.wait(wait)
        in_flight = self.writer.in_flight
        return self.writer.failure, in_flight

    def _gather(self, problem: str | None, running: bool) -> torch.Tensor:
        """(processes, 7) per process: non-finite loss, damaged shard, first non-finite image index (-1: none), data
        check still running, checkpoint write failed, checkpoint write in flight, damaged file met while reading.
        Every rank then decides from these same values."""
        device = self.bad_index.device
        failure, writing = self._writer_state()
        met = self.stream is not None and self.stream.fault is not None
        local = torch.tensor([int(problem is not None), int(running), int(failure is not None), int(writing),
                              int(met)], device=device)
        flags = torch.stack([self.nonfinite.long(), local[0], self.bad_index, local[1], local[2], local[3], local[4]])
        return self.accelerator.gather(flags[None]).reshape(-1, 7)

    @staticmethod
    def _must_wait_for_data(flags: torch.Tensor, before_checkpoint: bool) -> bool:
        """True while the data check runs, has found nothing yet, and its verdict decides what happens next: before a
        checkpoint (none is written from damaged data) or before stopping for non-finite values (a damaged shard is
        the better diagnosis)."""
        decides = before_checkpoint or int(flags[:, 0].max()) > 0 or int(flags[:, 2].max()) >= 0
        return decides and int(flags[:, 3].max()) > 0 and int(flags[:, 1].max()) == 0

    @staticmethod
    def _must_wait_for_write(flags: torch.Tensor, before_checkpoint: bool) -> bool:
        """True while the previous checkpoint is still being written, before a checkpoint, an evaluation or the run's
        end (at most one write in flight, its failure known to every rank before anything else happens) or before
        stopping for damaged data or a non-finite loss (whose line names the last checkpoint written)."""
        stopping = (int(flags[:, 0].max()) > 0 or int(flags[:, 1].max()) > 0 or int(flags[:, 2].max()) >= 0
                    or int(flags[:, 6].max()) > 0)
        return (before_checkpoint or stopping) and int(flags[:, 5].max()) > 0

    def _must_wait(self, flags: torch.Tensor, before_checkpoint: bool) -> bool:
        return self._must_wait_for_data(flags, before_checkpoint) or self._must_wait_for_write(flags,
                                                                                              before_checkpoint)

    def check(self, step: int, sync: bool, before_checkpoint: bool) -> None:
        """Raise if the run must stop: DataFault (damaged shard, a damaged file one rank met while reading, non-finite
        data), CheckpointWriteError or FloatingPointError.

        `before_checkpoint` (a checkpoint step, an evaluation, the run's end): also wait for the checkpoint write in
        flight, and raise CheckpointWriteError on every rank if it failed.

        Every rank enters the same collectives and branches on gathered values only, and none waits on local work
        for more than POLL_SECONDS while the others sit in a collective: waiting for the data check or the
        checkpoint write is a loop of short waits and gathers, which every rank leaves at the same iteration."""
        world = self.accelerator.num_processes
        problem, running = self._verifier_state()
        if world == 1 and problem:
            raise DataFault(f"stopped before step {step + 1}: {problem}")
        failure = self._writer_state()[0]
        if world == 1 and failure:
            raise CheckpointWriteError(failure)
        if not sync:
            return
        flags = self._gather(problem, running)
        if self._must_wait_for_data(flags, before_checkpoint) and not self.logged_wait:
            self.logged_wait = True
            logger.info("data: waiting for the check of the shards against their checksums before going on")
        while self._must_wait(flags, before_checkpoint):
            for_data = self._must_wait_for_data(flags, before_checkpoint)
            problem, running = self._verifier_state(wait=POLL_SECONDS if for_data else 0.0)
            self._writer_state(wait=0.0 if for_data else POLL_SECONDS)
            flags = self._gather(problem, running)
        if int(flags[:, 1].max()) > 0:
            raise DataFault(f"stopped before step {step + 1}: " + (problem or "the main process found a damaged "
                                                                   "shard (see its log)"))
        if int(flags[:, 6].max()) > 0:
            raise self.stream.stopped(f"after step {step}")
        if int(flags[:, 4].max()) > 0:
            raise CheckpointWriteError(self._writer_state()[0] or "the main process failed to write a checkpoint "
                                       "(see its log)")
        bad = int(flags[:, 2].max())
        if bad >= 0:
            origin = ("The shards match their checksums, so preprocessing stored these values" if self.verifier
                      else "The shards were not checked against checksums; if they match, preprocessing stored these "
                      "values")
            raise DataFault(f"non-finite values in the training data, at or before step {step} (the data is at fault, "
                            f"not the learning rate): {self.dataset.nonfinite_report(bad)}. {origin}: check that "
                            "image and the VAE, then encode again with --overwrite (or into a new --dest): "
                            f"{self.dataset.repair_command()}")
        if int(flags[:, 0].max()) > 0:
            kept = list_checkpoints(self.run_dir / "checkpoints")
            raise FloatingPointError(
                f"non-finite loss before step {step} with finite data; stopping. Last good checkpoint: "
                f"{kept[max(kept)] if kept else 'none'} (try a lower --learning-rate or --mixed-precision no)")


# ----------------------------------------------------------------------------------------------
# Failures


def log_fatal(message: str, run_dir: Path) -> None:
    """Write a fatal message to the run's log.txt as well, if its logging is set up (stderr has it already)."""
    record = logging.LogRecord("train", logging.ERROR, __file__, 0, "error: %s", (message,), None)
    log_file = os.path.abspath(run_dir / "log.txt")
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and handler.baseFilename == log_file:
            handler.handle(record)


def discard_refused_run(run_dir: Path | None) -> None:
    """Delete a run directory that this invocation created and that never trained a step (a refused run); not when
    another train.py has locked it since this one let go."""
    if run_dir is None or not run_dir.is_dir() or list_checkpoints(run_dir / "checkpoints"):
        return
    if (run_dir / LOCK_NAME).exists():
        return
    root = logging.getLogger()
    for handler in list(root.handlers):  # its log.txt goes with it: a later line must not reopen the file
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == run_dir.resolve():
            root.removeHandler(handler)
            handler.close()
    shutil.rmtree(run_dir, ignore_errors=True)
