"""Processes vs visible GPUs: train.py, generate.py and preprocessing stop with one line before any collective when
a node starts more processes than it has visible GPUs, and run (on gloo) when no GPU is visible or --device cpu.

The machine's GPUs are simulated by patching torch.cuda, so these run (and mean the same) with or without a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import devices

ROOT = Path(__file__).resolve().parents[1]


def fake_gpus(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


@pytest.mark.parametrize("gpus, env, device, problem", [
    (0, {}, None, None),  # a CPU machine: run on the CPU
    (0, {"CUDA_VISIBLE_DEVICES": ""}, None, None),  # GPUs hidden on purpose: run on the CPU
    (0, {"CUDA_VISIBLE_DEVICES": "-1"}, None, None),
    (0, {"CUDA_VISIBLE_DEVICES": "NoDevFiles"}, None, None),  # what Slurm sets for a job without GPUs
    (0, {"CUDA_VISIBLE_DEVICES": "3"}, None, "names GPUs, but none is visible"),
    (0, {"CUDA_VISIBLE_DEVICES": "GPU-5d2c1e"}, None, "names GPUs, but none is visible"),
    (0, {}, "cuda", "--device cuda: no CUDA device is visible"),
    (0, {"LOCAL_WORLD_SIZE": "4"}, "cpu", None),
    (1, {"LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": "0"}, None, "2 processes on this node but 1 visible GPU"),
    (1, {"LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": "1"}, "cuda", "2 processes on this node but 1 visible GPU"),
    (1, {"LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": "1"}, "cpu", None),  # --device cpu: gloo, whatever the GPUs
    (8, {"LOCAL_WORLD_SIZE": "8", "LOCAL_RANK": "7", "CUDA_VISIBLE_DEVICES": "0"}, None, None),  # count is 8 here
    (2, {"LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": "1"}, None, None),
    (2, {"LOCAL_RANK": "2"}, None, "3 processes on this node"),  # no LOCAL_WORLD_SIZE: at least LOCAL_RANK + 1
    (1, {}, "cuda:1", "only 1 GPU(s) visible"),
    (2, {"LOCAL_WORLD_SIZE": "2"}, "cuda:0", "would share one GPU"),
    (1, {}, None, None),
])
def test_launch_problem(monkeypatch, gpus, env, device, problem):
    fake_gpus(monkeypatch, gpus)
    found = devices.gpu_launch_problem(device, env)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found and "\n" not in found
        if "CUDA_VISIBLE_DEVICES" in env:
            assert f"CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']!r}" in found


def test_the_message_names_the_fix(monkeypatch):
    fake_gpus(monkeypatch, 2)
    message = devices.gpu_launch_problem(None, {"LOCAL_WORLD_SIZE": "3", "CUDA_VISIBLE_DEVICES": "0,1"})
    assert "--nproc_per_node 2" in message and "--device cpu" in message and "'0,1'" in message


# ---------------------------------------------------------------- the entry points, in this process


@pytest.fixture
def second_of_two_ranks_on_one_gpu(monkeypatch, tmp_path):
    """Rank 1 of 2 on a node with one GPU; any process group or CUDA call would be a failure of the check."""
    fake_gpus(monkeypatch, 1)
    for key, value in {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    def forbidden(*args, **kwargs):
        raise AssertionError("a process group or CUDA call before the launch check")

    monkeypatch.setattr(dist, "init_process_group", forbidden)
    monkeypatch.setattr(torch.cuda, "set_device", forbidden)
    return tmp_path


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def test_train_stops_before_the_process_group(second_of_two_ranks_on_one_gpu, capsys):
    import train

    out = second_of_two_ranks_on_one_gpu / "runs"
    assert train.main(["--data-dir", str(out / "nowhere"), "--output-dir", str(out)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "2 processes on this node but 1 visible GPU" in line
    assert not out.exists()


def test_generate_stops_before_the_process_group(second_of_two_ranks_on_one_gpu, capsys):
    import generate

    out = second_of_two_ranks_on_one_gpu / "samples"
    assert generate.main(["--ckpt", str(out / "none.pt"), "--sample-dir", str(out)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "2 processes on this node but 1 visible GPU" in line
    assert not out.exists()


def test_preprocessing_stops_before_the_process_group(second_of_two_ranks_on_one_gpu, capsys):
    from preprocessing import encode

    out = second_of_two_ranks_on_one_gpu / "latents"
    assert encode.main(["--source", str(second_of_two_ranks_on_one_gpu), "--dest", str(out)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "2 processes on this node but 1 visible GPU" in line
    assert not out.exists()


# ---------------------------------------------------------------- a real two-process launch


LAUNCH = """
import sys, torch
torch.cuda.is_available = lambda: True  # this node "has" one GPU
torch.cuda.device_count = lambda: 1
def no_cuda(*a, **k):
    raise RuntimeError("CUDA error: invalid device ordinal")
torch.cuda.set_device = no_cuda
sys.argv = [sys.argv[1], *sys.argv[2:]]
sys.path.insert(0, {root!r})
if sys.argv[0] == "train":
    import train as entry
elif sys.argv[0] == "generate":
    import generate as entry
else:
    from preprocessing import encode as entry
sys.exit(entry.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("entry, argv", [
    ("train", ["--data-dir", "nowhere"]),
    ("generate", ["--ckpt", "none.pt"]),
    ("encode", ["--source", ".", "--dest", "latents"]),
])
def test_two_processes_on_one_gpu_both_stop_at_once(tmp_path, entry, argv):
    (tmp_path / "launch.py").write_text(LAUNCH.format(root=str(ROOT)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(tmp_path / "launch.py"), entry, *argv], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "visible GPU" in line]
    assert len(errors) == 2 and all("2 processes on this node but 1 visible GPU" in e for e in errors), proc.stderr
    assert "invalid device ordinal" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["launch.py"]  # nothing written


# ---------------------------------------------------------------- a fault on some ranks only

# Each case fails on some ranks only; every rank records what it raised (or returned), then all meet in a barrier:
# a rank left behind in a collective would end the launch with gloo's error instead.
AGREE = """
import json, os, sys
import torch.distributed as dist
import devices

rank, world, _ = devices.init_processes("cpu")

def fail_on(*ranks, kind=ValueError):
    def fn():
        if rank in ranks:
            raise kind(f"broken on {rank}")
        return rank * 10
    return fn

cases = {
    "first_fault none": lambda: devices.first_fault(None, world),
    "first_fault 2 and 1": lambda: devices.first_fault(f"line {rank}" if rank else None, world),
    "together ok": lambda: devices.together(fail_on(), world),
    "together fails on 2": lambda: devices.together(fail_on(2), world),
    "together RuntimeError on 1": lambda: devices.together(fail_on(1, kind=RuntimeError), world),
    "on_rank0 ok": lambda: devices.on_rank0(fail_on(), rank, world),
    "on_rank0 RuntimeError on 0": lambda: devices.on_rank0(fail_on(0, kind=RuntimeError), rank, world),
    "then_others fails on 1": lambda: devices.on_rank0(fail_on(1), rank, world, then_others=True),
}
seen = {}
for name, case in cases.items():
    try:
        seen[name] = ["returned", case()]
    except Exception as e:
        seen[name] = [type(e).__name__, str(e)]
    dist.barrier()
with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
    json.dump(seen, f)
dist.destroy_process_group()
"""


def test_a_fault_on_some_ranks_reaches_every_rank_at_the_same_point(tmp_path):
    """devices.first_fault, together and on_rank0 with three gloo processes: the failing rank raises its own error,
    every other rank a UsageError naming the first rank that failed; none leaves alone (it once did: an error other
    than OSError/ValueError on rank 0 in on_rank0, and any error of another rank's own attempt with then_others)."""
    (tmp_path / "agree.py").write_text(AGREE)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "3",
                           str(tmp_path / "agree.py"), str(tmp_path)], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(3)]

    def other(r: int, failed: int, kind: str = "ValueError") -> list:
        return [kind, f"broken on {r}"] if r == failed else ["UsageError", f"rank {failed} failed: broken on {failed}"]

    for r in range(3):
        assert seen[r]["first_fault none"] == ["returned", None]
        assert seen[r]["first_fault 2 and 1"] == ["returned", [1, "line 1"]]  # the lowest rank with a fault
        assert seen[r]["together ok"] == ["returned", 10 * r]
        assert seen[r]["together fails on 2"] == other(r, 2)
        assert seen[r]["together RuntimeError on 1"] == other(r, 1, "RuntimeError")
        assert seen[r]["on_rank0 ok"] == ["returned", 0]  # rank 0's result, shared
        assert seen[r]["on_rank0 RuntimeError on 0"] == other(r, 0, "RuntimeError")
        assert seen[r]["then_others fails on 1"] == other(r, 1)


def test_one_process_raises_its_own_error_with_no_collective():
    assert devices.first_fault(None, 1) is None and devices.first_fault("x", 1) == (0, "x")
    with pytest.raises(OSError, match="gone"):
        devices.together(lambda: (_ for _ in ()).throw(OSError("gone")), 1)
    assert devices.on_rank0(lambda: 7, 0, 1, then_others=True) == 7
