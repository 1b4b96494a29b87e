"""Training as several real processes (gloo on the CPU): a fault seen by one rank (damaged data, a checkpoint the main
process failed to write) ends every rank with its line and no collective error, and the background data check never
keeps a rank waiting inside a collective."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers_data import error_lines, full_disk_line, record_checksums, write_latent_dataset, write_repa_layout
from helpers_distributed import free_port, torchrun

import integrity

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "SiT-S/2", "--depth", "2", "--hidden-size", "32", "--num-heads", "2", "--vae-repa-depth", "1",
        "--mixed-precision", "no", "--num-workers", "0", "--sample-every", "0", "--batch-size", "4",
        "--learning-rate", "1e-3", "--ema-decay", "0.9", "--device", "cpu"]
# Words gloo and torch.distributed print when ranks disagree on a collective or one leaves in the middle of one.
COLLECTIVE_ERRORS = ("Connection closed by peer", "Connection reset", "Timed out", "timed out", "mismatch",
                     "DistBackendError", "Detected mismatch")

# Runs train.py's main with the data check slowed down (each file hashed after a sleep) and records, per rank, the
# seconds spent in each of the guard's gathers: time a rank waits there is time another rank did not come.
SLOW_CHECK_WORKER = """
import json, os, sys, time
import integrity, train
from training import guard

sleep, out = float(sys.argv[1]), sys.argv[2]
real = integrity.sha256_file
integrity.sha256_file = lambda path: time.sleep(sleep) or real(path)
guard.POLL_SECONDS = 0.5
waits, gather = [], guard.Watch._gather

def timed(self, *args):
    start = time.perf_counter()
    try:
        return gather(self, *args)
    finally:
        waits.append(time.perf_counter() - start)

guard.Watch._gather = timed
code = train.main(sys.argv[3:])
with open(os.path.join(out, f"waits{os.environ['RANK']}.json"), "w") as f:
    json.dump(waits, f)
sys.exit(code)
"""


def make_dataset(root: Path, n: int = 16, nan_everywhere: bool = False) -> Path:
    """A 16-image latent dataset in 4 shards whose manifest records each file's sha256, as preprocessing writes it."""
    rng = np.random.default_rng(0)
    mean = rng.standard_normal((n, 4, 8, 8)).astype(np.float32)
    if nan_everywhere:
        mean[:, 1, 2, 3] = np.nan
    write_latent_dataset(root, mean, np.full_like(mean, 0.1), rng.integers(0, 3, n), shard_size=4, num_classes=3)
    return record_checksums(root)


# Runs train.py's main with the write of checkpoint 0000004.pt failing half-way through: the disk is full.
FULL_DISK_WORKER = """
import errno, io, os, sys
import torch
import integrity, train
from training import checkpoint_writer

real = checkpoint_writer.write_checkpoint

def write(state, path):
    if path.name != "0000004.pt":
        return real(state, path)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with integrity.atomic_write(path, checksum=True) as f:
        f.write(buffer.getvalue()[: buffer.tell() // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

checkpoint_writer.write_checkpoint = write
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("nproc", [2, 3])
def test_a_damaged_shard_with_non_finite_data_ends_every_rank_with_its_line(tmp_path, nproc):
    """Rank 0's check finds a damaged shard while every rank sees non-finite values: every rank takes the same branch
    (it once skipped a gather that rank 1 entered, which died with "Connection closed by peer", its line lost)."""
    data = make_dataset(tmp_path / "data", nan_everywhere=True)
    shard = data / "std-00002.npy"
    raw = bytearray(shard.read_bytes())
    raw[-7] ^= 0xFF
    shard.write_bytes(bytes(raw))
    r = torchrun(tmp_path, ROOT / "train.py", "--data-dir", str(data), "--output-dir", str(tmp_path / "runs"), *TINY,
                 "--max-train-steps", "6", "--logging-steps", "3", "--checkpointing-steps", "6", "--exp-name", "a",
                 "--batch-size", str(2 * nproc), nproc=nproc)
    assert r.returncode != 0
    lines = error_lines(r.stderr)
    assert sum("std-00002.npy is damaged" in line for line in lines) == 1, r.stderr[-3000:]  # rank 0, the check's
    others = sum("the main process found a damaged shard" in line for line in lines)
    assert others == nproc - 1, r.stderr[-3000:]  # every other rank, with its own line
    assert not [word for word in COLLECTIVE_ERRORS if word in r.stderr], r.stderr[-3000:]
    assert "std-00002.npy is damaged" in (tmp_path / "runs/a/log.txt").read_text()
    assert not list((tmp_path / "runs/a/checkpoints").glob("*.pt"))


def test_a_slow_data_check_never_keeps_a_rank_waiting_in_a_collective(tmp_path):
    """The check takes about 13 s (9 files, 1.5 s each) and must end before the first checkpoint: rank 0 waits for it
    in slices of POLL_SECONDS (0.5 s here) between gathers that every rank enters, so rank 1 never waits in one for
    long (it once sat in a gather for the whole check: past the process-group timeout on a slow file system)."""
    data = make_dataset(tmp_path / "data")
    (tmp_path / "worker.py").write_text(SLOW_CHECK_WORKER)
    r = torchrun(tmp_path, tmp_path / "worker.py", "1.5", str(tmp_path), "--data-dir", str(data), "--output-dir",
                 str(tmp_path / "runs"), *TINY, "--max-train-steps", "2", "--logging-steps", "1",
                 "--checkpointing-steps", "1", "--exp-name", "a")
    assert r.returncode == 0, r.stderr[-3000:]
    waits = json.loads((tmp_path / "waits1.json").read_text())
    assert max(waits) < 5, waits  # none close to the 13 s the check took
    assert len(waits) > 5  # the check was waited for in many short slices
    log = (tmp_path / "runs/a/log.txt").read_text()
    assert "waiting for the check of the shards" in log
    assert "data: all 9 files match their checksums" in log
    assert log.index("data: all 9 files match") < log.index("saved checkpoint")  # verified before the first one
    assert sorted(p.name for p in (tmp_path / "runs/a/checkpoints").glob("*.pt")) == ["0000001.pt", "0000002.pt"]


# generate.main in one of two processes, recording which checkpoint files this rank hashed against their sidecar.
GENERATE_WORKER = """
import os, sys
import checkpoints, generate

calls, verify = [], checkpoints.verify_file
checkpoints.verify_file = lambda path: calls.append(str(path)) or verify(path)
code = generate.main(sys.argv[2:])
with open(os.path.join(sys.argv[1], f"verified{os.environ['RANK']}.txt"), "w") as f:
    f.write("\\n".join(calls))
sys.exit(code)
"""


def test_generate_hashes_the_checkpoint_once_on_rank_0_and_both_ranks_refuse_a_damaged_one(tmp_path):
    """An XL checkpoint is 11 GB: rank 0 alone reads it against its sha256 sidecar while the other ranks wait, then
    every rank loads it unverified; a damaged one stops every rank with rank 0's line."""
    from helpers_data import make_tiny_vae
    from helpers_generate import make_checkpoint

    from integrity import checksum_path, sha256_file

    ckpt = make_checkpoint(tmp_path / "run/checkpoints/0000002.pt", make_tiny_vae(tmp_path / "vae"))
    checksum_path(ckpt).write_text(f"{sha256_file(ckpt)}  {ckpt.name}\n")
    (tmp_path / "worker.py").write_text(GENERATE_WORKER)
    quick = ["--num-fid-samples", "4", "--num-steps", "2", "--per-proc-batch-size", "2", "--device", "cpu"]
    r = torchrun(tmp_path, tmp_path / "worker.py", str(tmp_path), "--ckpt", str(ckpt), "--sample-dir",
                 str(tmp_path / "samples"), *quick)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "verified0.txt").read_text() == str(ckpt)
    assert (tmp_path / "verified1.txt").read_text() == ""

    raw = bytearray(ckpt.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    ckpt.write_bytes(bytes(raw))
    r = torchrun(tmp_path, tmp_path / "worker.py", str(tmp_path), "--ckpt", str(ckpt), "--sample-dir",
                 str(tmp_path / "damaged"), *quick)
    assert r.returncode != 0
    lines = error_lines(r.stderr)
    assert any(line.startswith("error: --ckpt: checkpoint") and "is damaged" in line for line in lines), lines
    assert any("rank 0 failed: --ckpt: checkpoint" in line for line in lines), lines
    assert not [word for word in COLLECTIVE_ERRORS if word in r.stderr], r.stderr[-3000:]


def launch_nodes(tmp_path: Path, script: Path, *argv: str) -> list[subprocess.CompletedProcess]:
    """Two nodes simulated on this machine: two torchrun launchers with one process each, meeting through c10d's
    rendezvous on the loopback address, as `scripts/train_multinode.sh` starts them on a cluster."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend",
           "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"test{port}", str(script), *argv]
    nodes = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
             for _ in range(2)]  # c10d gives each its node rank
    results = []
    for node in nodes:
        out, err = node.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(node.args, node.returncode, out, err))
    return results


def test_two_simulated_nodes_train_resume_and_sample_as_one_node_with_two_processes(tmp_path):
    """Two nodes of one process each give the run of one node with two processes: the same checkpoint after a stop and
    a --resume, and the same samples from it."""
    import torch

    data = make_dataset(tmp_path / "data")
    common = ["--data-dir", str(data), "--output-dir", str(tmp_path / "runs"), *TINY, "--logging-steps", "2",
              "--checkpointing-steps", "2"]
    r = torchrun(tmp_path, ROOT / "train.py", *common, "--max-train-steps", "4", "--exp-name", "one")
    assert r.returncode == 0, r.stderr[-3000:]
    for steps, resume in (("2", []), ("4", ["--resume", "latest"])):
        for node in launch_nodes(tmp_path, ROOT / "train.py", *common, "--max-train-steps", steps, "--exp-name",
                                 "two", *resume):
            assert node.returncode == 0, node.stderr[-3000:]
    one, two = (torch.load(tmp_path / f"runs/{name}/checkpoints/0000004.pt", weights_only=True)
                for name in ("one", "two"))
    for key in ("model", "ema"):
        for name, p in one[key].items():
            assert torch.equal(two[key][name], p), (key, name)
    assert "resumed from" in (tmp_path / "runs/two/log.txt").read_text()

    from helpers_data import make_tiny_vae

    sampling = ["--num-fid-samples", "6", "--num-steps", "2", "--per-proc-batch-size", "2", "--device", "cpu",
                "--vae", str(make_tiny_vae(tmp_path / "vae"))]
    ckpt = str(tmp_path / "runs/one/checkpoints/0000004.pt")
    r = torchrun(tmp_path, ROOT / "generate.py", "--ckpt", ckpt, "--sample-dir", str(tmp_path / "s1"), *sampling)
    assert r.returncode == 0, r.stderr[-3000:]
    for node in launch_nodes(tmp_path, ROOT / "generate.py", "--ckpt", ckpt, "--sample-dir", str(tmp_path / "s2"),
                             *sampling):
        assert node.returncode == 0, node.stderr[-3000:]
    (npz1,), (npz2,) = (list((tmp_path / s).glob("*.npz")) for s in ("s1", "s2"))
    assert npz1.name == npz2.name and npz1.read_bytes() == npz2.read_bytes()


def test_a_checkpoint_the_main_process_failed_to_write_ends_both_ranks_with_their_lines(tmp_path):
    """Rank 0's background write of step 4 fails (disk full) while both ranks train on: at the next checkpoint step
    the failure reaches every rank through the guard's gathered flags, and both end with their line."""
    data = make_dataset(tmp_path / "data")
    (tmp_path / "worker.py").write_text(FULL_DISK_WORKER)
    r = torchrun(tmp_path, tmp_path / "worker.py", "--data-dir", str(data), "--output-dir", str(tmp_path / "runs"),
                 *TINY, "--max-train-steps", "6", "--checkpointing-steps", "2", "--exp-name", "a")
    assert r.returncode != 0
    folder = tmp_path / "runs/a/checkpoints"
    lines = error_lines(r.stderr)
    (written,) = [line for line in lines if line.startswith("error: checkpoint ")]  # rank 0's
    assert full_disk_line(written[len("error: "):])[0] == folder / "0000004.pt", r.stderr[-3000:]
    assert "error: the main process failed to write a checkpoint (see its log)" in lines, r.stderr[-3000:]  # rank 1
    assert len(lines) == 2, r.stderr[-3000:]  # (torchrun adds its own traceback of the exit codes)
    assert not [word for word in COLLECTIVE_ERRORS if word in r.stderr], r.stderr[-3000:]
    assert written[len("error: "):] in (tmp_path / "runs/a/log.txt").read_text()
    assert sorted(p.name for p in folder.iterdir()) == ["0000002.pt", "0000002.pt.sha256"]
    assert integrity.verify_file(folder / "0000002.pt")



# Runs train.py's main with rank 1 reading its own copy of a dataset in REPA's layout (one file per image, read when the
# image is: as on a node that staged the data to its own disk), every file of that copy but the first (which set-up
# reads) damaged after rank 1's optimizer step argv[1] (0: before training starts).
DAMAGED_ON_ONE_RANK_WORKER = """
import os, shutil, sys
from pathlib import Path
import train
from training import loop

after, argv = int(sys.argv[1]), sys.argv[2:]
data = argv[argv.index("--data-dir") + 1]

def damage():
    for path in sorted(Path(data + "-rank1").glob("vae-sd/*/*.npy"))[1:]:
        path.write_bytes(b"not an npy file")

if os.environ["RANK"] == "1":
    argv[argv.index("--data-dir") + 1] = data + "-rank1"
    shutil.copytree(data, data + "-rank1")
    real, steps = loop.update_ema, [0]

    def update_ema(*args):
        real(*args)
        steps[0] += 1
        if steps[0] == after:
            damage()

    loop.update_ema = update_ema
    if after == 0:
        damage()
sys.exit(train.main(argv))
"""


@pytest.mark.parametrize("after", [2, 0])
def test_a_damaged_file_one_rank_meets_while_reading_stops_every_rank_together(tmp_path, after):
    """Only rank 1 meets damaged files, when it reads the batch of step 3 (or its first batch): it must not leave
    alone (rank 0 would wait in the next all-reduce until the process group's timeout). It repeats its last batch up
    to the guard's gather at checkpoint step 4, where both ranks stop before writing it (or both stop after gathering
    whether they have their first batch), each with a line naming the file."""
    rng = np.random.default_rng(0)
    mean = rng.standard_normal((16, 4, 8, 8)).astype(np.float32)
    data = write_repa_layout(tmp_path / "data", mean, np.full_like(mean, 0.1), rng.integers(0, 3, 16))
    (tmp_path / "worker.py").write_text(DAMAGED_ON_ONE_RANK_WORKER)
    r = torchrun(tmp_path, tmp_path / "worker.py", str(after), "--data-dir", str(data), "--output-dir",
                 str(tmp_path / "runs"), *TINY, "--max-train-steps", "6", "--checkpointing-steps", "2",
                 "--exp-name", "a")
    assert r.returncode != 0
    lines = error_lines(r.stderr)
    assert len(lines) == 2, r.stderr[-3000:]  # rank 1's, rank 0's
    damaged = sorted((tmp_path / "data-rank1").glob("vae-sd/*/*.npy"))[1:]
    pattern = r"error: damaged training data: (\S+): cannot be read as \.npy .*"
    mine = [m for line in lines if (m := re.fullmatch(pattern, line))]
    assert len(mine) == 1, lines
    mine = mine[0]
    assert mine and Path(mine[1]) in damaged, lines
    theirs = [line for line in lines if line.startswith(f"error: process 1 met damaged training data: {mine[1]}: ")]
    assert len(theirs) == 1, lines
    when = "after step 4" if after else "before its first step"
    assert all(line.endswith(f"(the run stopped {when}, every process with it)") for line in lines), lines
    assert not [word for word in COLLECTIVE_ERRORS if word in r.stderr], r.stderr[-3000:]
    assert mine[1] in (tmp_path / "runs/a/log.txt").read_text()
    kept = sorted(p.name for p in (tmp_path / "runs/a/checkpoints").glob("*.pt"))
    assert kept == (["0000002.pt"] if after else [])


# Runs train.py's main with one rank's part of the --eval-every evaluation raising: rank 1's sampling (as an
# out-of-memory error would on one GPU), or rank 0's scoring after the gather; the other rank evaluates as usual.
EVAL_FAULT_ON_ONE_RANK_WORKER = """
import os, sys
import train
import evaluations.scoring
from training import evaluation

where, argv = sys.argv[1], sys.argv[2:]
rank = os.environ["RANK"]

def fail(*args, **kwargs):
    raise RuntimeError(f"out of memory (injected on rank {rank})")

if where == "sampling" and rank == "1":
    evaluation.sample_batch = fail
if where == "scoring" and rank == "0":
    evaluations.scoring.score_features = fail
sys.exit(train.main(argv))
"""


@pytest.mark.parametrize("where", ["sampling", "scoring"])
def test_an_evaluation_failing_on_one_rank_stops_every_rank_together(tmp_path, where):
    """One rank's part of the evaluation at step 2 raises: rank 1's sampling (rank 0 once waited for its features in
    the gather: "Connection closed by peer" under gloo, the process group's timeout under NCCL) or rank 0's scoring
    (rank 1 waited in the barrier after it). The ranks meet after that work, exchange the fault and stop together,
    each with the faulting rank's line; the checkpoint of step 2, written before the evaluation, stays intact and
    metrics.jsonl gets no row."""
    from helpers_data import make_tiny_vae

    from evaluations.inception import write_random_weights

    rng = np.random.default_rng(0)
    data = make_dataset(tmp_path / "data")
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["vae"] = str(make_tiny_vae(tmp_path / "vae"))  # latents 4x8x8 -> 16x16 images
    (data / "manifest.json").write_text(json.dumps(manifest))
    record_checksums(data)
    np.savez(tmp_path / "ref.npz", arr_0=rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8))
    weights = write_random_weights(tmp_path / "inception.pth")
    (tmp_path / "worker.py").write_text(EVAL_FAULT_ON_ONE_RANK_WORKER)
    r = torchrun(tmp_path, tmp_path / "worker.py", where, "--data-dir", str(data), "--output-dir",
                 str(tmp_path / "runs"), *TINY, "--max-train-steps", "4", "--checkpointing-steps", "100",
                 "--eval-every", "2", "--eval-ref", str(tmp_path / "ref.npz"), "--inception-weights", str(weights),
                 "--eval-samples", "4", "--eval-num-steps", "2", "--eval-batch-size", "2", "--exp-name", "a")
    assert r.returncode != 0
    assert not [word for word in COLLECTIVE_ERRORS if word in r.stderr], r.stderr[-3000:]
    lines = error_lines(r.stderr)
    rank = 1 if where == "sampling" else 0
    what = "sampling its images" if where == "sampling" else f"scoring the samples against {tmp_path / 'ref.npz'}"
    line = (f"error: the evaluation at step 2 failed on process {rank} while {what}: RuntimeError: out of memory "
            f"(injected on rank {rank}); every process stopped with it. The checkpoint of step 2 is written: fix the "
            "cause and run the same command with --resume latest, which evaluates step 2 again")
    assert lines == [line, line], r.stderr[-3000:]  # rank 1's and rank 0's
    assert line[len("error: "):] in (tmp_path / "runs/a/log.txt").read_text()
    folder = tmp_path / "runs/a/checkpoints"
    assert sorted(p.name for p in folder.glob("*.pt")) == ["0000002.pt"]
    assert integrity.verify_file(folder / "0000002.pt")
    assert not (tmp_path / "runs/a/metrics.jsonl").exists()
