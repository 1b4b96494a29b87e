"""train.py's --eval-* flags and their checks, apart from training/evaluation.py so that the command line can be built
(and --help printed) without importing torch."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from cli import CFG_CHANNELS_HELP, PIXEL_ROUNDINGS, cfg_channels


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation during training (off unless --eval-every is set)")
    g.add_argument("--eval-every", type=int, default=0,
                   help="every N steps and at the end, sample --eval-samples images from the EMA model and log FID, "
                        "sFID, IS (and precision/recall when --eval-ref holds images) to the trackers and to "
                        "metrics.jsonl; a checkpoint is written (and kept) at each such step (0: never)")
    g.add_argument("--eval-ref", default=None,
                   help="reference batch: ADM's .npz (e.g. VIRTUAL_imagenet256_labeled.npz), an .npz with arr_0 "
                        "uint8 images, or an image folder; required with --eval-every")
    g.add_argument("--eval-samples", type=int, default=10_000,
                   help="images per evaluation (default: %(default)s; the paper's tables use 50K: scripts/curves.py; "
                        "a 10K FID is higher than a 50K one)")
    g.add_argument("--eval-mode", choices=("sde", "ode"), default="sde",
                   help="sampler, as generate.py --mode (default: REPA's Euler-Maruyama SDE, the paper's protocol)")
    g.add_argument("--eval-num-steps", type=int, default=250,
                   help="sampler steps, as generate.py --num-steps (default: %(default)s)")
    g.add_argument("--eval-heun", action="store_true", help="--eval-mode ode only: Heun's corrector (default: off)")
    g.add_argument("--eval-cfg-scale", type=float, default=1.0,
                   help="classifier-free guidance scale (default 1: no guidance, the paper's Table 2 protocol)")
    g.add_argument("--eval-cfg-channels", type=cfg_channels, default="all", metavar="all|N",
                   help="as generate.py --cfg-channels: " + CFG_CHANNELS_HELP)
    g.add_argument("--eval-guidance-low", type=float, default=0.0,
                   help="guidance applies at t >= this (default: %(default)s)")
    g.add_argument("--eval-guidance-high", type=float, default=1.0,
                   help="guidance applies at t <= this (default: %(default)s)")
    g.add_argument("--eval-seed", type=int, default=0,
                   help="sample i depends only on (this seed, i), as generate.py --global-seed (default: %(default)s)")
    g.add_argument("--eval-label-sampling", choices=("random", "balanced"), default="random",
                   help="class of each sample, as generate.py --label-sampling (default: %(default)s)")
    g.add_argument("--eval-pixel-rounding", choices=PIXEL_ROUNDINGS, default="repa",
                   help="decoder output -> 8-bit pixels, as generate.py --pixel-rounding (default: %(default)s)")
    g.add_argument("--eval-batch-size", type=int, default=64,
                   help="images per sampling batch on each process; does not change the images (default: %(default)s)")
    g.add_argument("--inception-weights", default=None,
                   help="torch-fidelity's Inception weights file (default: $VAE_REPA_INCEPTION_WEIGHTS, else "
                        "torch.hub's cache, else downloaded), as evaluations/evaluator.py --inception-weights")


def check_arguments(args: argparse.Namespace, error) -> None:
    """Refuse a bad --eval-* setting at parse time, before anything is written (`error` reports and exits)."""
    if args.eval_every < 0:
        error("--eval-every must be >= 0 (0: no evaluation)")
    if args.eval_every == 0:
        return
    for flag, value, low in (("--eval-samples", args.eval_samples, 2), ("--eval-num-steps", args.eval_num_steps, 1),
                             ("--eval-batch-size", args.eval_batch_size, 1)):
        if value < low:
            error(f"{flag} must be at least {low}, got {value}")
    if args.eval_cfg_scale < 1.0:
        error("--eval-cfg-scale must be >= 1 (1: no guidance)")
    if not 0.0 <= args.eval_guidance_low <= args.eval_guidance_high <= 1.0:
        error("need 0 <= --eval-guidance-low <= --eval-guidance-high <= 1")
    if args.eval_ref is None:
        error("--eval-every needs --eval-ref (a reference batch, e.g. ADM's VIRTUAL_imagenet256_labeled.npz)")
    from evaluations.data import EvaluationError
    from evaluations.inception import resolve_weights
    from evaluations.scoring import open_reference

    ref = Path(args.eval_ref)
    if not ref.exists():
        error(f"--eval-ref {ref}: no such file or folder")
    if not os.access(ref, os.R_OK):
        error(f"--eval-ref {ref}: not readable")
    try:
        images, stats = open_reference(str(ref), num_workers=0)
    except (EvaluationError, OSError, ValueError) as e:
        error(f"--eval-ref: {e}")
    if images is not None and len(images) < 4:
        error(f"--eval-ref {ref}: {len(images)} images; at least 4 are needed")
    try:
        resolve_weights(args.inception_weights)
    except (EvaluationError, OSError, ValueError) as e:
        error(f"--inception-weights: {e}")
