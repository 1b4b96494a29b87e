"""train.py --eval-every: the logged metrics equal generate.py + the evaluator on the same checkpoint; a kill during an
evaluation is redone after --resume and no step gets two rows; bad --eval-ref is refused before anything is written."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers_data import TINY_TRAIN, error_lines, make_tiny_vae, write_latent_dataset

import generate
import train
from cli import UsageError
from evaluations import evaluator, scoring
from evaluations.inception import write_random_weights
from training import evaluation

ROOT = Path(__file__).resolve().parents[1]
TINY = TINY_TRAIN


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    rng = np.random.default_rng(0)
    mean = rng.standard_normal((10, 4, 8, 8)).astype(np.float32)
    data = write_latent_dataset(root / "data", mean, np.full_like(mean, 0.1), rng.integers(0, 3, 10), shard_size=4,
                                num_classes=3, scale=0.5)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["vae"] = str(make_tiny_vae(root / "vae"))  # latents 4x8x8 -> 16x16 images
    (data / "manifest.json").write_text(json.dumps(manifest))
    ref = root / "ref.npz"
    np.savez(ref, arr_0=rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8))
    return {"data": data, "ref": ref, "weights": write_random_weights(root / "inception.pth")}


def eval_flags(assets, samples: int = 8) -> list[str]:
    return ["--eval-ref", str(assets["ref"]), "--inception-weights", str(assets["weights"]), "--eval-samples",
            str(samples), "--eval-num-steps", "3", "--eval-batch-size", "3"]


def test_logged_fid_equals_generate_and_evaluator_on_the_checkpoint(tmp_path, assets):
    args = train.parse_args(["--data-dir", str(assets["data"]), "--output-dir", str(tmp_path / "runs"),
                             "--exp-name", "e", *TINY, "--max-train-steps", "3", "--eval-every", "2",
                             "--checkpointing-steps", "100", "--keep-last", "1", *eval_flags(assets)])
    train.train(args)
    run = tmp_path / "runs" / "e"
    rows = evaluation.read_rows(run)
    assert [r["step"] for r in rows] == [2, 3]  # every 2 steps and at the end
    # a checkpoint at each evaluation step, kept although --keep-last 1 and --checkpointing-steps 100
    assert sorted(p.name for p in (run / "checkpoints").glob("*.pt")) == ["0000002.pt", "0000003.pt"]
    for row in rows:
        assert row["images_seen"] == 4 * row["step"] and row["num_samples"] == 8
        assert 0 < row["eval_seconds"] and 0 < row["eval_fraction"] < 1
        assert row["precision"] is not None  # the reference holds images

    # the same checkpoint evaluated afterwards, by the command-line tools, with the flags the row records
    row = rows[0]
    assert generate.main(["--ckpt", str(run / "checkpoints" / "0000002.pt"), "--sample-dir", str(tmp_path / "s"),
                          "--device", "cpu", *row["protocol"]["generate_flags"]]) == 0
    (npz,) = (tmp_path / "s").glob("*.npz")
    assert json.loads((npz.with_suffix("") / "config.json").read_text())["config"]["cfg_channels"] == row["protocol"][
        "cfg_channels"]  # the folder and the row record the guided channels alike
    out = tmp_path / "metrics.json"
    assert evaluator.main([str(assets["ref"]), str(npz), "--inception-weights", str(assets["weights"]),
                           "--out", str(out), "--device", "cpu", "--quiet", "--num-workers", "0"]) == 0
    offline = json.loads(out.read_text())
    for key in ("fid", "sfid", "inception_score", "precision", "recall"):
        assert row[key] == pytest.approx(offline[key], rel=1e-6, abs=1e-9), key
    assert rows[1]["fid"] != offline["fid"]  # the step-3 model gives another figure: the comparison can fail


def test_kill_during_evaluation_then_resume_gives_one_row_per_step(tmp_path, assets):
    cmd = [sys.executable, "train.py", "--data-dir", str(assets["data"]), "--output-dir", str(tmp_path / "runs"),
           "--exp-name", "k", *TINY, "--max-train-steps", "4", "--eval-every", "2", *eval_flags(assets, samples=40)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = tmp_path / "runs" / "k"
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            log = run / "log.txt"
            if log.is_file() and "step 2: evaluating" in log.read_text():
                break
            assert proc.poll() is None, "train.py ended before its first evaluation"
            time.sleep(0.05)
        else:
            pytest.fail("no evaluation started")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert evaluation.read_rows(run) == []  # killed during the evaluation of step 2
    assert (run / "checkpoints" / "0000002.pt").is_file()

    for _ in range(2):  # the second resume finds everything done: it must not write step 4 again
        done = subprocess.run(cmd + ["--resume", "latest"], cwd=ROOT, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
    assert [r["step"] for r in evaluation.read_rows(run)] == [2, 4]
    assert (run / "log.txt").read_text().count("step 2: evaluating") == 2  # interrupted once, redone once


@pytest.mark.parametrize("problem", ["missing", "not-images", "no-ref"])
def test_bad_eval_ref_is_refused_before_anything_is_written(tmp_path, assets, problem, capsys):
    ref = {"missing": tmp_path / "nope.npz", "not-images": tmp_path / "bad.npz", "no-ref": None}[problem]
    if problem == "not-images":
        np.savez(ref, arr_0=np.zeros((5, 3), np.float32))
    flags = [] if ref is None else ["--eval-ref", str(ref)]
    with pytest.raises(SystemExit):
        train.parse_args(["--data-dir", str(assets["data"]), "--output-dir", str(tmp_path / "runs"), *TINY,
                          "--eval-every", "2", *flags])
    assert "--eval-" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_append_row_skips_a_step_already_written_and_survives_a_cut_line(tmp_path):
    assert evaluation.append_row(tmp_path, {"step": 2, "fid": 1.0})
    with open(tmp_path / evaluation.METRICS_FILE, "a") as f:
        f.write('{"step": 4, "fi')  # a line cut short by a kill
    assert not evaluation.append_row(tmp_path, {"step": 2, "fid": 9.0})
    assert evaluation.append_row(tmp_path, {"step": 4, "fid": 3.0})
    assert evaluation.read_rows(tmp_path) == [{"step": 2, "fid": 1.0}, {"step": 4, "fid": 3.0}]


def test_two_gloo_processes_evaluate_together_as_one_generate_run(tmp_path, assets):
    # Each rank samples and scores every other index (7: an uneven split); rank 0 puts the features back in order.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train.py"), "--data-dir", str(assets["data"]), "--output-dir", str(tmp_path / "runs"),
           "--exp-name", "ddp", *TINY, "--max-train-steps", "2", "--eval-every", "2", *eval_flags(assets, samples=7)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = evaluation.read_rows(tmp_path / "runs" / "ddp")
    assert row["num_samples"] == 7 and row["protocol"]["processes"] == 2

    assert generate.main(["--ckpt", str(tmp_path / "runs/ddp/checkpoints/0000002.pt"), "--sample-dir",
                          str(tmp_path / "s"), "--device", "cpu", *row["protocol"]["generate_flags"]]) == 0
    (npz,) = (tmp_path / "s").glob("*.npz")
    offline = scoring.evaluate(assets["ref"], npz, inception_weights=assets["weights"], device="cpu", verbose=False)
    for key in ("fid", "sfid", "inception_score", "precision", "recall"):
        # Inception sees other batches on two ranks: equal up to float32 rounding
        assert row[key] == pytest.approx(offline[key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("mode", [["--eval-mode", "sde"], ["--eval-mode", "ode", "--eval-heun"],
                                  ["--eval-mode", "ode", "--eval-cfg-channels", "3"]])
def test_evaluation_samples_with_the_settings_of_its_recorded_generate_command(tmp_path, assets, mode):
    """The evaluation's sampling settings are those generate.py parses from the flags the evaluation records (ODE too:
    it once lacked the time shift generate.py passes, so --eval-mode ode failed at the first evaluation)."""
    from sampling.batch import SamplingSettings

    args = train.parse_args(["--data-dir", str(assets["data"]), "--output-dir", str(tmp_path), *TINY, "--eval-every",
                             "2", *eval_flags(assets), "--eval-cfg-scale", "1.5", "--eval-seed", "7", *mode])
    recorded = generate.parse_args(["--ckpt", "checkpoint.pt", *evaluation.generate_flags(args)])
    assert evaluation.sampling_settings(args) == SamplingSettings.from_args(recorded)
    assert recorded.cfg_channels == (3 if "--eval-cfg-channels" in mode else "all")


def test_more_guided_channels_than_the_model_has_are_refused(tmp_path):
    import argparse

    args = argparse.Namespace(eval_every=2, eval_cfg_channels=5)
    with pytest.raises(UsageError, match="--eval-cfg-channels 5: the model has 4 latent channels"):
        evaluation.make_evaluator(args, {"latent_shape": [4, 8, 8]}, tmp_path, accelerator=None)


def test_an_evaluation_that_fails_stops_the_run_with_one_line_and_resume_evaluates_its_step(tmp_path, assets,
                                                                                            monkeypatch, capsys):
    """A single process whose sampling raises (e.g. out of memory) stops with one line naming what failed, in log.txt
    too; the step's checkpoint is kept and --resume latest evaluates that step, as the line says."""
    def fail(*args, **kwargs):
        raise RuntimeError("out of memory (injected)")

    argv = ["--data-dir", str(assets["data"]), "--output-dir", str(tmp_path / "runs"), "--exp-name", "f", *TINY,
            "--max-train-steps", "2", "--eval-every", "2", *eval_flags(assets)]
    with monkeypatch.context() as patch:
        patch.setattr(evaluation, "sample_batch", fail)
        assert train.main(argv) == 2
    line = ("the evaluation at step 2 failed while sampling its images: RuntimeError: out of memory (injected). The "
            "checkpoint of step 2 is written: fix the cause and run the same command with --resume latest, which "
            "evaluates step 2 again")
    assert error_lines(capsys.readouterr().err) == [f"error: {line}"]
    run = tmp_path / "runs" / "f"
    assert line in (run / "log.txt").read_text()
    assert evaluation.read_rows(run) == []
    assert train.main([*argv, "--resume", "latest"]) == 0
    assert [r["step"] for r in evaluation.read_rows(run)] == [2]
