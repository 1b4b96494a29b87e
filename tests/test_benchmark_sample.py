"""scripts/benchmark_sample.py: a tiny SiT on the CPU (JSON schema, counted forwards against the closed form of the
SDE grid, bf16-weight bits against autocast, bf16 error against fp32, --variants) and SiT-B/2 on CUDA (-m gpu)."""

import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers_scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "SiT-S/2", "--depth", "2", "--hidden-size", "32", "--num-heads", "2", "--latent-size", "8",
        "--batch-size", "2", "--num-steps", "250", "--sampler-steps", "10", "--repeats", "3", "--warmup", "1"]


def bench():
    return load_script("benchmark_sample")

def sde_forwards(num_steps: int, low: float, high: float) -> dict:
    """The SDE grid is linspace(1, 0.04, num_steps) then 0; the model runs once at the start of each step, so at
    every grid time but the final 0, and with the doubled batch where low <= t <= high."""
    times = np.linspace(1.0, 0.04, num_steps)
    guided = int(np.sum((times >= low) & (times <= high)))
    return {"guided": guided, "unguided": num_steps - guided}


@pytest.fixture(scope="module")
def cpu_report(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("bench") / "sample.json"
    variants = ["fp32", "autocast", "bf16-weights", "compile", "compile-cudagraphs"]
    assert bench().main([*TINY, "--variants", *variants, "--decode", "--out", str(out)]) == 0
    return json.loads(out.read_text())


def rows_of(report: dict) -> dict:
    return {r["variant"]: r for r in report["results"]}


def test_json_schema(cpu_report):
    assert {"benchmark", "command", "device", "torch", "commit", "python", "args", "protocol", "results",
            "extrapolated", "decode"} <= set(cpu_report)
    assert cpu_report["benchmark"] == "sample" and cpu_report["device"].startswith("cpu")
    assert cpu_report["command"].startswith("python scripts/benchmark_sample.py --model SiT-S/2")
    assert cpu_report["args"]["batch_size"] == 2 and cpu_report["extrapolated"] is True
    assert cpu_report["variants"] == ["fp32", "autocast", "bf16-weights", "compile", "compile-cudagraphs"]
    for row in cpu_report["results"]:
        if row["status"] != "ok":
            continue
        for kind, batch in (("guided", 4), ("unguided", 2)):
            timing = row["forward"][kind]
            assert timing["batch"] == batch and len(timing["times_ms"]) == 3  # --repeats raw timings
            assert timing["median_ms"] == pytest.approx(statistics.median(timing["times_ms"]))
            assert row["first_call_s"][kind] > 0
        sampler = row["sampler"]
        assert len(sampler["times_s"]) == 1 and sampler["images_per_s"] > 0
        assert sampler["gpu_hours_per_50k"] == pytest.approx(50_000 / sampler["images_per_s"] / 3600)
        assert row["peak_memory_gb"] is None  # CUDA only
        assert (row["compile_s"] is None) == ("compile" not in row["variant"])


def test_counted_forwards_match_the_closed_form(cpu_report):
    assert sde_forwards(250, 0.0, 0.7) == {"guided": 172, "unguided": 78}  # the protocol: 172 of 250 steps doubled
    assert cpu_report["protocol"]["forwards"] == sde_forwards(250, 0.0, 0.7)
    for row in rows_of(cpu_report).values():
        if row["status"] == "ok":
            assert row["sampler"]["forwards"] == sde_forwards(10, 0.0, 0.7) == {"guided": 7, "unguided": 3}


def test_extrapolation_scales_by_forward_cost(cpu_report):
    row = rows_of(cpu_report)["autocast"]
    g, u = (row["forward"][k]["median_ms"] for k in ("guided", "unguided"))
    full, short = sde_forwards(250, 0.0, 0.7), sde_forwards(10, 0.0, 0.7)
    ratio = (full["guided"] * g + full["unguided"] * u) / (short["guided"] * g + short["unguided"] * u)
    assert row["sampler"]["protocol_s_per_batch"] == pytest.approx(row["sampler"]["median_s"] * ratio)


def test_bf16_weights_are_bit_identical_to_autocast(cpu_report):
    acc = rows_of(cpu_report)["bf16-weights"]["accuracy"]["vs_autocast"]
    assert acc["forward"]["max_abs"] == 0 and acc["latents"]["max_abs"] == 0


def test_bf16_error_against_fp32_is_small_but_nonzero(cpu_report):
    acc = rows_of(cpu_report)["autocast"]["accuracy"]["vs_fp32"]
    for what in ("forward", "latents"):
        assert acc[what]["ref_std"] > 0.05  # the random init gives a non-trivial output
        assert 0 < acc[what]["mean_rel_std"] < 1e-2 and acc[what]["max_rel_std"] < 0.1


def test_compile_stays_near_autocast_and_cudagraphs_skip_on_cpu(cpu_report):
    rows = rows_of(cpu_report)
    acc = rows["compile"]["accuracy"]["vs_autocast"]
    assert acc["forward"]["mean_rel_std"] < 1e-2 and acc["latents"]["mean_rel_std"] < 1e-2
    assert rows["compile"]["graphs_compiled"] == 2  # guided and unguided batch; the sampler recompiles nothing
    assert rows["compile-cudagraphs"]["status"] == "skipped" and "CUDA" in rows["compile-cudagraphs"]["note"]


def test_decode_is_timed_and_its_share_reported(cpu_report):
    decode = cpu_report["decode"]
    assert decode["status"] == "ok" and decode["batch"] == 2 and len(decode["times_s"]) == 3
    share = rows_of(cpu_report)["autocast"]["with_decode"]
    total = rows_of(cpu_report)["autocast"]["sampler"]["protocol_s_per_batch"] + decode["median_s"]
    assert share["decode_fraction"] == pytest.approx(decode["median_s"] / total)


def test_variants_list_is_honoured(tmp_path, one_thread):
    out = tmp_path / "two.json"
    assert bench().main([*TINY, "--sampler-steps", "3", "--repeats", "1", "--warmup", "0", "--variants",
                               "bf16-weights", "autocast", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["variant"] for r in report["results"]] == ["bf16-weights", "autocast"]
    assert report["decode"] is None and report["results"][0]["speedup_vs_autocast"]["sampler"] > 0


def test_help_needs_no_gpu():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark_sample.py"), "--help"],
                          capture_output=True, text=True, timeout=120, env={"CUDA_VISIBLE_DEVICES": "",
                                                                             "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0 and "--sampler-steps" in proc.stdout, proc.stderr


@pytest.mark.gpu
def test_fast_paths_on_cuda_stay_within_bf16_noise(tmp_path, record_property):
    """SiT-B/2, batch 16: bf16-weights is bit-identical to autocast; compile and CUDA graphs differ from autocast by
    no more than bf16 noise (autocast's own distance to fp32, with a floor)."""
    out = tmp_path / "gpu.json"
    variants = ["fp32", "autocast", "bf16-weights", "compile", "compile-cudagraphs"]
    assert bench().main(["--model", "SiT-B/2", "--batch-size", "16", "--sampler-steps", "5", "--repeats", "3",
                               "--warmup", "3", "--variants", *variants, "--out", str(out)]) == 0
    rows = rows_of(json.loads(out.read_text()))
    assert all(rows[v]["status"] == "ok" and rows[v]["peak_memory_gb"] > 0 for v in variants)
    same = rows["bf16-weights"]["accuracy"]["vs_autocast"]
    assert same["forward"]["max_abs"] == 0 and same["latents"]["max_abs"] == 0
    noise = rows["autocast"]["accuracy"]["vs_fp32"]
    for v in ("compile", "compile-cudagraphs"):
        acc = rows[v]["accuracy"]["vs_autocast"]
        for what in ("forward", "latents"):
            name = f"sample_b2_{v}_{what}_mean_rel_err_vs_autocast"
            record_property(name, acc[what]["mean_rel_std"])
            print(f"[gpu measurement] {name} = {acc[what]['mean_rel_std']} (bf16 vs fp32: "
                  f"{noise[what]['mean_rel_std']})")
            assert acc[what]["mean_rel_std"] <= max(3 * noise[what]["mean_rel_std"], 5e-3)
            assert acc[what]["max_rel_std"] <= max(3 * noise[what]["max_rel_std"], 5e-2)
    assert rows["compile"]["graphs_compiled"] == 2
    print(f"[gpu measurement] sample_b2_speedup_compile = {rows['compile']['speedup_vs_autocast']}")


def test_a_failing_variant_is_recorded_and_the_others_kept(tmp_path, one_thread, monkeypatch):
    module = bench()
    real = module.variant_model

    def variant_model(base, variant, device):
        if variant == "bf16-weights":
            raise RuntimeError("out of memory (simulated)")
        return real(base, variant, device)

    monkeypatch.setattr(module, "variant_model", variant_model)
    out = tmp_path / "failed.json"
    assert module.main([*TINY, "--sampler-steps", "2", "--repeats", "1", "--warmup", "0", "--variants", "autocast",
                       "bf16-weights", "--out", str(out)]) == 1
    rows = rows_of(json.loads(out.read_text()))
    assert rows["autocast"]["status"] == "ok"
    assert rows["bf16-weights"] == {"variant": "bf16-weights", "status": "failed",
                                    "note": "RuntimeError: out of memory (simulated)"}


def test_each_variant_is_written_when_done(tmp_path, one_thread, monkeypatch):
    """The JSON is rewritten after every variant: a run stopped during its second variant keeps the first."""
    module = bench()
    real = module.variant_model

    def variant_model(base, variant, device):
        if variant == "bf16-weights":
            raise KeyboardInterrupt
        return real(base, variant, device)

    monkeypatch.setattr(module, "variant_model", variant_model)
    out = tmp_path / "stopped.json"
    with pytest.raises(KeyboardInterrupt):
        module.main([*TINY, "--sampler-steps", "2", "--repeats", "1", "--warmup", "0", "--variants", "autocast",
                     "bf16-weights", "--out", str(out)])
    report = json.loads(out.read_text())
    assert [r["variant"] for r in report["results"]] == ["autocast"] and report["results"][0]["status"] == "ok"
