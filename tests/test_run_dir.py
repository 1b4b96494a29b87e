"""The run directory: one train.py at a time (its lock, a killed holder's lock taken over), --resume latest without
a checkpoint, refused runs leaving no directory, a full disk at start and during a checkpoint write, and the methods'
blocks checked at parse time (issue 27, items 6-10)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_data import TINY_TRAIN, error_lines, free_bytes, full_disk_line, make_tiny_vae, write_latent_dataset

import integrity
import train
from training import checkpoint_writer, run_lock, run_settings
from training.checkpoint_writer import CheckpointWriter
from training.run_lock import LOCK_NAME, RunLock, stale_reason

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py
ROOT = Path(__file__).resolve().parents[1]
TINY = TINY_TRAIN
# A process that takes a run directory's lock through our API and keeps it until it is killed.
HOLDER = """
import sys, time
sys.path.insert(0, sys.argv[2])
from training.run_lock import RunLock
RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
"""


def make_dataset(root: Path, n: int = 10) -> Path:
    rng = np.random.default_rng(0)
    mean = rng.standard_normal((n, 4, 8, 8)).astype(np.float32)
    return write_latent_dataset(root, mean, np.full_like(mean, 0.1), rng.integers(0, 3, n), shard_size=4,
                                num_classes=3)


@pytest.fixture
def holder():
    """hold(run_dir): a separate process holding the directory's lock (killed at the end)."""
    procs = []

    def hold(run_dir: Path) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir), str(ROOT)], stdout=subprocess.PIPE,
                                text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield hold
    for proc in procs:
        proc.kill()
        proc.wait()


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------
# The lock (item 6)


def test_a_second_run_on_a_directory_in_use_is_refused_naming_the_holder(run_train, tmp_path, holder):
    data = make_dataset(tmp_path / "data")
    assert run_train("--data-dir", str(data), "--exp-name", "a", "--max-train-steps", "1").returncode == 0
    run_dir = tmp_path / "runs/a"
    proc = holder(run_dir)
    before = files(run_dir)
    holder_words = f"host {socket.gethostname()}, pid {proc.pid}, since "
    for extra in (["--resume", "latest"], []):  # a resume, and the same new-run command again
        r = run_train("--data-dir", str(data), "--exp-name", "a", "--max-train-steps", "2", *extra)
        (line,) = error_lines(r.stderr)
        assert r.returncode == 2 and line.startswith(f"error: run directory {run_dir} is in use by train.py"), r.stderr
        assert holder_words in line and "Traceback" not in r.stderr
    assert files(run_dir) == before  # nothing written or removed, the holder's lock included
    assert json.loads((run_dir / LOCK_NAME).read_text())["pid"] == proc.pid


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_line(run_train, tmp_path, holder):
    data = make_dataset(tmp_path / "data")
    assert run_train("--data-dir", str(data), "--exp-name", "a", "--max-train-steps", "1").returncode == 0
    run_dir = tmp_path / "runs/a"
    proc = holder(run_dir)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads((run_dir / LOCK_NAME).read_text())["pid"] == proc.pid  # left behind
    r = run_train("--data-dir", str(data), "--exp-name", "a", "--max-train-steps", "2", "--resume", "latest")
    assert r.returncode == 0, r.stderr
    log = (run_dir / "log.txt").read_text()
    assert (f"run directory lock {run_dir / LOCK_NAME}: left by train.py (host {socket.gethostname()}, pid "
            f"{proc.pid}, since ") in log and f"its process {proc.pid} has ended: taken over" in log
    assert (run_dir / "checkpoints/0000002.pt").is_file() and not (run_dir / LOCK_NAME).exists()


def test_a_lock_from_another_host_or_without_owner_is_refused_with_how_to_remove_it(run_train, tmp_path):
    data = make_dataset(tmp_path / "data")
    assert run_train("--data-dir", str(data), "--exp-name", "a", "--max-train-steps", "1").returncode == 0
    lock = tmp_path / "runs/a" / LOCK_NAME
    for content, words in ((json.dumps({"host": "node-17.elsewhere", "pid": 4242, "since": "2026-01-02 03:04:05 UTC"}),
                            "train.py (host node-17.elsewhere, pid 4242, since 2026-01-02 03:04:05 UTC)"),
                           ("", "holds no owner")):
        lock.write_text(content)
        r = run_train("--data-dir", str(data), "--exp-name", "a", "--max-train-steps", "2", "--resume", "latest")
        (line,) = error_lines(r.stderr)
        assert r.returncode == 2 and words in line and "remove the lock" in line and f"rm {lock}" in line, line
        assert lock.read_text() == content


def test_a_lock_from_another_host_not_refreshed_for_ten_minutes_is_taken_over(run_train, tmp_path):
    """A job killed outright on one node and requeued on another: its lock's time stops moving, and once it is
    STALE_AFTER_SECONDS old the resume takes the lock over with a line."""
    data = make_dataset(tmp_path / "data")
    assert run_train("--data-dir", str(data), "--exp-name", "a", "--max-train-steps", "1").returncode == 0
    run_dir = tmp_path / "runs/a"
    lock = run_dir / LOCK_NAME
    lock.write_text(json.dumps({"host": "node-17.elsewhere", "pid": 4242, "since": "2026-01-02 03:04:05 UTC"}))
    old = time.time() - run_lock.STALE_AFTER_SECONDS - 60
    os.utime(lock, (old, old))
    r = run_train("--data-dir", str(data), "--exp-name", "a", "--max-train-steps", "2", "--resume", "latest")
    assert r.returncode == 0, r.stderr
    log = (run_dir / "log.txt").read_text()
    assert "left by train.py (host node-17.elsewhere, pid 4242" in log
    assert "has not been refreshed for 11 minutes" in log
    assert (run_dir / "checkpoints/0000002.pt").is_file() and not lock.exists()


def test_a_live_holder_on_this_machine_keeps_its_lock_whatever_its_age(run_train, tmp_path, holder):
    """A lock not refreshed for long (a suspended job, a heartbeat that missed beats) whose holder runs on this machine
    is not stale: only a holder that cannot be checked from here loses its lock by age."""
    data = make_dataset(tmp_path / "data")
    assert run_train("--data-dir", str(data), "--exp-name", "a", "--max-train-steps", "1").returncode == 0
    run_dir = tmp_path / "runs/a"
    proc = holder(run_dir)
    old = time.time() - run_lock.STALE_AFTER_SECONDS - 60
    os.utime(run_dir / LOCK_NAME, (old, old))
    r = run_train("--data-dir", str(data), "--exp-name", "a", "--max-train-steps", "2", "--resume", "latest")
    (line,) = error_lines(r.stderr)
    assert r.returncode == 2 and f"is in use by train.py (host {socket.gethostname()}, pid {proc.pid}" in line, line
    assert json.loads((run_dir / LOCK_NAME).read_text())["pid"] == proc.pid


def test_the_holder_refreshes_its_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "HEARTBEAT_SECONDS", 0.05)
    lock = RunLock(tmp_path)
    lock.acquire()
    old = time.time() - 3600
    os.utime(tmp_path / LOCK_NAME, (old, old))
    deadline = time.time() + 10
    while run_lock.lock_age(tmp_path / LOCK_NAME) > 60 and time.time() < deadline:
        time.sleep(0.05)
    assert run_lock.lock_age(tmp_path / LOCK_NAME) < 60  # touched again by the holder's thread
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_live_pid_is_no_proof_of_a_live_holder_on_this_machine(tmp_path):
    """Crafted locks of this host: the pid alive but started at another time (reused), or a boot id of before a
    restart, are stale; this very process's own record is not."""
    lock = RunLock(tmp_path)
    lock.acquire()
    mine = json.loads((tmp_path / LOCK_NAME).read_text())
    assert mine["pid"] == os.getpid() and stale_reason(mine) is None
    if mine["start"] is not None:  # Linux: /proc/PID/stat
        assert stale_reason({**mine, "start": str(int(mine["start"]) + 1)}) == (
            f"pid {os.getpid()} now belongs to another process")
    if mine["boot_id"] is not None:
        assert stale_reason({**mine, "boot_id": "0" * 36}) == "this machine has restarted since"
    assert stale_reason({**mine, "host": "elsewhere"}) is None  # cannot be checked from here
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_the_lock_is_held_until_the_last_checkpoint_write_has_ended(run_train, tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "data")
    lock = tmp_path / "runs/a" / LOCK_NAME
    real, seen = checkpoint_writer.write_checkpoint, []

    def slow(state, path):
        time.sleep(0.5)  # the loop has long reached its end when the last write finishes
        real(state, path)
        seen.append((path.name, json.loads(lock.read_text())["pid"]))

    monkeypatch.setattr(checkpoint_writer, "write_checkpoint", slow)
    r = run_train("--data-dir", str(data), "--exp-name", "a", "--max-train-steps", "2", "--checkpointing-steps", "1")
    assert r.returncode == 0, r.stderr
    assert seen == [("0000001.pt", os.getpid()), ("0000002.pt", os.getpid())] and not lock.exists()


def test_every_rank_learns_that_the_directory_is_in_use(tmp_path, holder):
    """Only rank 0 takes the lock; rank 1 gets the outcome from it, and both stop (none waits alone)."""
    data = make_dataset(tmp_path / "data", n=16)
    run_dir = tmp_path / "runs/a"
    run_dir.mkdir(parents=True)
    proc = holder(run_dir)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(ROOT / "train.py"), "--data-dir", str(data), "--output-dir",
                        str(tmp_path / "runs"), *TINY, "--exp-name", "a", "--max-train-steps", "1", "--resume",
                        "latest"], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    lines = error_lines(r.stderr)
    assert r.returncode != 0
    assert [line for line in lines if f"pid {proc.pid}" in line and "is in use by train.py" in line], r.stderr[-3000:]
    assert [line for line in lines if line.startswith("error: rank 0 failed: run directory")], r.stderr[-3000:]
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_NAME]


# ----------------------------------------------------------------------------------------------
# --resume latest without a checkpoint (item 7)


def test_resume_latest_without_a_checkpoint_says_so_and_refuses_another_runs_directory(run_train, tmp_path):
    data = make_dataset(tmp_path / "data")
    r = run_train("--data-dir", str(data), "--exp-name", "typo", "--max-train-steps", "1", "--resume", "latest")
    assert r.returncode == 0, r.stderr
    log = (tmp_path / "runs/typo/log.txt").read_text()
    assert f"no checkpoint in {tmp_path / 'runs/typo'}: starting a new run" in log

    # another run's directory, killed before its first checkpoint: its args.json and a temporary file stay
    r = run_train("--data-dir", str(data), "--exp-name", "b", "--max-train-steps", "1", "--seed", "7")
    assert r.returncode == 0, r.stderr
    run_dir = tmp_path / "runs/b"
    for p in (run_dir / "checkpoints").iterdir():
        p.unlink()
    temp = run_dir / "checkpoints/.0000001.pt.0a1b2c3d.tmp"
    temp.write_bytes(b"half a checkpoint")
    before = files(run_dir)
    r = run_train("--data-dir", str(data), "--exp-name", "b", "--max-train-steps", "1", "--resume", "latest")
    (line,) = error_lines(r.stderr)
    assert r.returncode == 2 and line.startswith(f"error: --resume latest: {run_dir} holds no checkpoint, and another "
                                                 "run's settings"), r.stderr
    assert "--seed: args.json 7, now 0" in line
    assert files(run_dir) == before  # args.json not rewritten, the temporary file not removed

    # an args.json that is not a run's settings: refused as well, left as it is
    (run_dir / "args.json").write_text("{not json")
    r = run_train("--data-dir", str(data), "--exp-name", "b", "--max-train-steps", "1", "--resume", "latest")
    (line,) = error_lines(r.stderr)
    assert r.returncode == 2 and "its args.json cannot be read" in line, r.stderr
    assert (run_dir / "args.json").read_text() == "{not json" and temp.exists()
    (run_dir / "args.json").write_bytes(before["args.json"])

    # the same run's directory, its args.json written by an older version (without the keys added since, e.g. SRA's
    # teacher precision, whose old-run meaning differs from today's default): it starts anew there, with the line
    older = {k: v for k, v in json.loads(before["args.json"]).items()
             if k not in ("sra_teacher_precision", "tracker_project_name", "eval_cfg_channels")}
    (run_dir / "args.json").write_text(json.dumps(older))
    r = run_train("--data-dir", str(data), "--exp-name", "b", "--max-train-steps", "1", "--resume", "latest", "--seed",
                  "7")
    assert r.returncode == 0, r.stderr
    assert f"no checkpoint in {run_dir}: starting a new run" in (run_dir / "log.txt").read_text()
    assert not temp.exists()


# ----------------------------------------------------------------------------------------------
# Refused runs leave no directory (item 8); a full disk (items 8 and 9)


@pytest.fixture
def small_disk(tmp_path):
    """mount(kilobytes): a tmpfs of that size under tmp_path (unmounted at the end); skipped where this process may
    not mount one (the ENOSPC-injection tests cover the same code paths there)."""
    mounted = []

    def mount(kilobytes: int) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        if shutil.which("mount") is None:
            pytest.skip("no mount command here: the ENOSPC-injection tests cover this path")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kilobytes}k", "tmpfs", str(where)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}): the ENOSPC-injection tests cover this path")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_bad_inception_weights_file_leaves_no_directory(run_train, tmp_path):
    data = make_dataset(tmp_path / "data")
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["vae"] = str(make_tiny_vae(tmp_path / "vae"))
    (data / "manifest.json").write_text(json.dumps(manifest))
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=np.zeros((8, 16, 16, 3), np.uint8))
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"not a weights file")
    r = run_train("--data-dir", str(data), "--exp-name", "a", "--max-train-steps", "1", "--eval-every", "1",
                  "--eval-ref", str(ref), "--inception-weights", str(weights))
    (line,) = error_lines(r.stderr)
    assert r.returncode == 2 and line.startswith("error: --eval-every:") and str(weights) in line, r.stderr
    assert not (tmp_path / "runs/a").exists()
    assert run_train("--data-dir", str(data), "--exp-name", "a", "--max-train-steps", "1").returncode == 0


def test_a_full_disk_at_start_is_one_line_and_leaves_no_directory(run_train, tmp_path, monkeypatch):
    """ENOSPC injected where the run writes args.json (the first file of its own it writes)."""
    data = make_dataset(tmp_path / "data")
    real = run_settings.atomic_write

    def full(path, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(run_settings, "atomic_write", full)
    r = run_train("--data-dir", str(data), "--exp-name", "a", "--max-train-steps", "1")
    (line,) = error_lines(r.stderr)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert line == f"error: the run's set-up failed: No space left on device ({tmp_path / 'runs/a/args.json'})"
    assert not (tmp_path / "runs/a").exists()
    monkeypatch.setattr(run_settings, "atomic_write", real)
    assert run_train("--data-dir", str(data), "--exp-name", "a", "--max-train-steps", "1").returncode == 0


def test_a_really_full_disk_at_start_leaves_nothing_on_it(run_train, tmp_path, small_disk):
    data = make_dataset(tmp_path / "data")
    disk = small_disk(64)
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:  # fill it up
        with pytest.raises(OSError) as e:
            while True:
                f.write(b"\0" * 4096)
    assert e.value.errno == errno.ENOSPC
    r = run_train("--data-dir", str(data), "--output-dir", str(disk / "runs"), "--exp-name", "a", "--max-train-steps",
                  "1")
    (line,) = error_lines(r.stderr)
    assert r.returncode == 2 and "No space left on device" in line and str(disk / "runs/a") in line, r.stderr
    assert sorted(p.name for p in (disk / "runs").iterdir()) == [] and (disk / "filler").exists()


def test_a_really_full_disk_during_a_checkpoint_write_is_one_line_and_keeps_the_earlier_one(tmp_path, small_disk):
    """torch.save on a full tmpfs fails with "[enforce fail at inline_container.cc...]"; the line says what it is."""
    disk = small_disk(1024)
    writer = CheckpointWriter()
    writer.submit({"w": torch.ones(50_000)}, disk / "0000001.pt")  # 200 kB: fits
    assert writer.wait(30) and writer.failure is None
    writer.submit({"w": torch.ones(500_000), "v": torch.ones(10)}, disk / "0000002.pt")  # 2 MB: does not
    assert writer.wait(30)
    path, needed, free = full_disk_line(writer.failure)
    assert path == disk / "0000002.pt" and needed == 4 * 500_010  # float32 tensors' bytes
    assert free == free_bytes(disk) and free < needed  # nobody else writes on this tmpfs
    assert integrity.verify_file(disk / "0000001.pt")
    assert sorted(p.name for p in disk.iterdir()) == ["0000001.pt", "0000001.pt.sha256"]  # no temporary file


# ----------------------------------------------------------------------------------------------
# Blocks past the model's depth, an inverted time range (item 10)


@pytest.mark.parametrize("argv, message", [
    (["--depth", "2", "--vae-repa-depth", "3"],
     "--vae-repa-depth 3: the model has 2 blocks (--depth 2), so the block must be in [1, 2]"),
    (["--model", "SiT-XL/2", "--depth", "4"],  # VAE-REPA's default block for XL is 8
     "--vae-repa-depth 8 (the default for this model): the model has 4 blocks (--depth 4), so the block must be in "
     "[1, 4]"),
    (["--model", "SiT-B/2", "--encoder-depth", "13"],  # SiT-B has 12 blocks (REPA's models/sit.py, SiT_B_2)
     "--encoder-depth 13: the model has 12 blocks (SiT-B/2), so the block must be in [1, 12]"),
    (["--depth", "6", "--vae-repa-depth", "1", "--align", "sra", "--block-out-s", "2", "--block-out-t", "7"],
     "--sra-teacher-depth 7: the model has 6 blocks (--depth 6), so the block must be in [1, 6]"),
    (["--vae-repa-t-range", "0.8", "0.2"], "--vae-repa-t-range 0.8 0.2: expected LOW < HIGH within [0, 1]"),
])
def test_blocks_past_the_depth_and_an_inverted_range_are_usage_errors_before_anything_is_written(
        tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        train.main(["--data-dir", str(tmp_path / "data"), "--output-dir", str(tmp_path / "runs"), *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "runs").exists()


def test_blocks_within_the_depth_and_unused_methods_defaults_pass():
    # SRA's default blocks (4 and 8 for S) exceed --depth 2, but SRA is not trained: no error
    args = train.parse_args(["--data-dir", "d", *TINY])
    assert args.align == ["vae-repa"] and args.vae_repa_depth == 1 and args.sra_teacher_depth == 8
    args = train.parse_args(["--data-dir", "d", "--depth", "2", "--vae-repa-depth", "2", "--vae-repa-t-range", "0",
                             "0.5"])
    assert args.vae_repa_depth == 2 and list(args.vae_repa_t_range) == [0.0, 0.5]
