"""scripts/curves.py: every checkpoint evaluated once through generate.py + the evaluator, a second run does no work,
and the table holds the evaluator's and metrics.jsonl's figures and the paper's Table 2 points."""

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_data import make_tiny_vae
from helpers_generate import make_checkpoint
from PIL import Image

import generate
from evaluations import evaluator, scoring
from evaluations.inception import write_random_weights

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import curves  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture
def calls(monkeypatch):
    """generate.py and the evaluator run in this process (the same argv as the subprocess would get), counted."""
    seen = []

    def run_tool(argv, nproc=1):
        seen.append(argv)
        rc = (generate.main if argv[0].endswith("generate.py") else evaluator.main)(argv[1:])
        assert rc == 0, argv

    monkeypatch.setattr(curves, "run_tool", run_tool)
    return seen


def make_runs(root: Path) -> tuple[Path, Path]:
    """A tiny run with two checkpoints (one recording its wall time) and a metrics.jsonl row, and an XL/2 VAE-REPA
    run with only metrics.jsonl rows (to draw the paper's points beside)."""
    vae = make_tiny_vae(root / "vae")
    tiny = root / "runs" / "tiny"
    for step, seed in ((2, 0), (4, 1)):
        path = make_checkpoint(tiny / "checkpoints" / f"{step:07d}.pt", vae, seed=seed, step=step)
        if step == 4:
            checkpoint = torch.load(path, weights_only=True)
            torch.save({**checkpoint, "wall_seconds": 1800.0}, path)
    (tiny / "args.json").write_text(json.dumps({"model": "SiT-S/2", "depth": 2, "align": ["vae-repa"],
                                                "batch_size": 4, "world_size": 2}))
    (tiny / "metrics.jsonl").write_text(json.dumps({"step": 2, "images_seen": 8, "gpu_hours": None, "fid": 123.5,
                                                    "inception_score": 1.5, "num_samples": 6}) + "\n")
    xl = root / "runs" / "xl"
    xl.mkdir()
    (xl / "args.json").write_text(json.dumps({"model": "SiT-XL/2", "align": ["vae-repa"], "batch_size": 256}))
    (xl / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "images_seen": 256 * s, "gpu_hours": s / 1000,
                                                          "fid": f, "inception_score": 50.0, "num_samples": 10000})
                                              + "\n" for s, f in ((100_000, 30.0), (400_000, 14.0))))
    return tiny, xl


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_curves_evaluates_each_checkpoint_once_and_tabulates_what_the_tools_measured(tmp_path, calls):
    tiny, xl = make_runs(tmp_path)
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=np.random.default_rng(0).integers(0, 256, (10, 16, 16, 3), dtype=np.uint8))
    weights = write_random_weights(tmp_path / "inception.pth")
    argv = [str(tiny), str(xl), "--ref", str(ref), "--num-samples", "6", "--num-steps", "2", "--device", "cpu",
            "--inception-weights", str(weights), "--per-proc-batch-size", "3", "--out-dir", str(tmp_path / "out")]
    assert curves.main(argv) == 0
    # two checkpoints, the two tools for each
    assert [Path(a[0]).name for a in calls] == ["generate.py", "evaluator.py", "generate.py", "evaluator.py"]

    rows = read_csv(tmp_path / "out" / "curves.csv")
    ours = {int(r["step"]): r for r in rows if r["run"] == "tiny" and r["series"] == "6 samples"}
    assert sorted(ours) == [2, 4]
    work = tiny / "curves" / curves.protocol_tag(curves.parse_args(argv))
    for step, row in ours.items():
        # the samples scored for this row were drawn from this row's checkpoint
        (folder,) = [p for p in (work / f"{step:07d}").iterdir() if p.is_dir()]
        assert json.loads((folder / "config.json").read_text())["sources"]["ckpt"].endswith(f"{step:07d}.pt")
        images = np.stack([np.asarray(Image.open(folder / f"{i:06d}.png")) for i in range(6)])
        expected = scoring.evaluate(ref, images, inception_weights=weights, device="cpu", verbose=False)
        for key in ("fid", "sfid", "inception_score", "precision", "recall"):
            assert float(row[key]) == pytest.approx(expected[key], rel=1e-9), (step, key)
        assert int(row["images_seen"]) == 4 * step
    assert ours[2]["gpu_hours"] == "" and float(ours[4]["gpu_hours"]) == pytest.approx(1800 * 2 / 3600)
    assert ours[2]["model"] == "SiT-S/2 (custom size)" and ours[2]["method"] == "vae-repa"

    logged = [r for r in rows if r["series"].startswith("in training")]
    assert [(r["run"], int(r["step"]), float(r["fid"])) for r in logged] == [
        ("tiny", 2, 123.5), ("xl", 100_000, 30.0), ("xl", 400_000, 14.0)]
    paper = [r for r in rows if r["run"].startswith("paper")]
    assert {int(r["step"]): float(r["fid"]) for r in paper} == {400_000: 11.7, 1_000_000: 8.2, 2_000_000: 7.0,
                                                                 4_000_000: 6.6}  # Table 2, XL/2 + VAE-REPA
    assert all(int(r["images_seen"]) == 256 * int(r["step"]) for r in paper)
    md = (tmp_path / "out" / "curves.md").read_text()
    assert "6 samples per checkpoint, SDE sampler with 2 steps, no guidance" in md and "| 11.7 |" in md
    with Image.open(tmp_path / "out" / "curves.png") as im:
        assert im.size[0] > 1000

    # run twice: nothing is sampled or evaluated again, and the table is the same
    results = {p: p.stat().st_mtime_ns for p in work.rglob("*") if p.is_file()}
    calls.clear()
    assert curves.main(argv) == 0
    assert calls == []
    assert {p: p.stat().st_mtime_ns for p in work.rglob("*") if p.is_file()} == results
    assert read_csv(tmp_path / "out" / "curves.csv") == rows


def test_curves_needs_ref_only_for_work_left(tmp_path, calls):
    tiny, _ = make_runs(tmp_path)
    with pytest.raises(SystemExit, match="--ref"):
        curves.main([str(tiny), "--out-dir", str(tmp_path / "out")])
    assert calls == []


def test_cfg_channels_reach_generate_and_name_their_own_protocol(tmp_path, monkeypatch):
    """--cfg-channels is passed to generate.py as given, and results of another channel choice are kept apart (an old
    guided protocol without the flag keeps its folder name: all channels)."""
    seen = []

    def run_tool(argv, nproc=1):
        seen.append(argv)

    monkeypatch.setattr(curves, "run_tool", run_tool)
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)  # the paths exist: curves.py checks them before any work
    Path("ref.npz").touch()
    base = [str(run), "--ref", "ref.npz", "--cfg-scale", "4", "--guidance-high", "0.9"]
    three = curves.parse_args([*base, "--cfg-channels", "3"])
    with pytest.raises(SystemExit, match="expected one .npz"):
        curves.evaluate_checkpoint(three, run, 2, run / "0000002.pt", {"batch_size": 4, "processes": 1}, {})
    assert generate.parse_args(seen[0][1:]).cfg_channels == 3
    assert curves.protocol_tag(three) != curves.protocol_tag(curves.parse_args(base))
    assert curves.protocol_tag(curves.parse_args(base)) == "50000-sde-250steps-cfg4.0-high0.9-seed0-ref-ref"
    assert "on channels 0-2" in curves.protocol_caption(three)
