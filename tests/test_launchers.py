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


# LightningDiT's reproduction configs, hustvl/LightningDiT configs/reproductions/, typed in by hand (read in two copies
# of that repository, victories24/LightningDiT-An-Experimental-Evaluation-on-ImageNet-Generation- and
# thiagoambiel/LightningDiTLoRA, whose config files agree line for line but for the paths):
# lightningdit_xl_vavae_f16d32_64ep_cfg.yaml, line: value
LDIT_64EP = {
    "model_type": "LightningDiT-XL/1",  # l.25
    "use_qknorm": False,  # l.26
    "max_steps": 80_000,  # l.35
    "global_batch_size": 1024,  # l.36
    "global_seed": 0,  # l.37
    "ckpt_every": 20_000,  # l.42
    "lr": 0.0002,  # l.44
    "beta2": 0.95,  # l.45
    "path_type": "Linear",  # l.49
    "use_cosine_loss": True,  # l.54
    "use_lognorm": True,  # l.55
    "mode": "ODE", "sampling_method": "euler",  # l.59, l.60
    "num_sampling_steps": 250,  # l.65: torch.linspace(t0, t1, 250) in transport/integrators.py's ode: 249 steps
    "cfg_scale": 10.0,  # l.66
    "fid_num": 50_000,  # l.74
    "cfg_interval_start": 0.10,  # l.75: guided when its time s >= 0.10 (s = 1 - t)
    "timestep_shift": 0.3,  # l.76
}
# lightningdit_xl_vavae_f16d32_800ep_cfg.yaml: the same sample section but for the guidance
LDIT_800EP = {"cfg_scale": 6.7, "cfg_interval_start": 0.125}  # l.66, l.75
# Not in the configs, in LightningDiT's code: train.py builds AdamW(lr, weight_decay=0, betas=(0.9, beta2)), updates
# its EMA with update_ema's decay=0.9999 and clips only when the config's optimizer section has max_grad_norm (none
# does); models/lightningdit.py: class_dropout_prob=0.1, forward_with_cfg guides model_out[:, :3]; docs/tutorial.md:
# training runs in bfloat16; datasets/img_latent_dataset.py: the stored latents or their flip, probability 0.5;
# tokenizer/vavae.py decode_to_images: uint8(clamp(127.5 x + 128)), DiT's rounding.
LDIT_CODE = {"weight_decay": 0.0, "beta1": 0.9, "ema_decay": 0.9999, "class_dropout": 0.1, "guided_channels": 3}
IMAGENET_TRAIN_IMAGES = 1_281_167


@pytest.mark.parametrize("methods, recipe, model", [
    ("none", "table2", "LightningDiT-XL/1"), ("vae-repa", "table2", "LightningDiT-XL/1"),
    ("vae-repa", "sit", "SiT-XL/1"),
])
def test_vavae_launcher_is_the_row_it_says(tmp_path, methods, recipe, model):
    (argv,) = launches(tmp_path, "train_vavae_table2.sh", METHODS=methods, RECIPE=recipe, MODEL=model)
    args = train.parse_args(argv)
    assert (args.model, args.batch_size, args.max_train_steps) == (model, 256, 400_000)
    assert args.checkpointing_steps == 100_000  # the FIDs at 100K / 200K / 400K
    lightning = recipe == "table2"
    assert (args.weighting, args.cos_loss_coeff, args.adam_beta2, args.learning_rate, args.max_grad_norm) == (
        ("logit-normal", 1.0, LDIT_64EP["beta2"], LDIT_64EP["lr"], 0.0) if lightning
        else ("uniform", 0.0, 0.999, 1e-4, 1.0))
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


@pytest.mark.parametrize("methods", ["none", "vae-repa"])
def test_lightningdit_64ep_recipe_is_lightningdits_config_value_by_value(tmp_path, methods):
    (argv,) = launches(tmp_path, "train_vavae_table2.sh", METHODS=methods, RECIPE="lightningdit-64ep")
    args = train.parse_args(argv)
    assert args.model == LDIT_64EP["model_type"] and args.qk_norm == LDIT_64EP["use_qknorm"]
    assert args.batch_size * args.gradient_accumulation_steps == LDIT_64EP["global_batch_size"]
    assert args.max_train_steps == LDIT_64EP["max_steps"] and args.seed == LDIT_64EP["global_seed"]
    assert round(args.max_train_steps * args.batch_size / IMAGENET_TRAIN_IMAGES) == 64  # epochs
    assert args.checkpointing_steps == args.keep_every == LDIT_64EP["ckpt_every"]  # every one kept
    assert (args.learning_rate, args.adam_beta1, args.adam_beta2, args.adam_weight_decay) == (
        LDIT_64EP["lr"], LDIT_CODE["beta1"], LDIT_64EP["beta2"], LDIT_CODE["weight_decay"])
    assert args.max_grad_norm == 0  # no clipping: no config sets max_grad_norm
    assert args.ema_decay == LDIT_CODE["ema_decay"] and args.cfg_prob == LDIT_CODE["class_dropout"]
    assert args.path_type == LDIT_64EP["path_type"].lower() and args.prediction == "v"
    assert args.weighting == "logit-normal" and LDIT_64EP["use_lognorm"]
    assert args.cos_loss_coeff == 1.0 and LDIT_64EP["use_cosine_loss"]
    assert args.mixed_precision == "bf16" and args.flip
    assert args.align == ([] if methods == "none" else ["vae-repa"])  # VAE-REPA is the only difference
    assert args.exp_name == f"vavae-lightningdit-64ep-LightningDiT-XL-1-{'vanilla' if methods == 'none' else methods}"


def test_a_table2_run_started_before_the_recipe_had_its_name_resumes_as_it_was(tmp_path):
    (tmp_path / "runs" / "vavae-lightningdit-xl-1-lightningdit-vae-repa").mkdir(parents=True)
    proc = run_launcher(tmp_path, "train_vavae_table2.sh")
    assert proc.returncode == 0, proc.stderr
    (argv,) = launches(tmp_path, "train_vavae_table2.sh")
    args = train.parse_args(argv)
    assert args.exp_name == "vavae-lightningdit-xl-1-lightningdit-vae-repa" and args.max_grad_norm == 1.0
    assert "earlier version of this script" in proc.stderr


def test_vavae_launcher_refuses_an_unknown_recipe(tmp_path):
    with pytest.raises(subprocess.CalledProcessError):
        launches(tmp_path, "train_vavae_table2.sh", RECIPE="edm")


def sampling_launches(tmp_path: Path, run_name: str, steps: list[int], **env) -> tuple[list[list[str]], str]:
    """generate.py's arguments of every launch scripts/sample_vavae_table2.sh makes for a run with checkpoints at
    `steps` (torchrun and the evaluator's python are stubs; the evaluator reports FID 1.0), and its output."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "torchrun").write_text(STUB + "print('into samples/x.npz holds arr_0')\n")
    (bin_dir / "python").write_text("#!/usr/bin/env python3\nprint('FID: 1.0')\n")
    for name in ("torchrun", "python"):
        (bin_dir / name).chmod(0o755)
    run = tmp_path / "runs" / run_name
    for step in steps:
        (run / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run / "checkpoints" / f"{step:07d}.pt").touch()
    log = tmp_path / "launches.jsonl"
    log.unlink(missing_ok=True)
    full_env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "LAUNCH_LOG": str(log), "RUN": str(run),
                "REF": "ref.npz", **env}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "sample_vavae_table2.sh")], env=full_env, check=True,
                          cwd=tmp_path, capture_output=True, text=True)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    return [argv[argv.index("generate.py") + 1:] for argv in lines], done.stdout


@pytest.mark.parametrize("protocol, config", [("lightningdit", LDIT_64EP), ("lightningdit-800ep", LDIT_800EP)])
def test_lightningdits_fid_protocol_is_its_sample_config(tmp_path, protocol, config):
    import generate

    (argv,), out = sampling_launches(tmp_path, "vavae-lightningdit-64ep-LightningDiT-XL-1-vanilla", [80_000],
                                     PROTOCOL=protocol)
    args = generate.parse_args(argv)
    assert args.mode == LDIT_64EP["mode"].lower() and not args.heun  # euler
    assert args.num_steps == LDIT_64EP["num_sampling_steps"] - 1  # grid points -> steps
    assert args.time_shift == 1 / LDIT_64EP["timestep_shift"]  # exactly, in our time t = 1 - s
    assert args.cfg_scale == config["cfg_scale"] and args.cfg_channels == LDIT_CODE["guided_channels"]
    assert (args.guidance_low, args.guidance_high) == (0.0, 1 - config["cfg_interval_start"])
    assert args.pixel_rounding == "dit" and args.label_sampling == "random"
    assert args.num_fid_samples == LDIT_64EP["fid_num"]
    if protocol == "lightningdit":
        assert "80K iterations, lightningdit protocol, CFG 10.0: FID 1.0 (ours) | 2.11" in out


def test_lightningdits_protocol_without_guidance_keeps_its_time_shift(tmp_path):
    import generate

    (argv,), out = sampling_launches(tmp_path, "vavae-lightningdit-64ep-LightningDiT-XL-1-vanilla", [80_000], CFG="1")
    args = generate.parse_args(argv)
    assert args.cfg_scale == 1.0 and args.time_shift == 1 / LDIT_64EP["timestep_shift"] and args.mode == "ode"
    assert "| 5.14" in out


def test_table2_runs_are_sampled_with_repas_protocol_by_default(tmp_path):
    import generate

    runs, out = sampling_launches(tmp_path, "vavae-table2-LightningDiT-XL-1-vae-repa", [100_000, 400_000])
    for argv in runs:
        args = generate.parse_args(argv)
        assert (args.mode, args.num_steps, args.cfg_scale, args.time_shift, args.pixel_rounding) == (
            "sde", 250, 1.0, 1.0, "repa")
    assert "400K iterations, repa protocol, CFG 1.0: FID 1.0 (ours) | 4.4 (paper, Table 2)" in out


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
