"""SiT backbone and VAE-REPA head: shapes, parameter counts, initialisation, layout, REPA key names."""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from models import MODEL_NAMES, build_model, patchify, unpatchify
from models.sit import Attention, sincos_pos_embed_2d


def tiny(**kw):
    cfg = dict(input_size=8, depth=4, hidden_size=32, num_heads=4, num_classes=10, encoder_depth=2)
    cfg.update(kw)
    return build_model("SiT-S/2", **cfg)


def head_params(model):
    return sum(p.numel() for p in model.vae_projector.parameters())


def backbone_params(model):
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("vae_projector", "projectors")))


@pytest.mark.parametrize(
    "name, backbone_m, head_m",
    [("SiT-B/2", 130.3, 8.29), ("SiT-L/2", 457.8, None), ("SiT-XL/2", 674.8, 18.63)],
)
def test_parameter_counts_match_the_papers(name, backbone_m, head_m):
    # Published: SiT-B/2 130M, L/2 458M, XL/2 675M; VAE-REPA head 8M (B/2) and 18M (XL/2).
    with torch.device("meta"):
        model = build_model(name)
    assert backbone_params(model) / 1e6 == pytest.approx(backbone_m, abs=0.1)
    if head_m is not None:
        assert head_params(model) / 1e6 == pytest.approx(head_m, abs=0.01)


def test_head_parameter_count_closed_form():
    # 5 Linear layers h -> 2h -> 2h -> 2h -> 2h -> p^2 C, with biases.
    with torch.device("meta"):
        model = build_model("SiT-B/2")
    h, w, out = 768, 1536, 16
    expected = (h * w + w) + 3 * (w * w + w) + (w * out + out)
    assert head_params(model) == expected
    with torch.device("meta"):
        two = build_model("SiT-B/2", vae_head_layers=2)
    assert head_params(two) == (h * w + w) + (w * out + out)  # the ablation's 2-layer head (~1M)


def test_registry_names_and_default_alignment_depth():
    sit = [f"SiT-{s}/{p}" for s in ("S", "B", "L", "XL") for p in (1, 2, 4, 8)]
    lightning = [f"LightningDiT-{s}/{p}" for s in ("B", "L", "XL") for p in (1, 2)]
    assert MODEL_NAMES == sit + lightning
    depths = {}
    for name in MODEL_NAMES:
        with torch.device("meta"):
            m = build_model(name)
        assert type(m).__name__ == name.split("-")[0]
        depths[name.split("/")[0]] = m.encoder_depth
        assert m.patch_size == int(name.split("/")[1])
    assert depths == {"SiT-S": 2, "SiT-B": 2, "SiT-L": 8, "SiT-XL": 8, "LightningDiT-B": 2, "LightningDiT-L": 8,
                      "LightningDiT-XL": 8}
    with pytest.raises(ValueError, match="unknown model"):
        build_model("SiT-XXL/2")
    with pytest.raises(ValueError, match="unknown model"):
        build_model("LightningDiT-S/2")


@pytest.mark.parametrize("channels, size, patch", [(4, 8, 2), (16, 8, 4), (3, 16, 8)])
def test_output_shapes_and_zero_init(channels, size, patch):
    model = tiny(in_channels=channels, input_size=size, patch_size=patch)
    x = torch.randn(3, channels, size, size)
    v, heads = model(x, torch.rand(3), torch.tensor([0, 5, 10]))  # 10 = null class
    assert v.shape == x.shape
    assert torch.count_nonzero(v) == 0  # adaLN-Zero and a zero output layer
    assert heads["vae"].shape == (3, (size // patch) ** 2, patch * patch * channels)


def test_heads_only_when_asked():
    model = tiny()
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    assert "vae" in model(x, t, y)[1]  # training mode
    model.eval()
    calls = []
    model.vae_projector.register_forward_hook(lambda *a: calls.append(1))
    assert model(x, t, y)[1] == {}
    assert not calls
    assert "vae" in model(x, t, y, return_heads=True)[1]
    assert tiny(vae_head_layers=0)(x, t, y)[1] == {}


def test_patchify_round_trip_and_layout():
    x = torch.randn(2, 3, 8, 8)
    tokens = patchify(x, 2)
    assert torch.equal(unpatchify(tokens, 2, 3), x)
    # Token k = (row i, col j) holds x[:, c, 2i + a, 2j + b] at feature (a * 2 + b) * C + c.
    i, j, a, b, c = 1, 3, 1, 0, 2
    assert tokens[0, i * 4 + j, (a * 2 + b) * 3 + c] == x[0, c, 2 * i + a, 2 * j + b]


def test_head_target_layout_agrees_with_unpatchify():
    # The head's output for token k must be compared with the patch of the clean latent that the final
    # layer writes at token k. A final layer that emits patchify(x) must reproduce x through unpatchify.
    model = tiny(input_size=8, patch_size=2, in_channels=4)
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        model.final_layer.linear.weight.zero_()
    model.final_layer.linear.forward = lambda h: patchify(x, 2)
    v, _ = model(torch.zeros_like(x), torch.rand(2), torch.tensor([0, 1]))
    assert torch.equal(v, x)


def test_attention_matches_timm():
    # An independent implementation with the same parameter names: timm's Attention, as REPA uses it
    # (timm < 1.0 defaulted to nn.LayerNorm for qk-norm).
    from timm.models.vision_transformer import Attention as TimmAttention

    for qk_norm in (False, True):
        ours = Attention(32, num_heads=4, qk_norm=qk_norm)
        ref = TimmAttention(32, num_heads=4, qkv_bias=True, qk_norm=qk_norm, norm_layer=nn.LayerNorm)
        ref.load_state_dict(ours.state_dict())  # same parameter names and shapes
        with torch.no_grad():
            for p in ours.parameters():
                p.normal_()
        ref.load_state_dict(ours.state_dict())
        x = torch.randn(2, 5, 32)
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_sincos_position_embedding_formula():
    dim, grid = 16, 4
    emb = sincos_pos_embed_2d(dim, grid)
    quarter = dim // 4
    for row in range(grid):
        for col in range(grid):
            k = row * grid + col
            for f in range(quarter):
                omega = 1 / 10000 ** (f / quarter)
                # MAE / REPA layout: [sin(col w), cos(col w), sin(row w), cos(row w)]
                assert emb[k, f] == pytest.approx(math.sin(col * omega), abs=1e-6)
                assert emb[k, quarter + f] == pytest.approx(math.cos(col * omega), abs=1e-6)
                assert emb[k, 2 * quarter + f] == pytest.approx(math.sin(row * omega), abs=1e-6)
                assert emb[k, 3 * quarter + f] == pytest.approx(math.cos(row * omega), abs=1e-6)


def repa_state_dict(depth, hidden, patch, channels, num_classes, tokens, z_dims=(768,), proj_dim=2048, qk=False):
    """A state dict with the key names and shapes of REPA's models/sit.py, written from its documentation."""
    rng = np.random.default_rng(0)
    sd = {}

    def put(name, *shape):
        sd[name] = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))

    put("pos_embed", 1, tokens, hidden)
    put("x_embedder.proj.weight", hidden, channels, patch, patch)
    put("x_embedder.proj.bias", hidden)
    put("t_embedder.mlp.0.weight", hidden, 256)
    put("t_embedder.mlp.0.bias", hidden)
    put("t_embedder.mlp.2.weight", hidden, hidden)
    put("t_embedder.mlp.2.bias", hidden)
    put("y_embedder.embedding_table.weight", num_classes + 1, hidden)
    for i in range(depth):
        b = f"blocks.{i}."
        put(b + "attn.qkv.weight", 3 * hidden, hidden)
        put(b + "attn.qkv.bias", 3 * hidden)
        if qk:
            for n in ("q_norm", "k_norm"):
                put(b + f"attn.{n}.weight", hidden // 4)
                put(b + f"attn.{n}.bias", hidden // 4)
        put(b + "attn.proj.weight", hidden, hidden)
        put(b + "attn.proj.bias", hidden)
        put(b + "mlp.fc1.weight", 4 * hidden, hidden)
        put(b + "mlp.fc1.bias", 4 * hidden)
        put(b + "mlp.fc2.weight", hidden, 4 * hidden)
        put(b + "mlp.fc2.bias", hidden)
        put(b + "adaLN_modulation.1.weight", 6 * hidden, hidden)
        put(b + "adaLN_modulation.1.bias", 6 * hidden)
    put("final_layer.linear.weight", patch * patch * channels, hidden)
    put("final_layer.linear.bias", patch * patch * channels)
    put("final_layer.adaLN_modulation.1.weight", 2 * hidden, hidden)
    put("final_layer.adaLN_modulation.1.bias", 2 * hidden)
    for j, z in enumerate(z_dims):
        for k, (i, o) in zip((0, 2, 4), ((hidden, proj_dim), (proj_dim, proj_dim), (proj_dim, z))):
            put(f"projectors.{j}.{k}.weight", o, i)
            put(f"projectors.{j}.{k}.bias", o)
    return sd


@pytest.mark.parametrize("qk", [False, True])
def test_repa_checkpoint_loads_into_backbone(qk):
    model = tiny(qk_norm=qk)
    sd = repa_state_dict(depth=4, hidden=32, patch=2, channels=4, num_classes=10, tokens=16, qk=qk)
    ignored = model.load_backbone_state_dict({"module." + k: v for k, v in sd.items()})
    assert sorted(ignored) == sorted(k for k in sd if k.startswith("projectors."))
    own = model.state_dict()
    for k, v in sd.items():
        if not k.startswith("projectors."):
            assert torch.equal(own[k], v), k
    # With REPA's projector configured, the whole checkpoint loads, projectors included.
    full = tiny(qk_norm=qk, vae_head_layers=0, repa_z_dims=(768,))
    assert full.load_backbone_state_dict(sd) == []
    assert torch.equal(full.state_dict()["projectors.0.4.weight"], sd["projectors.0.4.weight"])


def test_wrong_checkpoint_is_a_clear_error():
    model = tiny()
    sd = repa_state_dict(depth=3, hidden=32, patch=2, channels=4, num_classes=10, tokens=16)
    with pytest.raises(KeyError, match="missing"):
        model.load_backbone_state_dict(sd)


def test_encoder_depth_must_exist():
    with pytest.raises(ValueError, match="encoder_depth"):
        tiny(encoder_depth=5)


def test_meta_build_is_cheap_and_has_no_storage():
    with torch.device("meta"):
        model = build_model("SiT-XL/2")
    assert all(p.is_meta for p in model.parameters())
    assert isinstance(model.vae_projector, nn.Sequential) and len(model.vae_projector) == 9
