"""Channel-wise latent statistics (LightningDiT's latent normalisation): streaming mean and std, latents_stats.pt."""

from __future__ import annotations

from pathlib import Path

import torch

from checkpoints import load_plain_file


class LatentStats:
    """Per-channel mean and standard deviation over batches of latents (N, C, H, W), accumulated in float64.

    Each batch's mean and sum of squared deviations are merged into the running ones (Chan et al.'s pairwise update),
    so no sum of squares of raw values is ever formed and millions of latents lose no precision.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None  # sum of squared deviations from the mean, per channel

    def update(self, latents: torch.Tensor) -> None:
        if latents.ndim != 4:
            raise ValueError(f"expected latents (N, C, H, W), got shape {tuple(latents.shape)}")
        x = latents.detach().to(torch.float64).transpose(0, 1).flatten(1)  # (C, N*H*W)
        n = x.shape[1]
        if n == 0:
            return
        mean = x.mean(dim=1)
        self.merge(n, mean, ((x - mean[:, None]) ** 2).sum(dim=1))

    def merge(self, n: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        """Add a block of `n` values per channel given by its per-channel mean and sum of squared deviations."""
        if n == 0:
            return
        mean, m2 = torch.as_tensor(mean, dtype=torch.float64), torch.as_tensor(m2, dtype=torch.float64)
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        if mean.shape != self.mean.shape:
            raise ValueError(f"latents with {mean.numel()} channels after {self.mean.numel()}")
        total = self.count + n
        delta = mean - self.mean.to(mean.device)
        self.mean = self.mean.to(mean.device) + delta * (n / total)
        self.m2 = self.m2.to(mean.device) + m2 + delta**2 * (self.count * n / total)
        self.count = total

    def result(self, unbiased: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std), each (1, C, 1, 1) float32. `unbiased` divides by count - 1, as `torch.std` (LightningDiT's
        latents_stats.pt) does."""
        if self.mean is None or self.count < 2:
            raise ValueError("latent statistics need at least two values per channel")
        var = self.m2 / (self.count - 1 if unbiased else self.count)
        shape = (1, -1, 1, 1)
        return self.mean.float().view(shape).cpu(), var.sqrt().float().view(shape).cpu()


def save_latent_stats(path: str | Path, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Write {'mean', 'std'} tensors of shape (1, C, 1, 1): the layout of LightningDiT's latents_stats.pt."""
    torch.save({"mean": mean.detach().cpu().float(), "std": std.detach().cpu().float()}, Path(path))


def stats_beside(vae: str | Path) -> str | None:
    """A released statistics file next to a VAE's weights (the file's folder, or the diffusers folder itself):
    latents_stats.pt (LightningDiT's VA-VAE) or *latents-stats.pt (REPA-E's E2E-VAEs); None for a hub id or when
    there is none."""
    path = Path(vae).expanduser()
    folder = path.parent if path.is_file() else path if path.is_dir() else None
    if folder is None:
        return None
    found = sorted(folder.glob("latents_stats.pt")) + sorted(folder.glob("*latents-stats.pt"))
    return str(found[0]) if found else None


def read_latent_stats(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std), each (1, C, 1, 1), from a latents_stats.pt ({'mean', 'std'}), read without running code from it
    (ValueError naming the file for one that holds anything but tensors and plain values)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"latent statistics not found at {path} (LightningDiT publishes latents_stats.pt "
                                "beside the VA-VAE weights, or compute them with latent_codecs.LatentStats)")
    stats = load_plain_file(path, "a latent statistics file: {'mean', 'std'} tensors saved with torch.save")
    if not isinstance(stats, dict) or not {"mean", "std"} <= stats.keys():
        raise ValueError(f"{path} is not a latent statistics file: expected a dict with 'mean' and 'std'")
    mean, std = (torch.as_tensor(stats[k]).float() for k in ("mean", "std"))
    if mean.ndim == 1:
        mean, std = mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)
    if mean.shape != std.shape or mean.ndim != 4 or mean.shape[0] != 1 or mean.shape[2:] != (1, 1):
        raise ValueError(f"{path}: expected mean and std of shape (1, C, 1, 1), got {tuple(mean.shape)} and "
                         f"{tuple(std.shape)}")
    if not bool((std > 0).all()):
        raise ValueError(f"{path}: the std has a channel that is not positive")
    return mean, std


def normalize(z: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, multiplier: float = 1.0) -> torch.Tensor:
    """Tokenizer latent -> diffusion space, LightningDiT's way: (z - mean) / std * multiplier."""
    return (z - mean.to(z)) / std.to(z) * multiplier


def denormalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, multiplier: float = 1.0) -> torch.Tensor:
    """Diffusion space -> tokenizer latent: x / multiplier * std + mean (the inverse of `normalize`)."""
    return x / multiplier * std.to(x) + mean.to(x)
