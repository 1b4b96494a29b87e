"""Integrity with real faults: flipped bytes in shards and checkpoints, kills during writes, killed parents of worker
processes, file modes under a umask, refused runs, changed settings on resume, clean one-line errors."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_data import TINY_TRAIN, error_lines, make_image_folder, record_checksums, write_latent_dataset

import integrity
from checkpoints import DamagedCheckpointError, atomic_save, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = TINY_TRAIN


def make_dataset(root: Path, n: int = 10, checksums: bool = True, nan_at: int | None = None) -> Path:
    rng = np.random.default_rng(0)
    mean = rng.standard_normal((n, 4, 8, 8)).astype(np.float32)
    if nan_at is not None:
        mean[nan_at, 1, 2, 3] = np.nan
    write_latent_dataset(root, mean, np.full_like(mean, 0.1), rng.integers(0, 3, n), shard_size=4, num_classes=3)
    if checksums:  # as preprocessing records them: sha256 of every shard file and of labels.npy
        record_checksums(root)
        manifest = json.loads((root / "manifest.json").read_text())
        manifest["source"] = "/data/imagenet/train"
        (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def flip_byte(path: Path, offset_from_end: int = 7) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


# ----------------------------------------------------------------------------------------------
# The atomic writer


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_writes_get_the_mode_open_gives_under_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        with open(tmp_path / "reference", "w"):
            pass
        atomic_save({"a": torch.zeros(2)}, tmp_path / "ckpt.pt", checksum=True)
        integrity.write_text(tmp_path / "config.json", "{}")
    finally:
        os.umask(old)
    expected = (tmp_path / "reference").stat().st_mode & 0o777
    assert expected == 0o666 & ~umask
    for name in ("ckpt.pt", "ckpt.pt.sha256", "config.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == expected, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "ckpt.pt.sha256", "config.json", "reference"]


def test_a_failed_write_leaves_neither_file_nor_temporary(tmp_path):
    (tmp_path / "x.json").write_text("old")
    with pytest.raises(ZeroDivisionError):
        with integrity.atomic_write(tmp_path / "x.json", "w") as f:
            f.write("half")
            raise ZeroDivisionError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"] and (tmp_path / "x.json").read_text() == "old"


def test_checksum_sidecar_is_sha256sum_format_and_verification_sees_a_flipped_byte(tmp_path):
    path = tmp_path / "0000001.pt"
    atomic_save({"w": torch.arange(1000.0)}, path, checksum=True)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()  # independent of integrity.sha256_file
    assert (tmp_path / "0000001.pt.sha256").read_text() == f"{digest}  0000001.pt\n"
    assert integrity.verify_file(path) is True
    flip_byte(path, 2000)
    assert integrity.verify_file(path) is False
    with pytest.raises(DamagedCheckpointError, match="0000001.pt is damaged"):
        load_checkpoint(path)


def test_empty_checkpoint_is_called_an_empty_file(tmp_path):
    (tmp_path / "c.pt").write_bytes(b"")
    with pytest.raises(DamagedCheckpointError, match=r"c.pt is an empty file \(0 bytes\)"):
        load_checkpoint(tmp_path / "c.pt")


def test_stale_temporaries_removed_only_by_their_pattern(tmp_path):
    ours = [tmp_path / ".0000020.pt.3fa4b2c1.tmp", tmp_path / ".args.json.00ff00aa.tmp"]
    others = [tmp_path / "notes.tmp", tmp_path / ".0000020.pt.tmp", tmp_path / "0000020.pt", tmp_path / ".x.zz.tmp"]
    for p in ours + others:
        p.write_bytes(b"x")
    removed = integrity.remove_stale_temps(tmp_path, names=None)
    assert sorted(removed) == sorted(ours) and all(p.exists() for p in others)


# ----------------------------------------------------------------------------------------------
# Training: damaged data, damaged checkpoints, leftovers


def test_a_damaged_shard_stops_training_before_any_checkpoint(run_train, tmp_path):
    data = make_dataset(tmp_path / "data")
    flip_byte(data / "mean-00001.npy")  # the header stays intact: np.load still opens it
    np.load(data / "mean-00001.npy")
    r = run_train("--data-dir", str(data), "--exp-name", "a", "--max-train-steps", "4",
                  "--checkpointing-steps", "1")
    assert r.returncode == 2, r.stderr
    (line,) = error_lines(r.stderr)
    assert "mean-00001.npy is damaged" in line
    assert "python -m preprocessing.encode --source /data/imagenet/train" in line
    assert "--dest " + str(data) in line
    assert not list((tmp_path / "runs/a/checkpoints").glob("*.pt"))
    assert "mean-00001.npy is damaged" in (tmp_path / "runs/a/log.txt").read_text()  # the fatal line is logged

    r = run_train("--data-dir", str(data), "--exp-name", "b", "--max-train-steps", "2", "--no-verify-data")
    assert r.returncode == 0, r.stderr
    assert "not verified (--no-verify-data)" in (tmp_path / "runs/b/log.txt").read_text()


def test_two_processes_both_stop_on_a_damaged_shard_before_any_checkpoint(tmp_path):
    data = make_dataset(tmp_path / "data", n=16)
    flip_byte(data / "std-00002.npy")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(ROOT / "train.py"), "--data-dir", str(data), "--output-dir",
                        str(tmp_path / "runs"), *TINY, "--max-train-steps", "3", "--logging-steps", "2",
                        "--checkpointing-steps", "1", "--exp-name", "ddp"],
                       capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert r.returncode != 0
    lines = error_lines(r.stderr)
    assert any("std-00002.npy is damaged" in line for line in lines), r.stderr[-3000:]
    assert any("the main process found a damaged shard" in line for line in lines), r.stderr[-3000:]  # rank 1
    assert not list((tmp_path / "runs/ddp/checkpoints").glob("*.pt"))


def test_intact_data_is_verified_and_a_dataset_without_checksums_is_called_unverified(run_train, tmp_path):
    r = run_train("--data-dir", str(make_dataset(tmp_path / "data")), "--exp-name", "a", "--max-train-steps", "2")
    assert r.returncode == 0, r.stderr
    assert "data: all 7 files match their checksums" in (tmp_path / "runs/a/log.txt").read_text()
    r = run_train("--data-dir", str(make_dataset(tmp_path / "plain", checksums=False)), "--exp-name", "b",
                  "--max-train-steps", "1")
    assert r.returncode == 0, r.stderr
    assert "carries no checksums" in (tmp_path / "runs/b/log.txt").read_text()


def test_nan_in_the_data_is_blamed_on_the_data_and_logged(run_train, tmp_path):
    data = make_dataset(tmp_path / "data", nan_at=5)
    r = run_train("--data-dir", str(data), "--exp-name", "a", "--max-train-steps", "6", "--logging-steps", "3")
    assert r.returncode == 2, r.stderr
    (line,) = error_lines(r.stderr)
    assert "not the learning rate" in line and "image 5 (row 1 of shard 1)" in line
    assert "mean-00001.npy (1 values)" in line
    assert "std-00001.npy" not in line
    assert "image 5" in (tmp_path / "runs/a/log.txt").read_text()


def test_a_damaged_checkpoint_is_refused_and_the_intact_one_named(run_train, tmp_path):
    data = make_dataset(tmp_path / "data")
    r = run_train("--data-dir", str(data), "--exp-name", "a", "--max-train-steps", "2",
                  "--checkpointing-steps", "1")
    assert r.returncode == 0, r.stderr
    folder = tmp_path / "runs/a/checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["0000001.pt", "0000001.pt.sha256", "0000002.pt",
                                                        "0000002.pt.sha256"]
    newest = folder / "0000002.pt"
    flip_byte(newest, newest.stat().st_size // 2)
    r = run_train("--data-dir", str(data), "--exp-name", "a", "--max-train-steps", "3", "--resume", "latest")
    assert r.returncode == 2
    (line,) = error_lines(r.stderr)
    assert f"checkpoint {newest} is damaged" in line
    assert f"newest intact one before it is {folder / '0000001.pt'}" in line
    move = f"mv {newest} {newest}.damaged"
    assert move in line
    subprocess.run(move.split(), check=True)  # the advice, followed as given
    r = run_train("--data-dir", str(data), "--exp-name", "a", "--max-train-steps", "3", "--resume", "latest")
    assert r.returncode == 0, r.stderr
    log = (tmp_path / "runs/a/log.txt").read_text()
    assert f"resumed from {folder / '0000001.pt'} at step 1" in log and "verified against its sha256" in log


def test_an_old_checkpoint_without_checksum_loads_unverified(run_train, tmp_path):
    data = make_dataset(tmp_path / "data")
    assert run_train("--data-dir", str(data), "--exp-name", "a", "--max-train-steps", "1").returncode == 0
    (tmp_path / "runs/a/checkpoints/0000001.pt.sha256").unlink()
    r = run_train("--data-dir", str(data), "--exp-name", "a", "--max-train-steps", "2", "--resume", "latest")
    assert r.returncode == 0, r.stderr
    assert "0000001.pt: unverified" in (tmp_path / "runs/a/log.txt").read_text()


KILL_DURING_CHECKPOINT = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {root!r})
    import integrity, train
    real = integrity._HashingWriter.write
    def write_then_die(self, data):
        real(self, data[: len(data) // 2])
        self.flush()
        os.kill(os.getpid(), signal.SIGKILL)  # a real kill, half-way through the checkpoint
    integrity._HashingWriter.write = write_then_die
    train.main(sys.argv[1:])
""")


def test_a_kill_during_a_checkpoint_write_leaves_a_temporary_that_the_next_start_removes(tmp_path):
    data = make_dataset(tmp_path / "data")
    argv = ["--output-dir", str(tmp_path / "runs"), *TINY, "--data-dir", str(data), "--exp-name", "a"]
    r = subprocess.run([sys.executable, "-c", KILL_DURING_CHECKPOINT.format(root=str(ROOT)), *argv,
                        "--max-train-steps", "1"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == -signal.SIGKILL
    folder = tmp_path / "runs/a/checkpoints"
    (temp,) = folder.iterdir()
    assert integrity.TEMP_NAME.match(temp.name) and temp.name.startswith(".0000001.pt.") and temp.stat().st_size > 0
    (folder / "user-notes.tmp").write_text("not ours")
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), *argv, "--max-train-steps", "1", "--resume", "latest"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr  # no checkpoint to resume from: the run starts over in its directory
    assert sorted(p.name for p in folder.iterdir()) == ["0000001.pt", "0000001.pt.sha256", "user-notes.tmp"]
    assert f"removed {temp}" in (tmp_path / "runs/a/log.txt").read_text()


# ----------------------------------------------------------------------------------------------
# Refused runs, changed settings


@pytest.mark.parametrize("bad", [["--learning-rate", "-1"], ["--batch-size", "64"], ["--ema-decay", "2"],
                                 ["--sample-every", "1"]])
def test_a_refused_run_leaves_nothing_and_the_corrected_command_runs(run_train, tmp_path, bad):
    data = make_dataset(tmp_path / "data")
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["vae"] = str(tmp_path / "no-such-vae")  # --sample-every: refused after the run directory exists
    (data / "manifest.json").write_text(json.dumps(manifest))
    r = run_train("--data-dir", str(data), "--exp-name", "a", "--max-train-steps", "1", *bad)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert bad[0] in r.stderr or "no-such-vae" in r.stderr
    assert not (tmp_path / "runs/a").exists()
    r = run_train("--data-dir", str(data), "--exp-name", "a", "--max-train-steps", "1")
    assert r.returncode == 0, r.stderr


def test_resume_refuses_changed_settings_and_records_the_ones_that_may_change(run_train, tmp_path):
    data = make_dataset(tmp_path / "data")
    assert run_train("--data-dir", str(data), "--exp-name", "a", "--max-train-steps", "1").returncode == 0
    args_file = tmp_path / "runs/a/args.json"
    before = args_file.read_bytes()
    r = run_train("--data-dir", str(data), "--exp-name", "a", "--max-train-steps", "2", "--resume", "latest",
                  "--batch-size", "2", "--seed", "1", "--learning-rate", "2e-3", "--gradient-accumulation-steps", "2")
    assert r.returncode == 2
    for difference in ("--batch-size: checkpoint 4, now 2", "--seed: checkpoint 0, now 1",
                       "--learning-rate: checkpoint 0.001, now 0.002",
                       "--gradient-accumulation-steps: checkpoint 1, now 2"):  # the global batch is batch x steps
        assert difference in r.stderr
    assert args_file.read_bytes() == before
    r = run_train("--data-dir", str(data), "--exp-name", "a", "--max-train-steps", "3", "--resume", "latest",
                  "--checkpointing-steps", "2")
    assert r.returncode == 0, r.stderr
    recorded = json.loads(args_file.read_text())
    assert recorded["max_train_steps"] == 3 and recorded["checkpointing_steps"] == 2
    (entry,) = recorded["history"]
    assert entry["step"] == 1 and entry["changed"]["max_train_steps"] == [1, 3]
    assert entry["changed"]["checkpointing_steps"] == [10000, 2] and "resume" in entry["changed"]
    assert "max_train_steps changed from 1 to 3" in (tmp_path / "runs/a/log.txt").read_text()


# ----------------------------------------------------------------------------------------------
# Worker processes die with their parent


PARENT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    import numpy as np, torch
    import integrity

    class Big(torch.utils.data.Dataset):
        def __len__(self):
            return 1000
        def __getitem__(self, i):
            return np.zeros(1 << 20, np.uint8)

    # Numpy batches (preprocessing's decoded images) are pickled through the worker's pipe, not shared as tensors:
    # once the pipe is full the worker waits for a reader, and after its parent's death it waits forever.
    init = integrity.worker_init() if {fix} else None
    loader = torch.utils.data.DataLoader(Big(), batch_size=4, num_workers=1, worker_init_fn=init, collate_fn=list)
    it = iter(loader)
    next(it)
    print(it._workers[0].pid, flush=True)
    time.sleep(600)
""")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # a zombie is dead, only not yet reaped


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize("fix", [True, False])
def test_a_killed_parent_takes_its_data_loader_worker_along(tmp_path, fix):
    proc = subprocess.Popen([sys.executable, "-c", PARENT.format(root=str(ROOT), fix=fix)], stdout=subprocess.PIPE,
                            text=True)
    worker = int(proc.stdout.readline().split()[-1])
    time.sleep(1.0)  # the worker fills the pipe and blocks
    assert _alive(worker)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + (10 if fix else 8)
    while _alive(worker) and time.time() < deadline:
        time.sleep(0.1)
    try:
        assert _alive(worker) is not fix  # without the fix it outlives its parent, as the issue saw
    finally:
        if _alive(worker):
            os.kill(worker, signal.SIGKILL)


def test_training_preprocessing_and_evaluation_loaders_set_the_worker_init():
    for path in ("training/loop.py", "preprocessing/encode.py", "evaluations/data.py"):
        assert "worker_init_fn=worker_init()" in (ROOT / path).read_text(), path


# ----------------------------------------------------------------------------------------------
# One-line errors elsewhere


def test_preprocessing_refuses_an_unwritable_dest_in_one_line(tmp_path, capsys):
    from preprocessing import encode

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    make_image_folder(tmp_path / "src")
    assert encode.main(["--source", str(tmp_path / "src"), "--dest", str(blocker / "latents"), "--device", "cpu"]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert line.startswith(f"error: --dest {blocker / 'latents'}: cannot write there")
    if os.geteuid() != 0:  # root writes through permission bits
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert encode.main(["--source", str(tmp_path / "src"), "--dest", str(locked / "x"), "--device", "cpu"]) == 2
        assert "cannot write there" in capsys.readouterr().err


def test_evaluator_folder_of_mixed_sizes_names_the_file(tmp_path):
    from PIL import Image

    from evaluations.data import EvaluationError, open_images

    for i in range(6):
        Image.fromarray(np.zeros((16, 16 if i != 4 else 20, 3), np.uint8)).save(tmp_path / f"{i:03d}.png")
    images = open_images(tmp_path, num_workers=2)
    with pytest.raises(EvaluationError) as e:
        list(images.batches(2))
    assert str(e.value) == (f"{tmp_path / '004.png'} is 20x16 pixels but 000.png is 16x16: all images of a folder "
                            "must have the same size")


def _children(pid: int) -> list[int]:
    """Child processes of `pid`, over all its threads; a thread that ends while they are read is skipped (not the
    whole answer: torch starts and ends threads all the time)."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except (FileNotFoundError, ProcessLookupError):
        return []
    found = []
    for task in tasks:
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_killed_preprocessing_run_leaves_no_decoding_worker(tmp_path):
    from helpers_data import make_tiny_vae
    from PIL import Image

    src = tmp_path / "src/n01"
    src.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(48):
        Image.fromarray(rng.integers(0, 255, (300, 300, 3), dtype=np.uint8)).save(src / f"{i:03d}.png")
    vae = make_tiny_vae(tmp_path / "vae")
    proc = subprocess.Popen([sys.executable, "-m", "preprocessing.encode", "--source", str(tmp_path / "src"),
                             "--dest", str(tmp_path / "latents"), "--vae", str(vae), "--device", "cpu",
                             "--num-workers", "1", "--batch-size", "1", "--shard-size", "48"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    workers = _children(proc.pid)
    while not workers and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
        workers = _children(proc.pid)
    assert workers, "the encoder started no worker process"
    time.sleep(0.5)  # decoded 256 px images (196 KB each) fill the worker's pipe
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while any(map(_alive, workers)) and time.time() < deadline:
        time.sleep(0.1)
    survivors = [w for w in workers if _alive(w)]
    for w in survivors:
        os.kill(w, signal.SIGKILL)
    assert not survivors
