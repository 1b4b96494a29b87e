"""scripts/benchmark_train.py on a tiny CPU configuration: the JSON it writes and FLOP counts against closed forms."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers_scripts import load_script

ROOT = Path(__file__).resolve().parents[1]


def sit_forward_macs(tokens: int, d: int, depth: int, patch: int, channels: int) -> int:
    """Multiply-accumulates of one SiT forward per image: patch embedding, timestep MLP, per block adaLN (6d per
    sample), qkv, attention scores and values, projection, MLP (4d), then the final adaLN and linear layer."""
    block = 6 * d * d + tokens * (3 * d * d + d * d + 8 * d * d) + 2 * tokens * tokens * d
    return (tokens * channels * patch * patch * d + 256 * d + d * d + depth * block + 2 * d * d
            + tokens * d * patch * patch * channels)


def test_table4_harness_counts_flops_and_writes_json(tmp_path, capsys):
    bench = load_script("benchmark_train")
    out = tmp_path / "bench.json"
    rc = bench.main(["--models", "SiT-S/2", "--align", "none", "vae-repa", "sra", "--depth", "3", "--hidden-size",
                     "32", "--num-heads", "2", "--latent-size", "8", "--batch-size", "2", "--steps", "1",
                     "--warmup", "0", "--precision", "fp32", "--sra-teacher-precision", "fp32", "--out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert {"device", "torch", "commit", "results"} <= set(report)
    rows = {r["align"]: r for r in report["results"]}
    t, d, depth = 16, 32, 3  # 8 x 8 latents at patch 2
    vanilla = sit_forward_macs(t, d, depth, 2, 4)
    assert rows["none"]["forward_gmacs_per_image"] * 1e9 == pytest.approx(vanilla, rel=1e-9)
    # VAE-REPA: a 5-layer head d -> 2d -> 2d -> 2d -> 2d -> p^2 C on every token
    head = t * (d * 2 * d + 3 * (2 * d) ** 2 + 2 * d * 16)
    assert rows["vae-repa"]["forward_gmacs_per_image"] * 1e9 == pytest.approx(vanilla + head, rel=1e-9)
    # SRA: its 2-layer head, then the teacher's embeddings and blocks up to its block (here the last: all blocks)
    sra_head = t * (d * 2 * d + 2 * d * d)
    teacher = vanilla - 2 * d * d - t * d * 16
    assert rows["sra"]["forward_gmacs_per_image"] * 1e9 == pytest.approx(vanilla + sra_head + teacher, rel=1e-9)
    assert rows["none"]["external_params_m"] == 0 and rows["sra"]["external_params_m"] > 0
    assert rows["vae-repa"]["head_params_m"] * 1e6 == pytest.approx(d * 2 * d + 3 * (2 * d) ** 2 + 2 * d * 16
                                                                   + 4 * 2 * d + 16, rel=1e-9)
    for r in rows.values():
        assert r["images_per_s"] > 0 and len(r["step_times_s"]) == 1 and r["train_gflops_per_image"] > 0
    assert "derived: 8 x images/s per GPU / 256" in capsys.readouterr().out


def test_the_sra_row_is_timed_with_each_teacher_precision(tmp_path, capsys):
    """Issue 26: the SRA row measures SRA's fp32 teacher and the autocast one, each row labelled; the teacher's matrix
    products run in the precision the row names (bf16 autocast on the CPU)."""
    from alignment import peers

    bench, train_step = load_script("benchmark_train"), load_script("benchmark_train_step")
    assert tuple(bench.TEACHER_PRECISIONS) == peers.TEACHER_PRECISIONS
    tiny = ["--models", "SiT-S/2", "--depth", "2", "--hidden-size", "32", "--num-heads", "2", "--latent-size", "8",
            "--batch-size", "2", "--steps", "1", "--warmup", "0", "--precision", "bf16"]
    out = tmp_path / "bench.json"
    assert bench.main([*tiny, "--align", "none", "sra", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [(r["align"], r["methods"], r["sra_teacher_precision"]) for r in rows] == [
        ("none", "none", None), ("sra", "sra (teacher fp32)", "fp32"), ("sra", "sra (teacher autocast)", "autocast")]
    assert all(r["images_per_s"] > 0 and r["time_overhead"] is not None for r in rows)
    printed = capsys.readouterr().out
    assert "sra (teacher fp32)" in printed and "sra (teacher autocast)" in printed
    assert bench.parse_args(["--sra-teacher-precision", "autocast"]).sra_teacher_precision == ["autocast"]

    args = bench.parse_args(tiny)
    for precision, dtype in (("fp32", torch.float32), ("autocast", torch.bfloat16)):
        step = train_step.TrainStep("SiT-S/2", "sra", 2, args, torch.device("cpu"), precision)
        seen: list[torch.dtype] = []
        hook = step.ema.blocks[0].mlp.fc1.register_forward_hook(lambda m, i, o, seen=seen: seen.append(o.dtype))
        step.forward()
        hook.remove()
        assert seen == [dtype], precision  # the teacher (the EMA model) ran once, in that precision


def test_table4_preset_is_the_paper_s_setting():
    bench = load_script("benchmark_train")
    args = bench.parse_args(["--table4"])
    assert (args.models, args.align, args.enc_type, args.batch_size) == (
        ["SiT-XL/2"], ["none", "repa", "sra", "vae-repa", "repa,vae-repa"], "dinov2-vit-l", [32])


def test_vavae_rows_time_lightningdit_on_vavae_latents_with_its_objective(tmp_path):
    """--vavae-rows: LightningDiT-XL/1 on 32-channel latents of half the side, beside SiT-XL/2; a tiny LightningDiT's
    forward multiply-accumulates against the closed form of its layers (SwiGLU width int(2/3 * 4d))."""
    bench, train_step = load_script("benchmark_train"), load_script("benchmark_train_step")
    args = bench.parse_args(["--vavae-rows"])
    assert (args.models, args.align, args.batch_size) == (["SiT-XL/2", "LightningDiT-XL/1"], ["none", "vae-repa"], [32])
    assert train_step.latent_shape("LightningDiT-XL/1", args) == [32, 16, 16]
    assert train_step.latent_shape("SiT-XL/2", args) == [4, 32, 32]
    assert train_step.loss_config("LightningDiT-XL/1").cos_coeff == 1.0
    out = tmp_path / "bench.json"
    assert bench.main(["--models", "LightningDiT-B/1", "--align", "none", "--depth", "2", "--hidden-size", "32",
                       "--num-heads", "2", "--latent-size", "8", "--batch-size", "2", "--steps", "1", "--warmup",
                       "0", "--precision", "fp32", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["results"]
    t, d, c, h, depth = 16, 32, 32, int(2 / 3 * 4 * 32), 2  # 4 x 4 tokens of 32 channels at patch 1
    block = 6 * d * d + t * (3 * d * d + d * d + 2 * h * d + h * d) + 2 * t * t * d
    expected = t * c * d + 256 * d + d * d + depth * block + 2 * d * d + t * d * c
    assert row["forward_gmacs_per_image"] * 1e9 == pytest.approx(expected, rel=1e-9)


def test_vae_repa_flop_overhead_is_its_head_and_the_full_size_floors(tmp_path):
    """What FlopCounterMode counts in a training step (2 FLOPs per multiply-add; every matrix product's backward is two
    products of its size, one for the weight and one for the input, except where the input needs no gradient: the
    latents into the patch embedding and the sinusoidal features into the timestep MLP): vanilla train FLOPs =
    6 x forward MACs - 2 x those two layers' MACs, and VAE-REPA adds 6 x its head's forward MACs (its input, the
    block's tokens, needs a gradient). The row's flop_overhead is their ratio; at full size (counted on fake tensors)
    it is +9.2% for SiT-B/2 and +4.0% for SiT-XL/2 (with attention's backward as its 4 products; the H100 baseline's
    counts, 139 -> 152 and 716 -> 744.5, add flash attention's recompute of the scores to both rows)."""
    bench = load_script("benchmark_train")
    out = tmp_path / "bench.json"
    assert bench.main(["--models", "SiT-S/2", "--align", "none", "vae-repa", "--depth", "3", "--hidden-size", "32",
                       "--num-heads", "2", "--latent-size", "8", "--batch-size", "2", "--steps", "1", "--warmup",
                       "1", "--precision", "fp32", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["compile"] is False  # the default on the CPU, as train.py's
    rows = {r["align"]: r for r in report["results"]}
    t, d, depth, p, c = 16, 32, 3, 2, 4
    macs = sit_forward_macs(t, d, depth, p, c)
    vanilla = 6 * macs - 2 * t * c * p * p * d - 2 * 256 * d  # patch embedding and timestep MLP: no input gradient
    head = 6 * t * (d * 2 * d + 3 * (2 * d) ** 2 + 2 * d * p * p * c)
    assert rows["none"]["train_gflops_per_image"] * 1e9 == pytest.approx(vanilla, rel=1e-9)
    assert rows["vae-repa"]["train_gflops_per_image"] * 1e9 == pytest.approx(vanilla + head, rel=1e-9)
    assert rows["vae-repa"]["flop_overhead"] == pytest.approx(head / vanilla, rel=1e-9)
    assert rows["none"]["flop_overhead"] == 0 and rows["none"]["time_overhead"] == 0
    ratio = rows["none"]["images_per_s"] / rows["vae-repa"]["images_per_s"]
    assert rows["vae-repa"]["time_overhead"] == pytest.approx(ratio - 1)
    assert all(r["first_step_s"] > 0 for r in rows.values())
    # the same counts without a vanilla row in the run (its FLOPs on fake tensors)
    args = bench.parse_args(["--depth", "3", "--hidden-size", "32", "--num-heads", "2", "--latent-size", "8"])
    assert bench.fake_train_flops("SiT-S/2", "none", args) == pytest.approx(vanilla, rel=1e-9)
    assert bench.fake_train_flops("SiT-S/2", "vae-repa", args) == pytest.approx(vanilla + head, rel=1e-9)

    full = bench.parse_args([])
    for name, (d, depth, floor) in {"SiT-B/2": (768, 12, 0.0922), "SiT-XL/2": (1152, 28, 0.0402)}.items():
        t = 256
        vanilla = 6 * sit_forward_macs(t, d, depth, p, c) - 2 * t * c * p * p * d - 2 * 256 * d
        head = 6 * t * (d * 2 * d + 3 * (2 * d) ** 2 + 2 * d * p * p * c)
        counted = bench.fake_train_flops(name, "none", full), bench.fake_train_flops(name, "vae-repa", full)
        assert counted == (pytest.approx(vanilla, rel=1e-9), pytest.approx(vanilla + head, rel=1e-9))
        assert counted[1] / counted[0] - 1 == pytest.approx(floor, abs=5e-4)


def test_batch_sizes_phases_and_profile(tmp_path, capsys):
    """Several --batch-size values: every row at each, each method row's overhead against the vanilla row of its own
    batch; each row has its phase times; --profile-steps records a profile whose operator time fits inside the
    profiled steps' wall time, and --trace-dir writes the Chrome trace."""
    bench = load_script("benchmark_train")
    out, traces = tmp_path / "bench.json", tmp_path / "traces"
    assert bench.main(["--models", "SiT-S/2", "--align", "none", "vae-repa", "--depth", "2", "--hidden-size", "32",
                       "--num-heads", "2", "--latent-size", "8", "--batch-size", "2", "4", "--steps", "2", "--warmup",
                       "1", "--precision", "fp32", "--sdpa-backend", "math", "--profile-steps", "2", "--trace-dir",
                       str(traces), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["sdpa_backend"] == "math" and report["memory_fits"] == []  # no peak memory on the CPU
    assert report["compile"] is False and report["compile_mode"] is None
    rows = {(r["align"], r["batch_size"]): r for r in report["results"]}
    assert set(rows) == {(a, b) for a in ("none", "vae-repa") for b in (2, 4)}
    for b in (2, 4):
        ratio = rows["none", b]["images_per_s"] / rows["vae-repa", b]["images_per_s"]
        assert rows["vae-repa", b]["time_overhead"] == pytest.approx(ratio - 1)
    for (align, b), r in rows.items():
        assert list(r["phase_ms"]) == ["forward", "backward", "clip", "optimizer", "ema"]
        assert all(ms > 0 for ms in r["phase_ms"].values())
        prof = r["profile"]
        assert prof["steps"] == 2 and 0 < prof["busy_ms_per_step"] <= prof["wall_ms_per_step"]
        assert sum(prof["by_kind_ms"].values()) == pytest.approx(prof["busy_ms_per_step"])
        assert prof["by_kind_ms"]["matmul"] > 0 and prof["top"]
        slug = "SiT-S-2-" + align
        assert prof["trace"] == str(traces / f"{slug}_b{b}.json.gz") and Path(prof["trace"]).stat().st_size > 0
    assert "median ms per phase" in capsys.readouterr().out


def test_largest_batch_is_the_linear_fit_of_peak_memory():
    """Peak memory = fixed + per-image x batch: the least-squares line through the measured points and the largest
    batch under the device's memory, against the closed form."""
    bench = load_script("benchmark_train")
    rows = [{"model": "SiT-XL/2", "align": "vae-repa", "batch_size": b, "peak_memory_gb": 10 + 0.2 * b}
            for b in (32, 64, 128)]
    rows += [{"model": "SiT-XL/2", "align": "none", "batch_size": 32, "peak_memory_gb": 9.0}]  # one point: no fit
    (fit,) = bench.largest_batches(rows, memory_gb=80.1)
    assert (fit["model"], fit["align"], fit["batch_sizes"]) == ("SiT-XL/2", "vae-repa", [32, 64, 128])
    assert fit["fixed_gb"] == pytest.approx(10) and fit["gb_per_image"] == pytest.approx(0.2)
    assert fit["largest_batch"] == 350  # (80.1 - 10) / 0.2 = 350.5


def test_a_row_out_of_memory_is_recorded_and_each_row_is_written_when_done(tmp_path, monkeypatch):
    """A batch that does not fit is a recorded failure while the other rows run, and larger batches of the same
    methods are not tried; the JSON is rewritten after every row, so a run stopped part-way (here by an interrupt at
    its last row) keeps the rows already timed."""
    bench = load_script("benchmark_train")
    out = tmp_path / "bench.json"
    real, calls = bench.time_config, []

    def time_config(name, align, b, args, device, precision=None):
        calls.append((align, b))
        if (align, b) == ("none", 4):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if (align, b) == ("vae-repa", 6):
            raise KeyboardInterrupt
        return real(name, align, b, args, device, precision)

    monkeypatch.setattr(bench, "time_config", time_config)
    argv = ["--models", "SiT-S/2", "--align", "none", "vae-repa", "--depth", "2", "--hidden-size", "32",
            "--num-heads", "2", "--latent-size", "8", "--batch-size", "2", "4", "6", "--steps", "1", "--warmup", "0",
            "--precision", "fp32", "--out", str(out)]
    with pytest.raises(KeyboardInterrupt):
        bench.main(argv)
    report = json.loads(out.read_text())
    assert calls == [("none", 2), ("vae-repa", 2), ("none", 4), ("vae-repa", 4), ("vae-repa", 6)]
    assert [(r["align"], r["batch_size"]) for r in report["results"]] == [("none", 2), ("vae-repa", 2),
                                                                          ("vae-repa", 4)]
    assert [(f["align"], f["batch_size"]) for f in report["failures"]] == [("none", 4)]
    assert report["failures"][0]["error"].startswith("OutOfMemoryError: CUDA out of memory")
    text = load_script("benchmarks_doc").render(tmp_path)
    assert "| SiT-S/2 | none | 4 | fp32 | no | failed: OutOfMemoryError |" in text


@pytest.mark.gpu
def test_cuda_rows_have_memory_fits_profiles_and_the_attention_backend(tmp_path, record_property):
    """On CUDA (eager, bf16): peak memory grows with the batch, so the fit has a positive per-image slope and the
    largest batch lies beyond the measured ones; the profile finds matrix-product and attention kernels under torch's
    default attention, and none of attention's fused kernels with --sdpa-backend math (its products run as plain
    matrix products); the phases and the kernel time fit in the step."""
    bench = load_script("benchmark_train")
    tiny = ["--models", "SiT-S/2", "--align", "none", "vae-repa", "--depth", "2", "--hidden-size", "64",
            "--num-heads", "2", "--latent-size", "16", "--steps", "3", "--warmup", "1", "--no-compile",
            "--profile-steps", "2"]
    reports = {}
    for backend in ("default", "math"):
        out = tmp_path / f"{backend}.json"
        assert bench.main([*tiny, "--batch-size", "8", "64", "--sdpa-backend", backend, "--out", str(out)]) == 0
        reports[backend] = json.loads(out.read_text())
    fits = reports["default"]["memory_fits"]
    assert {f["align"] for f in fits} == {"none", "vae-repa"}
    for f in fits:
        assert f["gb_per_image"] > 0 and f["largest_batch"] > 64 and f["device_memory_gb"] > 1
    for backend, report in reports.items():
        for r in report["results"]:
            prof = r["profile"]
            kinds = prof["by_kind_ms"]
            assert kinds["matmul"] > 0 and 0 < prof["busy_ms_per_step"] <= prof["wall_ms_per_step"]
            assert (kinds.get("attention", 0) > 0) == (backend == "default"), kinds
            step_ms = 1000 * r["batch_size"] / r["images_per_s"]
            assert sum(r["phase_ms"].values()) < 1.5 * step_ms
    row = reports["default"]["results"][-1]
    record_property("gpu measurement", f"tiny SiT batch 64 vae-repa: phases {row['phase_ms']}, "
                                       f"kernels {row['profile']['by_kind_ms']}")


def test_ddp_rows_run_the_model_wrapped_as_train_py_wraps_it(tmp_path):
    """--ddp times the step through DistributedDataParallel with train.py's options, in a process group of one (a
    subprocess: the group would outlive the test); the rows count the same FLOPs as the bare model's and the JSON says
    which path was measured."""
    rows = {}
    for ddp in ("--ddp", "--no-ddp"):
        out = tmp_path / f"{ddp}.json"
        r = subprocess.run([sys.executable, str(ROOT / "scripts/benchmark_train.py"), "--models", "SiT-S/2", "--align",
                            "vae-repa", "--depth", "2", "--hidden-size", "32", "--num-heads", "2", "--latent-size", "8",
                            "--batch-size", "2", "--steps", "2", "--warmup", "1", "--precision", "fp32", ddp,
                            "--out", str(out)], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
        assert r.returncode == 0, r.stderr[-3000:]
        rows[ddp] = json.loads(out.read_text())
    assert rows["--ddp"]["ddp"] is True and rows["--no-ddp"]["ddp"] is False
    wrapped, bare = rows["--ddp"]["results"][0], rows["--no-ddp"]["results"][0]
    assert wrapped["train_gflops_per_image"] == bare["train_gflops_per_image"] > 0
    assert wrapped["images_per_s"] > 0
