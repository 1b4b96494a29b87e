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

import cli
from evaluations import DEFAULT_BATCH_SIZE, DEFAULT_REF_PR_IMAGES, DEFAULT_WORKERS, INCEPTION_WEIGHTS_ENV


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
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--num-workers", args.num_workers, 0),
                             ("--ref-pr-images", args.ref_pr_images, 4)):  # 4: PR_NEIGHBOURS (3) + 1, metrics.py
        if value < low:
            parser.error(f"{flag} must be at least {low}, got {value}")
    return args


if __name__ == "__main__":
    parse_args()  # --help and usage errors answer here, before torch is imported

import numpy as np
import scipy
import torch
import torch_fidelity

from evaluations.data import EvaluationError
from evaluations.scoring import evaluate
from integrity import write_text


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
            if Path(path).is_dir():
                raise EvaluationError(f"{path} is a folder: --out and --save-ref name the file to write")
            if Path(path).exists() and not args.overwrite:
                raise EvaluationError(f"{path} exists; pass --overwrite to replace it (or --out for another name)")
            if not Path(path).resolve().parent.is_dir():
                raise EvaluationError(f"the folder of {path} does not exist")
            if not os.access(Path(path).resolve().parent, os.W_OK):  # a read-only file system says so too
                raise EvaluationError(f"{path}: its folder cannot be written to (the metrics would be lost at the end)")
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
