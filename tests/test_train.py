"""train.py: exact resume, ranks in agreement, once-per-step bookkeeping, clear errors for bad input."""

import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_data import make_tiny_vae, write_latent_dataset
from helpers_distributed import torchrun

import train
from alignment import model_from_args
from devices import resolve_compile
from training import checkpoint_writer, loop

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "SiT-S/2", "--depth", "2", "--hidden-size", "32", "--num-heads", "2", "--vae-repa-depth", "1",
        "--mixed-precision", "no", "--num-workers", "0", "--sample-every", "0", "--logging-steps", "1",
        "--batch-size", "4", "--learning-rate", "1e-3", "--ema-decay", "0.9"]


def make_dataset(root: Path, n: int = 10, channels: int = 4, size: int = 8, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    mean = rng.standard_normal((n, channels, size, size)).astype(np.float32) * 5
    std = np.full_like(mean, 0.1)
    flip = mean[..., ::-1].copy()
    return write_latent_dataset(root, mean, std, rng.integers(0, 3, n), flip, std, shard_size=4, num_classes=3)


def run(tmp_path: Path, data: Path, *extra: str) -> tuple:
    args = train.parse_args(["--data-dir", str(data), "--output-dir", str(tmp_path / "runs"), *TINY, *extra])
    return train.train(args)


def logged_losses(run_dir: Path) -> dict[int, str]:
    lines = (run_dir / "log.txt").read_text().splitlines()
    out = {}
    for line in lines:
        if "] step " in line:
            step, rest = line.split("] step ")[1].split(": ", 1)
            out[int(step)] = " ".join(w for w in rest.split() if not w.startswith("images_per_s"))
    return out


@pytest.fixture
def restore_determinism():
    """train.py --deterministic sets process-wide flags (as a CLI may); put them back for the next tests."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
             torch.backends.cudnn.benchmark, torch.backends.cuda.flash_sdp_enabled(),
             torch.backends.cuda.mem_efficient_sdp_enabled(), os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
             getattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: None)())
    yield
    torch.use_deterministic_algorithms(saved[0])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[1], saved[2]
    torch.backends.cuda.enable_flash_sdp(saved[3])
    torch.backends.cuda.enable_mem_efficient_sdp(saved[4])
    if saved[6] is not None:
        torch.backends.cuda.enable_cudnn_sdp(saved[6])
    if saved[5] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved[5]


@pytest.mark.parametrize("deterministic", [False, True])
def test_exact_resume_on_the_cpu(tmp_path, deterministic, restore_determinism):
    # The CPU's kernels are deterministic either way; tests/test_gpu.py covers CUDA, where --deterministic is needed.
    data = make_dataset(tmp_path / "data")  # 10 latents, batch 4: epochs end mid-run and drop a remainder
    cpu = ["--device", "cpu", *(["--deterministic"] if deterministic else [])]
    straight, straight_ema = run(tmp_path, data, *cpu, "--exp-name", "straight", "--max-train-steps", "6")
    run(tmp_path, data, *cpu, "--exp-name", "split", "--max-train-steps", "3", "--checkpointing-steps", "3")
    resumed, resumed_ema = run(tmp_path, data, *cpu, "--exp-name", "split", "--max-train-steps", "6",
                               "--resume", "latest")
    assert torch.are_deterministic_algorithms_enabled() == deterministic
    for a, b in ((straight, resumed), (straight_ema, resumed_ema)):
        for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(p, q), name
    runs = tmp_path / "runs"
    assert logged_losses(runs / "straight") == logged_losses(runs / "split")  # every step's losses, 1..6
    ckpt_a = torch.load(runs / "straight/checkpoints/0000006.pt", weights_only=True)
    ckpt_b = torch.load(runs / "split/checkpoints/0000006.pt", weights_only=True)
    assert ckpt_a["data"] == ckpt_b["data"] == {"epoch": 2, "position": 8}  # 2 batches per epoch: 6 = 3 epochs
    for sa, sb in zip(ckpt_a["opt"]["state"].values(), ckpt_b["opt"]["state"].values()):
        assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])

    # A checkpoint written before RNG states were stored as tensors (Python's state tuple, numpy's legacy tuple
    # holding an array) resumes exactly as well. torch.load(weights_only=True) alone refuses it: the allowlist
    # of numpy's array reconstruction is what opens it.
    ckpt = torch.load(runs / "split/checkpoints/0000003.pt", weights_only=True)
    for state in ckpt["rng"]:
        py, npy = state["python"], state["numpy"]
        state["python"] = (py["version"], tuple(py["state"].tolist()), py["gauss_next"])
        state["numpy"] = (npy["bit_generator"], npy["key"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                          npy["gauss"])
    old = runs / "old/checkpoints/0000003.pt"
    old.parent.mkdir(parents=True)
    torch.save(ckpt, old)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(old, weights_only=True)
    old_model, old_ema = run(tmp_path, data, "--exp-name", "old", "--max-train-steps", "6", "--resume", "latest")
    for a, b in ((straight, old_model), (straight_ema, old_ema)):
        for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(p, q), name


def test_checkpoint_contents_and_retention(tmp_path):
    data = make_dataset(tmp_path / "data")
    run(tmp_path, data, "--exp-name", "r", "--max-train-steps", "6", "--checkpointing-steps", "1",
        "--keep-last", "2", "--keep-every", "4", "--gradient-accumulation-steps", "2", "--batch-size", "2")
    run_dir = tmp_path / "runs/r"
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.pt")) == ["0000004.pt", "0000005.pt", "0000006.pt"]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.sha256")) == [
        "0000004.pt.sha256", "0000005.pt.sha256", "0000006.pt.sha256"]  # pruned with their checkpoint
    ckpt = torch.load(run_dir / "checkpoints/0000006.pt", weights_only=True)
    assert {"format", "model", "ema", "opt", "step", "args", "rng", "data"} <= set(ckpt)
    assert ckpt["step"] == 6 and len(ckpt["rng"]) == 1
    # Accumulation (REPA's meaning: --batch-size 2 is the micro-batch, an optimizer step sees 2 x 2):
    # 6 optimizer steps x 2 micro-batches of 2 = 24 samples = 2 full epochs + 4 (5 per epoch
    # usable as 2 batches of 2).
    assert ckpt["data"] == {"epoch": 2, "position": 4}
    saved = json.loads((run_dir / "args.json").read_text())
    assert saved["latent_shape"] == [4, 8, 8] and saved["num_classes"] == 3 and saved["align"] == ["vae-repa"]
    # One optimizer step logs once: steps 1..6, not 12 micro-batches.
    assert sorted(logged_losses(run_dir)) == [1, 2, 3, 4, 5, 6]
    log = (run_dir / "log.txt").read_text()
    assert "effective global batch 4 images per optimizer step = 1 processes x 2 per process x 2" in log
    # Resuming from an older checkpoint while newer ones exist would let retention delete the wrong files.
    with pytest.raises(train.UsageError, match="after step 4"):
        run(tmp_path, data, "--exp-name", "r", "--max-train-steps", "8", "--gradient-accumulation-steps", "2",
            "--batch-size", "2", "--resume", str(run_dir / "checkpoints/0000004.pt"))
    # A checkpoint is never pruned right after it is written, whatever the retention flags.
    run(tmp_path, data, "--exp-name", "r", "--max-train-steps", "7", "--checkpointing-steps", "1",
        "--keep-last", "0", "--keep-every", "0", "--gradient-accumulation-steps", "2", "--batch-size", "2",
        "--resume", "latest")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["0000007.pt", "0000007.pt.sha256"]


def test_compile_is_on_by_default_with_cuda_only_and_may_change_on_resume(tmp_path, monkeypatch):
    """--compile / --no-compile; without either, on with CUDA and off on the CPU and under --deterministic. The value
    used is logged and recorded in args.json and the checkpoints (a bool, as older runs recorded it), and a resume may
    change it: the continuation with each block and head compiled (dynamo's eager backend here: no code generation on
    the CPU) equals the straight run."""
    assert train.parse_args(["--data-dir", "d"]).compile is None
    assert train.parse_args(["--data-dir", "d", "--compile"]).compile is True
    assert train.parse_args(["--data-dir", "d", "--no-compile"]).compile is False
    assert resolve_compile(None, torch.device("cuda")) is True
    assert resolve_compile(None, torch.device("cuda"), deterministic=True) is False
    assert resolve_compile(True, torch.device("cuda"), deterministic=True) is True
    assert resolve_compile(None, torch.device("cpu")) is False
    assert resolve_compile(False, torch.device("cuda")) is False
    assert resolve_compile(True, torch.device("cpu")) is True
    help_text = " ".join(train.build_parser().format_help().split())
    assert "(default: on with CUDA, off on the CPU and with --deterministic)" in help_text and "1.52x" in help_text

    data = make_dataset(tmp_path / "data")
    straight, _ = run(tmp_path, data, "--device", "cpu", "--exp-name", "straight", "--max-train-steps", "4")
    run(tmp_path, data, "--device", "cpu", "--exp-name", "split", "--max-train-steps", "2")
    split = tmp_path / "runs/split"
    assert json.loads((split / "args.json").read_text())["compile"] is False
    assert "torch.compile: off (the default on cpu)" in (split / "log.txt").read_text()
    assert torch.load(split / "checkpoints/0000002.pt", weights_only=True)["args"]["compile"] is False

    compiled = []
    real_compile = torch.compile

    def eager_compile(model, **kwargs):
        compiled.append(model)
        return real_compile(model, backend="eager", **kwargs)

    monkeypatch.setattr(torch, "compile", eager_compile)
    resumed, _ = run(tmp_path, data, "--device", "cpu", "--exp-name", "split", "--max-train-steps", "4",
                     "--resume", "latest", "--compile")
    heads = [getattr(resumed, attr) for attr, _ in resumed.head_taps.values()]
    assert [fn.__self__ for fn in compiled] == [*resumed.blocks, *heads]  # per block and head (Module.compile)
    saved = json.loads((split / "args.json").read_text())
    assert saved["compile"] is True and saved["history"][-1]["changed"]["compile"] == [False, True]
    log = (split / "log.txt").read_text()
    assert "torch.compile: on (--compile)" in log and "resume: compile changed from False to True" in log
    assert re.search(r"first step: [0-9.]+ s \(torch.compile included\)", log)
    ckpt = torch.load(split / "checkpoints/0000004.pt", weights_only=True)
    assert not any(k.startswith("_orig_mod.") for k in ckpt["model"])
    for (name, p), q in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    assert logged_losses(tmp_path / "runs/straight").keys() == logged_losses(split).keys()


def test_checkpoint_retention_rule():
    assert checkpoint_writer.checkpoint_steps_to_keep([10, 20, 30, 40, 50], keep_last=2, keep_every=20) == {20, 40, 50}
    assert checkpoint_writer.checkpoint_steps_to_keep([10, 20, 30], keep_last=0, keep_every=0) == set()


def test_ema_update_formula():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.clone() for p in a.parameters()]
    loop.update_ema(a, b, 0.75)
    for e, old, m in zip(a.parameters(), before, b.parameters()):
        torch.testing.assert_close(e, 0.75 * old + 0.25 * m)


def test_vanilla_run_has_no_head_and_zero_alignment_loss(tmp_path):
    data = make_dataset(tmp_path / "data")
    model, _ = run(tmp_path, data, "--exp-name", "v", "--max-train-steps", "2", "--no-align")
    assert not model.has_heads() and not any(n.startswith(model.head_state_prefixes()) for n in model.state_dict())
    assert train.parse_args(["--data-dir", "d", "--vae-repa-coeff", "0"]).align == []  # lambda = 0 is vanilla
    assert all("vae_repa_loss" not in line for line in logged_losses(tmp_path / "runs/v").values())


def test_sample_grid_is_written(tmp_path):
    data = make_dataset(tmp_path / "data")
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["vae"] = str(make_tiny_vae(tmp_path / "vae"))
    (data / "manifest.json").write_text(json.dumps(manifest))
    run(tmp_path, data, "--exp-name", "g", "--max-train-steps", "2", "--sample-every", "2", "--sample-grid-size", "4",
        "--sample-grid-steps", "2")
    from PIL import Image

    grid = Image.open(tmp_path / "runs/g/samples/0000002.png")
    assert grid.size == (2 + 2 * (16 + 2), 2 + 2 * (16 + 2))  # 2 x 2 images of 16 px (VAE upsamples 8 -> 16)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "data")
    calls = {"n": 0}
    real = loop.training_loss

    def poisoned(*a, **k):
        calls["n"] += 1
        out = real(*a, **k)
        if calls["n"] > 2:
            out = {k: v * float("nan") for k, v in out.items()}
        return out

    monkeypatch.setattr(loop, "training_loss", poisoned)
    with pytest.raises(FloatingPointError, match="0000002.pt"):
        run(tmp_path, data, "--exp-name", "nan", "--max-train-steps", "6", "--checkpointing-steps", "2")
    ckpts = sorted(p.name for p in (tmp_path / "runs/nan/checkpoints").glob("*.pt"))
    assert ckpts == ["0000002.pt"]
    good = torch.load(tmp_path / "runs/nan/checkpoints/0000002.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in good["model"].values())


def cli(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "train.py"), "--output-dir", str(tmp_path / "runs"), *TINY, *argv]
    return subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)


def test_bad_input_is_a_clear_error_and_changes_nothing(tmp_path):
    data = make_dataset(tmp_path / "data")
    r = cli(tmp_path, "--data-dir", str(tmp_path / "nowhere"), "--exp-name", "a", "--max-train-steps", "1")
    assert r.returncode == 2 and "--data-dir" in r.stderr and "does not exist" in r.stderr

    r = cli(tmp_path, "--data-dir", str(data), "--exp-name", "a", "--max-train-steps", "1")
    assert r.returncode == 0, r.stderr
    args_json = (tmp_path / "runs/a/args.json").read_bytes()
    ckpt = tmp_path / "runs/a/checkpoints/0000001.pt"
    ckpt_bytes = ckpt.read_bytes()

    r = cli(tmp_path, "--data-dir", str(data), "--exp-name", "a", "--max-train-steps", "1")  # no --resume
    assert r.returncode == 2 and "already exists" in r.stderr and "--resume" in r.stderr

    r = cli(tmp_path, "--data-dir", str(data), "--exp-name", "b", "--max-train-steps", "2", "--hidden-size", "64",
            "--resume", str(ckpt))  # another model size
    assert r.returncode == 2 and "hidden_size" in r.stderr

    other = make_dataset(tmp_path / "data8", channels=8)  # latent channels that do not match the model
    r = cli(tmp_path, "--data-dir", str(other), "--exp-name", "a", "--max-train-steps", "2", "--resume", "latest")
    assert r.returncode == 2 and "latent_shape" in r.stderr

    blocker = tmp_path / "file"
    blocker.write_text("")
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--output-dir", str(blocker / "runs"), *TINY,
                        "--data-dir", str(data), "--max-train-steps", "1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "cannot write" in r.stderr

    assert (tmp_path / "runs/a/args.json").read_bytes() == args_json
    assert ckpt.read_bytes() == ckpt_bytes
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["0000001.pt", "0000001.pt.sha256"]


def test_repa_train_flags_keep_repa_meaning(tmp_path):
    """REPA's --resume-step, --epochs, --resolution, --num-classes, --tf32, --fused-attn, --no-qk-norm and the
    underscore spellings: each works as in REPA, or the run stops with a message."""
    data = make_dataset(tmp_path / "data")  # 10 latents of 8 x 8, 3 classes
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["resolution"] = 64
    (data / "manifest.json").write_text(json.dumps(manifest))
    base = ["--data-dir", str(data), "--output_dir", str(tmp_path / "runs"), *TINY]
    # --epochs 2 with 10 latents and batch 4: 2 batches per pass, so 2 passes end at step 4 (before 100).
    args = train.parse_args([*base, "--exp_name", "e", "--max-train-steps", "100", "--epochs", "2",
                             "--checkpointing-steps", "3", "--resolution", "64", "--num-classes", "3", "--no-tf32",
                             "--no-qk-norm", "--fused-attn"])
    assert not args.allow_tf32 and not args.qk_norm and args.output_dir == str(tmp_path / "runs")
    assert any("fused-attn changes nothing" in n for n in args.notes)
    train.train(args)
    run_dir = tmp_path / "runs/e"
    assert sorted(logged_losses(run_dir)) == [1, 2, 3, 4]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.pt")) == ["0000003.pt", "0000004.pt"]
    # --resume-step N: the run's checkpoint of step N, as REPA's train.py finds it.
    args = train.parse_args([*base, "--exp_name", "e", "--resume-step", "4", "--max-train-steps", "5"])
    assert args.resume == str(run_dir / "checkpoints/0000004.pt")
    train.train(args)
    assert sorted(logged_losses(run_dir)) == [1, 2, 3, 4, 5]
    with pytest.raises(train.UsageError, match="--resolution 256, but .* holds resolution 64"):
        train.train(train.parse_args([*base, "--exp-name", "r", "--resolution", "256"]))
    with pytest.raises(train.UsageError, match="--num-classes 1000, but .* holds num classes 3"):
        train.train(train.parse_args([*base, "--exp-name", "r", "--num-classes", "1000"]))
    assert not (tmp_path / "runs/r").exists()
    for bad, said in ((["--logging-dir", "logs"], "run directory"), (["--resume-step", "4", "--resume", "latest"],
                                                                       "pass one")):
        r = cli(tmp_path, *bad, "--data-dir", str(data))
        assert r.returncode == 2 and said in r.stderr, r.stderr


def test_help_works_without_a_gpu():
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--proj-coeff" in r.stdout and "--resume" in r.stdout
    assert "--trust-checkpoint" in r.stdout and "RUNS CODE FROM THE FILE" in " ".join(r.stdout.split())


# train.train in one of two processes; after the first optimizer step, a recompile of any compiled block is an error
# (with --compile: the real batch shapes, under DDP).
WORKER = """
import os, sys, torch, train
from training import loop

update_ema = loop.update_ema

def after_first_step(*args):
    update_ema(*args)
    torch._dynamo.config.error_on_recompile = True

loop.update_ema = after_first_step
model, ema = train.train(train.parse_args(sys.argv[2:]))
rank = int(os.environ["RANK"])
torch.save({"model": model.state_dict(), "ema": ema.state_dict()}, f"{sys.argv[1]}/rank{rank}.pt")
"""


def test_two_gloo_processes_keep_identical_weights(tmp_path):
    """Two ranks on gloo end with the same weights, eager and with --compile (the CUDA default; each block compiled
    before DDP wraps the model, as on GPUs, by inductor), the compiled run trains as the eager one, up to float
    rounding, and nothing is recompiled after the first step."""
    data = make_dataset(tmp_path / "data", n=16)
    (tmp_path / "worker.py").write_text(WORKER)
    runs = {}
    for name, flag in (("compiled", "--compile"), ("ddp", "--no-compile")):
        # CPU behaviour: the workers see no GPU (a machine with one GPU would otherwise give both ranks CUDA).
        r = torchrun(tmp_path, tmp_path / "worker.py", str(tmp_path), "--data-dir", str(data), "--output-dir",
                     str(tmp_path / "runs"), *TINY, "--max-train-steps", "3", "--exp-name", name, flag, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = [torch.load(tmp_path / f"rank{i}.pt") for i in (0, 1)]
    for a, b in runs.values():
        for key in ("model", "ema"):
            for name, p in a[key].items():
                assert torch.equal(p, b[key][name]), (key, name)
    a, compiled = runs["ddp"][0], runs["compiled"][0]
    for name, p in a["model"].items():
        torch.testing.assert_close(compiled["model"][name], p, rtol=1e-4, atol=1e-5)
    assert "torch.compile: on (--compile)" in (tmp_path / "runs/compiled/log.txt").read_text()
    init = model_from_args(json.loads((tmp_path / "runs/ddp/args.json").read_text()))
    moved = any(not torch.equal(p, a["model"][n]) for n, p in init.state_dict().items())
    assert moved  # the ranks trained, and agree
    ckpt = torch.load(tmp_path / "runs/ddp/checkpoints/0000003.pt", weights_only=True)
    assert len(ckpt["rng"]) == 2 and not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])


def test_offline_wandb_run_resumed_keeps_its_id(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is optional (requirements.txt installs it; make test does)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    data = make_dataset(tmp_path / "data")
    run(tmp_path, data, "--exp-name", "w", "--max-train-steps", "1", "--report-to", "wandb")
    run(tmp_path, data, "--exp-name", "w", "--max-train-steps", "2", "--report-to", "wandb", "--resume", "latest")
    run_id = (tmp_path / "runs/w/wandb_id.txt").read_text().strip()
    offline_runs = sorted((tmp_path / "runs/w/wandb").glob("offline-run-*"))
    # wandb names a run's folder offline-run-<time>-<id>, adding "-1" when two start within the same second
    assert len(offline_runs) == 2 and all(re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{run_id}(-\d+)?", p.name)
                                          for p in offline_runs), [p.name for p in offline_runs]


def test_tensorboard_tracker_writes_events(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is optional (requirements.txt installs it; make test does)")
    data = make_dataset(tmp_path / "data")
    run(tmp_path, data, "--exp-name", "tb", "--max-train-steps", "2", "--report-to", "tensorboard")
    assert list((tmp_path / "runs/tb").rglob("events.out.tfevents.*"))


def test_a_run_recorded_with_block_0_resumes_with_the_block_it_trained_with(tmp_path):
    """Block 0 is refused now, but runs that recorded it trained with the default block (build_methods read it with
    `or`): resuming one with that block, here SiT-S's default 2 for VAE-REPA, is not a change of settings."""
    data = make_dataset(tmp_path / "data")
    r = cli(tmp_path, "--data-dir", str(data), "--exp-name", "two", "--max-train-steps", "1", "--vae-repa-depth", "2")
    assert r.returncode == 0, r.stderr
    ckpt = torch.load(tmp_path / "runs/two/checkpoints/0000001.pt", weights_only=True)
    assert ckpt["args"]["vae_repa_depth"] == 2
    ckpt["args"]["vae_repa_depth"] = 0
    old = tmp_path / "runs/zero/checkpoints/0000001.pt"
    old.parent.mkdir(parents=True)
    torch.save(ckpt, old)
    r = cli(tmp_path, "--data-dir", str(data), "--exp-name", "zero", "--max-train-steps", "2", "--vae-repa-depth", "2",
            "--resume", "latest")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "runs/zero/checkpoints/0000002.pt").is_file()
