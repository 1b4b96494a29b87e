"""The manifest's "normalization" entry (how latents become the model's input): chosen from the flags, with per-channel
moments recorded per shard and merged into the channel-wise mean and std at the end."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

from cli import UsageError
from latent_codecs import LatentStats, read_latent_stats, stats_beside


def resolve_normalisation(args: argparse.Namespace, channels: int) -> dict:
    """The manifest's "normalization" entry: {"type": "scale"} (SD-VAE's (z + shift) * scale), or
    {"type": "channelwise", "stats": "compute" or a file, "multiplier", and "mean" / "std" when read from a file}."""
    mode, beside = args.latent_norm, stats_beside(args.vae)
    if mode == "auto":
        mode = "scale" if channels == 4 and beside is None else "channelwise"
    if mode == "scale":
        return {"type": "scale"}
    if not (math.isfinite(args.latent_multiplier) and args.latent_multiplier > 0):
        raise UsageError(f"--latent-multiplier {args.latent_multiplier}: must be a positive number")
    source = args.latent_stats
    if source == "auto":
        source = beside or "compute"
    out = {"type": "channelwise", "stats": source, "multiplier": args.latent_multiplier}
    if source != "compute":
        try:
            mean, std = read_latent_stats(source)
        except (OSError, KeyError, ValueError, RuntimeError) as e:
            raise UsageError(f"--latent-stats {source}: {e}") from e
        if mean.shape[1] != channels:
            raise UsageError(f"--latent-stats {source}: statistics of {mean.shape[1]} channels, but --vae {args.vae} "
                             f"gives {channels}")
        out.update(mean=mean.flatten().tolist(), std=std.flatten().tolist())
    return out


def channel_moments(mean: np.ndarray, std: np.ndarray) -> dict:
    """Per-channel moments of the posterior samples z = mean + std * eps of a block of latents (N, C, H, W):
    count (values per channel), the mean of `mean`, the sum of squared deviations of `mean` (m2), and the sum of
    std^2 (the expected squared noise). Merged over shards by `merge_moments`; in float64."""
    m = mean.astype(np.float64).transpose(1, 0, 2, 3).reshape(mean.shape[1], -1)
    s = std.astype(np.float64).transpose(1, 0, 2, 3).reshape(std.shape[1], -1)
    mu = m.mean(axis=1) if m.shape[1] else np.zeros(m.shape[0])
    return {"count": int(m.shape[1]), "mean": mu.tolist(), "m2": ((m - mu[:, None]) ** 2).sum(axis=1).tolist(),
            "noise": (s**2).sum(axis=1).tolist()}


def merge_moments(parts: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) per channel of the posterior samples over all parts: mean = E[mean], var = Var(mean) (with
    count - 1, as torch.std) + E[std^2]. The means and m2 are merged by latent_codecs.LatentStats (Chan et al.)."""
    stats, noise = LatentStats(), 0.0
    for part in parts:
        stats.merge(part["count"], part["mean"], part["m2"])
        noise = noise + np.asarray(part["noise"], dtype=np.float64)
    if stats.mean is None or stats.count < 2:
        raise UsageError("channel-wise latent statistics need at least two latent values per channel")
    return stats.mean.numpy(), np.sqrt(stats.m2.numpy() / (stats.count - 1) + noise / stats.count)


def final_normalization(normalization: dict, moments: list[dict | None], dest: Path) -> dict:
    """The complete manifest's entries for channel-wise normalisation: "normalization" with its per-channel mean and
    std (merged from the shards' `moments` when computed), and the "scale" and "shift" that apply it; none for
    "scale" normalisation, whose entries the manifest already holds."""
    if normalization["type"] != "channelwise":
        return {}
    norm = dict(normalization)
    if norm["stats"] == "compute":
        if None in moments:
            raise UsageError(f"a shard sidecar in {dest} predates the latent statistics; rerun with --overwrite")
        mean, std = merge_moments(moments)
        norm.update(mean=mean.tolist(), std=std.tolist(), count=sum(m["count"] for m in moments))
    mean, std = np.asarray(norm["mean"]), np.asarray(norm["std"])
    return {"normalization": norm, "scale": (norm["multiplier"] / std).tolist(), "shift": (-mean).tolist()}
