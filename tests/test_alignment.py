"""Alignment methods: REPA's loss, projector and encoder, SRA's teacher, combinations, flags and train.py runs."""

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers_data import write_latent_dataset, write_repa_layout

import alignment
import train
from alignment import build_methods, head_specs, model_from_args
from alignment.base import StepInputs
from alignment.repa import Repa, repa_projection_loss
from alignment.sra import Sra, teacher_times
from alignment.vae_repa import VaeRepa
from dataset import LatentDataset
from loss import LossConfig, training_loss
from models import build_model
from models.encoders import EncoderError, load_dinov2, parse_enc_type


@pytest.fixture(scope="module")
def dinov2_weights(tmp_path_factory) -> Path:
    """Random weights of timm's DINOv2 ViT-S/14 at its released 518 px (37 x 37 position grid), as safetensors."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=518, num_classes=0)
    path = tmp_path_factory.mktemp("dinov2") / "model.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    return path


def tiny_args(align: list[str], **kw) -> dict:
    args = dict(model="SiT-S/2", depth=4, hidden_size=32, num_heads=2, num_classes=3, latent_shape=[4, 8, 8],
                align=align, vae_repa_depth=1, enc_type="dinov2-vit-s", encoder_depth=2, proj_coeff=0.5,
                sra_student_depth=1, sra_teacher_depth=3)
    args.update(kw)
    return args


# ----------------------------------------------------------------------------------------------
# REPA


def test_repa_projection_loss_is_repa_s_per_sample_loop():
    torch.manual_seed(0)
    preds = [torch.randn(3, 5, 8), torch.randn(3, 5, 6)]
    feats = [torch.randn(3, 5, 8), torch.randn(3, 5, 6)]
    # REPA's loss.py: for each encoder and sample, mean over tokens of -<z/|z|, z~/|z~|>; summed, / (encoders x N)
    total = 0.0
    for z, z_tilde in zip(feats, preds):
        for j in range(3):
            a, b = z[j] / z[j].norm(dim=-1, keepdim=True), z_tilde[j] / z_tilde[j].norm(dim=-1, keepdim=True)
            total += (-(a * b).sum(-1)).mean().item()
    expected = total / (2 * 3)
    assert repa_projection_loss(preds, feats).item() == pytest.approx(expected, rel=1e-6)
    assert repa_projection_loss([feats[0] * 3], [feats[0]]).item() == pytest.approx(-1.0, abs=1e-6)


def test_repa_projector_is_repa_s_mlp_with_repa_s_names():
    model = model_from_args(tiny_args(["repa"]))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith("projectors.")}
    # REPA's build_mlp: Linear(hidden, 2048), SiLU, Linear(2048, 2048), SiLU, Linear(2048, z_dim), one per encoder
    assert shapes == {"projectors.0.0.weight": (2048, 32), "projectors.0.0.bias": (2048,),
                      "projectors.0.2.weight": (2048, 2048), "projectors.0.2.bias": (2048,),
                      "projectors.0.4.weight": (384, 2048), "projectors.0.4.bias": (384,)}
    assert isinstance(model.projectors[0][1], torch.nn.SiLU) and model.head_taps["repa"] == ("projectors", 2)
    # A REPA checkpoint (its SiT with z_dims=[384]) loads strictly into the model our run builds, and back.
    repa = build_model("SiT-S/2", input_size=8, depth=4, hidden_size=32, num_heads=2, num_classes=3,
                       encoder_depth=2, vae_head_layers=0, repa_z_dims=(384,))
    model.load_state_dict(repa.state_dict(), strict=True)
    repa.load_state_dict(model.state_dict(), strict=True)


def test_enc_type_parsing_and_errors(tmp_path):
    specs = parse_enc_type("dinov2-vit-b,dinov2reg-vit-l")
    assert [(s.timm_name, s.embed_dim, s.hub_name) for s in specs] == [
        ("vit_base_patch14_dinov2", 768, "dinov2_vitb14"), ("vit_large_patch14_reg4_dinov2", 1024, "dinov2_vitl14_reg")]
    for bad in ("mocov3-vit-b", "dinov2-vit-x", "dinov2-b"):
        with pytest.raises(EncoderError, match="--enc-type"):
            parse_enc_type(bad)
    with pytest.raises(EncoderError, match="no such file"):
        load_dinov2(specs[0], 256, weights=str(tmp_path / "missing.safetensors"))
    (tmp_path / "bad.safetensors").write_bytes(b"not weights")
    with pytest.raises(EncoderError, match=r"--enc-weights \S*bad.safetensors could not be read as safetensors"):
        load_dinov2(specs[0], 256, weights=str(tmp_path / "bad.safetensors"))


def test_dinov2_features_are_repa_s_preprocessing_and_tokens(dinov2_weights):
    import timm
    from safetensors.torch import load_file
    from timm.layers import resample_abs_pos_embed

    encoder = load_dinov2(parse_enc_type("dinov2-vit-s")[0], 256, weights=str(dinov2_weights))
    assert not any(p.requires_grad for p in encoder.parameters()) and not encoder.train().training
    images = torch.randint(0, 256, (2, 256, 256, 3), dtype=torch.uint8)
    ours = encoder(images)
    assert ours.shape == (2, 256, 384) and encoder.num_tokens == 256

    # REPA: the 518 px weights with pos_embed resampled to 16 x 16, images / 255, ImageNet normalisation, bicubic
    # resize to 224, then the normalised patch tokens (DINOv2's x_norm_patchtokens: class token dropped).
    state = load_file(str(dinov2_weights))
    state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], [16, 16])
    vit = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=224, num_classes=0).eval()
    vit.load_state_dict(state)
    x = images.permute(0, 3, 1, 2).float() / 255
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    x = F.interpolate((x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1), 224, mode="bicubic")
    with torch.no_grad():
        tokens = vit.blocks(vit._pos_embed(vit.patch_embed(x)))
        expected = vit.norm(tokens)[:, 1:]
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_repa_refuses_a_patch_size_whose_tokens_differ(dinov2_weights):
    model = build_model("SiT-S/4", input_size=32, depth=2, hidden_size=32, num_heads=2, vae_head_layers=0)
    with pytest.raises(ValueError, match="256 tokens .* model has 64"):
        Repa("dinov2-vit-s", depth=1, enc_weights=str(dinov2_weights)).setup(torch.device("cpu"), model, 256)


# ----------------------------------------------------------------------------------------------
# SRA


def test_sra_teacher_time_and_weight_schedule():
    t = torch.tensor([0.0, 0.1, 0.5, 1.0])
    u = torch.tensor([0.5, 0.9, 0.25, 0.0])
    torch.testing.assert_close(teacher_times(t, 0.2, u), torch.tensor([0.0, 0.0, 0.45, 1.0]))
    sra = Sra(8, 20)
    for epoch in (0, 100, 149, 150, 600, 1149, 2000):
        # SRA's train.py (256 px, smooth-L1): 2 * 0.1 ** ((epoch - 149) / 1000 + 1) after epoch 149, else 2 * 0.1
        expected = 2 * 0.1 ** (((epoch - 149) / 1000 + 1) if epoch > 149 else 1)
        assert sra.weight(epoch) == pytest.approx(expected, rel=1e-12)
    assert Sra(8, 20, decay_epochs=0).weight(5000) == 0.2


def test_sra_aligns_the_student_head_to_the_teacher_block_at_the_teacher_time():
    torch.manual_seed(0)
    student = model_from_args(tiny_args(["sra"]))
    teacher = model_from_args(tiny_args(["sra"])).eval()
    for p in list(student.parameters()) + list(teacher.parameters()):
        p.data.add_(0.05 * torch.randn_like(p))  # non-zero adaLN so that every block matters
    sra = build_methods(tiny_args(["sra"]))[0]
    assert (sra.student_depth, sra.teacher_depth) == (1, 3) and student.head_taps["sra"] == ("ap_head", 1)
    x, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t, y = torch.tensor([0.05, 0.3, 0.6, 0.95]), torch.tensor([0, 1, 2, 3])  # 3: the null class
    _, heads = student((1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * noise, t, y, return_heads=True)
    torch.manual_seed(7)
    value = sra.loss(StepInputs(x=x, noise=noise, t=t, y=y, heads=heads, teacher=teacher))

    torch.manual_seed(7)
    tt = (t - 0.2 * torch.rand(4)).clamp(0, 1)
    seen = []
    hook = teacher.blocks[2].register_forward_hook(lambda m, i, o: seen.append(o))  # after block 3 of a full pass
    with torch.no_grad():
        teacher((1 - tt.view(-1, 1, 1, 1)) * x + tt.view(-1, 1, 1, 1) * noise, tt, y)
    hook.remove()
    expected = F.smooth_l1_loss(heads["sra"], seen[0], beta=0.05)  # SRA's criterion: PyTorch's mean
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    # SRA's head: Linear(d, 2d), SiLU, Linear(2d, d) with SRA's names
    assert {k: tuple(v.shape) for k, v in student.ap_head.state_dict().items()} == {
        "linear1.weight": (64, 32), "linear1.bias": (64,), "linear2.weight": (32, 64), "linear2.bias": (32,)}


# ----------------------------------------------------------------------------------------------
# Combinations


def test_combined_loss_is_the_sum_of_its_parts_and_only_the_student_learns(dinov2_weights):
    torch.manual_seed(0)
    args = tiny_args(["vae-repa", "repa", "sra"], latent_shape=[4, 32, 32], enc_weights=str(dinov2_weights))
    model, ema = model_from_args(args), model_from_args(args).eval().requires_grad_(False)
    methods = build_methods(args)
    for m in methods:
        m.setup(torch.device("cpu"), model, image_size=256)
    repa = methods[1]
    assert repa.external_parameters() == sum(p.numel() for p in repa.encoders[0].parameters()) > 2e7
    x, images = torch.randn(2, 4, 32, 32), torch.randint(0, 256, (2, 256, 256, 3), dtype=torch.uint8)
    out = training_loss(model, x, torch.tensor([0, 1]), LossConfig(), 3, methods, images=images, teacher=ema,
                        epoch=0, generator=torch.Generator().manual_seed(0))
    assert set(out) == {"total", "denoise", "vae_repa_loss", "proj_loss", "sra_loss"}
    parts = out["denoise"] + 1.0 * out["vae_repa_loss"] + 0.5 * out["proj_loss"] + 0.2 * out["sra_loss"]
    assert out["total"].item() == pytest.approx(parts.item(), rel=1e-6)
    assert all(math.isfinite(v.item()) and v.item() != 0 for v in out.values())
    out["total"].backward()
    for prefix in ("vae_projector.", "projectors.", "ap_head."):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters()
                   if n.startswith(prefix)), prefix
    assert all(p.grad is None for p in ema.parameters())
    assert all(p.grad is None for p in repa.encoders[0].parameters())


def test_head_specs_follow_each_method_s_block():
    methods = build_methods(tiny_args(["vae-repa", "repa", "sra"]))
    specs = head_specs(methods, hidden_size=32, patch_size=2, channels=4, depth=4)
    assert [(key, attr, depth) for key, attr, _, depth in specs] == [
        ("vae", "vae_projector", 1), ("repa", "projectors", 2), ("sra", "ap_head", 1)]
    old = build_methods(dict(model="SiT-XL/2", align=True, encoder_depth=6, head_layers=2, proj_coeff=0.7))
    assert len(old) == 1 and isinstance(old[0], VaeRepa) and (old[0].depth, old[0].head_layers, old[0].coeff) == (
        6, 2, 0.7)  # a checkpoint written before the method set existed
    assert build_methods(dict(model="SiT-XL/2", align=False)) == []


# ----------------------------------------------------------------------------------------------
# Flags


def parse(*argv):
    return train.parse_args(["--data-dir", "d", *argv])


def test_repa_flags_alone_train_repa_with_repa_s_defaults():
    args = parse("--model", "SiT-XL/2", "--enc-type", "dinov2-vit-l", "--proj-coeff", "0.5")
    assert args.align == ["repa"] and args.encoder_depth == 8 and args.projector_embed_dims == "1024"
    assert args.exp_name == "SiT-XL-2-repa" and "training REPA alone" in args.notes[0]
    default = parse("--model", "SiT-XL/2")
    assert default.align == ["vae-repa"] and default.vae_repa_depth == 8 and default.enc_type == "dinov2-vit-b"
    both = parse("--model", "SiT-B/2", "--align", "repa,vae-repa", "--encoder-depth", "4")
    assert both.align == ["vae-repa", "repa"] and both.vae_repa_depth == 2 and both.encoder_depth == 4
    assert both.exp_name == "SiT-B-2-vae-repa+repa"
    sra = parse("--model", "SiT-XL/2", "--align", "sra", "--block-out-s", "6")
    assert (sra.sra_student_depth, sra.sra_teacher_depth, sra.sra_t_max) == (6, 20, 0.2)
    assert parse("--no-align").align == [] and parse("--align", "none").exp_name == "SiT-B-2-vanilla"


def test_bad_method_sets_and_contradicting_flags_are_refused(capsys):
    for argv, message in ((("--align", "repa,dino"), "expected a comma-separated set"),
                          (("--align", "vae-repa", "--proj-coeff", "0.5"), "configure REPA"),
                          (("--enc-type", "dinov2-vit-b", "--projector-embed-dims", "1024"), "disagrees"),
                          (("--enc-type", "clip-vit-L"), "--enc-type")):
        with pytest.raises(SystemExit) as e:
            parse(*argv)
        assert e.value.code == 2 and message in capsys.readouterr().err


def _another_value(action: argparse.Action):
    if action.choices:
        return next(c for c in action.choices if c != action.default)
    if isinstance(action.default, tuple):
        return (0.0, 0.5)
    return action.default + 1 if isinstance(action.default, int) else action.default / 2


@pytest.mark.parametrize("model", ["SiT-B/2", "SiT-XL/2"])
def test_an_old_run_lacking_a_method_flag_gets_the_command_line_s_default(model):
    # Every method flag: the parser's default (or what resolve_args fills in for its None) is what build_methods
    # falls back to for a run whose args.json lacks the key, so dropping the key leaves the methods as they were.
    declared = argparse.ArgumentParser()
    alignment.add_arguments(declared)
    keys = sorted({a.dest for a in declared._actions} - {"help", "align"})
    actions = {a.dest: a for a in train.build_parser()._actions}
    run_args = vars(parse("--model", model, "--align", "vae-repa,repa,sra"))
    built = [vars(m) for m in build_methods(run_args)]
    assert len(built) == 3 and set(keys) - {"projector_embed_dims"} == set(alignment.method_defaults(model))
    for key in keys:
        if actions[key].default is not None:
            assert run_args[key] == actions[key].default, key
            changed = {**run_args, key: _another_value(actions[key])}
            assert [vars(m) for m in build_methods(changed)] != built, key  # build_methods reads the key
        old = {k: v for k, v in run_args.items() if k != key}
        if key in alignment.peers.OLD_RUN:  # a key added later: missing means what the run did before it existed
            assert [getattr(m, "teacher_precision", None) for m in build_methods(old)] == [None, None, "autocast"]
            assert run_args[key] == "fp32"  # a new run's default (SRA's), not the old run's
            continue
        assert [vars(m) for m in build_methods(old)] == built, key


def test_old_vae_repa_spellings_still_work_with_a_deprecation_line():
    args = parse("--align-loss", "l1", "--head-layers", "2", "--align-t-range", "0", "0.5")
    assert (args.vae_repa_loss, args.vae_repa_head_layers, args.vae_repa_t_range) == ("l1", 2, [0.0, 0.5])
    assert sum("deprecated" in note for note in args.notes) == 3
    assert parse("--sampling-steps", "500").sample_every == 500  # REPA's meaning: how often a grid is saved


# ----------------------------------------------------------------------------------------------
# Data and train.py


def image_dataset(root: Path, n: int = 8, size: int = 32, image_size: int = 256, flip: bool = True) -> Path:
    rng = np.random.default_rng(0)
    mean = rng.standard_normal((n, 4, size, size)).astype(np.float32)
    std = np.full_like(mean, 0.1)
    images = rng.integers(0, 256, (n, image_size, image_size, 3), dtype=np.uint8)
    return write_latent_dataset(root, mean, std, rng.integers(0, 3, n), mean[..., ::-1].copy() if flip else None,
                                std if flip else None, shard_size=3, num_classes=3, images=images)


def test_dataset_images_follow_the_latent_flip(tmp_path):
    data = image_dataset(tmp_path / "d", n=6, size=4, image_size=8)
    stored = np.concatenate([np.load(p) for p in sorted(data.glob("images-*.npy"))])
    mean = np.concatenate([np.load(p) for p in sorted(data.glob("mean-*.npy"))])
    ds = LatentDataset(data, with_images=True)
    assert ds.image_size == 8
    flips = 0
    for epoch in range(4):
        ds.set_epoch(epoch)
        for i in range(6):
            item = ds[i]
            flipped = not np.allclose(item["target"].numpy(), mean[i] * 0.18215)
            flips += flipped
            expected = stored[i][:, ::-1] if flipped else stored[i]
            assert item["images"].dtype == torch.uint8 and np.array_equal(item["images"].numpy(), expected)
    assert 0 < flips < 24
    assert "images" not in LatentDataset(data)[0]
    without = image_dataset(tmp_path / "none", n=2, size=4, image_size=8)
    manifest = json.loads((without / "manifest.json").read_text())
    manifest["images"] = False
    (without / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="--save-images"):
        LatentDataset(without, with_images=True)


def test_repa_layout_images_are_read_in_sorted_order(tmp_path):
    rng = np.random.default_rng(0)
    mean = rng.standard_normal((3, 4, 4, 4)).astype(np.float32)
    images = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    root = write_repa_layout(tmp_path / "repa", mean, np.ones_like(mean), np.array([0, 1, 2]), images=images)
    ds = LatentDataset(root, with_images=True)
    for i in range(3):
        assert np.array_equal(ds[i]["images"].numpy(), images[i])


TINY = ["--model", "SiT-S/2", "--depth", "2", "--hidden-size", "32", "--num-heads", "2", "--mixed-precision", "no",
        "--num-workers", "0", "--sample-every", "0", "--logging-steps", "1", "--batch-size", "2",
        "--max-train-steps", "2", "--vae-repa-depth", "1", "--sra-student-depth", "1", "--sra-teacher-depth", "2"]


@pytest.mark.parametrize("align", ["repa", "sra", "repa,vae-repa,sra"])
def test_two_training_steps_of_each_method(tmp_path, dinov2_weights, align):
    data = image_dataset(tmp_path / "data")
    repa = ["--enc-type", "dinov2-vit-s", "--encoder-depth", "1"] if "repa," in align + "," else []
    args = train.parse_args(["--data-dir", str(data), "--output-dir", str(tmp_path / "runs"), *TINY,
                             "--align", align, *repa, "--enc-weights", str(dinov2_weights)])
    model, ema = train.train(args)
    run_dir = tmp_path / "runs" / args.exp_name
    log = (run_dir / "log.txt").read_text()
    names = {"repa": "proj_loss", "sra": "sra_loss", "vae-repa": "vae_repa_loss"}
    for method in align.split(","):
        assert f" {names[method]}=" in log
    assert "step 2: total_loss=" in log and " loss=" in log
    saved = json.loads((run_dir / "args.json").read_text())
    assert saved["align"] == [m for m in ("vae-repa", "repa", "sra") if m in align.split(",")]
    ckpt = torch.load(run_dir / "checkpoints/0000002.pt", map_location="cpu", weights_only=False)
    assert ckpt["args"]["align"] == saved["align"]
    assert ("projectors.0.0.weight" in ckpt["model"]) == ("repa" in align)
    assert ("ap_head.linear1.weight" in ckpt["model"]) == ("sra" in align)
    # resuming rebuilds the same heads from the checkpoint's arguments and continues
    args = train.parse_args(["--data-dir", str(data), "--output-dir", str(tmp_path / "runs"), *TINY,
                             "--align", align, *repa, "--enc-weights", str(dinov2_weights),
                             "--max-train-steps", "3", "--resume", "latest"])
    train.train(args)
    assert "step 3: total_loss=" in (run_dir / "log.txt").read_text()


def test_repa_without_images_in_the_dataset_is_a_clear_error(tmp_path, capsys):
    rng = np.random.default_rng(0)
    mean = rng.standard_normal((4, 4, 32, 32)).astype(np.float32)
    data = write_latent_dataset(tmp_path / "data", mean, np.ones_like(mean), np.array([0, 1, 2, 0]), num_classes=3)
    rc = train.main(["--data-dir", str(data), "--output-dir", str(tmp_path / "runs"), *TINY, "--align", "repa",
                     "--enc-type", "dinov2-vit-s", "--encoder-depth", "1"])  # REPA's default block 8 > --depth 2
    assert rc == 2 and "--save-images" in capsys.readouterr().err


def test_repa_s_readme_launch_line_trains_repa():
    # REPA's README training command (its flags, minus the data path), as a REPA user would paste it
    args = train.parse_args(["--report-to=none", "--allow-tf32", "--mixed-precision=fp16", "--seed=0",
                             "--path-type=linear", "--prediction=v", "--weighting=uniform", "--model=SiT-XL/2",
                             "--enc-type=dinov2-vit-b", "--proj-coeff=0.5", "--encoder-depth=8", "--output-dir=exps",
                             "--exp-name=linear-dinov2-b-enc8", "--data-dir=data"])
    assert args.align == ["repa"] and (args.enc_type, args.encoder_depth, args.proj_coeff) == ("dinov2-vit-b", 8, 0.5)
    method = build_methods(vars(args))[0]
    assert isinstance(method, Repa) and method.z_dims == [768] and method.weight(0) == 0.5


def test_a_resumed_repa_run_logs_the_same_losses_as_an_uninterrupted_one(tmp_path, dinov2_weights):
    # Loading the encoder draws random initial weights: it must not shift the resumed run's noise stream.
    data = image_dataset(tmp_path / "data")
    base = ["--data-dir", str(data), "--output-dir", str(tmp_path / "runs"), *TINY, "--align", "repa",
            "--enc-type", "dinov2-vit-s", "--encoder-depth", "1", "--enc-weights", str(dinov2_weights)]
    train.train(train.parse_args([*base, "--exp-name", "straight", "--max-train-steps", "3"]))
    train.train(train.parse_args([*base, "--exp-name", "split", "--checkpointing-steps", "2"]))
    train.train(train.parse_args([*base, "--exp-name", "split", "--max-train-steps", "3", "--resume", "latest"]))

    def step3(run: str) -> str:
        line = next(x for x in (tmp_path / "runs" / run / "log.txt").read_text().splitlines() if "] step 3:" in x)
        return " ".join(w for w in line.split("step 3:")[1].split() if not w.startswith("images_per_s"))

    assert step3("straight") == step3("split")


@pytest.mark.parametrize("flag", ["--encoder-depth", "--vae-repa-depth", "--sra-student-depth", "--sra-teacher-depth"])
def test_block_zero_is_refused_instead_of_meaning_the_default(flag, capsys):
    """Blocks count from 1; a 0 was once recorded in args.json while training used the default block."""
    align = {"--encoder-depth": "repa", "--vae-repa-depth": "vae-repa"}.get(flag, "sra")
    with pytest.raises(SystemExit) as e:
        parse(flag, "0", "--align", align)
    assert e.value.code == 2 and f"{flag} must be positive, got 0" in capsys.readouterr().err
