"""Sample pixels: decoder output to 8-bit pixels (the bytes the metrics see), and PNG files written atomically."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cli import PIXEL_ROUNDINGS, UsageError
from integrity import atomic_write


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


def save_png(image: np.ndarray, path: Path) -> None:
    """Write a PNG through a temporary file and a rename: a killed run never leaves a truncated image."""
    with atomic_write(path) as f:
        Image.fromarray(image).save(f, format="PNG")


def read_png(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            image = np.asarray(im)
    except OSError as e:
        raise UsageError(f"{path} is unreadable ({e}); delete it and rerun to sample it again") from e
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise UsageError(f"{path} is not an 8-bit RGB image (shape {image.shape}); delete it and rerun")
    return image
