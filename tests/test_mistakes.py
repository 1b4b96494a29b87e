"""Ordinary command-line mistakes that used to end in a traceback, an exit 0 with nothing done, or a misleading line:
each is one line naming the flag or file, exit 2, and nothing written or changed (the mistakes' table is in the
report of this hunt; the hostile files are tests/test_hostile_files.py's)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_data import TINY_TRAIN, error_lines, make_image_folder, write_latent_dataset
from helpers_generate import TINY_ARGS, make_checkpoint
from helpers_scripts import load_script
from test_launchers import launches, run_launcher

import generate
import train
from alignment import model_from_args
from checkpoints import load_checkpoint
from evaluations import evaluator
from preprocessing import encode

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import curves  # noqa: E402


def refused(call, capsys) -> tuple[int, str]:
    """(exit status, stderr) of an entry point's main called in this process (argparse's refusals exit)."""
    try:
        code = call()
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, err


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------
# Sizes the backbone cannot be built with


# (model, --hidden-size (None: the size's own), --num-heads, the line); SiT-S is 384 wide with 6 heads (DiT's models.py,
# DiT_S_2; REPA's models/sit.py, SiT_S_2)
SIZES = [
    ("SiT-S/2", 32, 3, "--hidden-size 32 is not divisible by --num-heads 3: each head takes hidden/heads"),
    ("SiT-S/2", 30, 2, "--hidden-size 30: SiT's 2-D sin-cos position embedding needs a multiple of 4"),
    ("LightningDiT-B/2", 36, 2, "--hidden-size 36 / --num-heads 2: LightningDiT's 2-D RoPE needs a head width "
                                "(hidden size / heads) divisible by 4"),
    ("SiT-S/2", None, 5, "--hidden-size 384 (SiT-S/2's) is not divisible by --num-heads 5"),
]


@pytest.mark.parametrize("model, hidden, heads, message", SIZES)
def test_a_size_the_model_cannot_have_is_a_usage_error_before_anything_is_written(tmp_path, capsys, model, hidden,
                                                                                   heads, message):
    size = ["--depth", "2", "--num-heads", str(heads), *(["--hidden-size", str(hidden)] if hidden else [])]
    argv = ["--data-dir", str(tmp_path / "data"), "--output-dir", str(tmp_path / "runs"), "--model", model, *size,
            "--vae-repa-depth", "1"]
    code, err = refused(lambda: train.main(argv), capsys)
    assert code == 2 and len(error_lines(err)) == 1 and message in err, err
    assert not (tmp_path / "runs").exists()
    # the second opinion: the backbone itself cannot be built with this size (it used to fail there, with a traceback)
    with pytest.raises(ValueError):
        model_from_args({**TINY_ARGS, "model": model, "hidden_size": hidden or 384, "num_heads": heads})
    model_from_args({**TINY_ARGS, "model": model, "hidden_size": 32, "num_heads": 2})  # a size it takes: built


def test_depth_zero_names_the_depth(tmp_path, capsys):
    code, err = refused(lambda: train.main(["--data-dir", str(tmp_path / "data"), "--output-dir", str(tmp_path / "r"),
                                            *TINY_TRAIN, "--depth", "0"]), capsys)
    assert code == 2 and "error: --depth must be positive, got 0" in err and not (tmp_path / "r").exists(), err


@pytest.mark.parametrize("argv, message", [
    (["--vae-repa-coeff", "-1"], "--vae-repa-coeff must be non-negative, got -1.0"),  # trained, exit 0
    (["--align", "repa", "--proj-coeff", "-0.5"], "--proj-coeff must be non-negative, got -0.5"),
    (["--align", "sra", "--sra-coeff", "-1"], "--sra-coeff must be non-negative, got -1.0"),
    (["--align", "sra", "--sra-t-max", "1.5"], "--sra-t-max must be in [0, 1], got 1.5"),
])
def test_a_negative_loss_weight_is_a_usage_error(tmp_path, capsys, argv, message):
    code, err = refused(lambda: train.main(["--data-dir", str(tmp_path / "data"), "--output-dir", str(tmp_path / "r"),
                                            *TINY_TRAIN, *argv]), capsys)
    assert code == 2 and error_lines(err) == [f"error: {message}"], err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("where, hint", [
    ("parent", "; a dataset is one level down, in {root}/latents: name that folder"),
    ("manifest", None),
    ("images", "; it holds images in class folders: encode them first (python -m preprocessing.encode --source "
               "{root}/images --dest DEST), then pass DEST"),
])
def test_a_data_dir_next_to_the_dataset_says_where_it_is(tmp_path, capsys, where, hint):
    root = tmp_path / "d"
    rng = np.random.default_rng(0)
    mean = rng.standard_normal((4, 4, 8, 8)).astype(np.float32)
    write_latent_dataset(root / "latents", mean, np.full_like(mean, 0.1), np.arange(4) % 2, num_classes=2)
    make_image_folder(root / "images")
    data_dir = {"parent": root, "manifest": root / "latents" / "manifest.json", "images": root / "images"}[where]
    code, err = refused(lambda: train.main(["--data-dir", str(data_dir), "--output-dir", str(tmp_path / "r"),
                                            *TINY_TRAIN]), capsys)
    if hint is None:
        expected = f"{data_dir} is a file; expected the dataset's folder (the one holding manifest.json)"
    else:
        expected = (f"{data_dir}: no manifest.json (a folder written by preprocessing/encode.py) and no "
                    f"vae-sd/dataset.json or dataset.json (REPA's layout)" + hint.format(root=root))
    assert code == 2 and error_lines(err) == [f"error: --data-dir {data_dir}: {expected}"], err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("argv, message", [
    (["--eval-samples", "1"], "--eval-samples must be at least 2, got 1"),  # was one line naming three flags
    (["--eval-batch-size", "0"], "--eval-batch-size must be at least 1, got 0"),
    (["--eval-ref", "IMAGENET"], "--eval-ref: IMAGENET: no image files"),  # was "--eval-ref / --inception-weights"
    (["--inception-weights", "MISSING"], "--inception-weights: Inception weights not found: MISSING"),
])
def test_eval_flags_name_the_one_flag_at_fault(tmp_path, capsys, argv, message):
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    names = {"IMAGENET": str(make_image_folder(tmp_path / "imagenet")), "MISSING": str(tmp_path / "none.pth")}
    argv = [names.get(a, a) for a in argv]
    message = message.replace("IMAGENET", names["IMAGENET"]).replace("MISSING", names["MISSING"])
    full = ["--data-dir", str(tmp_path / "data"), "--output-dir", str(tmp_path / "r"), *TINY_TRAIN, "--eval-every",
            "1", "--eval-ref", str(ref), "--inception-weights", str(tmp_path / "none.pth"), *argv]
    code, err = refused(lambda: train.main(full), capsys)
    assert code == 2 and f".py: error: {message}" in err.splitlines()[-1], err
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------------------------
# train.py: a resume past --max-train-steps


@pytest.mark.parametrize("argv, flag", [
    (["--max-train-steps", "1"], "--max-train-steps 1"),
    # 8 latents in batches of 4: an epoch is 2 steps, so --epochs 1 ends at step 2
    (["--max-train-steps", "3", "--epochs", "1"], "--epochs 1 (its passes end at step 2)"),
])
def test_resume_past_the_runs_end_changes_nothing(run_train, tmp_path, argv, flag):
    rng = np.random.default_rng(0)
    mean = rng.standard_normal((8, 4, 8, 8)).astype(np.float32)
    data = write_latent_dataset(tmp_path / "data", mean, np.full_like(mean, 0.1), rng.integers(0, 3, 8), num_classes=3)
    common = ["--data-dir", str(data), "--exp-name", "r", "--checkpointing-steps", "1"]
    assert run_train(*common, "--max-train-steps", "3").returncode == 0
    run_dir = tmp_path / "runs" / "r"
    before = tree(run_dir)
    proc = run_train(*common, *argv, "--resume", "latest")
    # it used to exit 0 ("done: 3 steps"), args.json rewritten with the smaller end
    assert proc.returncode == 2 and error_lines(proc.stderr) == [
        f"error: {flag}: checkpoint {run_dir / 'checkpoints' / '0000003.pt'} is at step 3 already; pass a larger "
        f"{flag.split()[0]} to train on"], proc.stderr
    after = tree(run_dir)
    assert {k: v for k, v in after.items() if k != "log.txt"} == {k: v for k, v in before.items() if k != "log.txt"}
    assert after["log.txt"].startswith(before["log.txt"])  # the refusal is appended to the log, nothing is lost
    assert json.loads(after["args.json"])["max_train_steps"] == 3


def test_resume_naming_a_folder_says_what_to_name_instead(run_train, tmp_path):
    (tmp_path / "old" / "checkpoints").mkdir(parents=True)
    proc = run_train("--data-dir", str(tmp_path / "data"), "--resume", str(tmp_path / "old"))
    assert proc.returncode == 2 and error_lines(proc.stderr) == [
        f"error: --resume {tmp_path / 'old'}: a folder, not a checkpoint file: name its NNNNNNN.pt, or resume a run "
        "with --resume latest and its --output-dir / --exp-name"], proc.stderr  # was "no such checkpoint file"
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------------------------
# A file that is no checkpoint at all, given as --ckpt


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from helpers_data import make_tiny_vae

    root = tmp_path_factory.mktemp("ckpt")
    return make_checkpoint(root / "0000002.pt", make_tiny_vae(root / "vae"))


@pytest.mark.parametrize("name, content", [("args.json", b'{\n  "seed": 0}'), ("log.txt", b"[2026-12-06] step 1"),
                                           ("latents.npy", None)])
def test_a_text_or_array_file_as_ckpt_is_named_without_advising_the_opt_in_that_runs_code(tmp_path, capsys, name,
                                                                                           content):
    path = tmp_path / name
    if content is None:
        np.save(path, np.zeros(3))
    else:
        path.write_bytes(content)
    out = tmp_path / "x.safetensors"
    for call in (lambda: generate.main(["--ckpt", str(path), "--device", "cpu", "--sample-dir", str(tmp_path / "s")]),
                 lambda: load_script("export").main(["--ckpt", str(path), "--out", str(out)])):
        code, err = refused(call, capsys)
        # before: "could not be read as plain data (Unsupported operand 123); ... pass --trust-checkpoint"
        assert code == 2 and f"--ckpt: {path} is not a checkpoint: expected torch.save's zip file" in err, err
        assert "--trust-checkpoint" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_checkpoints_in_both_torch_formats_still_load(tmp_path, tiny_checkpoint):
    """The check reads the first bytes only: torch.save's zip file and its older pickle layout both load."""
    state = load_checkpoint(tiny_checkpoint)
    legacy = tmp_path / "legacy.pt"
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    assert legacy.read_bytes()[:1] == b"\x80"  # a pickle, not a zip archive
    again = load_checkpoint(legacy)
    assert again["step"] == state["step"] and all(torch.equal(again["ema"][k], v) for k, v in state["ema"].items())
    # the legacy layout under pickle protocol 1 starts with torch's magic number as text: loaded when trusted
    torch.save(state, legacy, pickle_protocol=1, _use_new_zipfile_serialization=False)
    assert legacy.read_bytes()[:8] == b"L1195470"
    assert load_checkpoint(legacy, trust=True)["step"] == state["step"]
    # a cut zip file is a damaged checkpoint, in torch's words, not "not a checkpoint"
    raw = tiny_checkpoint.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="could not be read .*zip archive"):
        load_checkpoint(cut)


@pytest.mark.parametrize("fmt, name, expected", [("safetensors", "w.pt", "end in .safetensors"),
                                                 ("repa", "w.safetensors", "not end in .safetensors (e.g. .pt)")])
def test_export_refuses_an_out_name_its_readers_would_misread(tmp_path, capsys, tiny_checkpoint, fmt, name, expected):
    """A .safetensors file named w.pt went out with exit 0; generate.py, going by the name, then read it as a torch
    file."""
    out = tmp_path / name
    code, err = refused(lambda: load_script("export").main(["--ckpt", str(tiny_checkpoint), "--format", fmt, "--out",
                                                             str(out)]), capsys)
    assert code == 2 and error_lines(err) == [
        f"error: --out {out}: a --format {fmt} file is read by its name, which must {expected}"], err
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# Flags out of range, each named with its value


@pytest.mark.parametrize("flag", ["--num-fid-samples", "--per-proc-batch-size", "--num-steps"])
def test_generate_names_the_flag_that_is_not_positive(tmp_path, capsys, flag):
    argv = ["--ckpt", str(tmp_path / "none.pt"), "--sample-dir", str(tmp_path / "s"), "--num-fid-samples", "4",
            "--per-proc-batch-size", "2", "--num-steps", "2", flag, "0"]
    code, err = refused(lambda: generate.main(argv), capsys)
    assert code == 2 and error_lines(err) == [f"error: {flag} must be positive, got 0"], err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("flag, value, low", [("--batch-size", "0", 1), ("--num-workers", "-1", 0),
                                              ("--ref-pr-images", "3", 4)])
def test_evaluator_flags_out_of_range_are_usage_errors(tmp_path, capsys, flag, value, low):
    """--batch-size 0 ended in `range() arg 3 must not be zero`, --num-workers -1 in DataLoader's ValueError, after
    the Inception network was loaded. 4 reference images at least: a radius is the distance to the 3rd neighbour
    (openai/guided-diffusion, evaluations/evaluator.py: ManifoldEstimator's nhood_sizes=(3,))."""
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    argv = [str(ref), str(ref), "--out", str(tmp_path / "m.json"), "--inception-weights", str(tmp_path / "none.pth"),
            "--device", "cpu", flag, value]
    code, err = refused(lambda: evaluator.main(argv), capsys)
    assert code == 2 and error_lines(err) == [f"error: {flag} must be at least {low}, got {value}"], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.npz"]


def test_evaluator_out_naming_a_folder_is_refused_before_any_work(tmp_path, capsys):
    """It used to compute every feature, then fail in os.replace with IsADirectoryError (a traceback)."""
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "keep.txt").write_text("mine")
    before = tree(tmp_path)
    # weights that do not exist: the refusal comes before they are looked for
    argv = [str(ref), str(ref), "--out", str(tmp_path / "metrics"), "--overwrite", "--device", "cpu",
            "--inception-weights", str(tmp_path / "none.pth")]
    code, err = refused(lambda: evaluator.main(argv), capsys)
    assert code == 2 and error_lines(err) == [
        f"error: {tmp_path / 'metrics'} is a folder: --out and --save-ref name the file to write"], err
    assert tree(tmp_path) == before


@pytest.fixture
def read_only_folder(tmp_path, monkeypatch):
    """A folder this process cannot write to: chmod 555 for a user; for root, whom the mode does not stop, the answer a
    read-only file system gives (os.access(folder, W_OK) is False there; a test suite does not mount file systems)."""
    import os

    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() == 0:
        access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode, *a, **k: False if Path(path) == folder and mode & os.W_OK
                            else access(path, mode, *a, **k))
    else:
        folder.chmod(0o555)
    yield folder
    folder.chmod(0o755)


def test_evaluator_out_in_a_folder_it_cannot_write_is_refused_before_any_work(tmp_path, capsys, read_only_folder):
    """It computed every feature, then ended in the atomic writer's OSError traceback."""
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    out = read_only_folder / "m.json"
    argv = [str(ref), str(ref), "--out", str(out), "--device", "cpu", "--inception-weights", str(tmp_path / "no.pth")]
    code, err = refused(lambda: evaluator.main(argv), capsys)
    assert code == 2 and error_lines(err) == [
        f"error: {out}: its folder cannot be written to (the metrics would be lost at the end)"], err
    assert list(read_only_folder.iterdir()) == []


@pytest.mark.parametrize("argv, message", [
    (["--num-workers", "-2"], "--num-workers -2: must be at least 0"),  # DataLoader's ValueError, a directory left
    (["--scale", "0"], "--scale 0.0: must be positive"),  # encoded with a warning, a manifest with scale 0
    (["--scale", "-0.18215"], "--scale -0.18215: must be positive"),
    (["--latent-multiplier", "0"], "--latent-multiplier 0.0: must be positive"),
    (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
    (["--dest", "SOURCE"], "--dest SOURCE is the --source folder: give the latents a folder of their own"),
])
def test_encode_refuses_before_the_vae_or_the_destination(tmp_path, capsys, argv, message):
    source = make_image_folder(tmp_path / "images")
    before = tree(source)
    argv = [a.replace("SOURCE", str(source)) for a in argv]
    # a VAE that does not exist: the refusal comes before it is opened
    full = ["--source", str(source), "--dest", str(tmp_path / "latents"), "--vae", str(tmp_path / "no-vae"),
            "--resolution", "16", "--device", "cpu", *argv]
    code, err = refused(lambda: encode.main(full), capsys)
    assert code == 2 and error_lines(err) == ["error: " + message.replace("SOURCE", str(source))], err
    assert not (tmp_path / "latents").exists() and tree(source) == before


# ----------------------------------------------------------------------------------------------
# scripts/curves.py: checked before any generate.py run


@pytest.mark.parametrize("argv, message", [
    (["--nproc-per-node", "0"], "--nproc-per-node must be positive, got 0"),  # torchrun's AssertionError traceback
    (["--num-samples", "0"], "--num-samples must be positive, got 0"),  # generate.py's error, then "rerun to resume"
    (["--cfg-scale", "-2"], "--cfg-scale must be >= 1 (1: no guidance), got -2.0"),
    (["--ref", "MISSING"], "--ref MISSING: no such file or folder"),  # noticed after every sample was drawn
    (["--out-dir", "FILE"], "--out-dir FILE is a file; expected a folder"),  # noticed after the work
    (["RUN/checkpoints/0000002.pt"], "RUN/checkpoints/0000002.pt is not a train.py run directory (no checkpoints/ "
                                     "and no metrics.jsonl)"),
    (["NOWHERE"], "NOWHERE is not a train.py run directory (no such folder)"),
])
def test_curves_mistakes_are_usage_errors_before_any_work(tmp_path, capsys, monkeypatch, argv, message):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "0000002.pt").write_bytes(b"x")
    (tmp_path / "file").write_text("mine")
    names = {"MISSING": str(tmp_path / "none.npz"), "FILE": str(tmp_path / "file"), "RUN": str(run),
             "NOWHERE": str(tmp_path / "nowhere")}

    def real(text: str) -> str:
        for key, value in names.items():
            text = text.replace(key, value)
        return text

    monkeypatch.setattr(curves, "run_tool", lambda *a, **k: pytest.fail("a tool was run"))
    positional = [] if argv[0].startswith("RUN") or argv[0] == "NOWHERE" else [str(run)]
    before = tree(tmp_path)
    code, err = refused(lambda: curves.main([*positional, *map(real, argv), "--out-dir", str(tmp_path / "out")]
                                            if "--out-dir" not in argv else [*positional, *map(real, argv)]), capsys)
    assert code == 2 and err.splitlines()[-1].endswith(f".py: error: {real(message)}"), err
    assert tree(tmp_path) == before and not (tmp_path / "out").exists()


def test_curves_with_nothing_to_plot_says_so_instead_of_an_empty_table(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)  # a run that has not written its first checkpoint yet
    code, err = refused(lambda: curves.main([str(run), "--out-dir", str(tmp_path / "out")]), capsys)
    assert code == 2 and error_lines(err) == [f"error: nothing to plot: no checkpoints/NNNNNNN.pt and no metrics.jsonl "
                                              f"rows in {run}"], err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# scripts/benchmark_train.py


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps must be positive"),  # ZeroDivisionError after the timed steps
    (["--align", "none", "vae_repa"], "--align must be sets of vae-repa, repa, sra or none"),  # ValueError traceback
    (["--latent-size", "0"], "--latent-size must be a positive even number"),  # a convolution's RuntimeError
    (["--align", "repa"], "--latent-size must be a positive even number, and a multiple of 32 with repa"),  # 8 here
    (["--num-heads", "3"], "--hidden-size 32 is not divisible by --num-heads 3"),
])
def test_benchmark_train_mistakes_are_usage_errors(capsys, argv, message):
    bench = load_script("benchmark_train")
    tiny = ["--models", "SiT-S/2", "--depth", "2", "--hidden-size", "32", "--num-heads", "2", "--latent-size", "8",
            "--batch-size", "2", "--steps", "1", "--warmup", "0"]
    code, err = refused(lambda: bench.parse_args([*tiny, *argv]), capsys)
    assert code == 2 and f".py: error: {message}" in err.splitlines()[-1], err


# ----------------------------------------------------------------------------------------------
# The launchers' GPUS


@pytest.mark.parametrize("script", ["train_b2_table1.sh", "train_l2_xl2_table2.sh", "sample_xl2_table3.sh"])
@pytest.mark.parametrize("gpus", ["0", "eight", "-1"])
def test_a_gpus_that_is_no_process_count_is_one_line_and_launches_nothing(tmp_path, script, gpus):
    proc = run_launcher(tmp_path, script, GPUS=gpus, CKPT="runs/x")
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        f"{script}: GPUS={gpus}: expected the number of GPUs (processes) to use, 1 or more"], proc.stderr
    assert not (tmp_path / "launches.jsonl").exists()


def test_one_gpu_launches_without_multi_gpu(tmp_path):
    """accelerate refuses --multi_gpu with one process ("You need to use at least 2 processes"), with a traceback."""
    proc = run_launcher(tmp_path, "train_l2_xl2_table2.sh", GPUS="1")
    assert proc.returncode == 0, proc.stderr
    (argv,) = [json.loads(line) for line in (tmp_path / "launches.jsonl").read_text().splitlines()]
    assert argv[:4] == ["launch", "--num_processes", "1", "train.py"]
    assert launches(tmp_path, "train_l2_xl2_table2.sh", GPUS="2")[0][:2] == ["--model", "SiT-XL/2"]
    (argv,) = [json.loads(line) for line in (tmp_path / "launches.jsonl").read_text().splitlines()]
    assert argv[:5] == ["launch", "--multi_gpu", "--num_processes", "2", "train.py"]
