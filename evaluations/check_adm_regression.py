"""Check that evaluations/ reproduces the figure ADM's README publishes for its ImageNet 256 ADM-G + ADM-U batch."""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: python evaluations/check_adm_regression.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import time

import cli
from evaluations import DEFAULT_BATCH_SIZE, DEFAULT_WORKERS

BATCHES_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/"
REF_FILE = "VIRTUAL_imagenet256_labeled.npz"
SAMPLE_FILE = "admnet_guided_upsampled_imagenet256.npz"

# openai/guided-diffusion, evaluations/README.md: evaluator.py on REF_FILE and SAMPLE_FILE prints these.
ADM_PUBLISHED = {
    "inception_score": 215.8370361328125,
    "fid": 3.9425574129223264,
    "sfid": 6.140433703346162,
    "precision": 0.8265,
    "recall": 0.5309,
}
# Our bounds for "reproduced" (not ADM's): PyTorch vs TensorFlow convolutions and the emulated float16
# distances may move the last digits, but not more. Precision/recall steps are 1/50000 and 1/10000.
TOLERANCE = {"inception_score": 0.2, "fid": 0.01, "sfid": 0.02, "precision": 0.002, "recall": 0.002}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.parser(
        f"Score ADM's sample batch {SAMPLE_FILE} against its reference batch {REF_FILE} (both from\n"
        f"{BATCHES_URL})\nand compare with the numbers ADM's README publishes. Exit status 0 when all five "
        "metrics are within tolerance.",
        prog="python -m evaluations.check_adm_regression",
    )
    parser.add_argument("ref", nargs="?", default=REF_FILE, help="path to %(default)s (default: %(default)s)")
    parser.add_argument("sample", nargs="?", default=SAMPLE_FILE, help="path to %(default)s (default: %(default)s)")
    parser.add_argument(
        "--inception-weights", default=None, metavar="PATH", help="as for evaluations.evaluator (default: the same)"
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument(
        "--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="images per forward pass (default: %(default)s)"
    )
    parser.add_argument(
        "--num-workers", type=int, default=DEFAULT_WORKERS, help="image decoding workers (default: %(default)s)"
    )
    parser.add_argument("--out", default=None, help="also write the comparison as JSON here (default: do not)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from evaluations import scoring  # torch is imported from here on
    from evaluations.data import EvaluationError

    for path, name in ((args.ref, REF_FILE), (args.sample, SAMPLE_FILE)):
        if not Path(path).is_file():
            print(f"error: {path} not found; download it from {BATCHES_URL}{name}", file=sys.stderr)
            return 2
    started = time.time()
    try:
        stored = scoring.read_reference_stats(args.ref)
        if stored is None:
            raise EvaluationError(f"{args.ref} holds no mu/sigma/mu_s/sigma_s: not ADM's reference batch")
        result = scoring.evaluate(
            args.ref,
            args.sample,
            inception_weights=args.inception_weights,
            device=args.device,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
        )
    except EvaluationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    rows = []
    print(f"{'metric':<16}{'ADM (TensorFlow)':>20}{'ours':>20}{'difference':>14}{'tolerance':>11}  ok")
    for name, adm in ADM_PUBLISHED.items():
        ours = result[name]
        ok = ours is not None and abs(ours - adm) <= TOLERANCE[name]
        rows.append({"metric": name, "adm": adm, "ours": ours, "tolerance": TOLERANCE[name], "ok": ok})
        print(f"{name:<16}{adm:>20.6f}{ours:>20.6f}{ours - adm:>+14.6f}{TOLERANCE[name]:>11}  {'yes' if ok else 'NO'}")
    # mixed_6/conv is read after its ReLU, so ADM's stored spatial mean cannot be negative; this checks the
    # pre/post-activation reading of the TF graph against ADM's own numbers.
    mu_s_min = float(stored[1].mu.min())
    relu_ok = mu_s_min >= 0
    print(f"reference mu_s >= 0 (sFID features are post-ReLU): min {mu_s_min:.6g}  {'yes' if relu_ok else 'NO'}")
    passed = relu_ok and all(row["ok"] for row in rows)
    print(f"{'PASS' if passed else 'FAIL'} in {time.time() - started:.0f} s on {result['device']}")
    if args.out:
        record = {"passed": passed, "metrics": rows, "mu_s_min": mu_s_min, "result": result}
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
