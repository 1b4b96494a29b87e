"""Alignment heads on a transformer's blocks, shared by every backbone (SiT, LightningDiT): how a head is attached
to a block, run only when asked, and ignored when a checkpoint is loaded for sampling."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn

# Parameter prefixes of the alignment heads (ours, REPA's, SRA's): sampling ignores them.
HEAD_PREFIXES = ("vae_projector.", "projectors.", "ap_head.")

# An alignment head: (key of its output in `heads`, attribute name = parameter prefix, module, block it taps).
HeadSpec = tuple[str, str, nn.Module, int]


def build_mlp(in_dim: int, width: int, out_dim: int, num_layers: int) -> nn.Sequential:
    """`num_layers` Linear layers with SiLU between them: in -> width -> ... -> width -> out."""
    if num_layers < 1:
        raise ValueError(f"an MLP head needs at least one Linear layer, got {num_layers}")
    dims = [in_dim] + [width] * (num_layers - 1) + [out_dim]
    layers: list[nn.Module] = []
    for i in range(num_layers):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < num_layers - 1:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class HeadList(nn.ModuleList):
    """Several heads on the same tokens (REPA's projectors, one per encoder); returns their outputs as a list."""

    def forward(self, h: torch.Tensor) -> list[torch.Tensor]:
        return [head(h) for head in self]


def strip_wrapper_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with DDP's `module.` and torch.compile's `_orig_mod.` prefixes removed from its keys."""
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state_dict.items()}


class AlignmentHeads:
    """Mixin for a backbone with `blocks`, `num_classes`, `_embed(x, t, y) -> (tokens, conditioning)` and
    `_block(block, h, c)`: attaches heads to blocks, runs the blocks with them, stops early for a teacher, and loads
    checkpoints whose heads it may lack."""

    blocks: nn.ModuleList
    num_classes: int

    def _init_heads(self, heads: Sequence[HeadSpec]) -> None:
        self.head_taps: dict[str, tuple[str, int]] = {}  # key -> (attribute, block it taps)
        for key, attr, module, depth in heads:
            self.add_head(key, attr, module, depth)

    def add_head(self, key: str, attr: str, module: nn.Module, depth: int) -> None:
        """Attach `module` as attribute `attr` (its parameters' prefix), fed the tokens after block `depth`."""
        if not 1 <= depth <= len(self.blocks):
            raise ValueError(f"the {key} head's block (its depth flag, e.g. encoder_depth) must be in "
                             f"[1, {len(self.blocks)}], got {depth}")
        if key in self.head_taps or hasattr(self, attr):
            raise ValueError(f"a head named {key!r} / {attr!r} exists already")
        setattr(self, attr, module)
        self.head_taps[key] = (attr, depth)

    def compile_blocks(self, **kwargs) -> int:
        """torch.compile each transformer block and each head in place (`Module.compile`: the state dict's keys do not
        change), the unit of compilation everywhere: DDP then wraps an eager module of compiled blocks, so its
        gradient buckets split no graph. `kwargs` go to torch.compile. Returns the number of compiled modules."""
        units = [*self.blocks, *(getattr(self, attr) for attr, _ in self.head_taps.values())]
        for unit in units:
            unit.compile(**kwargs)
        return len(units)

    @property
    def null_class(self) -> int:
        return self.num_classes

    def has_heads(self) -> bool:
        return bool(self.head_taps)

    def head_state_prefixes(self) -> tuple[str, ...]:
        return HEAD_PREFIXES

    def _run_blocks(self, h: torch.Tensor, c: torch.Tensor, with_heads: bool) -> tuple[torch.Tensor, dict]:
        """All blocks; with_heads: each head's output on the tokens after its block."""
        taps = self.head_taps if with_heads else {}
        heads: dict = {}
        for i, block in enumerate(self.blocks):
            h = self._block(block, h, c)
            for key, (attr, depth) in taps.items():
                if depth == i + 1:
                    heads[key] = getattr(self, attr)(h)
        return h, heads

    def forward_tokens(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, depth: int) -> torch.Tensor:
        """The tokens (N, T, hidden) after block `depth`; the blocks after it are not run (SRA's teacher)."""
        if not 1 <= depth <= len(self.blocks):
            raise ValueError(f"depth must be in [1, {len(self.blocks)}], got {depth}")
        h, c = self._embed(x, t, y)
        for block in self.blocks[:depth]:
            h = self._block(block, h, c)
        return h

    def load_backbone_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
        """Load the backbone weights strictly; head weights load where this model has that head.

        Accepts training checkpoints' `ema`/`model` dicts (DDP `module.` or compile `_orig_mod.` prefixes are
        stripped). Returns the keys that were ignored (heads this model does not have).
        """
        clean = strip_wrapper_prefixes(state_dict)
        own = self.state_dict()
        ignored = [k for k in clean if k not in own and k.startswith(HEAD_PREFIXES)]
        for k in ignored:
            del clean[k]
        missing, unexpected = self.load_state_dict(clean, strict=False)
        missing = [k for k in missing if not k.startswith(HEAD_PREFIXES)]
        if missing or unexpected:
            raise KeyError(
                f"state dict does not match this {type(self).__name__}: missing "
                f"{missing[:8]}{'...' if len(missing) > 8 else ''}, unexpected "
                f"{unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
            )
        return ignored
