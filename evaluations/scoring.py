"""ADM's metrics from images to figures, as a library: a reference batch's features and statistics (computed, or
stored in ADM's .npz), a sample batch's features, and the scores (IS, FID, sFID, precision, recall). The evaluator's
command line and training's evaluation both use it."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from evaluations import DEFAULT_BATCH_SIZE, DEFAULT_REF_PR_IMAGES, DEFAULT_WORKERS
from evaluations.data import EvaluationError, NpzImageWriter, npz_keys, open_images
from evaluations.inception import (
    POOL_DIM,
    SPATIAL_DIM,
    Features,
    InceptionFeatures,
    default_device,
    extract_features,
)
from evaluations.metrics import (
    PR_NEIGHBOURS,
    FIDStatistics,
    compute_statistics,
    frechet_distance,
    inception_score,
    precision_recall,
)

ADM_STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


def read_reference_stats(path: str | os.PathLike) -> tuple[FIDStatistics, FIDStatistics] | None:
    """The (pool, spatial) statistics stored in an ADM-format reference .npz, or None if it stores none."""
    keys = npz_keys(path)
    if "mu" not in keys:
        return None
    missing = [key for key in ADM_STAT_KEYS if key not in keys]
    if missing:
        raise EvaluationError(f"{path}: has 'mu' but lacks {missing}; ADM's format stores {list(ADM_STAT_KEYS)}")
    try:  # allow_pickle=False: an object array would be unpickled, running code the file names
        with np.load(path, allow_pickle=False) as f:
            stats = FIDStatistics(f["mu"], f["sigma"]), FIDStatistics(f["mu_s"], f["sigma_s"])
    except ValueError as exc:
        raise EvaluationError(f"{path}: the statistics cannot be read ({exc})") from exc
    for (mu, sigma), dim, names in zip(stats, (POOL_DIM, SPATIAL_DIM), (("mu", "sigma"), ("mu_s", "sigma_s"))):
        if mu.shape != (dim,) or sigma.shape != (dim, dim):
            raise EvaluationError(
                f"{path}: {names[0]} {mu.shape} / {names[1]} {sigma.shape}, expected ({dim},) / ({dim}, {dim})"
            )
    return stats


def evenly_spaced(n: int, count: int) -> np.ndarray:
    """`count` indices spread evenly over range(n) (all of them when count >= n), increasing."""
    count = min(n, count)
    return np.arange(count) * n // count


def _rows_in(indices: np.ndarray, start: int, batch: np.ndarray) -> np.ndarray:
    lo, hi = np.searchsorted(indices, [start, start + len(batch)])
    return batch[indices[lo:hi] - start]


def evaluate(
    ref: str | os.PathLike | np.ndarray,
    sample: str | os.PathLike | np.ndarray,
    *,
    inception_weights: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    num_workers: int = DEFAULT_WORKERS,
    save_ref: str | os.PathLike | None = None,
    ref_pr_images: int = DEFAULT_REF_PR_IMAGES,
    verbose: bool = True,
) -> dict:
    """Inception Score (mean and std), FID, sFID, precision and recall of `sample` against `ref`.

    `sample`: an .npz with `arr_0` (N, H, W, 3) uint8, a folder of images, or such an array.
    `ref`: the same kinds, or an ADM reference .npz. When `ref` stores mu/sigma/mu_s/sigma_s they are used
    as they are and precision/recall use all its `arr_0` images (as ADM). Otherwise the statistics come from
    all reference images and precision/recall from `ref_pr_images` of them, evenly spaced; `save_ref`
    writes those statistics and images as an ADM-format .npz, so that a rerun on it gives the same numbers.
    Returns the metrics (precision/recall None when the reference has no images) and the image counts.
    """

    def log(message: str) -> None:
        if verbose:
            print(message, file=sys.stderr, flush=True)

    ref_images, ref_stats = open_reference(ref, num_workers)
    stats_stored = ref_stats is not None
    if ref_images is None:
        log(f"{ref} holds statistics but no images (arr_0): precision and recall are skipped")
    sample_images = open_images(sample, num_workers, "sample batch")
    if save_ref is not None and stats_stored:
        raise EvaluationError("save_ref: the reference is already in ADM's format, with its statistics")
    if ref_pr_images <= PR_NEIGHBOURS:
        raise EvaluationError(f"ref_pr_images must be at least {PR_NEIGHBOURS + 1}, got {ref_pr_images}")
    for name, images in (("reference batch", ref_images), ("sample batch", sample_images)):
        if images is not None and len(images) <= PR_NEIGHBOURS:
            raise EvaluationError(f"{name}: {len(images)} images; at least {PR_NEIGHBOURS + 1} are needed")

    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvaluationError(f"device {device} requested, but CUDA is not available here")
    model = InceptionFeatures(inception_weights).to(device)
    extract = dict(batch_size=batch_size, device=device, progress=verbose)
    reference = reference_features(ref_images, ref_stats, model, save_ref=save_ref, ref_pr_images=ref_pr_images,
                                   log=log, **extract)
    log(f"computing sample features ({len(sample_images)} images)...")
    sample_features = extract_features(model, sample_images, desc="samples", **extract)
    log("computing metrics...")
    return {
        **score_features(sample_features, reference, device=device),
        "num_ref_images": 0 if ref_images is None else len(ref_images),
        "inception_weights": model.weights,
        "device": str(device),
    }


class Reference(NamedTuple):
    """What scoring needs of a reference batch: its (pool, spatial) statistics, its pool features for
    precision/recall (None without images), and whether the statistics were stored in the file or computed."""

    stats: tuple[FIDStatistics, FIDStatistics]
    pr_features: np.ndarray | None
    stats_stored: bool


def reference_features(ref_images, ref_stats, model: InceptionFeatures, *, save_ref=None,
                       ref_pr_images: int = DEFAULT_REF_PR_IMAGES, log=lambda message: None, **extract) -> Reference:
    """The reference's statistics (stored ones, else computed from all its images) and precision/recall features."""
    stats_stored = ref_stats is not None
    ref_pr_features = None
    if ref_images is not None:
        keep = np.arange(len(ref_images)) if stats_stored else evenly_spaced(len(ref_images), ref_pr_images)
        writer = NpzImageWriter(save_ref, len(keep), ref_images.image_shape) if save_ref is not None else None
        try:
            log(f"computing reference features ({len(ref_images)} images)...")
            ref_features = extract_features(
                model,
                ref_images,
                desc="reference",
                on_batch=None if writer is None else lambda start, batch: writer.write(_rows_in(keep, start, batch)),
                **extract,
            )
            if not stats_stored:
                ref_stats = compute_statistics(ref_features.pool), compute_statistics(ref_features.spatial)
            if writer is not None:
                (mu, sigma), (mu_s, sigma_s) = ref_stats
                writer.close(mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
                log(f"saved the reference statistics and {len(keep)} images to {save_ref}")
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        ref_pr_features = ref_features.pool[keep]
    return Reference(ref_stats, ref_pr_features, stats_stored)


def open_reference(ref: str | os.PathLike | np.ndarray, num_workers: int = DEFAULT_WORKERS):
    """(reference images or None, stored statistics or None) of a reference batch, as `evaluate` reads it."""
    is_npz = not isinstance(ref, np.ndarray) and Path(ref).is_file() and Path(ref).suffix.lower() == ".npz"
    ref_stats = read_reference_stats(ref) if is_npz else None
    ref_images = None
    if ref_stats is None or "arr_0" in npz_keys(ref):
        ref_images = open_images(ref, num_workers, "reference batch")
    return ref_images, ref_stats


def score_features(sample_features: Features, reference: Reference, device: str | torch.device = "cpu") -> dict:
    """ADM's metrics of sample features (in sample order: IS scores contiguous splits) against a reference."""
    sample_stats = compute_statistics(sample_features.pool), compute_statistics(sample_features.spatial)
    is_mean, is_std = inception_score(sample_features.logits)
    precision = recall = None
    if reference.pr_features is not None:
        precision, recall = precision_recall(reference.pr_features, sample_features.pool, device=device)
    return {
        "inception_score": is_mean,
        "inception_score_std": is_std,
        "fid": frechet_distance(sample_stats[0], reference.stats[0]),
        "sfid": frechet_distance(sample_stats[1], reference.stats[1]),
        "precision": precision,
        "recall": recall,
        "num_samples": len(sample_features.pool),
        "num_ref_pr_images": 0 if reference.pr_features is None else len(reference.pr_features),
        "ref_stats": "stored" if reference.stats_stored else "computed",
    }
