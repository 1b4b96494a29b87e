"""LightningDiT backbone (SwiGLU, RMSNorm, 2-D RoPE, adaLN-Zero) with the same alignment-head interface as our SiT.

Architecture and parameter names are those of `hustvl/LightningDiT` (`models/lightningdit.py`), so the `ema` or `model`
weights of its released checkpoints load with `load_backbone_state_dict`; see docs/lightningdit.md.

Time convention. LightningDiT (like SiT's repository, `transport/path.py` ICPlan) trains on
x_s = s * data + (1 - s) * noise with target velocity u = data - noise, so s = 1 is data and its ODE integrates s from
0 to 1. Ours (loss.py) is x_t = (1 - t) * data + t * noise, v = noise - data, t = 1 noise. With s = 1 - t the two
paths are the same points, and d x / dt = -d x / ds, so v = -u. This class takes our t and returns our v: it feeds
s = 1 - t to its timestep embedder and negates the velocity it computes. A released LightningDiT checkpoint therefore
gives correct velocities in our convention, and a model trained here can be used by LightningDiT's own sampler.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.heads import AlignmentHeads, HeadSpec
from models.registry import MODEL_NAMES, model_config
from models.sit import (
    LabelEmbedder,
    PatchEmbed,
    TimestepEmbedder,
    sincos_pos_embed_2d,
    unpatchify,
)


def modulate(x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor:
    x = x * (1 + scale.unsqueeze(1))
    return x if shift is None else x + shift.unsqueeze(1)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, the statistic computed in float32 (LLaMA's RMSNorm, as LightningDiT)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def swiglu_hidden_width(hidden_size: int, mlp_ratio: float = 4.0) -> int:
    """LightningDiT's SwiGLU width: two thirds of the GELU MLP's width, int(2/3 * int(hidden * ratio)), no rounding."""
    return int(2 / 3 * int(hidden_size * mlp_ratio))


class SwiGLUFFN(nn.Module):
    """w3(silu(a) * b) with [a, b] = w12(x) split in two halves (DINOv2's SwiGLUFFN names: w12, w3)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden_dim)
        self.w3 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class GeluMlp(nn.Module):
    """timm's Mlp with tanh-GELU (names fc1, fc2): LightningDiT without SwiGLU."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def rope_2d_tables(head_dim: int, grid_size: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (grid_size**2, head_dim) of EVA-02's VisionRotaryEmbeddingFast as LightningDiT builds it.

    The first half of a head's channels rotates with the token's row, the second half with its column. Within a half
    of width h = head_dim / 2, channel pair (2i, 2i + 1) turns by the angle pos * theta^(-2i / h), i < h / 2; tokens
    are in row-major order, as the patches.
    """
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs a head dimension divisible by 4, got {head_dim}")
    half = head_dim // 2
    freqs = 1.0 / theta ** (torch.arange(0, half, 2)[: half // 2].float() / half)
    pos = torch.arange(grid_size, dtype=torch.float32)
    angles = torch.repeat_interleave(pos[:, None] * freqs[None], 2, dim=-1)  # (grid, half): pairs share an angle
    rows = angles[:, None, :].expand(grid_size, grid_size, half)
    cols = angles[None, :, :].expand(grid_size, grid_size, half)
    table = torch.cat([rows, cols], dim=-1).reshape(grid_size * grid_size, head_dim)
    return table.cos(), table.sin()


class VisionRotaryEmbeddingFast(nn.Module):
    """2-D rotary embedding on (N, heads, T, head_dim); buffers `freqs_cos` / `freqs_sin` are in LightningDiT's
    state dicts, so they keep its names."""

    def __init__(self, head_dim: int, grid_size: int):
        super().__init__()
        cos, sin = rope_2d_tables(head_dim, grid_size)
        self.register_buffer("freqs_cos", cos)
        self.register_buffer("freqs_sin", sin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pairs = x.unflatten(-1, (-1, 2))
        rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)  # (a, b) -> (-b, a) per pair
        return (x * self.freqs_cos + rotated * self.freqs_sin).type_as(x)  # fp32 tables: product in fp32 under autocast


class Attention(nn.Module):
    """Self-attention with qkv bias, optional qk-norm (RMSNorm or LayerNorm per head) and RoPE on q and k."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False, use_rmsnorm: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        norm = RMSNorm if use_rmsnorm else nn.LayerNorm
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = norm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: nn.Module | None = None) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope(q), rope(k)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(n, t, d))


def _norm(dim: int, use_rmsnorm: bool) -> nn.Module:
    return RMSNorm(dim) if use_rmsnorm else nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


class LightningDiTBlock(nn.Module):
    """adaLN-Zero block; `wo_shift` drops the two shifts (4 modulation vectors instead of 6)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, use_qknorm: bool = False,
                 use_swiglu: bool = True, use_rmsnorm: bool = True, wo_shift: bool = False):
        super().__init__()
        self.norm1 = _norm(hidden_size, use_rmsnorm)
        self.attn = Attention(hidden_size, num_heads, qk_norm=use_qknorm, use_rmsnorm=use_rmsnorm)
        self.norm2 = _norm(hidden_size, use_rmsnorm)
        if use_swiglu:
            self.mlp = SwiGLUFFN(hidden_size, swiglu_hidden_width(hidden_size, mlp_ratio))
        else:
            self.mlp = GeluMlp(hidden_size, int(hidden_size * mlp_ratio))
        self.wo_shift = wo_shift
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, (4 if wo_shift else 6) * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: nn.Module | None = None) -> torch.Tensor:
        if self.wo_shift:
            scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(4, dim=-1)
            shift_msa = shift_mlp = None
        else:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, use_rmsnorm: bool = True):
        super().__init__()
        self.norm_final = _norm(hidden_size, use_rmsnorm)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class LightningDiT(AlignmentHeads, nn.Module):
    """LightningDiT taking our t (t = 1 noise) and returning our velocity; alignment heads as in `models.sit.SiT`.

    `forward(x, t, y)` returns `(velocity, heads)`; heads run only when asked (`return_heads=True`, the default in
    training mode). Labels are used as given: label dropout for guidance is the training loss's job (LightningDiT's
    own LabelEmbedder drops labels inside the model in training mode; this one does not). Row `num_classes` of the
    class table is the null class. `learn_sigma` doubles the output channels and keeps the first half, as LightningDiT
    does. The released models use SwiGLU, RMSNorm and RoPE without qk-norm: those are the defaults here.
    """

    def __init__(
        self,
        input_size: int = 16,
        patch_size: int = 1,
        in_channels: int = 32,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        learn_sigma: bool = False,
        use_qknorm: bool = False,
        use_swiglu: bool = True,
        use_rope: bool = True,
        use_rmsnorm: bool = True,
        wo_shift: bool = False,
        encoder_depth: int = 8,
        heads: Sequence[HeadSpec] = (),
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.input_size = input_size
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.encoder_depth = encoder_depth  # the default block for an alignment head (registry size)

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        self.register_buffer("pos_embed", torch.zeros(1, self.x_embedder.num_patches, hidden_size))
        self.feat_rope = (VisionRotaryEmbeddingFast(hidden_size // num_heads, self.x_embedder.grid_size)
                          if use_rope else None)
        self.blocks = nn.ModuleList([
            LightningDiTBlock(hidden_size, num_heads, mlp_ratio, use_qknorm, use_swiglu, use_rmsnorm, wo_shift)
            for _ in range(depth)
        ])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, use_rmsnorm)

        self._init_heads(heads)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """LightningDiT's (= DiT's) initialisation, heads' Linear layers included as in SiT; RMSNorm weights are one."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        self.pos_embed.copy_(torch.from_numpy(sincos_pos_embed_2d(self.hidden_size, self.x_embedder.grid_size))[None])
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in [*(b.adaLN_modulation[-1] for b in self.blocks), self.final_layer.adaLN_modulation[-1],
                      self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def _embed(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # LightningDiT's time runs the other way (s = 1 is data): see the module docstring.
        return self.x_embedder(x) + self.pos_embed, self.t_embedder(1 - t) + self.y_embedder(y)

    def _block(self, block: nn.Module, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return block(h, c, self.feat_rope)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, return_heads: bool | None = None
    ) -> tuple[torch.Tensor, dict]:
        h, c = self._embed(x, t, y)
        h, heads = self._run_blocks(h, c, self.training if return_heads is None else return_heads)
        out = unpatchify(self.final_layer(h, c), self.patch_size, self.out_channels)
        if self.learn_sigma:
            out = out[:, : self.in_channels]
        return -out, heads  # LightningDiT's velocity (data - noise) is minus ours


# ----------------------------------------------------------------------------------------------
# Registry (names and sizes in models/registry.py)

LIGHTNINGDIT_NAMES = [name for name in MODEL_NAMES if name.startswith("LightningDiT-")]


def build_lightningdit(name: str, **overrides) -> LightningDiT:
    """Build a registry LightningDiT; keyword arguments (not None) override the size's defaults."""
    if name not in LIGHTNINGDIT_NAMES:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(LIGHTNINGDIT_NAMES)}")
    config = model_config(name)
    config.update({k: v for k, v in overrides.items() if v is not None})
    return LightningDiT(**config)
