r"""Train SiT on pre-extracted VAE latents, vanilla or with alignment methods (VAE-REPA, REPA, SRA, or a set of
them); one or many GPUs, or the CPU.

    accelerate launch --multi_gpu --num_processes 8 train.py --model SiT-XL/2 --data-dir data/imagenet256
    torchrun --nproc_per_node 8 train.py --model SiT-B/2 --data-dir data/imagenet256 --no-align
    accelerate launch --multi_gpu --num_processes 8 train.py --model SiT-XL/2 --data-dir data/imagenet256 \
        --align repa,vae-repa      # REPA (DINOv2 ViT-B, needs --save-images data) with VAE-REPA on top
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import alignment  # declares the methods' flags without importing torch
import cli
from cli import MODEL_NAMES, PATH_TYPES, TRUST_FLAG, TRUST_HELP, WEIGHTINGS
from models.registry import size_problem  # torch-free
from training import eval_flags  # --eval-* flags (torch-free)


def __getattr__(name: str):
    """`train.train` and `train.UsageError`, imported on first use (they import torch)."""
    if name == "train":
        from training.loop import train
        return train
    if name == "UsageError":
        from cli import UsageError
        return UsageError
    raise AttributeError(f"module 'train' has no attribute {name!r}")


def build_parser() -> argparse.ArgumentParser:
    """The command line (no torch import: `--help` and usage errors answer at once)."""
    p = cli.parser(__doc__)
    _add_run_flags(p)
    _add_model_flags(p)
    _add_objective_flags(p)
    _add_optimisation_flags(p)
    _add_process_flags(p)
    _add_repa_other_flags(p)
    alignment.add_arguments(p)
    eval_flags.add_arguments(p)
    return p


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    """The run: data, output folder, resuming, logging, checkpoints and sample grids."""
    g = p.add_argument_group("run")
    g.add_argument("--data-dir", required=True, help="latent dataset folder (preprocessing/ output or REPA's layout)")
    g.add_argument("--output-dir", "--output_dir", dest="output_dir", default="runs",
                   help="parent folder of run directories")
    g.add_argument("--exp-name", "--exp_name", dest="exp_name", default=None,
                   help="run directory name (default: <model>-<methods, or vanilla>)")
    g.add_argument("--resume", default=None,
                   help="'latest' to continue the run in <output-dir>/<exp-name>, or a checkpoint path")
    g.add_argument("--resume-step", type=int, default=0,
                   help="REPA's flag: continue the run in <output-dir>/<exp-name> from its checkpoint of this step "
                        "(checkpoints/NNNNNNN.pt); 0 starts a new run. The same as --resume with that file")
    g.add_argument(TRUST_FLAG, action="store_true", help=f"--resume: {TRUST_HELP}")
    g.add_argument("--seed", type=int, default=0, help="global seed (model init, data order, noise)")
    g.add_argument("--report-to", choices=("none", "wandb", "tensorboard"), default="none",
                   help="experiment tracker; wandb honours WANDB_MODE=offline and needs no account then")
    g.add_argument("--tracker-project-name", default=None,
                   help="the tracker's project: wandb's project, TensorBoard's folder in the run directory (default: a "
                        "resumed run's own, else $WANDB_PROJECT for wandb, else vae-repa; recorded in args.json)")
    g.add_argument("--logging-steps", type=int, default=100, help="log losses, grad norm and throughput every N steps")
    g.add_argument("--checkpointing-steps", type=int, default=10000, help="write a checkpoint every N steps")
    g.add_argument("--keep-last", type=int, default=2, help="retain the newest N checkpoints ...")
    g.add_argument("--keep-every", type=int, default=50000,
                   help="... and every checkpoint whose step is a multiple of this (0: none)")
    g.add_argument("--sampling-steps", "--sample-every", dest="sample_every", type=int, default=10000,
                   help="save a sample grid from the EMA model every N steps (0: never; REPA's --sampling-steps)")
    g.add_argument("--sample-grid-size", type=int, default=16, help="images in the sample grid")
    g.add_argument("--sample-grid-steps", type=int, default=50, help="Euler ODE steps for the sample grid")


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    """The architecture and how it runs (compile, attention)."""
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=MODEL_NAMES, default="SiT-B/2", help="architecture")
    g.add_argument("--depth", type=int, default=None, help="override the number of blocks (small experiments)")
    g.add_argument("--hidden-size", type=int, default=None, help="override the hidden size (small experiments)")
    g.add_argument("--num-heads", type=int, default=None, help="override the attention heads (small experiments)")
    g.add_argument("--qk-norm", action=argparse.BooleanOptionalAction, default=False,
                   help="LayerNorm on queries and keys")
    g.add_argument("--fused-attn", action=argparse.BooleanOptionalAction, default=None,
                   help="REPA's flag; here attention always runs as F.scaled_dot_product_attention (fused kernels "
                        "where available, the math kernel under --deterministic), so it changes nothing (a note)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile each transformer block and head, before DDP wraps the model (default: on "
                        "with CUDA, off on the CPU and with --deterministic). On one H100, SiT-XL/2 + VAE-REPA trained "
                        "1.52x faster with the whole model compiled at a per-GPU batch of 128 (342 -> 520 img/s) and "
                        "1.47x at 32; the per-block compile is not measured on a GPU yet. The first step takes longer "
                        "while it compiles (logged as 'first step')")


def _add_objective_flags(p: argparse.ArgumentParser) -> None:
    """The training objective: interpolant, time weighting, extra loss terms, label dropout."""
    g = p.add_argument_group("objective")
    g.add_argument("--path-type", choices=PATH_TYPES, default="linear", help="interpolant")
    g.add_argument("--prediction", choices=("v",), default="v", help="model output (velocity)")
    g.add_argument("--weighting", choices=WEIGHTINGS, default="uniform",
                   help="training time distribution: uniform; lognormal (REPA's: log sigma ~ N(0, 1)); "
                        "lognormal-edm (EDM's: log sigma ~ N(-1.2, 1.2^2)); sigma = noise-to-signal ratio; "
                        "logit-normal (LightningDiT's: t = sigmoid(N(0, 1)))")
    g.add_argument("--cos-loss-coeff", type=float, default=0.0,
                   help="weight of LightningDiT's velocity cosine term, 1 - cos(v_pred, v) over channels (its configs "
                        "use 1; 0: off); logged as cos_loss")
    g.add_argument("--cfg-prob", type=float, default=0.1, help="label dropout probability for CFG")


def _add_optimisation_flags(p: argparse.ArgumentParser) -> None:
    """Batch, optimizer, EMA, precision, device, data loading."""
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=256,
                   help="images per micro-batch over all processes, as in REPA: each process takes batch-size / "
                        "processes; with accumulation an optimizer step sees batch-size x accumulation steps images")
    g.add_argument("--gradient-accumulation-steps", type=int, default=1,
                   help="micro-batches per optimizer step (multiplies the batch, as in REPA)")
    g.add_argument("--max-train-steps", type=int, default=400000, help="optimizer steps to train for")
    g.add_argument("--epochs", type=int, default=None,
                   help="REPA's flag: also stop after this many passes over the data, whichever of it and "
                        "--max-train-steps comes first (default: no limit in epochs; REPA's is 1400, which "
                        "--max-train-steps reaches first on ImageNet)")
    g.add_argument("--learning-rate", type=float, default=1e-4, help="AdamW learning rate (constant)")
    g.add_argument("--adam-beta1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--adam-beta2", type=float, default=0.999, help="AdamW beta2")
    g.add_argument("--adam-epsilon", type=float, default=1e-8, help="AdamW epsilon")
    g.add_argument("--adam-weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm (0: off)")
    g.add_argument("--ema-decay", type=float, default=0.9999, help="EMA decay per optimizer step")
    g.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="bf16", help="autocast precision")
    g.add_argument("--allow-tf32", "--tf32", dest="allow_tf32", action=argparse.BooleanOptionalAction, default=True,
                   help="TF32 matmuls on Ampere and newer GPUs (--tf32 is REPA's spelling)")
    g.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="where to train (default: cuda when a GPU is visible, else cpu); each process takes the GPU "
                        "of its local rank, and several processes on the CPU form a gloo group")
    g.add_argument("--deterministic", action="store_true",
                   help="bitwise-reproducible CUDA kernels (deterministic algorithms, fixed cuBLAS workspace, math "
                        "attention), so that a resumed run equals an uninterrupted one on the same GPUs; slower")
    g.add_argument("--num-workers", type=int, default=4, help="data loader workers per process")
    g.add_argument("--in-memory", action="store_true", help="load the latent shards into RAM")
    g.add_argument("--verify-data", action=argparse.BooleanOptionalAction, default=True,
                   help="check every shard against the sha256 in manifest.json, in the background while training "
                        "starts; a damaged shard stops the run before the next step and any checkpoint "
                        "(--no-verify-data: skip)")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="use the flipped-image latents (probability 0.5) when the dataset has them. Default: on; off "
                        "for a command recognised as REPA's or SRA's (their flags, no --align), whose code uses none")


def _add_process_flags(p: argparse.ArgumentParser) -> None:
    """How several processes share the gradients (DDP); none of these changes the model's numbers but --ddp-comm."""
    g = p.add_argument_group("processes (DDP: several GPUs or nodes)")
    g.add_argument("--ddp-bucket-cap-mb", type=float, default=25,
                   help="gradients are all-reduced in buckets of this many MB while the backward runs (DDP's default; "
                        "larger buckets: fewer, longer all-reduces)")
    g.add_argument("--ddp-static-graph", action=argparse.BooleanOptionalAction, default=False,
                   help="tell DDP that every step uses the same parameters in the same order, which lets it skip "
                        "per-step bookkeeping; leave it off when a method uses parameters only some steps")
    g.add_argument("--ddp-comm", choices=("fp32", "bf16"), default="fp32",
                   help="precision of the gradients sent between processes: bf16 halves the traffic (most useful "
                        "across nodes) and rounds each all-reduced gradient to bf16, so the run is no longer the fp32 "
                        "one bit for bit; fp32 sends them as computed")


def _add_repa_other_flags(p: argparse.ArgumentParser) -> None:
    """REPA's flags that the dataset or the run directory decides here."""
    g = p.add_argument_group("REPA's other flags (REPA's meaning)")
    g.add_argument("--resolution", type=int, default=None,
                   help="image side in pixels; the dataset fixes it, and training stops with a message when the two "
                        "disagree (default: the dataset's)")
    g.add_argument("--num-classes", type=int, default=None,
                   help="number of classes; checked against the dataset like --resolution (default: the dataset's)")
    g.add_argument("--logging-dir", default=None,
                   help="REPA's tracker folder: refused here, as the log, args.json and tracker files all go in the "
                        "run directory <output-dir>/<exp-name>")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.logging_dir is not None:
        p.error("--logging-dir: the log, args.json and tracker files go in the run directory <output-dir>/<exp-name>"
                " here; drop the flag (choose the place with --output-dir and --exp-name)")
    if args.resume_step < 0:
        p.error("--resume-step must be 0 (a new run) or a checkpoint's step")
    defaulted = {k for k in ("vae_repa_depth", "encoder_depth", "sra_student_depth", "sra_teacher_depth")
                 if getattr(args, k) is None}  # resolve_args fills them in by the model's size
    args.notes = alignment.resolve_args(args, argv, p.error)
    if args.fused_attn is not None:
        args.notes.append(f"--{'' if args.fused_attn else 'no-'}fused-attn changes nothing here: attention always "
                          "runs as F.scaled_dot_product_attention")
    if args.exp_name is None:
        args.exp_name = f"{args.model.replace('/', '-')}-{'+'.join(args.align) or 'vanilla'}"
    if args.resume_step > 0:
        if args.resume is not None:
            p.error("--resume-step and --resume both name the checkpoint to resume from: pass one")
        args.resume = os.path.join(args.output_dir, args.exp_name, "checkpoints", f"{args.resume_step:07d}.pt")
    check_ranges(args, p.error)
    problem = size_problem(args.model, args.depth, args.hidden_size, args.num_heads)
    if problem:
        p.error(problem)
    check_blocks(args, defaulted, p.error)
    eval_flags.check_arguments(args, p.error)
    return args


def check_blocks(args: argparse.Namespace, defaulted: set[str], error) -> None:
    """The methods' blocks within the model's depth (--depth if given), and VAE-REPA's time range, at parse time: a
    block past the last one used to end in a traceback, with a half-made run directory left behind."""
    from models.registry import model_config  # torch-free

    depth = args.depth if args.depth is not None else model_config(args.model)["depth"]
    of = f"{depth} blocks (--depth {depth})" if args.depth is not None else f"{depth} blocks ({args.model})"
    blocks = {"vae-repa": [("vae_repa_depth", "--vae-repa-depth")], "repa": [("encoder_depth", "--encoder-depth")],
              "sra": [("sra_student_depth", "--sra-student-depth"), ("sra_teacher_depth", "--sra-teacher-depth")]}
    for method in args.align:
        for key, flag in blocks[method]:
            value = getattr(args, key)
            if value is not None and value > depth:
                default = " (the default for this model)" if key in defaulted else ""
                error(f"{flag} {value}{default}: the model has {of}, so the block must be in [1, {depth}]")
    if "vae-repa" in args.align:
        low, high = args.vae_repa_t_range
        if not 0 <= low < high <= 1:
            error(f"--vae-repa-t-range {low:g} {high:g}: expected LOW < HIGH within [0, 1] (t = 1 is noise)")


def check_ranges(args: argparse.Namespace, error) -> None:
    """The numeric flags' ranges, checked before anything is written (a refused run leaves nothing behind)."""
    import math

    positive, non_negative, unit = (lambda v: v > 0, "positive"), (lambda v: v >= 0, "non-negative"), \
        (lambda v: 0 <= v <= 1, "in [0, 1]")
    below_one = (lambda v: 0 <= v < 1, "in [0, 1)")
    rules = {"learning_rate": positive, "adam_beta1": below_one, "adam_beta2": below_one,
             "adam_epsilon": non_negative, "adam_weight_decay": non_negative, "max_grad_norm": non_negative,
             "ema_decay": unit, "cfg_prob": unit, "seed": non_negative, "num_workers": non_negative,
             "keep_last": non_negative, "keep_every": non_negative, "sample_every": non_negative,
             "sample_grid_size": positive, "sample_grid_steps": positive, "cos_loss_coeff": non_negative,
             "batch_size": positive, "gradient_accumulation_steps": positive, "max_train_steps": positive,
             "checkpointing_steps": positive, "logging_steps": positive,
             "epochs": positive, "resolution": positive, "num_classes": positive,
             # blocks are counted from 1 (0 used to fall back to the default block silently)
             "encoder_depth": positive, "vae_repa_depth": positive, "sra_student_depth": positive,
             "sra_teacher_depth": positive,
             # a negative weight ascends the alignment loss (it trained, exit 0)
             "vae_repa_coeff": non_negative, "proj_coeff": non_negative, "sra_coeff": non_negative,
             "vae_repa_beta": non_negative, "sra_beta": non_negative, "sra_t_max": unit,
             "vae_repa_head_width": positive}  # None (unset) passes
    for name, (ok, what) in rules.items():
        value = getattr(args, name, None)
        if value is not None and not (math.isfinite(value) and ok(value)):
            flag = "--sampling-steps" if name == "sample_every" else f"--{name.replace('_', '-')}"
            error(f"{flag} must be {what}, got {value}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from cli import UsageError
    from devices import end_processes  # torch is imported from here on
    from training import guard
    from training.loop import train

    try:
        train(args)
    except (UsageError, FloatingPointError) as e:
        cli.print_error(f"error: {e}")
        guard.log_fatal(str(e), Path(args.output_dir) / args.exp_name)  # into log.txt too
        guard.discard_refused_run(getattr(args, "created_run_dir", None))  # refused before its first step
        return 2 if isinstance(e, UsageError) else 3
    finally:
        end_processes()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
