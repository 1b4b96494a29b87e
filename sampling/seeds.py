"""Per-sample randomness: everything about sample i (its label, initial noise and SDE noise) comes from
(global seed, i), so the images depend neither on the number of processes nor on the batch size."""

from __future__ import annotations

import numpy as np
import torch

NOISE_STREAM, LABEL_STREAM = 0, 1  # per-sample random streams


def sample_generator(global_seed: int, index: int, stream: int) -> torch.Generator:
    """A CPU generator for one sample and one purpose (noise or label), seeded by hashing (seed, index, stream)."""
    seed = np.random.SeedSequence([global_seed, index, stream]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(seed))


def sample_labels(indices: list[int], num_classes: int, mode: str, global_seed: int) -> torch.Tensor:
    """Class of each sample: `i % num_classes` (balanced) or uniform from the sample's own label stream."""
    if mode == "balanced":
        return torch.tensor([i % num_classes for i in indices], dtype=torch.long)
    if mode == "random":
        draws = [torch.randint(num_classes, (1,), generator=sample_generator(global_seed, i, LABEL_STREAM))
                 for i in indices]
        return torch.cat(draws)
    raise ValueError(f"unknown label sampling {mode!r}")
