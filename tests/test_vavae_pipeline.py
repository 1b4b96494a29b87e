"""Table 2's VA-VAE row end to end on the CPU: an LDM-format VA-VAE file (small, random weights) through
preprocessing (channel-wise statistics), train.py (LightningDiT + VAE-REPA, LightningDiT's objective) and
generate.py (decoding with the tokenizer the data recorded)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_data import load_shards, make_image_folder
from PIL import Image

import generate
import train
from dataset import LatentDataset
from latent_codecs import diffusers_to_ldm, save_latent_stats
from latent_codecs.vavae import build_vavae
from preprocessing import encode

RES = 32
# VA-VAE's layout (LDM AutoencoderKL, attention inside the lowest level, 2 res blocks) at a test's size: 3 levels
# (downsampling 4), 32 base channels, VA-VAE's 32 latent channels.
C = 32
SMALL = dict(ch=32, ch_mult=(1, 1, 2), num_res_blocks=2, attn_resolutions=(8,), z_channels=C, resolution=RES)


def released_layout(path: Path, seed: int = 0) -> Path:
    """Random weights saved as the released file is: LDM names under `state_dict`, beside training-only keys."""
    torch.manual_seed(seed)
    vae = build_vavae(SMALL)
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    state = {**diffusers_to_ldm(vae.state_dict()), "loss.logvar": torch.zeros(()),
             "foundation_model.pos_embed": torch.zeros(1, 4, 8)}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state}, path)
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("vavae")
    src = make_image_folder(root / "src")
    vae = released_layout(root / "vae" / "vavae.pt")

    def argv(dest, *extra, vae=vae):
        return ["--source", str(src), "--dest", str(dest), "--vae", str(vae), "--resolution", str(RES),
                "--shard-size", "4", "--batch-size", "2", "--num-workers", "0", "--dtype", "fp32", *extra]

    data = root / "data"
    assert encode.main(argv(data)) == 0
    return {"root": root, "src": src, "vae": vae, "data": data, "argv": argv}


def test_statistics_are_the_moments_of_the_posterior_samples(assets):
    m = json.loads((assets["data"] / "manifest.json").read_text())
    assert m["latent_shape"] == [C, RES // 4, RES // 4]
    norm = m["normalization"]
    assert norm["type"] == "channelwise" and norm["stats"] == "compute" and norm["multiplier"] == 1.0
    # z = mean + std * eps: E[z] = E[mean], Var[z] = Var[mean] + E[std^2] per channel (numpy, over all images)
    mean, std = (load_shards(assets["data"], kind).astype(np.float64) for kind in ("mean", "std"))
    expected_mean = mean.mean(axis=(0, 2, 3))
    per_channel = mean.transpose(1, 0, 2, 3).reshape(C, -1)
    expected_std = np.sqrt(per_channel.var(axis=1, ddof=1) + (std**2).mean(axis=(0, 2, 3)))
    assert np.allclose(norm["mean"], expected_mean, rtol=1e-6, atol=1e-9)
    assert np.allclose(norm["std"], expected_std, rtol=1e-6)
    assert np.allclose(m["scale"], 1 / expected_std, rtol=1e-6) and np.allclose(m["shift"], -expected_mean, atol=1e-9)
    # what training reads is standardised: per channel mean 0, std 1 over many posterior draws
    ds = LatentDataset(assets["data"])
    xs = []
    for epoch in range(60):
        ds.set_epoch(epoch)
        xs += [ds[i]["x"].numpy() for i in range(len(ds))]
    x = np.stack(xs).transpose(1, 0, 2, 3).reshape(C, -1)
    assert np.abs(x.mean(axis=1)).max() < 0.05 and np.abs(x.std(axis=1) - 1).max() < 0.05


def test_the_same_command_again_finds_the_finished_dataset_complete(assets, capsys):
    """A finished channel-wise dataset records the scale and shift its statistics give, which the command does not
    ask for: running the same command again (to check the dataset is complete) once refused it as "a different
    dataset"."""
    data = assets["data"]
    before = {p.name: p.read_bytes() for p in data.iterdir() if p.is_file()}
    assert encode.main(assets["argv"](data)) == 0
    assert "nothing to encode, all shards were already complete" in capsys.readouterr().out
    after = {p.name: p.read_bytes() for p in data.iterdir() if p.is_file()}
    assert after == before
    # a request that differs is still refused, naming the flag
    assert encode.main(assets["argv"](data, "--latent-multiplier", "2")) == 2
    assert "--latent-multiplier: " in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in data.iterdir() if p.is_file()} == before


def test_decoding_inverts_the_datasets_normalisation(assets):
    """An image's posterior mean, normalised as the dataset does and decoded as generate.py does, decodes as the
    raw posterior mean: the two sides use the same statistics, inverted."""
    from latent_codecs.autoencoder import decode_latents, load_vae

    m = json.loads((assets["data"] / "manifest.json").read_text())
    vae = load_vae(m["vae"])  # the manifest's tokenizer: the .pt file, through the loader generate.py uses
    image = torch.rand(1, 3, RES, RES) * 2 - 1
    with torch.no_grad():
        z = vae.encode(image).latent_dist.mean
        scale, shift = (torch.tensor(m[k]).view(1, -1, 1, 1) for k in ("scale", "shift"))
        x = (z + shift) * scale  # LatentDataset's formula
        assert torch.allclose(decode_latents(vae, x, m["scale"], m["shift"]), vae.decode(z).sample, atol=1e-5)


def test_released_statistics_are_used_and_checked(assets, tmp_path, capsys):
    mean, std = torch.randn(1, C, 1, 1), torch.rand(1, C, 1, 1) + 0.5
    vae = tmp_path / "release" / "vavae.pt"
    vae.parent.mkdir()
    vae.write_bytes(assets["vae"].read_bytes())
    save_latent_stats(vae.parent / "latents_stats.pt", mean, std)  # beside the weights: found by --latent-stats auto
    assert encode.main(assets["argv"](tmp_path / "auto", "--latent-multiplier", "0.5", vae=vae)) == 0
    m = json.loads((tmp_path / "auto" / "manifest.json").read_text())
    assert m["normalization"]["stats"] == str(vae.parent / "latents_stats.pt")
    assert np.allclose(m["scale"], 0.5 / std.flatten().numpy(), rtol=1e-6)
    assert np.allclose(m["shift"], -mean.flatten().numpy(), rtol=1e-6)
    # the same command again finds it complete; once the statistics beside the weights changed, or are gone (auto
    # then computes them), it is another dataset: refused, naming the file, nothing changed
    again = assets["argv"](tmp_path / "auto", "--latent-multiplier", "0.5", vae=vae)
    before = {p.name: p.read_bytes() for p in (tmp_path / "auto").iterdir()}
    assert encode.main(again) == 0
    save_latent_stats(vae.parent / "latents_stats.pt", mean + 1, std)
    assert encode.main(again) == 2
    assert f"--latent-stats: {vae.parent / 'latents_stats.pt'} holds other values than" in capsys.readouterr().err
    (vae.parent / "latents_stats.pt").unlink()
    assert encode.main(again) == 2
    assert "this run's come from 'compute'" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (tmp_path / "auto").iterdir()} == before
    # statistics of another channel count are refused, nothing is written
    save_latent_stats(tmp_path / "four.pt", torch.zeros(1, 4, 1, 1), torch.ones(1, 4, 1, 1))
    assert encode.main(assets["argv"](tmp_path / "bad", "--latent-stats", str(tmp_path / "four.pt"))) == 2
    assert not (tmp_path / "bad").exists()


def test_lightningdit_with_vae_repa_trains_and_samples_through_the_clis(assets, tmp_path):
    out = tmp_path / "runs"
    args = train.parse_args([
        "--data-dir", str(assets["data"]), "--output-dir", str(out), "--exp-name", "ldit",
        "--model", "LightningDiT-B/1", "--depth", "2", "--hidden-size", "64", "--num-heads", "2",
        "--vae-repa-depth", "1", "--weighting", "logit-normal", "--cos-loss-coeff", "1", "--adam-beta2", "0.95",
        "--mixed-precision", "no", "--num-workers", "0", "--batch-size", "2", "--max-train-steps", "2",
        "--logging-steps", "1", "--checkpointing-steps", "2", "--sampling-steps", "2", "--sample-grid-size", "2",
        "--sample-grid-steps", "2", "--device", "cpu",
    ])
    model, _ = train.train(args)
    assert type(model).__name__ == "LightningDiT"
    last = [m for m in model.vae_projector.modules() if isinstance(m, torch.nn.Linear)][-1]
    assert last.out_features == C  # the VAE-REPA target: C channels x 1 x 1 per token at patch 1
    run = out / "ldit"
    log = (run / "log.txt").read_text()
    assert "cos_loss" in log and "vae_repa_loss" in log
    assert (run / "samples").is_dir() and any((run / "samples").iterdir())  # decoded by the VA-VAE during training

    rc = generate.main(["--ckpt", str(run / "checkpoints" / "0000002.pt"), "--sample-dir", str(tmp_path / "s"),
                        "--device", "cpu", "--num-fid-samples", "3", "--per-proc-batch-size", "3", "--num-steps", "2",
                        "--mode", "ode"])
    assert rc == 0
    npz = next((tmp_path / "s").glob("*.npz"))
    images = np.load(npz)["arr_0"]
    assert images.shape == (3, RES, RES, 3) and images.dtype == np.uint8
    config = json.loads(next((tmp_path / "s").glob("*/config.json")).read_text())
    assert config["config"]["latent_scale"] == json.loads((assets["data"] / "manifest.json").read_text())["scale"]


def test_a_checkpoint_and_a_dataset_of_another_tokenizer_do_not_mix(assets, tmp_path, capsys):
    sd_like = tmp_path / "data4"
    rng = np.random.default_rng(0)
    from helpers_data import write_latent_dataset

    mean = rng.standard_normal((4, 4, 8, 8)).astype(np.float32)
    write_latent_dataset(sd_like, mean, np.full_like(mean, 0.1), np.zeros(4, dtype=np.int64), shard_size=4,
                         num_classes=3)
    base = ["--output-dir", str(tmp_path / "runs"), "--exp-name", "mix", "--model", "LightningDiT-B/1", "--depth",
            "1", "--hidden-size", "32", "--num-heads", "2", "--vae-repa-depth", "1", "--mixed-precision", "no",
            "--num-workers", "0", "--batch-size", "2", "--max-train-steps", "1", "--checkpointing-steps", "1",
            "--sampling-steps", "0", "--device", "cpu"]
    assert train.main(["--data-dir", str(assets["data"]), *base]) == 0
    assert train.main(["--data-dir", str(sd_like), *base, "--max-train-steps", "2", "--resume", "latest"]) == 2
    assert "latent_shape: checkpoint [32, 8, 8] vs now [4, 8, 8]" in capsys.readouterr().err


def test_lightningdits_released_layout_samples_with_its_vae_and_statistics(assets, tmp_path, monkeypatch, capsys):
    """A checkpoint as LightningDiT releases it ({'ema': ...} with its parameter names), sampled with
    `--model LightningDiT-B/1 --vae vavae.pt`: latent shape from the weights, statistics from latents_stats.pt."""
    from models import build_model, registry

    monkeypatch.setitem(registry.FAMILIES["LightningDiT"][0], "B", (2, 64, 2, 1))  # a test-sized "B"
    net = build_model("LightningDiT-B/1", input_size=RES // 4, in_channels=C, num_classes=3)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05)
    ckpt = tmp_path / "lightningdit-b-1.pt"
    torch.save({"ema": {f"module.{k}": v for k, v in net.state_dict().items()}}, ckpt)
    vae = tmp_path / "vae" / "vavae.pt"
    vae.parent.mkdir()
    vae.write_bytes(assets["vae"].read_bytes())
    flags = ["--ckpt", str(ckpt), "--model", "LightningDiT-B/1", "--num-classes", "3", "--device", "cpu",
             "--num-fid-samples", "2", "--per-proc-batch-size", "2", "--num-steps", "2", "--mode", "ode",
             "--sample-dir", str(tmp_path / "s")]
    assert generate.main(flags) == 2
    assert "pass --vae" in capsys.readouterr().err
    assert generate.main([*flags, "--vae", str(vae)]) == 2  # no latents_stats.pt beside it yet
    assert "latents_stats.pt" in capsys.readouterr().err
    mean, std = torch.randn(1, C, 1, 1), torch.rand(1, C, 1, 1) + 0.5
    save_latent_stats(vae.parent / "latents_stats.pt", mean, std)
    assert generate.main([*flags, "--vae", str(vae)]) == 0
    config = json.loads(next((tmp_path / "s").glob("*/config.json")).read_text())["config"]
    assert config["arch"]["latent_shape"] == [C, RES // 4, RES // 4]
    assert np.allclose(config["latent_scale"], 1 / std.flatten().numpy(), rtol=1e-6)
    assert np.allclose(config["latent_shift"], -mean.flatten().numpy(), rtol=1e-6)
    assert np.load(next((tmp_path / "s").glob("*.npz")))["arr_0"].shape == (2, RES, RES, 3)


def test_full_size_vavae_encodes_and_decodes_through_the_clis(tmp_path):
    """VA-VAE's real architecture (random weights, the released file's layout): two 256 px images through
    preprocessing.encode (32 x 16 x 16 latents), then generate.py decoding a LightningDiT's sample to 256 px with
    the tokenizer the checkpoint's data recorded. About 20 s on 2 CPU cores."""
    from helpers_generate import random_state

    from checkpoints import CHECKPOINT_FORMAT, atomic_save

    torch.manual_seed(0)
    vae = build_vavae()
    weights = tmp_path / "vae" / "vavae-imagenet256-f16d32-dinov2.pt"
    weights.parent.mkdir()
    torch.save({"state_dict": {k: v.half() for k, v in diffusers_to_ldm(vae.state_dict()).items()}}, weights)
    del vae
    src = tmp_path / "src"
    for i, name in enumerate(("a", "b")):
        (src / name).mkdir(parents=True)
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (300, 260, 3), dtype=np.uint8)).save(
            src / name / "x.png")
    data = tmp_path / "data"
    assert encode.main(["--source", str(src), "--dest", str(data), "--vae", str(weights), "--num-workers", "0"]) == 0
    m = json.loads((data / "manifest.json").read_text())
    assert m["latent_shape"] == [32, 16, 16] and m["normalization"]["type"] == "channelwise"
    assert len(m["scale"]) == 32 and load_shards(data, "mean").shape == (2, 32, 16, 16)

    args = dict(model="LightningDiT-B/1", depth=1, hidden_size=32, num_heads=2, qk_norm=False, num_classes=2,
                latent_shape=m["latent_shape"], align=[], vae=m["vae"], latent_scale=m["scale"],
                latent_shift=m["shift"], path_type="linear")
    state = random_state(args, seed=0)
    ckpt = tmp_path / "run" / "checkpoints" / "0000001.pt"
    atomic_save({"format": CHECKPOINT_FORMAT, "model": state, "ema": state, "opt": {}, "step": 1, "args": args,
                 "rng": None, "data": None}, ckpt)
    assert generate.main(["--ckpt", str(ckpt), "--sample-dir", str(tmp_path / "s"), "--device", "cpu",
                          "--num-fid-samples", "1", "--per-proc-batch-size", "1", "--num-steps", "1",
                          "--mode", "ode"]) == 0
    assert np.load(next((tmp_path / "s").glob("*.npz")))["arr_0"].shape == (1, 256, 256, 3)
