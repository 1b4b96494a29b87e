"""scripts/benchmarks_doc.py: docs/benchmarks.md matches benchmarks/results/*.json, and every kind renders with the
command that produced it (training and sampling JSONs made here by the benchmark scripts on tiny CPU models)."""

import json
import shutil
from pathlib import Path

import pytest
from helpers_scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def test_docs_benchmarks_md_is_in_sync_with_the_results():
    assert load_script("benchmarks_doc").main(["--check"]) == 0, "run: python scripts/benchmarks_doc.py"


def test_check_fails_on_a_stale_doc(tmp_path):
    doc = load_script("benchmarks_doc")
    results = tmp_path / "results"
    shutil.copytree(ROOT / "benchmarks" / "results", results)
    out = tmp_path / "benchmarks.md"
    assert doc.main(["--results-dir", str(results), "--out", str(out), "--check"]) == 1  # missing
    assert doc.main(["--results-dir", str(results), "--out", str(out)]) == 0
    assert doc.main(["--results-dir", str(results), "--out", str(out), "--check"]) == 0
    (results / "extra.json").write_text(json.dumps({"what": "something new"}))
    assert doc.main(["--results-dir", str(results), "--out", str(out), "--check"]) == 1


def test_every_kind_renders_with_its_command(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    train_argv = ["--models", "SiT-S/2", "--align", "none", "vae-repa", "--depth", "2", "--hidden-size", "32",
                  "--num-heads", "2", "--latent-size", "8", "--batch-size", "2", "--steps", "1", "--warmup", "0",
                  "--precision", "fp32", "--profile-steps", "1", "--out", str(results / "train_tiny.json")]
    assert load_script("benchmark_train").main(train_argv) == 0
    sample_argv = ["--model", "SiT-S/2", "--depth", "2", "--hidden-size", "32", "--num-heads", "2", "--latent-size",
                   "8", "--batch-size", "2", "--sampler-steps", "2", "--repeats", "1", "--warmup", "0", "--variants",
                   "autocast", "bf16-weights", "--out", str(results / "sample_tiny.json")]
    assert load_script("benchmark_sample").main(sample_argv) == 0
    for name in ("h100_baseline_a101ca5.json", "eval_cpu.json"):
        shutil.copy(ROOT / "benchmarks" / "results" / name, results / name)
    (results / "odd.json").write_text("[1, 2]")
    out = tmp_path / "doc.md"
    assert load_script("benchmarks_doc").main(["--results-dir", str(results), "--out", str(out)]) == 0
    text = out.read_text()
    train_command = json.loads((results / "train_tiny.json").read_text())["command"]
    assert train_command == "python scripts/benchmark_train.py " + " ".join(train_argv)
    for title in ("## H100 baseline (transcribed)", "## Training", "## Sampling", "## Evaluation", "## Other files"):
        assert title in text
    assert f"`{train_command}`" in text and "`python scripts/benchmark_sample.py --model SiT-S/2" in text
    train_row = next(line for line in text.splitlines() if "train_tiny.json" in line)
    train = json.loads((results / "train_tiny.json").read_text())
    # the commit's first 7 digits and any remark after its 40 (profiling.git_commit), or "unknown" whole
    assert f"| {train['commit'][:7]}{train['commit'][40:]} |" in train_row
    # VAE-REPA's row shows its FLOP overhead over the vanilla row of the same run, as a percentage
    vanilla, vae_repa = (r["train_gflops_per_image"] for r in train["results"])
    vae_repa_row = [line for line in text.splitlines() if "train_tiny.json" in line][1]
    assert "| vae-repa |" in vae_repa_row and f"| +{100 * (vae_repa / vanilla - 1):.1f}% |" in vae_repa_row
    assert "| 804 TFLOP/s |" in text and "| a101ca5 |" in text  # the transcribed H100 table
    # where the step time goes: the phases and the profile's shares, from the same file
    section = text.split("## Training: where the step time goes")[1].split("## ")[0]
    step_rows = [line for line in section.splitlines() if "train_tiny.json" in line]
    assert len(step_rows) == 2 and all("forward " in line and "backward " in line for line in step_rows)
    kinds = train["results"][0]["profile"]["by_kind_ms"]
    top = max(kinds, key=kinds.get)
    share = 100 * kinds[top] / train["results"][0]["profile"]["busy_ms_per_step"]
    assert f"{top} {share:.0f}%" in step_rows[0]
    assert "## Training: memory" not in text  # no peak memory on the CPU
    train["memory_fits"] = [{"model": "SiT-S/2", "align": "none", "batch_sizes": [2, 4], "fixed_gb": 1.5,
                             "gb_per_image": 0.25, "device_memory_gb": 80.0, "largest_batch": 314}]
    (results / "train_tiny.json").write_text(json.dumps(train))
    assert load_script("benchmarks_doc").main(["--results-dir", str(results), "--out", str(out)]) == 0
    memory = out.read_text().split("## Training: memory")[1].split("## ")[0]
    assert "| 2 4 | 1.5 | 0.25 | 80 | 314 |" in memory
    eval_row = next(line for line in text.splitlines() if "eval_cpu.json" in line)
    assert "not recorded" in eval_row  # older JSONs carry no command
    assert "odd.json" in text
