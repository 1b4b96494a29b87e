"""scripts/benchmark_train.py on a tiny CPU configuration: the JSON it writes and FLOP counts against closed forms."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
                     "--warmup", "0", "--precision", "fp32", "--out", str(out)])
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


def test_table4_preset_is_the_paper_s_setting():
    bench = load_script("benchmark_train")
    args = bench.parse_args(["--table4"])
    assert (args.models, args.align, args.enc_type, args.batch_size) == (
        ["SiT-XL/2"], ["none", "repa", "sra", "vae-repa", "repa,vae-repa"], "dinov2-vit-l", 32)


def test_vavae_rows_time_lightningdit_on_vavae_latents_with_its_objective(tmp_path):
    """--vavae-rows: LightningDiT-XL/1 on 32-channel latents of half the side, beside SiT-XL/2; a tiny LightningDiT's
    forward multiply-accumulates against the closed form of its layers (SwiGLU width int(2/3 * 4d))."""
    bench = load_script("benchmark_train")
    args = bench.parse_args(["--vavae-rows"])
    assert (args.models, args.align, args.batch_size) == (["SiT-XL/2", "LightningDiT-XL/1"], ["none", "vae-repa"], 32)
    assert bench.latent_shape("LightningDiT-XL/1", args) == [32, 16, 16]
    assert bench.latent_shape("SiT-XL/2", args) == [4, 32, 32]
    assert bench.loss_config("LightningDiT-XL/1").cos_coeff == 1.0
    out = tmp_path / "bench.json"
    assert bench.main(["--models", "LightningDiT-B/1", "--align", "none", "--depth", "2", "--hidden-size", "32",
                       "--num-heads", "2", "--latent-size", "8", "--batch-size", "2", "--steps", "1", "--warmup",
                       "0", "--precision", "fp32", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["results"]
    t, d, c, h, depth = 16, 32, 32, int(2 / 3 * 4 * 32), 2  # 4 x 4 tokens of 32 channels at patch 1
    block = 6 * d * d + t * (3 * d * d + d * d + 2 * h * d + h * d) + 2 * t * t * d
    expected = t * c * d + 256 * d + d * d + depth * block + 2 * d * d + t * d * c
    assert row["forward_gmacs_per_image"] * 1e9 == pytest.approx(expected, rel=1e-9)
