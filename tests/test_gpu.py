"""CUDA code paths: bf16 training steps of the real SiT-B/2 (compiled, the default, and eager), of SiT-XL/2 and of
LightningDiT-XL/1 on VA-VAE-shaped latents (eager), every method set (compiled), exact resume under --deterministic
(eager, its default) and the distance of a compiled resume without it, generate.py per sample on CUDA, SD-VAE-sized
preprocessing in bf16, the evaluator on CUDA against the CPU, and launches with more processes than GPUs or with
--device cpu beside a GPU.

`make test-gpu` (pytest -m gpu) runs them; without a visible GPU they are skipped with the reason (conftest.py).
They take a few minutes on one H100. Figures they measure are printed (run with -s) and recorded as junit
properties, so scripts/gpu_check.sh keeps them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_data import make_tiny_vae, write_latent_dataset
from helpers_generate import make_checkpoint

ROOT = Path(__file__).resolve().parents[1]
REAL_LATENT = (4, 32, 32)  # SD-VAE latents of 256 px images
PYTHONPATH = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # keep gpu_check.sh's wheels
pytestmark = pytest.mark.gpu


def latent_dataset(root: Path, n: int = 32, shape: tuple[int, ...] = REAL_LATENT, classes: int = 10) -> Path:
    rng = np.random.default_rng(0)
    mean = rng.standard_normal((n, *shape)).astype(np.float32) * 5
    std = np.full_like(mean, 0.1)
    return write_latent_dataset(root, mean, std, rng.integers(0, classes, n), mean[..., ::-1].copy(), std,
                                shard_size=16, num_classes=classes)


def train_cli(cwd: Path, *argv: str, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    """train.py in a fresh process (deterministic settings and the cuBLAS workspace must precede CUDA's start)."""
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--num-workers", "0", "--sample-every", "0",
                           "--logging-steps", "1", *argv], capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": PYTHONPATH, **env})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def logged(run_dir: Path) -> dict[int, dict[str, float]]:
    """{step: {name: value}} from log.txt (4 significant digits, as logged)."""
    out = {}
    for line in (run_dir / "log.txt").read_text().splitlines():
        if "] step " in line:
            step, rest = line.split("] step ")[1].split(": ", 1)
            out[int(step)] = {k: float(v) for k, v in (w.split("=") for w in rest.split())}
    return out


def losses(run_dir: Path) -> dict[int, tuple[float, ...]]:
    return {s: (v["total_loss"], v["loss"], v["vae_repa_loss"], v["grad_norm"]) for s, v in logged(run_dir).items()}


def report(record_property, name: str, value) -> None:
    record_property(name, value)
    print(f"[gpu measurement] {name} = {value}")


# ---------------------------------------------------------------- training


def first_step_seconds(run_dir: Path) -> float:
    line = next(x for x in (run_dir / "log.txt").read_text().splitlines() if "] first step: " in x)
    return float(line.split("] first step: ")[1].split()[0])


def test_sit_b2_bf16_steps_eager_and_compiled_agree(tmp_path, record_property):
    """train.py's default on CUDA (compiled) against --no-compile, with VAE-REPA (the default method)."""
    data = latent_dataset(tmp_path / "data")
    common = ["--model", "SiT-B/2", "--data-dir", str(data), "--output-dir", str(tmp_path / "runs"),
              "--batch-size", "16", "--max-train-steps", "3", "--mixed-precision", "bf16", "--device", "cuda"]
    train_cli(tmp_path, *common, "--exp-name", "eager", "--no-compile")
    train_cli(tmp_path, *common, "--exp-name", "compiled")
    assert "torch.compile: off (--no-compile)" in (tmp_path / "runs/eager/log.txt").read_text()
    assert "torch.compile: on (the default on cuda)" in (tmp_path / "runs/compiled/log.txt").read_text()
    assert json.loads((tmp_path / "runs/compiled/args.json").read_text())["compile"] is True
    eager, compiled = logged(tmp_path / "runs/eager"), logged(tmp_path / "runs/compiled")
    assert sorted(eager) == sorted(compiled) == [1, 2, 3]
    for values in (*eager.values(), *compiled.values()):
        assert all(np.isfinite(list(values.values()))) and values["max_memory_gb"] > 0
    # Same initial weights and the same noise draws: the first losses differ by bf16 kernel rounding only.
    for name in ("loss", "vae_repa_loss", "total_loss"):
        rel = abs(eager[1][name] - compiled[1][name]) / eager[1][name]
        report(record_property, f"b2_step1_{name}_rel_diff_compile_vs_eager", rel)
        assert rel < 2e-2, name
    report(record_property, "b2_step3_loss_rel_diff_compile_vs_eager",
           abs(eager[3]["loss"] - compiled[3]["loss"]) / eager[3]["loss"])
    report(record_property, "b2_step1_grad_norm_compile_vs_eager", (compiled[1]["grad_norm"], eager[1]["grad_norm"]))
    report(record_property, "b2_first_step_s_compiled_vs_eager",
           (first_step_seconds(tmp_path / "runs/compiled"), first_step_seconds(tmp_path / "runs/eager")))
    ckpt = torch.load(tmp_path / "runs/compiled/checkpoints/0000003.pt", map_location="cpu", weights_only=False)
    assert not any(k.startswith("_orig_mod.") for k in ckpt["model"])  # the compiled wrapper is not saved
    report(record_property, "b2_images_per_s_eager_step3", eager[3]["images_per_s"])
    report(record_property, "b2_images_per_s_compiled_step3", compiled[3]["images_per_s"])


def test_sit_xl2_bf16_steps(tmp_path, record_property):
    data = latent_dataset(tmp_path / "data")
    train_cli(tmp_path, "--model", "SiT-XL/2", "--data-dir", str(data), "--output-dir", str(tmp_path / "runs"),
              "--exp-name", "xl", "--batch-size", "16", "--max-train-steps", "2", "--mixed-precision", "bf16",
              "--device", "cuda", "--no-compile")  # eager: what is checked here is the size, not the compiler
    log = logged(tmp_path / "runs/xl")
    assert sorted(log) == [1, 2] and all(np.isfinite(list(v.values())).all() for v in log.values())
    assert log[1]["vae_repa_loss"] > 0  # VAE-REPA's head after block 8 is trained
    ckpt = torch.load(tmp_path / "runs/xl/checkpoints/0000002.pt", map_location="cpu", weights_only=False, mmap=True)
    n_params = sum(v.numel() for v in ckpt["model"].values())
    # 675M backbone (10 classes here, not 1000) + the 18.6M VAE-REPA head (5 Linear layers, width 2 x 1152; paper: 18M)
    assert 690e6 < n_params < 695e6
    moved = any(not torch.equal(ckpt["model"][k], ckpt["ema"][k]) for k in ckpt["model"])
    assert moved  # the optimizer stepped (EMA lags behind)
    report(record_property, "xl2_max_memory_gb_batch16", log[2]["max_memory_gb"])


@pytest.mark.parametrize("align", ["none", "vae-repa"])
def test_lightningdit_xl1_bf16_steps_on_vavae_latents(tmp_path, record_property, align):
    """Table 2's VAVAE row on CUDA: LightningDiT-XL/1 on 32 x 16 x 16 latents with its objective, with and without
    VAE-REPA (a head of 32 values per token after block 8)."""
    data = latent_dataset(tmp_path / "data", shape=(32, 16, 16))
    train_cli(tmp_path, "--model", "LightningDiT-XL/1", "--data-dir", str(data), "--output-dir",
              str(tmp_path / "runs"), "--exp-name", "ldit", "--align", align, "--weighting", "logit-normal",
              "--cos-loss-coeff", "1", "--adam-beta2", "0.95", "--batch-size", "16", "--max-train-steps", "2",
              "--mixed-precision", "bf16", "--device", "cuda", "--no-compile")  # eager, as the XL/2 test
    log = logged(tmp_path / "runs/ldit")
    assert sorted(log) == [1, 2] and all(np.isfinite(list(v.values())).all() for v in log.values())
    assert log[2]["cos_loss"] > 0 and (align == "none") == ("vae_repa_loss" not in log[2])
    report(record_property, f"lightningdit_xl1_{align}_images_per_s_step2", log[2]["images_per_s"])
    report(record_property, f"lightningdit_xl1_{align}_max_memory_gb_batch16", log[2]["max_memory_gb"])


RESUME = ["--model", "SiT-B/2", "--depth", "4", "--batch-size", "8", "--mixed-precision", "bf16", "--device", "cuda",
          "--learning-rate", "1e-4"]


def resume_runs(tmp_path: Path, data: Path, *extra: str) -> tuple[dict, dict, Path, Path]:
    """6 steps straight vs 3 steps + resume + 3 steps; (losses straight, losses split, final checkpoints)."""
    out = ["--data-dir", str(data), "--output-dir", str(tmp_path / "runs"), *RESUME, *extra]
    train_cli(tmp_path, *out, "--exp-name", "straight", "--max-train-steps", "6")
    train_cli(tmp_path, *out, "--exp-name", "split", "--max-train-steps", "3", "--checkpointing-steps", "3")
    train_cli(tmp_path, *out, "--exp-name", "split", "--max-train-steps", "6", "--resume", "latest")
    runs = tmp_path / "runs"
    return (losses(runs / "straight"), losses(runs / "split"), runs / "straight/checkpoints/0000006.pt",
            runs / "split/checkpoints/0000006.pt")


def test_every_method_set_trains_on_cuda_in_bf16(tmp_path, record_property):
    """REPA (a random-weight DINOv2 ViT-S from a local file), SRA and VAE-REPA together: two bf16 steps of SiT-B/2."""
    import timm
    from safetensors.torch import save_file

    vit = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=518, num_classes=0)
    weights = tmp_path / "dinov2.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(weights))
    rng = np.random.default_rng(0)
    mean = rng.standard_normal((16, *REAL_LATENT)).astype(np.float32)
    images = rng.integers(0, 256, (16, 256, 256, 3), dtype=np.uint8)
    data = write_latent_dataset(tmp_path / "data", mean, np.full_like(mean, 0.1), rng.integers(0, 10, 16),
                                shard_size=8, num_classes=10, images=images)
    train_cli(tmp_path, "--model", "SiT-B/2", "--data-dir", str(data), "--output-dir", str(tmp_path / "runs"),
              "--exp-name", "all", "--batch-size", "8", "--max-train-steps", "2", "--mixed-precision", "bf16",
              "--device", "cuda", "--align", "repa,vae-repa,sra", "--enc-type", "dinov2-vit-s",
              "--enc-weights", str(weights))
    log = logged(tmp_path / "runs/all")
    for name in ("loss", "proj_loss", "vae_repa_loss", "sra_loss", "total_loss"):
        assert all(np.isfinite(v[name]) for v in log.values()), name
    assert -1 <= log[1]["proj_loss"] < 0.5  # a negative cosine similarity
    report(record_property, "b2_all_methods_images_per_s_step2", log[2]["images_per_s"])


def test_exact_resume_on_cuda_with_deterministic(tmp_path):
    data = latent_dataset(tmp_path / "data", n=20)
    straight, split, a, b = resume_runs(tmp_path, data, "--deterministic")
    assert sorted(straight) == list(range(1, 7)) and straight == split
    a, b = (torch.load(p, map_location="cpu", weights_only=False) for p in (a, b))
    assert a["data"] == b["data"]
    for key in ("model", "ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), (key, name)
    for sa, sb in zip(a["opt"]["state"].values(), b["opt"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])


def test_resume_on_cuda_without_deterministic_is_close(tmp_path, record_property):
    """What the README says about a resume without --deterministic: measured, and bounded loosely (a resume that
    lost its RNG or data position would draw other noise and batches and miss by several percent)."""
    data = latent_dataset(tmp_path / "data", n=20)
    straight, split, a, b = resume_runs(tmp_path, data)
    rel = max(abs(x - y) / max(abs(x), 1e-8) for s in straight for x, y in zip(straight[s][:3], split[s][:3]))
    a, b = (torch.load(p, map_location="cpu", weights_only=False) for p in (a, b))
    weight_diff = max((a["model"][k].float() - b["model"][k].float()).abs().max().item() for k in a["model"])
    report(record_property, "resume_without_deterministic_max_loss_rel_diff", rel)
    report(record_property, "resume_without_deterministic_max_weight_abs_diff", weight_diff)
    assert rel < 1e-2 and weight_diff < 1e-2


# ---------------------------------------------------------------- sampling


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    vae = make_tiny_vae(root / "vae")
    run = root / "runs" / "exp"
    make_checkpoint(run / "checkpoints" / "0000002.pt", vae, seed=0, step=2)
    return run


def sample_cuda(run: Path, out: Path, *extra: str) -> np.ndarray:
    import generate

    argv = ["--ckpt", str(run), "--sample-dir", str(out), "--device", "cuda", "--num-fid-samples", "8",
            "--num-steps", "4", "--cfg-scale", "1.5", "--guidance-high", "0.7", *extra]
    assert generate.main(argv) == 0
    (npz,) = out.glob("*.npz")
    return np.load(npz)["arr_0"]


def test_generate_on_cuda_does_not_depend_on_the_batch_size(tiny_run, tmp_path, record_property):
    # eager, as before --compile became the default (test_generate_fast_bf16_path_on_cuda covers compiled sampling)
    fp32 = [sample_cuda(tiny_run, tmp_path / f"fp32-{b}", "--precision", "fp32", "--per-proc-batch-size", str(b),
                        "--no-compile") for b in (8, 3)]
    # fp32: the same images whatever the batch, up to kernels that sum in another order for another batch size
    # (seen on the CPU too: ~1e-7 relative), which can move a rare pixel by one level after quantisation.
    fp32_diff = np.abs(fp32[0].astype(int) - fp32[1])
    report(record_property, "fp32_batch_8_vs_3_pixels_that_differ", int((fp32_diff > 0).sum()))
    assert fp32_diff.max() <= 1 and (fp32_diff > 0).mean() < 1e-3
    assert fp32[0].std() > 10
    bf16 = [sample_cuda(tiny_run, tmp_path / f"bf16-{b}", "--precision", "bf16", "--per-proc-batch-size", str(b),
                        "--no-compile") for b in (8, 3)]
    batch = np.abs(bf16[0].astype(int) - bf16[1])
    vs_fp32 = np.abs(bf16[0].astype(int) - fp32[0])
    report(record_property, "bf16_batch_8_vs_3_pixel_diff_mean_max", (float(batch.mean()), int(batch.max())))
    report(record_property, "bf16_vs_fp32_pixel_diff_mean_max", (float(vs_fp32.mean()), int(vs_fp32.max())))
    assert batch.mean() < 1 and batch.max() <= 8  # bf16 kernels may round differently with the batch
    assert 0 < vs_fp32.mean() < 1 and vs_fp32.max() <= 8  # bf16 was used, and it changes little


def test_generate_fast_bf16_path_on_cuda(tiny_run, tmp_path, record_property):
    """bf16 matmul weights (stored once) give the bytes of fp32 weights under autocast, the path generate.py took
    before (sample_batch on a model left in fp32); --compile, generate.py's default on CUDA, stays within bf16's
    rounding of eager."""
    import generate
    from latent_codecs.autoencoder import load_vae
    from sampling.batch import sample_batch
    from sampling.checkpoint import load_model, resolve_checkpoint

    flags = ["--precision", "bf16", "--per-proc-batch-size", "8"]
    eager = sample_cuda(tiny_run, tmp_path / "eager", *flags, "--no-compile")
    args = generate.parse_args(["--ckpt", str(tiny_run), "--num-fid-samples", "8", "--num-steps", "4",
                                "--cfg-scale", "1.5", "--guidance-high", "0.7", *flags])
    model, info = load_model(args, resolve_checkpoint(args.ckpt))
    device = torch.device("cuda")
    old = sample_batch(model.to(device).eval(), load_vae(info["vae"]).to(device), list(range(8)), args, info, device,
                       "bf16")
    np.testing.assert_array_equal(eager, old)
    compiled = sample_cuda(tiny_run, tmp_path / "compiled", *flags)  # the default on CUDA
    diff = np.abs(compiled.astype(int) - eager)
    report(record_property, "bf16_compiled_vs_eager_pixel_diff_mean_max", (float(diff.mean()), int(diff.max())))
    assert diff.mean() < 1 and diff.max() <= 8


def test_generate_cuda_and_cpu_agree_to_fp32_rounding(tiny_run, tmp_path):
    import generate

    cuda = sample_cuda(tiny_run, tmp_path / "cuda", "--precision", "fp32", "--no-compile")
    argv = ["--ckpt", str(tiny_run), "--sample-dir", str(tmp_path / "cpu"), "--device", "cpu", "--num-fid-samples",
            "8", "--num-steps", "4", "--cfg-scale", "1.5", "--guidance-high", "0.7", "--precision", "fp32"]
    assert generate.main(argv) == 0
    (npz,) = (tmp_path / "cpu").glob("*.npz")
    diff = np.abs(np.load(npz)["arr_0"].astype(int) - cuda)
    # The same noise, so the same images up to rounding (cuDNN may use TF32 in the VAE's convolutions); other
    # noise would differ by tens of levels on average.
    assert diff.mean() < 0.5 and diff.max() <= 8


# ---------------------------------------------------------------- preprocessing


def sd_vae(path: Path) -> Path:
    """The SD-VAE architecture (as stabilityai/sd-vae-ft-ema) with random weights, saved with save_pretrained."""
    from diffusers.models import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                  sample_size=256).save_pretrained(path)
    return path


def test_preprocessing_sd_vae_on_cuda_fp32_and_bf16_against_the_cpu(tmp_path, record_property):
    from PIL import Image

    from preprocessing import encode

    rng = np.random.default_rng(0)
    for i in range(4):
        yy, xx = np.mgrid[0:300, 0:280]
        rgb = np.stack([xx * 255 // 280, yy * 255 // 300, (xx + yy) % 256], -1) + rng.integers(0, 40, (300, 280, 3))
        (tmp_path / "src" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(tmp_path / "src" / f"c{i % 2}" / f"{i}.png")
    vae = sd_vae(tmp_path / "sd-vae")

    def run(name: str, device: str, precision: str) -> dict[str, np.ndarray]:
        dest = tmp_path / name
        argv = ["--source", str(tmp_path / "src"), "--dest", str(dest), "--vae", str(vae), "--resolution", "256",
                "--precision", precision, "--device", device, "--dtype", "fp32", "--flip", "--num-workers", "0",
                "--batch-size", "4"]
        assert encode.main(argv) == 0
        manifest = json.loads((dest / "manifest.json").read_text())
        assert manifest["latent_shape"] == list(REAL_LATENT) and manifest["num_images"] == 4
        return {kind: np.concatenate([np.load(dest / s["files"][kind]) for s in manifest["shards"]])
                for kind in ("mean", "std", "flip-mean")}

    cpu, cuda, bf16 = run("cpu", "cpu", "fp32"), run("cuda", "cuda", "fp32"), run("bf16", "cuda", "bf16")
    for kind, ref in cpu.items():
        scale = np.abs(ref).max()
        np.testing.assert_allclose(cuda[kind], ref, rtol=1e-3, atol=1e-3 * scale)  # fp32 without TF32 on CUDA
        rel = float(np.linalg.norm(bf16[kind] - ref) / np.linalg.norm(ref))
        report(record_property, f"sd_vae_bf16_{kind}_rel_l2_error", rel)
        assert rel < 0.05 and np.abs(bf16[kind] - ref).max() < 0.1 * scale


# ---------------------------------------------------------------- evaluation


def test_evaluator_on_cuda_matches_the_cpu(tmp_path, monkeypatch):
    from evaluations import scoring
    from evaluations.inception import write_random_weights

    weights = write_random_weights(tmp_path / "random_inception.pth")
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 160, (16, 32, 40, 3), dtype=np.uint8)
    sample = np.concatenate([ref[:4], rng.integers(100, 256, (8, 32, 40, 3), dtype=np.uint8)])
    results = {}
    for device in ("cpu", "cuda"):
        calls = []  # FID itself is SciPy on the CPU whatever the device: record what it is given instead
        monkeypatch.setattr(scoring, "frechet_distance", lambda s1, s2, calls=calls: calls.append((s1, s2)) or 0.0)
        result = scoring.evaluate(ref, sample, inception_weights=weights, device=device, batch_size=8,
                                    num_workers=0, ref_pr_images=16, verbose=False)
        results[device] = (result, calls)
    (cpu, cpu_stats), (cuda, cuda_stats) = results["cpu"], results["cuda"]
    assert cpu["device"] == "cpu" and cuda["device"].startswith("cuda")
    for (a1, a2), (b1, b2) in zip(cpu_stats, cuda_stats):  # (pool, spatial) x (sample, reference)
        for x, y in ((a1, b1), (a2, b2)):
            scale = np.abs(x.mu).max()
            np.testing.assert_allclose(y.mu, x.mu, rtol=1e-4, atol=1e-4 * scale)
            np.testing.assert_allclose(y.sigma, x.sigma, rtol=1e-3, atol=1e-3 * np.abs(x.sigma).max())
    assert cuda["inception_score"] == pytest.approx(cpu["inception_score"], rel=1e-4)
    for name, n in (("precision", len(sample)), ("recall", len(ref))):
        assert abs(cuda[name] - cpu[name]) <= 1 / n  # a point on a radius boundary may flip, no more
    assert 0 < cpu["precision"] < 1


# ---------------------------------------------------------------- launches


def launch(tmp_path: Path, nproc: int, script: str, *argv: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), str(ROOT / script), *argv], capture_output=True, text=True, cwd=tmp_path,
                          timeout=600, env={**os.environ, "PYTHONPATH": PYTHONPATH, "OMP_NUM_THREADS": "1", **env})


@pytest.mark.parametrize("script, argv", [
    ("train.py", ["--data-dir", "nowhere", "--output-dir", "runs"]),
    ("generate.py", ["--ckpt", "none.pt", "--sample-dir", "samples"]),
    ("preprocessing/encode.py", ["--source", ".", "--dest", "latents"]),
])
def test_more_processes_than_gpus_stop_with_one_line_each(tmp_path, script, argv):
    gpus = torch.cuda.device_count()
    proc = launch(tmp_path, gpus + 1, script, *argv)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if f"{gpus + 1} processes on this node but {gpus}" in line]
    assert len(lines) == gpus + 1, proc.stderr[-3000:]
    assert "CUDA error" not in proc.stderr and "invalid device ordinal" not in proc.stderr
    assert not any(tmp_path.iterdir())


def test_two_processes_on_the_cpu_beside_a_gpu(tmp_path, tiny_run):
    """--device cpu: a gloo group whatever the GPUs (the case that failed with `invalid device ordinal`)."""
    # Batches of 2 in both runs, one thread per process: the same CPU kernels (a batch of 1 can round differently).
    settings = ["--num-fid-samples", "8", "--num-steps", "3", "--per-proc-batch-size", "2", "--device", "cpu"]
    for nproc, name in ((2, "two"), (1, "one")):
        proc = launch(tmp_path, nproc, "generate.py", "--ckpt", str(tiny_run), "--sample-dir", str(tmp_path / name),
                      *settings)
        assert proc.returncode == 0, proc.stderr[-3000:]
    (two,), (one,) = (tmp_path / "two").glob("*.npz"), (tmp_path / "one").glob("*.npz")
    np.testing.assert_array_equal(np.load(two)["arr_0"], np.load(one)["arr_0"])

    data = latent_dataset(tmp_path / "data", n=16, shape=(4, 8, 8), classes=3)
    proc = launch(tmp_path, 2, "train.py", "--data-dir", str(data), "--output-dir", str(tmp_path / "runs"),
                  "--model", "SiT-S/2", "--depth", "2", "--hidden-size", "32", "--num-heads", "2", "--batch-size", "4",
                  "--max-train-steps", "2", "--mixed-precision", "no", "--num-workers", "0", "--sample-every", "0",
                  "--no-align", "--exp-name", "cpu", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(tmp_path / "runs/cpu/checkpoints/0000002.pt", weights_only=False)
    assert len(ckpt["rng"]) == 2 and "cuda" not in ckpt["rng"][0]
