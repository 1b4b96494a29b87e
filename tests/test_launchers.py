"""The paper launchers (scripts/train_*.sh) run train.py with flags it accepts, meaning what the comments say:
each is run with `accelerate` / `torchrun` replaced by a stub that records the command line."""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

import generate
import train
from alignment import model_from_args

ROOT = Path(__file__).resolve().parents[1]
STUB = """#!/usr/bin/env python3
import json, os, sys
with open(os.environ["LAUNCH_LOG"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
print("stub: samples/stub.npz")  # what generate.py's last line names, for sample_vavae_table2.sh's pipe
"""
EVALUATOR_STUB = "#!/bin/sh\necho 'FID: 1.0'\n"  # `python -m evaluations.evaluator` in sample_vavae_table2.sh
# Every launcher: the tool it runs and the variables it requires.
LAUNCHERS = {
    "train_b2_table1.sh": ("train.py", {}),
    "train_l2_xl2_table2.sh": ("train.py", {}),
    "train_vavae_table2.sh": ("train.py", {}),
    "train_multinode.sh": ("train.py", {"NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "localhost"}),
    "sample_xl2_table3.sh": ("generate.py", {"CKPT": "runs/x"}),
    "sample_vavae_table2.sh": ("generate.py", {"RUN": "runs/x-vae-repa", "REF": "ref.npz", "STEPS": "100000"}),
}


def run_launcher(tmp_path: Path, script: str, *args: str, **env) -> subprocess.CompletedProcess:
    """The script run in tmp_path with `accelerate` and `torchrun` replaced by the stub (it logs to launches.jsonl)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("accelerate", STUB), ("torchrun", STUB), ("python", EVALUATOR_STUB)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "launches.jsonl"
    log.unlink(missing_ok=True)
    full_env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "LAUNCH_LOG": str(log), **env}
    return subprocess.run(["bash", str(ROOT / "scripts" / script), *args], env=full_env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)


def launches(tmp_path: Path, script: str, *args: str, tool: str = "train.py", **env) -> list[list[str]]:
    """train.py's (or generate.py's) arguments of every launch the script makes."""
    proc = run_launcher(tmp_path, script, *args, **env)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, script, proc.stdout, proc.stderr)
    lines = [json.loads(line) for line in (tmp_path / "launches.jsonl").read_text().splitlines()]
    return [argv[argv.index(tool) + 1:] for argv in lines]


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


def checkpoint(run: Path, step: int) -> None:
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / f"{step:07d}.pt").write_bytes(b"")


def test_every_launcher_is_covered():
    found = {p.name for p in (ROOT / "scripts").glob("*.sh")} - {"gpu_check.sh", "launcher_lib.sh"}
    assert found == set(LAUNCHERS)


@pytest.mark.parametrize("script", sorted(LAUNCHERS))
def test_launcher_answers_help_and_launches_nothing(tmp_path, script):
    tool, _ = LAUNCHERS[script]
    proc = run_launcher(tmp_path, script, "--help")  # without its required variables: help needs none
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "launches.jsonl").exists() and not (tmp_path / "runs").exists()
    text = (ROOT / "scripts" / script).read_text()
    variables = re.findall(r"^([A-Z_]+)=\$\{\1:[-?]", text, re.M)
    assert variables and all(f"  {name} (" in proc.stdout for name in variables), proc.stdout
    assert f"Extra arguments are passed to {tool}" in proc.stdout
    assert text.splitlines()[1].removeprefix("# ") in proc.stdout  # what it runs: its header comment


@pytest.mark.parametrize("script", sorted(LAUNCHERS))
def test_launcher_passes_extra_arguments_through(tmp_path, script):
    tool, env = LAUNCHERS[script]
    if script == "sample_vavae_table2.sh":
        checkpoint(tmp_path / "runs/x-vae-repa", 100_000)
    extra = ["--global-seed", "7"] if tool == "generate.py" else ["--seed", "7", "--max-train-steps", "10"]
    runs = launches(tmp_path, script, *extra, tool=tool, **env)
    assert runs
    for argv in runs:
        assert argv[-len(extra):] == extra
        if tool == "train.py":
            assert (train.parse_args(argv).seed, train.parse_args(argv).max_train_steps) == (7, 10)
        else:
            assert generate.parse_args(argv).global_seed == 7


@pytest.mark.parametrize("methods, readme_name", [("vae-repa", "SiT-XL-2-vae-repa"), ("none", "SiT-XL-2-vanilla"),
                                                  ("repa,vae-repa", "SiT-XL-2-vae-repa+repa"), ("sra", "SiT-XL-2-sra")])
def test_runs_are_named_as_the_readme_and_train_py_name_them(tmp_path, methods, readme_name):
    (argv,) = launches(tmp_path, "train_l2_xl2_table2.sh", METHODS=methods)
    args = train.parse_args(argv)
    assert (args.exp_name, args.output_dir, args.resume) == (readme_name, "runs", None)  # README: runs/SiT-XL-2-...
    i = argv.index("--exp-name")
    assert train.parse_args(argv[:i] + argv[i + 2:]).exp_name == readme_name  # train.py's own default name


def test_launchers_resume_runs_and_find_them_under_their_old_names(tmp_path):
    new = launches(tmp_path, "train_b2_table1.sh")
    assert [train.parse_args(a).exp_name for a in new] == ["SiT-B-2-vanilla", "SiT-B-2-vae-repa"]
    assert all(train.parse_args(a).resume is None for a in new)  # nothing to resume yet

    checkpoint(tmp_path / "runs/SiT-B-2-vanilla", 100_000)
    checkpoint(tmp_path / "runs/sit-b2-vae-repa", 50_000)  # started under the launcher's earlier name
    proc = run_launcher(tmp_path, "train_b2_table1.sh")
    assert proc.returncode == 0, proc.stderr
    runs = [train.parse_args(a) for a in launches(tmp_path, "train_b2_table1.sh")]
    assert [(a.exp_name, a.resume) for a in runs] == [("SiT-B-2-vanilla", "latest"), ("sit-b2-vae-repa", "latest")]
    assert "runs/sit-b2-vae-repa exists (this launcher's earlier name for runs/SiT-B-2-vae-repa)" in proc.stderr

    checkpoint(tmp_path / "runs/sit-xl-2-vae-repa", 50_000)  # train_l2_xl2_table2.sh lowercased names before
    (argv,) = launches(tmp_path, "train_l2_xl2_table2.sh")
    assert (train.parse_args(argv).exp_name, train.parse_args(argv).resume) == ("sit-xl-2-vae-repa", "latest")
    (argv,) = launches(tmp_path, "train_l2_xl2_table2.sh", "--exp-name", "mine")  # the user's name wins
    assert (train.parse_args(argv).exp_name, train.parse_args(argv).resume) == ("mine", None)


def test_one_exp_name_for_two_runs_is_refused(tmp_path):
    proc = run_launcher(tmp_path, "train_b2_table1.sh", "--exp-name", "d4", "--vae-repa-depth", "4")
    assert proc.returncode == 2 and "RUNS=vae-repa" in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert not (tmp_path / "launches.jsonl").exists()
    (argv,) = launches(tmp_path, "train_b2_table1.sh", "--exp-name", "d4", "--vae-repa-depth", "4", RUNS="vae-repa")
    assert (train.parse_args(argv).exp_name, train.parse_args(argv).vae_repa_depth) == ("d4", 4)
