"""Checkpoints written in the background (training/checkpoint_writer.py): one write in flight, the same files as the
synchronous path, retention only after a verified write, a failed write stopping the run with one line, a kill
during a write losing nothing."""

from __future__ import annotations

import collections
import errno
import functools
import io
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_data import TINY_TRAIN, free_bytes, full_disk_line, write_latent_dataset

import integrity
import train
from checkpoints import atomic_save, rng_state
from training import checkpoint_writer, guard, loop
from training.checkpoint_writer import CheckpointWriter, prune_checkpoints, snapshot

ROOT = Path(__file__).resolve().parents[1]
TINY = TINY_TRAIN
TIMEOUT = 30  # seconds any single wait in these tests may take


def make_dataset(root: Path, n: int = 10) -> Path:
    rng = np.random.default_rng(0)
    mean = rng.standard_normal((n, 4, 8, 8)).astype(np.float32)
    return write_latent_dataset(root, mean, np.full_like(mean, 0.1), rng.integers(0, 3, n), shard_size=4,
                                num_classes=3)


def training_state(seed: int = 0) -> dict:
    """A state like the loop's: a module's state dict (an OrderedDict with _metadata), an optimizer's after a step
    (tuples, a step tensor), views sharing one storage, RNG states, plain nested values."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).square().sum().backward()
    opt.step()
    flat = torch.arange(12.0)
    return {"format": "vae-repa/1", "model": model.state_dict(), "opt": opt.state_dict(), "step": 3,
            "views": {"all": flat, "middle": flat[4:8], "grid": flat.view(3, 4)[:, 1]}, "rng": [rng_state(torch.device(
                "cpu"))], "args": {"model": "SiT-S/2", "latent_shape": [4, 8, 8], "betas": (0.9, 0.999)},
            "data": {"epoch": 1, "position": 8}, "scaler": None}


def assert_same(a, b, where: str = "") -> None:
    """Equal contents: torch.equal (and dtype) for every tensor, == for the rest, the same container types."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}/{i}")
    else:
        assert a == b, where


def load(path: Path):
    return torch.load(path, weights_only=True)


class Gate:
    """Replaces checkpoint_writer.write_checkpoint: records each write's start and end, and holds the writes whose
    file name is in `hold` until `release()`."""

    def __init__(self, hold: set[str]):
        self.hold, self.events, self.opened = hold, [], threading.Event()
        self.real = checkpoint_writer.write_checkpoint

    def __call__(self, state, path: Path) -> None:
        self.events.append(("start", path.name, threading.current_thread().name))
        if path.name in self.hold:
            assert self.opened.wait(TIMEOUT)
        self.real(state, path)
        self.events.append(("end", path.name, threading.current_thread().name))

    def release(self) -> None:
        self.opened.set()


# ----------------------------------------------------------------------------------------------
# The writer


def test_a_second_submit_waits_for_the_write_in_flight(tmp_path, monkeypatch):
    gate = Gate(hold={"0000001.pt"})
    monkeypatch.setattr(checkpoint_writer, "write_checkpoint", gate)
    writer = CheckpointWriter()
    writer.submit(training_state(1), tmp_path / "0000001.pt")  # returns at once: the write is held
    assert writer.in_flight and not writer.wait(0.2)
    second = threading.Thread(target=writer.submit, args=(training_state(2), tmp_path / "0000002.pt"))
    second.start()
    second.join(0.5)
    assert second.is_alive()  # the second submit waits for the first write ...
    assert [e[:2] for e in gate.events] == [("start", "0000001.pt")]  # ... and has not started its own
    gate.release()
    second.join(TIMEOUT)
    assert writer.wait(TIMEOUT) and writer.failure is None
    assert [e[:2] for e in gate.events] == [("start", "0000001.pt"), ("end", "0000001.pt"),
                                            ("start", "0000002.pt"), ("end", "0000002.pt")]
    assert {e[2] for e in gate.events} == {"write-checkpoint"}  # written by the background thread
    assert integrity.verify_file(tmp_path / "0000001.pt") and integrity.verify_file(tmp_path / "0000002.pt")


def test_the_background_file_is_the_synchronous_write_of_the_state_when_submitted(tmp_path, monkeypatch):
    """Training changes the live state (weights in place, optimizer moments, nested settings) while the write is
    held: the file still holds the state as it was at submit, byte for byte what the synchronous path writes."""
    (tmp_path / "sync").mkdir()
    (tmp_path / "background").mkdir()
    state = training_state()
    CheckpointWriter(background=False).submit(state, tmp_path / "sync/0000003.pt")  # the old, synchronous path
    gate = Gate(hold={"0000003.pt"})
    monkeypatch.setattr(checkpoint_writer, "write_checkpoint", gate)
    writer = CheckpointWriter()
    writer.submit(state, tmp_path / "background/0000003.pt")
    for t in state["model"].values():
        t.add_(1)
    state["opt"]["state"][0]["exp_avg"].mul_(3)
    state["views"]["all"][5] = -1
    state["args"]["latent_shape"].append(9)
    state["data"]["position"] = 12
    gate.release()
    assert writer.wait(TIMEOUT) and writer.failure is None
    sync, background = tmp_path / "sync/0000003.pt", tmp_path / "background/0000003.pt"
    assert background.read_bytes() == sync.read_bytes()
    assert (tmp_path / "background/0000003.pt.sha256").read_text() == (tmp_path / "sync/0000003.pt.sha256").read_text()
    assert_same(load(background), load(sync))
    shared = load(background)["views"]  # views still share their storage, as in the live state
    assert shared["middle"].untyped_storage().data_ptr() == shared["all"].untyped_storage().data_ptr()


def test_snapshot_keeps_types_metadata_and_sharing():
    state = training_state()
    copied = snapshot(state)
    assert_same(copied, state)
    assert type(copied["model"]) is collections.OrderedDict and copied["model"]._metadata == state["model"]._metadata
    assert copied["model"]._metadata is not state["model"]._metadata
    assert copied["views"]["grid"].stride() == state["views"]["grid"].stride()
    assert copied["views"]["grid"].untyped_storage().data_ptr() == copied["views"]["all"].untyped_storage().data_ptr()
    assert all(c.untyped_storage().data_ptr() != s.untyped_storage().data_ptr()
               for c, s in zip(copied["model"].values(), state["model"].values()))


def write_steps(folder: Path, steps) -> None:
    writer = CheckpointWriter(background=False)
    for step in steps:
        writer.submit({"step": step, "w": torch.full((64,), float(step))}, folder / f"{step:07d}.pt")


def test_retention_runs_only_after_the_new_checkpoint_is_written_and_verified(tmp_path, monkeypatch):
    write_steps(tmp_path, [1, 2, 3])
    (tmp_path / "0000001.pt.sha256").unlink()  # a file our writer's sidecar does not vouch for: never deleted
    seen = []

    def prune(*args):
        seen.append((integrity.verify_file(tmp_path / "0000004.pt"), list(tmp_path.glob(".*.tmp"))))
        prune_checkpoints(*args)

    gate = Gate(hold={"0000004.pt"})
    monkeypatch.setattr(checkpoint_writer, "write_checkpoint", gate)
    writer = CheckpointWriter()
    writer.submit({"step": 4, "w": torch.zeros(64)}, tmp_path / "0000004.pt",
                  after=functools.partial(prune, tmp_path, 4, 1, 0))
    time.sleep(0.2)
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["0000001.pt", "0000002.pt", "0000003.pt"]
    assert not seen
    gate.release()
    assert writer.wait(TIMEOUT) and writer.failure is None
    assert seen == [(True, [])]  # retention ran once 0000004.pt had its name and matched its checksum
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0000001.pt", "0000004.pt", "0000004.pt.sha256"]


def fail_half_way(state, path: Path) -> None:
    """A write that runs out of space half-way through the file."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with integrity.atomic_write(path, checksum=True) as f:
        f.write(buffer.getvalue()[: buffer.tell() // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def fail_at_step_4(state, path: Path) -> None:
    if path.name == "0000004.pt":
        fail_half_way(state, path)
    else:
        atomic_save(state, path, checksum=True)


def test_a_failed_write_is_reported_and_leaves_the_earlier_checkpoints_intact(tmp_path, monkeypatch):
    write_steps(tmp_path, [1, 2])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    monkeypatch.setattr(checkpoint_writer, "write_checkpoint", fail_half_way)
    writer = CheckpointWriter()
    writer.submit({"step": 3, "w": torch.zeros(64)}, tmp_path / "0000003.pt",
                  after=functools.partial(prune_checkpoints, tmp_path, 3, 1, 0))
    assert writer.wait(TIMEOUT)
    path, needed, free = full_disk_line(writer.failure)
    assert path == tmp_path / "0000003.pt" and needed == 64 * 4  # the state's one tensor: 64 float32
    assert abs(free - free_bytes(tmp_path)) < 2**30  # (others write on this disk meanwhile)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no pruning, no temporary file
    assert integrity.verify_file(tmp_path / "0000001.pt") and integrity.verify_file(tmp_path / "0000002.pt")
    writer.submit({"step": 4}, tmp_path / "0000004.pt")  # a writer that failed writes nothing more
    assert writer.wait(TIMEOUT) and not (tmp_path / "0000004.pt").exists()


def test_the_guard_waits_for_a_slow_write_in_short_slices_between_gathers(tmp_path, monkeypatch):
    """Before the next checkpoint, rank 0 waits for the write in flight POLL_SECONDS at a time, with a gather that
    every rank enters in between: no rank sits in one collective for the whole write. Its failure then reaches
    every rank's decision through the gathered flags."""
    monkeypatch.setattr(guard, "POLL_SECONDS", 0.2)
    real = checkpoint_writer.write_checkpoint

    def slow(state, path):
        time.sleep(1.5)
        if path.name == "0000002.pt":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(state, path)

    monkeypatch.setattr(checkpoint_writer, "write_checkpoint", slow)
    gathers = []

    def gather(flags):
        gathers.append(time.perf_counter())
        return torch.cat([flags, torch.tensor([[0, 0, -1, 0, 0, 0, 0]])])  # a second rank with nothing to report

    accelerator = types.SimpleNamespace(num_processes=2, device=torch.device("cpu"), gather=gather)
    writer = CheckpointWriter()
    watch = guard.Watch(accelerator, None, None, tmp_path, writer)
    writer.submit({"step": 1}, tmp_path / "0000001.pt")
    watch.check(1, sync=True, before_checkpoint=False)  # a logging step: no waiting for the write
    assert len(gathers) == 1 and writer.in_flight
    watch.check(2, sync=True, before_checkpoint=True)
    assert not writer.in_flight and integrity.verify_file(tmp_path / "0000001.pt")
    assert len(gathers) >= 6 and max(b - a for a, b in zip(gathers[1:], gathers[2:])) < 0.5, gathers
    writer.submit({"step": 2}, tmp_path / "0000002.pt")
    with pytest.raises(guard.CheckpointWriteError, match="0000002.pt could not be written"):
        watch.check(3, sync=True, before_checkpoint=True)


# ----------------------------------------------------------------------------------------------
# Training with the writer


def run(tmp_path: Path, data: Path, *extra: str):
    return train.train(train.parse_args(["--data-dir", str(data), "--output-dir", str(tmp_path / "runs"), *TINY,
                                         *extra]))


def test_a_run_writes_in_the_background_the_checkpoints_the_synchronous_path_wrote(tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "data")
    flags = ["--max-train-steps", "4", "--checkpointing-steps", "1", "--keep-last", "10"]
    threads = {}
    for name, background in (("background", True), ("sync", False)):
        gate = Gate(hold=set())
        monkeypatch.setattr(checkpoint_writer, "write_checkpoint", gate)
        monkeypatch.setattr(loop, "CheckpointWriter", functools.partial(CheckpointWriter, background=background))
        run(tmp_path, data, *flags, "--exp-name", name)
        threads[name] = {e[2] for e in gate.events}
    assert threads == {"background": {"write-checkpoint"}, "sync": {"MainThread"}}
    runs = tmp_path / "runs"
    for step in range(1, 5):
        a, b = load(runs / f"background/checkpoints/{step:07d}.pt"), load(runs / f"sync/checkpoints/{step:07d}.pt")
        assert a.pop("wall_seconds") > 0 and b.pop("wall_seconds") > 0  # the clock: the one value that differs
        assert a["args"].pop("exp_name") == "background" and b["args"].pop("exp_name") == "sync"
        assert_same(a, b, f"step {step}")
        assert a["step"] == step


def test_a_failed_write_stops_a_run_with_one_line_and_keeps_the_earlier_checkpoints(tmp_path, monkeypatch, capsys):
    data = make_dataset(tmp_path / "data")
    monkeypatch.setattr(checkpoint_writer, "write_checkpoint", fail_at_step_4)
    folder = tmp_path / "runs/a/checkpoints"
    code = train.main(["--data-dir", str(data), "--output-dir", str(tmp_path / "runs"), *TINY, "--exp-name", "a",
                       "--max-train-steps", "6", "--checkpointing-steps", "2", "--logging-steps", "100"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    (line,) = [line[line.index("error: "):] for line in err.splitlines() if "error: " in line]  # after tqdm's bar
    path, needed, _ = full_disk_line(line[len("error: "):])
    weights = sum(t.numel() for t in load(folder / "0000002.pt")["model"].values())
    # fp32 model, EMA and AdamW's two moments, plus a few kB of RNG states and step counters
    assert path == folder / "0000004.pt" and 16 * weights <= needed <= 16 * weights + 65536, (needed, weights)
    assert sorted(p.name for p in folder.iterdir()) == ["0000002.pt", "0000002.pt.sha256"]
    assert integrity.verify_file(folder / "0000002.pt")
    assert line[len("error: "):] in (tmp_path / "runs/a/log.txt").read_text()
    assert issubclass(guard.CheckpointWriteError, train.UsageError)


@pytest.fixture
def slow_writes(monkeypatch):
    """Every checkpoint write takes 1.5 s longer: training goes on while one is in flight."""
    real_write = checkpoint_writer.write_checkpoint

    def slow_write(state, path):
        time.sleep(1.5)
        real_write(state, path)

    monkeypatch.setattr(checkpoint_writer, "write_checkpoint", slow_write)


def test_an_error_during_training_waits_for_the_write_in_flight(tmp_path, monkeypatch, slow_writes):
    data = make_dataset(tmp_path / "data")
    real_loss, calls = loop.training_loss, {"n": 0}

    def failing_loss(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("a fault in step 3")
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(loop, "training_loss", failing_loss)
    with pytest.raises(RuntimeError, match="a fault in step 3"):
        run(tmp_path, data, "--exp-name", "a", "--max-train-steps", "6", "--checkpointing-steps", "2")
    folder = tmp_path / "runs/a/checkpoints"  # the write of step 2 ended before the error left train()
    assert sorted(p.name for p in folder.iterdir()) == ["0000002.pt", "0000002.pt.sha256"]
    assert integrity.verify_file(folder / "0000002.pt")
    assert not [t for t in threading.enumerate() if t.name == "write-checkpoint"]


def test_a_non_finite_loss_names_the_checkpoint_still_being_written(tmp_path, monkeypatch, slow_writes):
    """The loss turns non-finite while step 2's checkpoint is being written: the run waits for it, so that the line
    names it as the last good checkpoint."""
    data = make_dataset(tmp_path / "data")
    real_loss, calls = loop.training_loss, {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        out = real_loss(*args, **kwargs)
        return {k: v * float("nan") for k, v in out.items()} if calls["n"] > 2 else out

    monkeypatch.setattr(loop, "training_loss", poisoned)
    with pytest.raises(FloatingPointError, match="Last good checkpoint: .*0000002.pt"):
        run(tmp_path, data, "--exp-name", "a", "--max-train-steps", "6", "--checkpointing-steps", "2")
    assert integrity.verify_file(tmp_path / "runs/a/checkpoints/0000002.pt")


KILL_DURING_BACKGROUND_WRITE = textwrap.dedent("""
    import io, sys, time
    sys.path.insert(0, {root!r})
    import torch
    import integrity, train
    from training import checkpoint_writer
    real = checkpoint_writer.write_checkpoint
    def stalled(state, path):
        if path.name != "0000004.pt":
            return real(state, path)
        buffer = io.BytesIO()
        torch.save(state, buffer)
        with integrity.atomic_write(path, checksum=True) as f:
            f.write(buffer.getvalue()[: buffer.tell() // 2])
            f.flush()
            time.sleep(600)  # half of the file on disk: the test kills the process here
    checkpoint_writer.write_checkpoint = stalled
    sys.exit(train.main(sys.argv[1:]))
""")


def test_a_kill_during_a_background_write_loses_nothing_and_the_resume_is_exact(tmp_path):
    data = make_dataset(tmp_path / "data")
    common = ["--data-dir", str(data), "--output-dir", str(tmp_path / "runs"), *TINY, "--checkpointing-steps", "2",
              "--max-train-steps", "6"]
    stderr = tmp_path / "stderr.txt"
    with open(stderr, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", KILL_DURING_BACKGROUND_WRITE.format(root=str(ROOT)), *common,
                                 "--exp-name", "split"], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=err)
    folder, log = tmp_path / "runs/split/checkpoints", tmp_path / "runs/split/log.txt"
    deadline = time.time() + 240
    try:
        # training goes on while step 4's checkpoint is written: step 5 is logged with the write in flight
        while not (log.is_file() and "] step 5: " in log.read_text() and list(folder.glob(".0000004.pt.*.tmp"))):
            assert proc.poll() is None and time.time() < deadline, stderr.read_text()[-3000:]
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    (temp,) = folder.glob(".0000004.pt.*.tmp")
    assert temp.stat().st_size > 0
    assert sorted(p.name for p in folder.glob("0*")) == ["0000002.pt", "0000002.pt.sha256"]
    for name, extra in (("split", ["--resume", "latest"]), ("straight", [])):
        r = subprocess.run([sys.executable, str(ROOT / "train.py"), *common, "--exp-name", name, *extra], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    text = log.read_text()
    assert f"removed {temp}" in text and f"resumed from {folder / '0000002.pt'} at step 2" in text
    resumed, straight = load(folder / "0000006.pt"), load(tmp_path / "runs/straight/checkpoints/0000006.pt")
    for key in ("model", "ema", "opt", "rng", "data", "step"):
        assert_same(resumed[key], straight[key], key)
    assert integrity.verify_file(folder / "0000004.pt")  # written again by the resumed run
