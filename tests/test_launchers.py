"""The paper launchers (scripts/train_*.sh) run train.py with flags it accepts, meaning what the comments say:
each is run with `accelerate` / `torchrun` replaced by a stub that records the command line."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

import train
from alignment import model_from_args

ROOT = Path(__file__).resolve().parents[1]
STUB = """#!/usr/bin/env python3
import json, os, sys
with open(os.environ["LAUNCH_LOG"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
"""


def launches(tmp_path: Path, script: str, **env) -> list[list[str]]:
    """train.py's arguments of every launch the script makes."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in ("accelerate", "torchrun"):
        (bin_dir / name).write_text(STUB)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "launches.jsonl"
    log.unlink(missing_ok=True)
    full_env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "LAUNCH_LOG": str(log), **env}
    subprocess.run(["bash", str(ROOT / "scripts" / script)], env=full_env, check=True, cwd=tmp_path)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    return [argv[argv.index("train.py") + 1:] for argv in lines]


@pytest.mark.parametrize("script, env", [
    ("train_b2_table1.sh", {}),
    ("train_l2_xl2_table2.sh", {"METHODS": "repa,vae-repa"}),
    ("train_multinode.sh", {"NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "localhost"}),
])
def test_paper_launchers_pass_flags_train_accepts(tmp_path, script, env):
    runs = launches(tmp_path, script, **env)
    assert runs
    for argv in runs:
        train.parse_args(argv)  # exits with status 2 on an unknown flag or a bad value


@pytest.mark.parametrize("methods, recipe, model", [
    ("none", "lightningdit", "LightningDiT-XL/1"), ("vae-repa", "lightningdit", "LightningDiT-XL/1"),
    ("vae-repa", "sit", "SiT-XL/1"),
])
def test_vavae_launcher_is_the_row_it_says(tmp_path, methods, recipe, model):
    (argv,) = launches(tmp_path, "train_vavae_table2.sh", METHODS=methods, RECIPE=recipe, MODEL=model)
    args = train.parse_args(argv)
    assert (args.model, args.batch_size, args.max_train_steps) == (model, 256, 400_000)
    assert args.checkpointing_steps == 100_000  # the FIDs at 100K / 200K / 400K
    lightning = recipe == "lightningdit"
    assert (args.weighting, args.cos_loss_coeff, args.adam_beta2, args.learning_rate) == (
        ("logit-normal", 1.0, 0.95, 2e-4) if lightning else ("uniform", 0.0, 0.999, 1e-4))
    assert args.align == ([] if methods == "none" else ["vae-repa"])
    # on VA-VAE latents (32 x 16 x 16): 675M parameters, and the VAE-REPA head predicts 32 values per token
    run_args = {**vars(args), "num_classes": 1000, "latent_shape": [32, 16, 16]}
    with torch.device("meta"):
        net = model_from_args(run_args)
        backbone = model_from_args(run_args, with_heads=False)
    assert abs(sum(p.numel() for p in backbone.parameters()) / 1e6 - 675) < 1
    if methods == "vae-repa":
        assert args.vae_repa_depth == 8 and net.head_taps["vae"] == ("vae_projector", 8)
        assert [m for m in net.vae_projector.modules() if isinstance(m, torch.nn.Linear)][-1].out_features == 32


def test_vavae_launcher_refuses_an_unknown_recipe(tmp_path):
    with pytest.raises(subprocess.CalledProcessError):
        launches(tmp_path, "train_vavae_table2.sh", RECIPE="edm")
