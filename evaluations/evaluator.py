"""Score a sample batch against a reference batch with ADM's metrics: Inception Score, FID, sFID, precision, recall."""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: python evaluations/evaluator.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import os
import platform
import time
from typing import NamedTuple

import cli
from evaluations import DEFAULT_BATCH_SIZE, DEFAULT_REF_PR_IMAGES, DEFAULT_WORKERS, INCEPTION_WEIGHTS_ENV

ADM_STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


def build_parser() -> argparse.ArgumentParser:
    """The command line (no torch import: `--help` and usage errors answer at once)."""
    parser = cli.parser(
        "Inception Score, FID, sFID, precision and recall of a sample batch against a reference batch, as OpenAI's\n"
        "ADM evaluator computes them, in PyTorch. Prints the metrics like ADM and writes them as JSON.",
        prog="python -m evaluations.evaluator",
    )
    parser.add_argument(
        "ref",
        help="reference batch: ADM's .npz (e.g. VIRTUAL_imagenet256_labeled.npz, whose stored mu/sigma/mu_s/sigma_s "
        "are used), or an .npz with arr_0 (N, H, W, 3) uint8, or a folder of images",
    )
    parser.add_argument("sample", help="sample batch: .npz with arr_0 (N, H, W, 3) uint8, or a folder of images")
    parser.add_argument(
        "--out",
        default=None,
        help="JSON file for the metrics (default: SAMPLE.metrics.json beside the samples, e.g. samples.npz -> "
        "samples.metrics.json). An existing file is an error unless --overwrite is given.",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing --out / --save-ref files")
    parser.add_argument(
        "--save-ref",
        default=None,
        metavar="PATH",
        help="when the reference is images, also save its statistics and its precision/recall images as an "
        "ADM-format .npz at PATH, for reuse as REF (default: do not save)",
    )
    parser.add_argument(
        "--ref-pr-images",
        type=int,
        default=DEFAULT_REF_PR_IMAGES,
        help="when the reference is images, how many of them (evenly spaced) serve for precision/recall and "
        "--save-ref; statistics always use all of them (default: %(default)s, as ADM's reference batches)",
    )
    parser.add_argument(
        "--inception-weights",
        default=None,
        metavar="PATH",
        help=f"torch-fidelity's weights-inception-2015-12-05-6726825d.pth (default: ${INCEPTION_WEIGHTS_ENV} if set, "
        "else torch.hub's cache, else downloaded there by torch-fidelity)",
    )
    parser.add_argument(
        "--device", default=None, help="torch device, e.g. cuda, cuda:1, cpu (default: cuda when available, else cpu)"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help="images per Inception forward pass; does not change the results (default: %(default)s)",
    )
    parser.add_argument(
        "--num-workers",
        type=int,
        default=DEFAULT_WORKERS,
        help="processes decoding image files of a folder input (default: %(default)s)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars or status messages")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


if __name__ == "__main__":
    parse_args()  # --help and usage errors answer here, before torch is imported

import numpy as np
import scipy
import torch
import torch_fidelity

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
from integrity import write_text


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


def default_output_path(sample: str | os.PathLike) -> Path:
    """samples.npz -> samples.metrics.json; a folder samples/ -> samples.metrics.json beside it."""
    path = Path(sample)
    if path.suffix.lower() == ".npz":
        return path.with_suffix(".metrics.json")
    return path.parent / f"{path.name}.metrics.json"


def write_json(path: Path, record: dict) -> None:
    write_text(path, json.dumps(record, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out) if args.out else default_output_path(args.sample)
    started = time.time()
    try:
        for path in (out, args.save_ref):
            if path is None:
                continue
            if Path(path).exists() and not args.overwrite:
                raise EvaluationError(f"{path} exists; pass --overwrite to replace it (or --out for another name)")
            if not Path(path).resolve().parent.is_dir():
                raise EvaluationError(f"the folder of {path} does not exist")
        result = evaluate(
            args.ref,
            args.sample,
            inception_weights=args.inception_weights,
            device=args.device,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            save_ref=args.save_ref,
            ref_pr_images=args.ref_pr_images,
            verbose=not args.quiet,
        )
    except EvaluationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    print("Inception Score:", result["inception_score"])
    print("FID:", result["fid"])
    print("sFID:", result["sfid"])
    print("Precision:", "n/a (no reference images)" if result["precision"] is None else result["precision"])
    print("Recall:", "n/a (no reference images)" if result["recall"] is None else result["recall"])
    record = {
        **result,
        "ref": str(args.ref),
        "sample": str(args.sample),
        "seconds": round(time.time() - started, 1),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_fidelity": torch_fidelity.__version__,
            "numpy": np.__version__,
            "scipy": scipy.__version__,
        },
    }
    write_json(out, record)
    if not args.quiet:
        print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
