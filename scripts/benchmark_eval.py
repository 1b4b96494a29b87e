"""Evaluation speed: Inception features from a streamed .npz (images/s), one FID (sqrtm) and precision/recall.

    python scripts/benchmark_eval.py --device cuda --images 5000 --batch-size 250 --pr-sizes 10000 50000 \
        --out benchmarks/results/eval_h100.json

Weights: the real file when one is found (--inception-weights, $VAE_REPA_INCEPTION_WEIGHTS, torch.hub's cache),
else random weights of the same shapes (the timing is the same). The estimate for a 50K-sample run against a
10K-image ADM reference adds 60K images of features, two Frechet distances and precision/recall at the measured
sizes (measure 10000 x 50000 for a real estimate).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cli  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.parser(__doc__)
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--images", type=int, default=16, help="images to run through Inception (default: 16)")
    parser.add_argument("--resolution", type=int, default=256, help="image side in pixels (default: 256)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default: 8)")
    parser.add_argument(
        "--pr-sizes",
        type=int,
        nargs=2,
        default=[2000, 2000],
        metavar=("REF", "SAMPLES"),
        help="feature counts for the precision/recall timing (default: 2000 2000; ADM's run: 10000 50000)",
    )
    parser.add_argument("--skip-fid", action="store_true", help="do not time the 2048-dim Frechet distance")
    parser.add_argument("--inception-weights", default=None, help="weights file (default: see above)")
    parser.add_argument("--out", default=None, help="append the result to this JSON file (default: print only)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    parse_args()  # --help and usage errors answer here, before the slow imports below (main parses again)

import numpy as np  # noqa: E402
import scipy  # noqa: E402
import torch  # noqa: E402

from evaluations.data import open_images  # noqa: E402
from evaluations.inception import (  # noqa: E402
    InceptionFeatures,
    default_device,
    extract_features,
    resolve_weights,
    write_random_weights,
)
from evaluations.metrics import FIDStatistics, frechet_distance, precision_recall  # noqa: E402


def machine_info() -> dict:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device) if args.device else default_device()
    run: dict = {"device": str(device), "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg()}
    rng = np.random.default_rng(0)

    with tempfile.TemporaryDirectory() as tmp:
        weights = resolve_weights(args.inception_weights)
        run["weights"] = "real" if weights else "random (same shapes)"
        weights = weights or write_random_weights(Path(tmp) / "random.pth")
        model = InceptionFeatures(weights).to(device)
        images = rng.integers(0, 256, (args.images, args.resolution, args.resolution, 3), dtype=np.uint8)
        np.savez(Path(tmp) / "batch.npz", arr_0=images)
        extract_features(model, open_images(images[: args.batch_size]), batch_size=args.batch_size, progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        extract_features(model, open_images(Path(tmp) / "batch.npz"), batch_size=args.batch_size, progress=False)
        seconds = time.perf_counter() - start
    run.update(images=args.images, resolution=args.resolution, batch_size=args.batch_size)
    run["features_images_per_s"] = args.images / seconds

    if not args.skip_fid:
        a, b = (rng.standard_normal((2048, 4096)) for _ in range(2))
        stats = [FIDStatistics(rng.standard_normal(2048), x @ x.T / 4096) for x in (a, b)]
        start = time.perf_counter()
        frechet_distance(*stats)
        run["frechet_distance_2048_seconds"] = time.perf_counter() - start

    n_ref, n_sample = args.pr_sizes
    ref, sample = rng.random((n_ref, 2048), np.float32), rng.random((n_sample, 2048), np.float32)
    start = time.perf_counter()
    precision_recall(ref, sample, device=device)
    run["pr_sizes"] = [n_ref, n_sample]
    run["precision_recall_seconds"] = time.perf_counter() - start

    if not args.skip_fid:
        run["estimated_50k_run_seconds"] = (
            60000 / run["features_images_per_s"] + 2 * run["frechet_distance_2048_seconds"]
            + run["precision_recall_seconds"]
        )
    print(json.dumps(run, indent=1))
    if args.out:
        path = Path(args.out)
        record = json.loads(path.read_text()) if path.exists() else {"machine": machine_info(), "runs": []}
        record["runs"].append(run)
        path.write_text(json.dumps(record, indent=1) + "\n")
    return run


if __name__ == "__main__":
    main()
