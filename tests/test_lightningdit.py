"""LightningDiT backbone: RoPE, SwiGLU, RMSNorm, sizes, time convention, head interface and two training steps."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from alignment.sra import Sra
from alignment.vae_repa import VaeRepa
from loss import LossConfig, training_loss
from models.lightningdit import (
    LIGHTNINGDIT_NAMES,
    LightningDiT,
    RMSNorm,
    SwiGLUFFN,
    VisionRotaryEmbeddingFast,
    build_lightningdit,
    swiglu_hidden_width,
)


def tiny(**kw) -> LightningDiT:
    config = dict(input_size=4, patch_size=1, in_channels=32, hidden_size=32, depth=3, num_heads=2, num_classes=3)
    config.update(kw)
    return LightningDiT(**config)


def test_rope_turns_each_channel_pair_by_its_row_or_column_angle():
    head_dim, grid, theta = 8, 3, 10000.0
    rope = VisionRotaryEmbeddingFast(head_dim, grid)
    x = torch.randn(2, 1, grid * grid, head_dim, dtype=torch.float64)
    out = rope.double()(x)
    half = head_dim // 2
    for token in range(grid * grid):
        row, col = divmod(token, grid)
        for pair in range(head_dim // 2):
            axis_pos, i = (row, pair) if pair < half // 2 else (col, pair - half // 2)
            angle = axis_pos * theta ** (-2 * i / half)
            a, b = x[..., token, 2 * pair], x[..., token, 2 * pair + 1]
            expected = (a * math.cos(angle) - b * math.sin(angle), a * math.sin(angle) + b * math.cos(angle))
            torch.testing.assert_close(out[..., token, 2 * pair], expected[0])
            torch.testing.assert_close(out[..., token, 2 * pair + 1], expected[1])


def test_rope_scores_depend_on_the_offset_only():
    rope = VisionRotaryEmbeddingFast(16, 4).double()
    q, k = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    tokens = torch.stack([q, k]).expand(16, 2, 16).transpose(0, 1)[:, None]  # (2, 1, 16 tokens, 16)
    rq, rk = rope(tokens)[0, 0], rope(tokens)[1, 0]
    # (row 0, col 0) vs (row 1, col 2), and the same offset moved to (row 2, col 1) vs (row 3, col 3)
    assert torch.isclose(rq[0] @ rk[1 * 4 + 2], rq[2 * 4 + 1] @ rk[3 * 4 + 3])
    assert not torch.isclose(rq[0] @ rk[1 * 4 + 2], rq[0] @ rk[2 * 4 + 1])


def test_swiglu_widths_and_formula():
    # two thirds of the 4x GELU width, truncated: XL 3072, L int(2730.67) = 2730, B 2048
    assert [swiglu_hidden_width(d) for d in (1152, 1024, 768)] == [3072, 2730, 2048]
    with torch.device("meta"):
        block = build_lightningdit("LightningDiT-L/2").blocks[0]
    assert block.mlp.w12.weight.shape == (2 * 2730, 1024) and block.mlp.w3.weight.shape == (1024, 2730)
    ffn = SwiGLUFFN(6, 5)
    x = torch.randn(3, 6)
    w, b = ffn.w12.weight, ffn.w12.bias
    gate, value = x @ w[:5].T + b[:5], x @ w[5:].T + b[5:]
    torch.testing.assert_close(ffn(x), (gate * torch.sigmoid(gate) * value) @ ffn.w3.weight.T + ffn.w3.bias)


def test_rmsnorm_formula():
    norm = RMSNorm(5)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 6.0))
    x = torch.randn(4, 5, dtype=torch.float64)
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6) * torch.arange(1.0, 6.0, dtype=torch.float64)
    torch.testing.assert_close(norm.double()(x), expected)


def closed_form_parameters(depth: int, d: int, patch: int, channels: int = 32, classes: int = 1000) -> int:
    """LightningDiT's parameter count (SwiGLU, RMSNorm, RoPE, no qk-norm), from its layer list."""
    h = int(2 / 3 * 4 * d)
    block = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * 2 * h + 2 * h) + (h * d + d) + (d * 6 * d + 6 * d)
    embed = (patch * patch * channels * d + d) + (256 * d + d + d * d + d) + (classes + 1) * d
    final = d + (d * patch * patch * channels + patch * patch * channels) + (d * 2 * d + 2 * d)
    return depth * block + embed + final


@pytest.mark.parametrize("name, depth, width, patch, published", [
    ("LightningDiT-B/1", 12, 768, 1, 130e6), ("LightningDiT-XL/1", 28, 1152, 1, 675e6),
])
def test_parameter_counts_match_the_layer_list_and_the_published_size(name, depth, width, patch, published):
    with torch.device("meta"):
        model = build_lightningdit(name)
    count = sum(p.numel() for p in model.parameters())
    assert count == closed_form_parameters(depth, width, patch)
    assert abs(count - published) / published < 0.005  # published: B 130M, XL 675M (DiT's sizes)


def test_registry_and_released_layout():
    assert LIGHTNINGDIT_NAMES == [f"LightningDiT-{s}/{p}" for s in ("B", "L", "XL") for p in (1, 2)]
    with pytest.raises(ValueError, match="unknown model"):
        build_lightningdit("LightningDiT-S/2")
    with torch.device("meta"):
        state = build_lightningdit("LightningDiT-XL/1").state_dict()
    # LightningDiT-XL/1 on VA-VAE f16d32: 16x16x32 latents, 256 tokens, head dim 72, 1000 classes + null row
    shapes = {"pos_embed": (1, 256, 1152), "x_embedder.proj.weight": (1152, 32, 1, 1),
              "feat_rope.freqs_cos": (256, 72), "y_embedder.embedding_table.weight": (1001, 1152),
              "blocks.27.norm1.weight": (1152,), "blocks.0.attn.qkv.bias": (3456,),
              "blocks.0.mlp.w12.weight": (6144, 1152), "blocks.0.adaLN_modulation.1.weight": (6912, 1152),
              "final_layer.norm_final.weight": (1152,), "final_layer.linear.weight": (32, 1152)}
    assert {k: tuple(state[k].shape) for k in shapes} == shapes
    assert not any(k.startswith(("blocks.28.", "blocks.0.attn.q_norm")) for k in state)


@pytest.mark.parametrize("patch, learn_sigma", [(1, False), (2, False), (2, True)])
def test_forward_shapes(patch, learn_sigma):
    model = tiny(patch_size=patch, learn_sigma=learn_sigma, heads=VaeRepa(2).head_specs(32, patch, 32, 3))
    x = torch.randn(2, 32, 4, 4)
    v, heads = model(x, torch.rand(2), torch.tensor([0, 3]), return_heads=True)
    assert v.shape == x.shape and model.final_layer.linear.out_features == patch**2 * 32 * (2 if learn_sigma else 1)
    assert heads["vae"].shape == (2, (4 // patch) ** 2, patch**2 * 32)
    assert model.x_embedder.num_patches == (4 // patch) ** 2 and model.null_class == 3
    assert model(x, torch.rand(2), torch.tensor([0, 3]), return_heads=False)[1] == {}


def test_time_convention_is_converted_at_the_boundary():
    """A model whose LightningDiT-convention output is g(s) = silu(silu(sin s)) everywhere, s = 1 is data: in our
    convention (t = 1 noise, v = noise - data) it must return -g(1 - t)."""
    model = tiny(depth=1)
    half = model.t_embedder.frequency_embedding_size // 2
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.t_embedder.mlp[0].weight[0, half] = 1.0  # the sin feature of frequency 1: sin(s)
        model.t_embedder.mlp[2].weight[0, 0] = 1.0
        ada = model.final_layer.adaLN_modulation[-1]
        ada.weight[0, 0] = 1.0  # shift[0] = silu(c[0])
        ada.bias[model.hidden_size:] = -1.0  # scale = -1: the normalised tokens vanish
        model.final_layer.linear.weight[:, 0] = 1.0
    t = torch.tensor([0.1, 0.5, 0.9])
    v, _ = model(torch.randn(3, 32, 4, 4), t, torch.tensor([0, 1, 3]))

    def g(s):
        return F.silu(F.silu(torch.sin(s)))

    torch.testing.assert_close(v, -g(1 - t).view(3, 1, 1, 1).expand_as(v))
    assert not torch.allclose(v, -g(t).view(3, 1, 1, 1).expand_as(v))


def test_forward_tokens_is_the_hidden_state_after_that_block():
    model = tiny(depth=4).eval()
    for block in model.blocks:  # non-zero gates so every block changes the tokens
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.1)
    seen = {}
    model.blocks[1].register_forward_hook(lambda m, i, o: seen.setdefault("h", o))
    x, t, y = torch.randn(2, 32, 4, 4), torch.rand(2), torch.tensor([1, 2])
    model(x, t, y)
    torch.testing.assert_close(model.forward_tokens(x, t, y, 2), seen["h"])
    assert not torch.allclose(model.forward_tokens(x, t, y, 3), seen["h"])
    with pytest.raises(ValueError, match="depth must be"):
        model.forward_tokens(x, t, y, 5)


def test_backbone_state_dict_loads_lightningdit_and_ddp_names_and_refuses_others():
    source = tiny()
    target = tiny(heads=VaeRepa(2).head_specs(32, 1, 32, 3))
    ddp = {f"module.{k}": v for k, v in source.state_dict().items()}
    ddp["module.projectors.0.0.weight"] = torch.zeros(1)  # a head this model does not have
    assert target.load_backbone_state_dict(ddp) == ["projectors.0.0.weight"]
    torch.testing.assert_close(target.blocks[2].mlp.w3.weight, source.blocks[2].mlp.w3.weight)
    broken = dict(source.state_dict())
    del broken["feat_rope.freqs_sin"]
    with pytest.raises(KeyError, match="feat_rope.freqs_sin"):
        target.load_backbone_state_dict(broken)
    with pytest.raises(ValueError, match="exists already"):
        target.add_head("vae", "other", torch.nn.Identity(), 1)


@pytest.mark.parametrize("method", [VaeRepa(depth=1), Sra(student_depth=1, teacher_depth=2)])
def test_two_training_steps_with_an_alignment_head(method):
    model = tiny(heads=method.head_specs(32, 1, 32, 3))
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    method.setup(torch.device("cpu"), model)
    head = getattr(model, model.head_taps["vae" if isinstance(method, VaeRepa) else "sra"][0])
    before = [p.detach().clone() for p in head.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(4, 32, 4, 4), torch.tensor([0, 1, 2, 0])
    for _ in range(2):
        out = training_loss(model, x, y, LossConfig(), model.null_class, [method], teacher=teacher)
        opt.zero_grad()
        out["total"].backward()
        opt.step()
        term = out[method.log_name]
        assert torch.isfinite(out["total"]) and term > 0
        torch.testing.assert_close(out["total"].detach(), out["denoise"] + method.weight(0) * term)
    assert all(not torch.equal(a, b) for a, b in zip(before, head.parameters()))


def test_bf16_autocast_forward_stays_close_to_fp32():
    model = tiny().eval()
    for block in model.blocks:
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.1)
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.1)
    x, t, y = torch.randn(2, 32, 4, 4), torch.rand(2), torch.tensor([0, 1])
    reference, _ = model(x, t, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, _ = model(x, t, y)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), reference, atol=0.05, rtol=0.05)
