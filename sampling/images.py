"""Sample pixels and files: decoder output to 8-bit pixels."""

from __future__ import annotations

import torch

from cli import PIXEL_ROUNDINGS


def to_uint8(images: torch.Tensor, rounding: str = "repa") -> torch.Tensor:
    """Decoder output in [-1, 1], (N, 3, H, W) -> uint8 (N, H, W, 3), truncated after clamping to [0, 255]."""
    x = images.float()
    if rounding == "repa":
        x = 255.0 * ((x + 1) / 2)  # REPA's order of float32 operations, so the bytes match on ties too
    elif rounding == "dit":
        x = x * 127.5 + 128
    else:
        raise ValueError(f"unknown pixel rounding {rounding!r}; choose one of {PIXEL_ROUNDINGS}")
    return x.clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
