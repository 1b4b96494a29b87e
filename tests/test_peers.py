"""A peer's command trains the peer: SRA's and REPA's README commands, parsed by train.py, get the methods, loss,
schedule, flips and teacher precision that the peer's own code would use; SRA's cosine loss against a closed form;
an old run resumes with the behaviour it had."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_data import write_latent_dataset

import alignment
import train
from alignment import build_methods, model_from_args, peers
from alignment.sra import Sra, token_axis_cosine
from checkpoints import atomic_save, load_checkpoint
from loss import StepInputs

ROOT = Path(__file__).resolve().parents[1]

# SRA's README (vvvvvjdy/SRA, README.md lines 52-67 of the stored copy at 03f5145, section "5.1. Training with SiT +
# SRA"), typed in without `accelerate launch --config_file configs/default.yaml train.py` and the data path.
SRA_README = ["--allow-tf32", "--mixed-precision=fp16", "--seed=0", "--path-type=linear", "--prediction=v",
              "--resolution=256", "--batch-size=32", "--weighting=uniform", "--model=SiT-XL/2", "--block-out-s=8",
              "--block-out-t=20", "--t-max=0.2", "--output-dir=exps", "--exp-name=sitxl-ab820-t0.2-res256"]
# SRA's README, line 78: "--batch-size: The local batch size (by default we use 1 node of 8 GPUs) ... total batch
# size of 256".
SRA_PER_GPU, SRA_GPUS, SRA_GLOBAL = 32, 8, 256
# SRA's SiT-SRA/train.py at 1723f85: parse_args `--loss-type` default "cos", choices sml1, l2, l1, cos; main(), the
# weight of the alignment loss: cos -> align_loss.mean() * 0.5; otherwise
# 2 * 0.1 ** (((epoch - 149) / 1000 + 1) if epoch > 149 else 1) when args.resolution == 256, else the same with
# 99 / 800.
SRA_LOSS_TYPE_DEFAULT, SRA_LOSS_TYPES = "cos", ("sml1", "l2", "l1", "cos")
SRA_COS_WEIGHT = 0.5
SRA_SCHEDULE = {256: (149, 1000), 512: (99, 800)}
# REPA's README (sihyun-yu/REPA, README.md lines 36-50 of the stored copy at 10c9231, section "3. Training"), typed in
# without `accelerate launch train.py` and the data path; `--report-to=wandb` becomes none (no tracker in tests).
REPA_README = ["--report-to=none", "--allow-tf32", "--mixed-precision=fp16", "--seed=0", "--path-type=linear",
               "--prediction=v", "--weighting=uniform", "--model=SiT-XL/2", "--enc-type=dinov2-vit-b",
               "--proj-coeff=0.5", "--encoder-depth=8", "--output-dir=exps", "--exp-name=linear-dinov2-b-enc8"]


def parse(*argv: str):
    return train.parse_args([*argv, "--data-dir", "data"])


def sra_method(args) -> Sra:
    (method,) = build_methods(vars(args))
    assert isinstance(method, Sra)
    return method


# ----------------------------------------------------------------------------------------------
# The commands, parsed


def test_sra_readme_command_trains_sra_as_sra_s_code_would():
    args = parse(*SRA_README)
    assert args.align == ["sra"] and args.flip is False  # SRA's dataset has no flips
    sra = sra_method(args)
    assert (sra.student_depth, sra.teacher_depth, sra.t_max) == (8, 20, 0.2)
    # no --loss-type: SRA's default, its cosine, at a constant weight
    assert sra.objective == peers.SRA_LOSS_TYPES[SRA_LOSS_TYPE_DEFAULT] == "cos"
    assert [sra.weight(e) for e in (0, 150, 799)] == [SRA_COS_WEIGHT] * 3
    assert sra.teacher_precision == "fp32"
    assert args.batch_size == SRA_PER_GPU and args.mixed_precision == "fp16"
    assert "training SRA alone" in args.notes[0] and "--align sra,vae-repa" in args.notes[0]
    assert any("smooth-L1" in n and "Table 3" in n for n in args.notes)
    assert tuple(peers.SRA_LOSS_TYPES) == SRA_LOSS_TYPES


@pytest.mark.parametrize("resolution", [256, 512])
def test_sra_smooth_l1_schedule_follows_the_resolution(resolution):
    args = parse(*SRA_README, "--loss-type=sml1")
    assert args.sra_loss == "smooth_l1" and args.align == ["sra"]
    peers.settle(args, None, resolution, world=1)
    sra = sra_method(args)
    after, epochs = SRA_SCHEDULE[resolution]
    for epoch in (0, after - 1, after, after + 1, 400, 799, 2000):
        expected = 2 * 0.1 ** (((epoch - after) / epochs + 1) if epoch > after else 1)
        assert sra.weight(epoch) == pytest.approx(expected, rel=1e-12), epoch
    # a value given on the command line stays
    given = parse(*SRA_README, "--loss-type=sml1", "--sra-decay-after", "10")
    peers.settle(given, None, 512, world=1)
    assert (given.sra_decay_after, given.sra_decay_epochs) == (10, 800)


def test_align_sra_keeps_the_paper_s_setting_and_our_flips():
    args = parse("--model", "SiT-XL/2", "--align", "sra")
    sra = sra_method(args)
    assert args.flip is True and sra.objective == "smooth_l1" and sra.weight(0) == pytest.approx(0.2)
    assert sra.teacher_precision == "fp32"
    assert parse("--align", "sra", "--sra-teacher-precision", "autocast").sra_teacher_precision == "autocast"
    assert parse(*SRA_README, "--flip").flip is True
    assert parse("--model", "SiT-B/2").flip is True and parse("--no-flip").flip is False


def test_repa_readme_command_trains_repa_without_flips():
    args = parse(*REPA_README)
    assert args.align == ["repa"] and args.flip is False
    assert (args.enc_type, args.encoder_depth, args.proj_coeff) == ("dinov2-vit-b", 8, 0.5)
    assert "training REPA alone" in args.notes[0] and any("flips off" in n for n in args.notes)
    assert parse(*REPA_README, "--flip").flip is True
    assert parse(*REPA_README, "--align", "repa").flip is True  # our command (an explicit --align): our defaults
    both = parse(*REPA_README, "--block-out-s=8", "--block-out-t=20")
    assert both.align == ["repa", "sra"] and both.flip is False


@pytest.mark.parametrize("flag, value", [("--loss-typ", "cos"), ("--t-ma", "0.1"), ("--block-out-s=2", None)])
def test_an_abbreviated_sra_flag_trains_sra_too(flag, value):
    """argparse takes unique prefixes of long flags: SRA's flags shortened must switch SRA on as written out would
    (they once set SRA's value and trained VAE-REPA, silently)."""
    args = parse("--model", "SiT-B/2", flag, *([value] if value else []))
    assert args.align == ["sra"] and args.flip is False
    assert not hasattr(parse("--model", "SiT-B/2", "--sra-t-max", "0.1"), "sra_spellings")  # our spelling: ours


def test_sra_flags_outside_the_method_set_are_refused(capsys):
    with pytest.raises(SystemExit) as e:
        parse(*SRA_README, "--align", "vae-repa")
    assert e.value.code == 2 and "--block-out-s, --block-out-t, --t-max configure SRA" in capsys.readouterr().err


def test_sra_batch_line_states_both_meanings():
    # SRA's README: 32 per GPU on 8 GPUs = 256. Here --batch-size is global: 32 on 8 processes is 4 each.
    line = peers.sra_batch_line(SRA_PER_GPU, 1, SRA_GPUS)
    assert f"--batch-size {SRA_PER_GPU} is the global batch here" in line
    assert f"{SRA_PER_GPU // SRA_GPUS} on each of {SRA_GPUS} processes" in line
    assert f"it would train {SRA_GLOBAL} images per step" in line and f"--batch-size {SRA_GLOBAL} here" in line


# ----------------------------------------------------------------------------------------------
# SRA's cosine and its teacher's precision


def test_sra_cos_is_the_cosine_over_the_token_axis():
    rng = np.random.default_rng(0)
    pred, target = rng.standard_normal((2, 2, 5, 4))  # two (N, T, D) = (2, 5, 4) arrays
    # closed form: for each sample n and feature d, 1 - <p[n, :, d], q[n, :, d]> / (|p[n, :, d]| |q[n, :, d]|)
    expected = np.zeros(2)
    for n in range(2):
        for d in range(4):
            p, q = pred[n, :, d], target[n, :, d]
            expected[n] += (1 - p @ q / np.sqrt((p @ p) * (q @ q))) / 4
    got = token_axis_cosine(torch.tensor(pred, dtype=torch.float32), torch.tensor(target, dtype=torch.float32))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)
    per_token = np.mean([1 - pred[n, k] @ target[n, k] / np.linalg.norm(pred[n, k]) / np.linalg.norm(target[n, k])
                         for n in range(2) for k in range(5)])
    assert abs(per_token - expected.mean()) > 1e-3  # our --sra-loss cosine is another function


def tiny_sra(**kw) -> dict:
    return dict(model="SiT-S/2", depth=3, hidden_size=32, num_heads=2, num_classes=3, latent_shape=[4, 8, 8],
                align=["sra"], sra_student_depth=1, sra_teacher_depth=2, **kw)


@pytest.mark.parametrize("precision", ["fp32", "autocast"])
def test_sra_teacher_runs_in_the_chosen_precision(precision):
    torch.manual_seed(0)
    student, teacher = model_from_args(tiny_sra()), model_from_args(tiny_sra()).eval()
    for p in list(student.parameters()) + list(teacher.parameters()):
        p.data.add_(0.05 * torch.randn_like(p))
    (sra,) = build_methods(tiny_sra(sra_loss="cos", sra_teacher_precision=precision))
    x, noise, t, y = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([0.1, 0.5, 0.9]), torch.arange(3)
    seen, matmuls = [], []
    hooks = [teacher.blocks[1].register_forward_hook(lambda m, i, o: seen.append(o)),
             teacher.blocks[1].mlp.fc1.register_forward_hook(lambda m, i, o: matmuls.append(o.dtype))]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, heads = student((1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * noise, t, y, return_heads=True)
        torch.manual_seed(7)
        value = sra.loss(StepInputs(x=x, noise=noise, t=t, y=y, heads=heads, teacher=teacher))
    for hook in hooks:
        hook.remove()
    assert heads["sra"].dtype == torch.bfloat16  # the student does run under autocast
    assert matmuls == [torch.float32 if precision == "fp32" else torch.bfloat16]
    if precision == "fp32":  # the same tokens as the teacher's forward outside autocast
        torch.manual_seed(7)
        tt = (t - 0.2 * torch.rand(3)).clamp(0, 1)
        with torch.no_grad():
            tokens = teacher.forward_tokens((1 - tt.view(-1, 1, 1, 1)) * x + tt.view(-1, 1, 1, 1) * noise, tt, y, 2)
        torch.testing.assert_close(seen[0], tokens, rtol=0, atol=0)
        p, q = heads["sra"].float(), tokens
        cos = (p * q).sum(1) / (p.norm(dim=1) * q.norm(dim=1))  # over the token axis
        assert value.item() == pytest.approx((1 - cos).mean().item(), rel=1e-5)


# ----------------------------------------------------------------------------------------------
# Two steps of SRA's command, and an old run resumed


TINY = ["--depth", "20", "--hidden-size", "32", "--num-heads", "2", "--mixed-precision", "no", "--num-workers", "0",
        "--sample-every", "0", "--logging-steps", "1", "--max-train-steps", "2", "--device", "cpu", "--no-compile"]


def sra_dataset(root: Path, n: int = 32) -> Path:
    rng = np.random.default_rng(0)
    mean = rng.standard_normal((n, 4, 8, 8)).astype(np.float32)
    std = np.full_like(mean, 0.1)
    write_latent_dataset(root, mean, std, rng.integers(0, 3, n), mean[..., ::-1].copy(), std, shard_size=16,
                         num_classes=3)
    manifest = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").write_text(json.dumps({**manifest, "resolution": 256}))
    return root


def test_sra_readme_command_two_steps_then_an_old_run_resumes_as_it_was(tmp_path):
    data, out = sra_dataset(tmp_path / "data"), tmp_path / "exps"
    command = [*SRA_README, "--data-dir", str(data), "--output-dir", str(out), *TINY]
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *command], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = out / "sitxl-ab820-t0.2-res256"
    log = (run_dir / "log.txt").read_text()
    for text in ("training SRA alone", "SRA: student block 8 (2-layer head) -> EMA teacher block 20 (run in fp32)",
                 "cos (SRA's, over the token axis), coefficient 0.5", "--batch-size 32 is the global batch here",
                 "effective global batch 32 images", "horizontal flips off", "step 2: total_loss="):
        assert text in log, text
        assert text in proc.stdout, text  # on the console too
    assert " sra_loss=" in log
    saved = json.loads((run_dir / "args.json").read_text())
    assert (saved["flip"], saved["sra_loss"], saved["sra_teacher_precision"]) == (False, "cos", "fp32")
    assert not {"notes", "defaulted", "peer_command"} & set(saved)

    # The same run as one written before the flag existed: no teacher precision recorded, flips on.
    path = run_dir / "checkpoints" / "0000002.pt"
    ckpt = load_checkpoint(path)
    old = {k: v for k, v in ckpt["args"].items() if k != "sra_teacher_precision"}
    old["flip"] = True
    atomic_save({**ckpt, "args": old}, path, checksum=True)
    (run_dir / "args.json").write_text(json.dumps(old))
    train.train(train.parse_args([*command, "--max-train-steps", "3", "--resume", "latest"]))
    log = (run_dir / "log.txt").read_text()
    assert "(run in autocast)" in log and "step 3: total_loss=" in log
    assert "--sra-teacher-precision 'autocast': the run's own setting" in log
    assert "--flip True: the run's own setting" in log
    resumed = json.loads((run_dir / "args.json").read_text())
    assert (resumed["flip"], resumed["sra_teacher_precision"]) == (True, "autocast")
    assert load_checkpoint(run_dir / "checkpoints" / "0000003.pt")["args"]["sra_teacher_precision"] == "autocast"
    assert alignment.with_defaults(old)["sra_teacher_precision"] == "autocast"


# ----------------------------------------------------------------------------------------------
# REPA's --resume-step and our --format repa optimizer state


class RepaOrder(torch.nn.Module):
    """Our SiT's modules registered as REPA's models/sit.py SiT.__init__ registers them (sihyun-yu/REPA, models/sit.py,
    class SiT): x_embedder, t_embedder, y_embedder, pos_embed = nn.Parameter(..., requires_grad=False), blocks,
    projectors, final_layer. torch orders model.parameters() as REPA's model does: the root's own pos_embed first."""

    def __init__(self, ours):
        super().__init__()
        self.x_embedder, self.t_embedder, self.y_embedder = ours.x_embedder, ours.t_embedder, ours.y_embedder
        self.pos_embed = torch.nn.Parameter(ours.pos_embed.clone(), requires_grad=False)
        self.blocks, self.projectors, self.final_layer = ours.blocks, ours.projectors, ours.final_layer


def test_repa_export_optimizer_state_loads_into_repa_s_adamw_in_repa_s_order():
    export = __import__("helpers_scripts").load_script("export")
    # the count for REPA's SiT-B/2 with one DINOv2 encoder: 138 parameter tensors, pos_embed among them
    full = dict(model="SiT-B/2", num_classes=1000, latent_shape=[4, 32, 32], align=["repa"], enc_type="dinov2-vit-b",
                encoder_depth=8)
    with torch.device("meta"):
        assert len(list(RepaOrder(model_from_args(full)).parameters())) == 138
    args = dict(model="SiT-S/2", depth=2, hidden_size=32, num_heads=2, num_classes=3, latent_shape=[4, 4, 4],
                align=["vae-repa", "repa", "sra"], vae_repa_depth=1, enc_type="dinov2-vit-s", encoder_depth=1,
                sra_student_depth=1, sra_teacher_depth=2)
    torch.manual_seed(0)
    ours = model_from_args(args)
    opt = torch.optim.AdamW(ours.parameters(), lr=1e-3)
    for p in ours.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    state = export.repa_optimizer_state(opt.state_dict(), args)
    repa = RepaOrder(ours)
    repa_opt = torch.optim.AdamW(repa.parameters(), lr=1e-4)
    repa_opt.load_state_dict(state)  # what REPA's --resume-step does with ckpt["opt"]
    for name, p in repa.named_parameters():
        if name == "pos_embed":
            assert p not in repa_opt.state  # frozen: no state, as in REPA's own optimizer
            continue
        torch.testing.assert_close(repa_opt.state[p]["exp_avg"], opt.state[p]["exp_avg"], rtol=0, atol=0)
        torch.testing.assert_close(repa_opt.state[p]["exp_avg_sq"], opt.state[p]["exp_avg_sq"], rtol=0, atol=0)
    assert repa_opt.param_groups[0]["lr"] == 1e-3  # the run's hyperparameters travel with the state
    no_repa = {**args, "align": ["vae-repa"]}
    assert export.repa_optimizer_state(torch.optim.AdamW(model_from_args(no_repa).parameters()).state_dict(),
                                       no_repa) is None


# ----------------------------------------------------------------------------------------------
# Two steps of REPA's command


# REPA's train.py (sihyun-yu/REPA, the stored copy at 2b8c181; lines as counted there): parse_args defaults the README
# command relies on -- l.402 --batch-size 256, l.406 --mixed-precision "fp16" (the README passes fp16 too), l.413
# --learning-rate 1e-4, l.414-417 AdamW betas (0.9, 0.999), weight decay 0, epsilon 1e-8, l.418 --max-grad-norm 1.0,
# l.429 --cfg-prob 0.1; main(): l.210 the batch is split over the processes (global), l.311 clip_grad_norm_ at
# --max-grad-norm every step, l.80 update_ema decay 0.9999. dataset.py l.58-74 (CustomDataset.__getitem__): the
# stored image and latent as they are, no flip.
REPA_CODE = {"batch_size": 256, "mixed_precision": "fp16", "learning_rate": 1e-4, "adam_beta1": 0.9,
             "adam_beta2": 0.999, "adam_weight_decay": 0.0, "adam_epsilon": 1e-8, "max_grad_norm": 1.0,
             "cfg_prob": 0.1, "ema_decay": 0.9999, "flip": False}


@pytest.fixture(scope="module")
def repa_inputs(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny REPA dataset (SD-VAE-shaped 4 x 32 x 32 latents with 256 px images beside them, as --save-images
    stores them; flips stored, so that only --flip decides) and random weights of timm's DINOv2 ViT-S/14 at its
    released 518 px as a local safetensors file: REPA's smallest encoder, dinov2-vit-s."""
    import timm
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("repa")
    rng = np.random.default_rng(0)
    mean = rng.standard_normal((4, 4, 32, 32)).astype(np.float32)
    images = rng.integers(0, 256, (4, 256, 256, 3), dtype=np.uint8)
    data = write_latent_dataset(root / "data", mean, np.full_like(mean, 0.1), rng.integers(0, 3, 4),
                                mean[..., ::-1].copy(), np.full_like(mean, 0.1), num_classes=3, images=images)
    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=518, num_classes=0)
    weights = root / "dinov2-vit-s.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(weights))
    return data, weights


def test_repa_readme_command_two_steps_trains_repa_as_repa_s_code_would(tmp_path, repa_inputs):
    data, weights = repa_inputs
    readme = parse(*REPA_README)  # the command as typed: REPA's batch, precision, clipping and optimizer
    for key, value in REPA_CODE.items():
        assert getattr(readme, key) == value, key
    # Tiny stand-ins, each said here: REPA's smallest encoder (random weights, read from a local file) tapped after
    # block 1 of a 2-block, 32-wide SiT-XL/2, and a global batch of 2 (REPA's 256 images through DINOv2 would take
    # minutes on a CPU). Nothing else changes: REPA's fp16 autocast runs on the CPU too.
    tiny = ["--enc-type=dinov2-vit-s", "--encoder-depth=1", "--enc-weights", str(weights), "--depth", "2",
            "--hidden-size", "32", "--num-heads", "2", "--batch-size", "2",
            "--num-workers", "0", "--sample-every", "0", "--logging-steps", "1", "--max-train-steps", "2",
            "--device", "cpu", "--no-compile"]
    command = [*REPA_README, "--data-dir", str(data), "--output-dir", str(tmp_path / "exps"), *tiny]
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *command], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "exps" / "linear-dinov2-b-enc8"
    log = (run_dir / "log.txt").read_text()
    for text in ("training REPA alone", "alignment: REPA: dinov2-vit-s", "after block 1, negative cosine, "
                 "coefficient 0.5", "horizontal flips off", "effective global batch 2 images", "step 2: total_loss="):
        assert text in log, text
        assert text in proc.stdout, text  # on the console too
    assert " proj_loss=" in log and " sra_loss=" not in log and " vae_repa_loss=" not in log
    saved = json.loads((run_dir / "args.json").read_text())
    assert saved["align"] == ["repa"] and (saved["enc_type"], saved["proj_coeff"]) == ("dinov2-vit-s", 0.5)
    assert saved["batch_size"] == 2  # the stand-in above, as recorded
    for key, value in REPA_CODE.items():
        if key != "batch_size":
            assert saved[key] == value, key
