"""scripts/quickstart.py: the --smoke pipeline end to end, its refusal to overwrite, and the metric helpers."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import quickstart_figures as figures  # noqa: E402
import quickstart_images as image_folder  # noqa: E402
import quickstart_progress as progress  # noqa: E402
import quickstart_runs as runs  # noqa: E402
import quickstart_scoring as scoring  # noqa: E402

ARMS = ("vae-repa", "vanilla")


def run_quickstart(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "quickstart.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_smoke_pipeline(tmp_path):
    out = tmp_path / "qs"
    proc = run_quickstart("--smoke", "--device", "cpu", "--output-dir", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # every output exists
    assert sorted(p.name for p in (out / "images").iterdir()) == [str(d) for d in range(10)]
    assert len(list((out / "images" / "3").glob("*.png"))) == 100
    assert (out / "vae" / "config.json").is_file()
    assert (out / "latents" / "manifest.json").is_file()
    for arm in ARMS:
        run = out / "runs" / arm
        assert (run / "args.json").is_file() and (run / "log.txt").is_file()
        assert list((run / "checkpoints").glob("*.pt"))
        npz = list((out / "samples" / arm).glob("*.npz"))
        assert len(npz) == 1
        assert np.load(npz[0])["arr_0"].shape == (50, 32, 32, 3)
    for png in ("grid_real", "vae_reconstructions", "grid_vae-repa", "grid_vanilla", "grids", "loss_curves"):
        with Image.open(out / f"{png}.png") as im:
            assert im.size[0] > 50 and im.size[1] > 50, png

    # the table holds measured, finite numbers in range
    results = json.loads((out / "results.json").read_text())
    assert results["held_out_accuracy"] > 0.5  # a 10-class digit classifier, chance is 0.1
    rows = {r["name"]: r for r in results["rows"]}
    assert set(rows) == {"real (held out)", "VAE reconstructions", "SiT vae-repa", "SiT vanilla"}
    for row in rows.values():
        assert 0.0 <= row["accuracy"] <= 1.0
        if "fd" in row:
            assert math.isfinite(row["fd"]) and row["fd"] >= -1e-6
    for arm in ARMS:
        assert math.isfinite(rows[f"SiT {arm}"]["loss"]) and rows[f"SiT {arm}"]["loss"] > 0
    assert rows["SiT vae-repa"]["vae_repa_loss"] > 0 and rows["SiT vanilla"]["vae_repa_loss"] is None
    assert (out / "results.txt").read_text().strip() in proc.stdout
    for arm in ARMS:
        assert str(out / f"grid_{arm}.png") in proc.stdout  # the closing list says where each output is


def test_refuses_to_overwrite(tmp_path):
    out = tmp_path / "qs"
    out.mkdir()
    (out / "keep.txt").write_text("previous run")
    proc = run_quickstart("--smoke", "--output-dir", str(out), timeout=120)
    assert proc.returncode != 0
    assert "--overwrite" in proc.stderr
    assert (out / "keep.txt").read_text() == "previous run"


def test_frechet_distance():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2000, 8))
    assert abs(scoring.frechet_distance(a, a)) < 1e-6
    shifted = a + np.array([3.0] + [0.0] * 7)  # same covariance, mean moved by 3: distance 9
    assert scoring.frechet_distance(a, shifted) == pytest.approx(9.0, abs=1e-6)
    scaled = a * 2  # mean ~0, covariance 4 I vs I: trace(I + 4I - 2 * 2I) = 8 per the formula
    assert scoring.frechet_distance(a, scaled) == pytest.approx(8.0, rel=0.05)


def test_parse_train_log(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text(
        "[2026-01-01 00:00:00] model SiT-S/2: 0.07M parameters (alignment on)\n"
        "[2026-01-01 00:00:01] step 10: total_loss=2.5 loss=1.9 vae_repa_loss=0.6 grad_norm=0.7 images_per_s=939.3\n"
        "[2026-01-01 00:00:02] step 20: total_loss=2.2 loss=1.7 vae_repa_loss=0.5 grad_norm=0.6 images_per_s=1.2e+03\n"
    )
    curves = runs.parse_train_log(log)
    assert curves["step"].tolist() == [10, 20]
    assert curves["loss"].tolist() == [1.9, 1.7]
    assert curves["images_per_s"].tolist() == [939.3, 1200.0]


def test_stratified_split_and_mnist_folder(tmp_path):
    assert image_folder.write_mnist_folder(tmp_path, per_class=3) == 30
    images, labels, classes = image_folder.load_image_folder(tmp_path, 32)
    assert images.shape == (30, 32, 32, 3) and images.dtype == np.uint8
    assert classes == [str(d) for d in range(10)] and np.bincount(labels).tolist() == [3] * 10
    assert (images[..., 0] == images[..., 2]).all()  # grey digits copied into R, G and B
    assert images[:, :2].max() == 0  # 2 px black padding around the 28x28 digit
    train, test = image_folder.stratified_split(labels, 0.34, seed=0)
    assert set(train).isdisjoint(test) and len(train) + len(test) == 30
    assert np.bincount(labels[test]).tolist() == [1] * 10


def test_a_second_run_reuses_or_restarts_its_own_folder(tmp_path, capsys):
    """`make quickstart` twice: the quickstart's own folder is reused when finished with the same settings, started
    again when unfinished or made with other settings; a folder it did not write is kept unless --overwrite."""
    import quickstart

    settings = {"smoke": True, "seed": 0}
    out = tmp_path / "qs"
    out.mkdir()
    (out / quickstart.ARGS_FILE).write_text(json.dumps(settings))
    (out / quickstart.RESULTS_FILE).write_text("table")
    assert quickstart.prepare_output_dir(out, False, settings) is True  # finished, same settings: reused
    assert (out / quickstart.RESULTS_FILE).read_text() == "table"

    assert quickstart.prepare_output_dir(out, False, {**settings, "seed": 1}) is False  # other settings: restarted
    assert list(out.iterdir()) == [] and "other settings" in capsys.readouterr().out

    (out / quickstart.ARGS_FILE).write_text(json.dumps(settings))  # unfinished (no results): restarted
    (out / "images").mkdir()
    assert quickstart.prepare_output_dir(out, False, settings) is False
    assert list(out.iterdir()) == [] and "unfinished" in capsys.readouterr().out

    (out / "keep.txt").write_text("not the quickstart's")
    with pytest.raises(SystemExit, match="--overwrite"):
        quickstart.prepare_output_dir(out, False, settings)
    assert (out / "keep.txt").is_file()
    (out / quickstart.ARGS_FILE).write_text(json.dumps(settings))
    (out / quickstart.RESULTS_FILE).write_text("table")
    assert quickstart.prepare_output_dir(out, True, settings) is False  # --overwrite: always from scratch
    assert list(out.iterdir()) == []


def test_eta_text():
    assert progress.eta_text(60.0, 10, 30) == "elapsed 01:00, about 02:00 left"
    assert progress.eta_text(5.0, 0, 4).startswith("elapsed 00:05")


def test_paired_summary_says_whether_the_difference_exceeds_its_spread():
    # differences +0.01, +0.02, +0.03: mean 0.02, std 0.01 -> exceeds, in VAE-REPA's favour for accuracy
    s = scoring.paired_summary([0.51, 0.62, 0.73], [0.50, 0.60, 0.70], "class accuracy", higher_is_better=True)
    assert s["mean"] == pytest.approx(0.02) and s["std"] == pytest.approx(0.01) and s["exceeds"] is True
    assert "exceeds its spread (in VAE-REPA's favour)" in s["sentence"] and "+0.02 ± 0.01" in s["sentence"]
    # the same differences for a lower-is-better metric count against VAE-REPA
    s = scoring.paired_summary([10.01, 10.02, 10.03], [10, 10, 10], "FD", higher_is_better=False)
    assert s["exceeds"] is True and "against VAE-REPA" in s["sentence"]
    # +0.007, -0.016, -0.013 (the one-seed differences): mean -0.0073, std 0.0125 -> no
    s = scoring.paired_summary([0.007, -0.016, -0.013], [0, 0, 0], "class accuracy", higher_is_better=True)
    assert s["exceeds"] is False and "does not exceed its spread" in s["sentence"]
    assert s["std"] == pytest.approx(float(np.std([0.007, -0.016, -0.013], ddof=1)))
    s = scoring.paired_summary([0.7], [0.6], "class accuracy", higher_is_better=True)
    assert s["exceeds"] is None and "one seed" in s["sentence"]


def test_seeds_share_everything_but_the_sit_seed(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    import quickstart

    args = quickstart.parse_args(["--smoke", "--seeds", "3", "--train-steps", "30", "--output-dir", str(tmp_path)])
    assert args.curve_points == 4 and runs.eval_steps(args) == [7, 14, 21, 30]
    cmds = {seed: runs.train_command(args, tmp_path, "vae-repa", seed) for seed in (0, 2)}
    differ = [(a, b) for a, b in zip(*cmds.values()) if a != b]
    assert differ == [("vae-repa-seed0", "vae-repa-seed2"), ("0", "2")]  # the run's name and --seed only
    gens = [runs.generate_command(args, tmp_path, arm, seed, 14) for arm in runs.ARMS for seed in (0, 1)]
    seeds = {g[g.index("--global-seed") + 1] for g in gens}
    assert seeds == {"0"}  # one sampling seed for every run: the arms share the sampling noise
    assert gens[0][gens[0].index("--ckpt") + 1].endswith("vae-repa-seed0/checkpoints/0000014.pt")
    one = quickstart.parse_args(["--smoke", "--output-dir", str(tmp_path)])
    assert one.curve_points == 1 and runs.eval_steps(one) == [30]
    assert "--exp-name" in (cmd := runs.train_command(one, tmp_path, "vanilla")) and "vanilla" in cmd


def test_metric_curves_plot(tmp_path):
    points = {arm: {seed: {step: {"accuracy": 0.1 * step + seed / 10 + k, "fd": 50 - step + seed}
                           for step in (10, 20)} for seed in (0, 1, 2)} for k, arm in enumerate(ARMS)}
    figures.plot_metric_curves(points, tmp_path / "m.png", "note")
    with Image.open(tmp_path / "m.png") as im:
        assert im.size[0] > 500
