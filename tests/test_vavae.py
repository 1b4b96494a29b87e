"""VA-VAE as a diffusers AutoencoderKL: LDM key conversion against an LDM forward written here, loading, shapes;
channel-wise latent statistics against numpy."""

import argparse

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from latent_codecs import (
    LatentStats,
    denormalize,
    diffusers_to_ldm,
    ldm_to_diffusers,
    load_vavae,
    normalize,
    read_latent_stats,
    save_latent_stats,
    vavae_state_dict,
)
from latent_codecs.vavae import VAVAE_F16D32, build_vavae, infer_ldm_config

SMALL = dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(16,), z_channels=8, resolution=64)


# An LDM AutoencoderKL forward (ldm/modules/diffusionmodules/model.py's Encoder and Decoder) on LDM-named weights.
def _gn(x, sd, p):
    return F.group_norm(x, 32, sd[f"{p}.weight"], sd[f"{p}.bias"], eps=1e-6)


def _conv(x, sd, p, stride=1, padding=1):
    return F.conv2d(x, sd[f"{p}.weight"], sd[f"{p}.bias"], stride=stride, padding=padding)


def _resblock(x, sd, p):
    h = _conv(F.silu(_gn(x, sd, f"{p}.norm1")), sd, f"{p}.conv1")
    h = _conv(F.silu(_gn(h, sd, f"{p}.norm2")), sd, f"{p}.conv2")
    return (_conv(x, sd, f"{p}.nin_shortcut", padding=0) if f"{p}.nin_shortcut.weight" in sd else x) + h


def _attn(x, sd, p):
    n, c, hh, ww = x.shape
    h = _gn(x, sd, f"{p}.norm")
    q, k, v = (_conv(h, sd, f"{p}.{name}", padding=0).flatten(2) for name in "qkv")  # (n, c, hw)
    weights = torch.softmax(q.transpose(1, 2) @ k / c**0.5, dim=-1)  # (n, hw_query, hw_key)
    out = (v @ weights.transpose(1, 2)).view(n, c, hh, ww)
    return x + _conv(out, sd, f"{p}.proj_out", padding=0)


def _mid(h, sd, side):
    h = _resblock(h, sd, f"{side}.mid.block_1")
    return _resblock(_attn(h, sd, f"{side}.mid.attn_1"), sd, f"{side}.mid.block_2")


def ldm_encode_mean(x, sd, levels, blocks):
    h = _conv(x, sd, "encoder.conv_in")
    for i in range(levels):
        for j in range(blocks):
            h = _resblock(h, sd, f"encoder.down.{i}.block.{j}")
            if f"encoder.down.{i}.attn.{j}.q.weight" in sd:
                h = _attn(h, sd, f"encoder.down.{i}.attn.{j}")
        if i < levels - 1:  # stride-2 conv after padding right and bottom by one
            h = _conv(F.pad(h, (0, 1, 0, 1)), sd, f"encoder.down.{i}.downsample.conv", stride=2, padding=0)
    h = _conv(F.silu(_gn(_mid(h, sd, "encoder"), sd, "encoder.norm_out")), sd, "encoder.conv_out")
    moments = _conv(h, sd, "quant_conv", padding=0)
    return moments[:, : moments.shape[1] // 2]


def ldm_decode(z, sd, levels, blocks):
    h = _mid(_conv(_conv(z, sd, "post_quant_conv", padding=0), sd, "decoder.conv_in"), sd, "decoder")
    for i in reversed(range(levels)):
        for j in range(blocks + 1):
            h = _resblock(h, sd, f"decoder.up.{i}.block.{j}")
            if f"decoder.up.{i}.attn.{j}.q.weight" in sd:
                h = _attn(h, sd, f"decoder.up.{i}.attn.{j}")
        if i > 0:
            h = _conv(F.interpolate(h, scale_factor=2.0, mode="nearest"), sd, f"decoder.up.{i}.upsample.conv")
    return _conv(F.silu(_gn(h, sd, "decoder.norm_out")), sd, "decoder.conv_out")


@pytest.fixture(scope="module")
def small_ldm_weights() -> dict:
    """Random LDM-named weights of the small config (norm weights and biases randomised too)."""
    torch.manual_seed(1)
    vae = build_vavae(SMALL)
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return diffusers_to_ldm(vae.state_dict())


def test_ldm_names_and_shapes_of_the_real_config():
    with torch.device("meta"):
        ldm = diffusers_to_ldm(build_vavae(VAVAE_F16D32).state_dict())
    shapes = {"encoder.conv_in.weight": (128, 3, 3, 3), "encoder.down.2.block.0.nin_shortcut.weight": (256, 128, 1, 1),
              "encoder.down.4.attn.1.q.weight": (512, 512, 1, 1), "encoder.down.3.downsample.conv.weight":
              (256, 256, 3, 3), "encoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
              "encoder.conv_out.weight": (64, 512, 3, 3), "quant_conv.weight": (64, 64, 1, 1),
              "post_quant_conv.weight": (32, 32, 1, 1), "decoder.conv_in.weight": (512, 32, 3, 3),
              "decoder.up.4.attn.2.norm.weight": (512,), "decoder.up.3.block.0.nin_shortcut.weight": (256, 512, 1, 1),
              "decoder.up.1.upsample.conv.weight": (128, 128, 3, 3), "decoder.up.0.block.2.conv2.weight":
              (128, 128, 3, 3), "decoder.conv_out.weight": (3, 128, 3, 3)}
    assert {k: tuple(ldm[k].shape) for k in shapes} == shapes
    # attention only at 16 px: two blocks in the last encoder level, three in the first decoder level, one per mid
    attn_blocks = {k.rsplit(".", 2)[0] for k in ldm if ".attn" in k}
    assert attn_blocks == {"encoder.down.4.attn.0", "encoder.down.4.attn.1", "encoder.mid.attn_1",
                           "decoder.mid.attn_1", "decoder.up.4.attn.0", "decoder.up.4.attn.1", "decoder.up.4.attn.2"}
    assert "encoder.down.4.downsample.conv.weight" not in ldm and "decoder.up.0.upsample.conv.weight" not in ldm


def test_key_conversion_round_trip(small_ldm_weights):
    diffusers_state = ldm_to_diffusers(small_ldm_weights)
    assert diffusers_state["encoder.down_blocks.2.attentions.0.to_q.weight"].ndim == 2
    back = diffusers_to_ldm(diffusers_state)
    assert back.keys() == small_ldm_weights.keys()
    assert all(torch.equal(back[k], small_ldm_weights[k]) for k in back)
    with pytest.raises(KeyError, match="not an LDM autoencoder key"):
        ldm_to_diffusers({"encoder.down.0.mystery.weight": torch.zeros(1)})


def test_converted_model_computes_the_ldm_autoencoder(small_ldm_weights):
    vae = build_vavae(SMALL).eval()
    vae.load_state_dict(ldm_to_diffusers(small_ldm_weights), strict=True)
    sd = {k: v.double() for k, v in small_ldm_weights.items()}
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        mean = vae.double().encode(x.double()).latent_dist.mean
        assert mean.shape == (2, 8, 16, 16)
        torch.testing.assert_close(mean, ldm_encode_mean(x.double(), sd, 3, 2))
        z = torch.randn(2, 8, 16, 16, dtype=torch.float64)
        torch.testing.assert_close(vae.decode(z).sample, ldm_decode(z, sd, 3, 2))


def test_load_vavae_from_a_training_checkpoint(tmp_path, small_ldm_weights):
    checkpoint = {"state_dict": {**small_ldm_weights, "loss.discriminator.main.0.weight": torch.zeros(2),
                                 "foundation_model.model.cls_token": torch.zeros(3),
                                 "linear_proj.weight": torch.zeros(4)}}
    assert sorted(vavae_state_dict(checkpoint)[1]) == ["foundation_model.model.cls_token", "linear_proj.weight",
                                                       "loss.discriminator.main.0.weight"]
    torch.save(checkpoint, tmp_path / "vavae.pt")
    vae = load_vavae(tmp_path / "vavae.pt", config=SMALL)
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    torch.testing.assert_close(vae.state_dict()["decoder.up_blocks.0.attentions.1.to_out.0.weight"],
                               small_ldm_weights["decoder.up.2.attn.1.proj_out.weight"][:, :, 0, 0])

    torch.save({**checkpoint, "hyper_parameters": argparse.Namespace(lr=1.0)}, tmp_path / "pickled.pt")
    with pytest.raises(RuntimeError, match="trusted=True"):
        load_vavae(tmp_path / "pickled.pt", config=SMALL)
    assert load_vavae(tmp_path / "pickled.pt", config=SMALL, trusted=True) is not None
    with pytest.raises(FileNotFoundError, match="vavae-imagenet256-f16d32-dinov2.pt"):
        load_vavae(tmp_path / "missing.pt")
    with pytest.raises(KeyError, match="does not match"):
        torch.save({"state_dict": {k: v for k, v in small_ldm_weights.items() if "mid.attn_1" not in k}},
                   tmp_path / "partial.pt")
        load_vavae(tmp_path / "partial.pt", config=SMALL)


def test_encode_decode_shapes_256px_to_32x16x16():
    # VA-VAE's levels and latent width, with fewer channels so that a CPU runs it in seconds
    vae = build_vavae(VAVAE_F16D32, ch=32, ch_mult=(1, 1, 2, 2, 2), num_res_blocks=1).eval()
    with torch.no_grad():
        posterior = vae.encode(torch.rand(1, 3, 256, 256) * 2 - 1).latent_dist
        assert posterior.mean.shape == posterior.std.shape == (1, 32, 16, 16)
        assert vae.decode(posterior.sample()).sample.shape == (1, 3, 256, 256)


def test_latent_stats_match_numpy_in_uneven_batches():
    rng = np.random.default_rng(0)
    data = rng.normal(size=(37, 4, 3, 5)) * np.array([1, 2, 3, 0.5])[:, None, None] + np.array(
        [1e4, -3, 0, 7])[:, None, None]  # a large offset: a naive sum of squares would lose the variance
    stats = LatentStats()
    for lo, hi in [(0, 1), (1, 9), (9, 9), (9, 37)]:
        stats.update(torch.from_numpy(data[lo:hi]).float() if lo == 0 else torch.from_numpy(data[lo:hi]))
    data[0] = data[0].astype(np.float32)  # the first batch went in as float32
    mean, std = stats.result()
    assert mean.shape == std.shape == (1, 4, 1, 1)
    np.testing.assert_allclose(mean.flatten(), data.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(std.flatten(), data.std(axis=(0, 2, 3), ddof=1), rtol=1e-5)
    np.testing.assert_allclose(stats.result(unbiased=False)[1].flatten(), data.std(axis=(0, 2, 3)), rtol=1e-5)
    with pytest.raises(ValueError, match="channels"):
        stats.update(torch.zeros(1, 3, 2, 2))


def test_latent_stats_file_and_normalisation(tmp_path):
    mean, std = torch.tensor([1.0, -2.0]).view(1, 2, 1, 1), torch.tensor([0.5, 4.0]).view(1, 2, 1, 1)
    save_latent_stats(tmp_path / "latents_stats.pt", mean, std)
    read_mean, read_std = read_latent_stats(tmp_path / "latents_stats.pt")
    assert torch.equal(read_mean, mean) and torch.equal(read_std, std)
    z = torch.randn(3, 2, 4, 4)
    x = normalize(z, mean, std, multiplier=0.5)
    torch.testing.assert_close(x[:, 1], (z[:, 1] + 2.0) / 4.0 * 0.5)
    torch.testing.assert_close(denormalize(x, mean, std, multiplier=0.5), z)
    torch.save({"mean": torch.zeros(2, 2), "std": torch.ones(2, 2)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"\(1, C, 1, 1\)"):
        read_latent_stats(tmp_path / "bad.pt")
    with pytest.raises(FileNotFoundError, match="latents_stats.pt"):
        read_latent_stats(tmp_path / "none.pt")


def test_architecture_is_read_off_the_weights(tmp_path, small_ldm_weights):
    """The full VA-VAE's ddconfig from its own (meta) weights, and a small one's, which then loads without config."""
    with torch.device("meta"):
        full = diffusers_to_ldm(build_vavae().state_dict())
    assert infer_ldm_config(full) == {**VAVAE_F16D32, "ch_mult": (1, 1, 2, 2, 4), "attn_resolutions": (16,)}
    assert infer_ldm_config(small_ldm_weights, resolution=64) == {**SMALL, "attn_resolutions": (16,)}
    torch.save(small_ldm_weights, tmp_path / "small.pt")
    vae = load_vavae(tmp_path / "small.pt")
    assert vae.config.latent_channels == SMALL["z_channels"]
    with pytest.raises(KeyError, match="not LDM autoencoder weights"):
        infer_ldm_config({"encoder.conv_in.weight": torch.zeros(4, 3, 3, 3)})
