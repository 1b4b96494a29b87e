"""Train SiT on pre-extracted VAE latents, vanilla or with alignment methods (VAE-REPA, REPA, SRA, or a set of
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

import alignment
from checkpoints import TRUST_FLAG, TRUST_HELP
from common import UsageError
from loss import PATH_TYPES, WEIGHTINGS
from models import MODEL_NAMES
from training import evaluation
from training.loop import train


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--data-dir", required=True, help="latent dataset folder (preprocessing/ output or REPA's layout)")
    g.add_argument("--output-dir", default="runs", help="parent folder of run directories")
    g.add_argument("--exp-name", default=None, help="run directory name (default: <model>-<vae-repa|vanilla>)")
    g.add_argument("--resume", default=None,
                   help="'latest' to continue the run in <output-dir>/<exp-name>, or a checkpoint path")
    g.add_argument(TRUST_FLAG, action="store_true", help=f"--resume: {TRUST_HELP}")
    g.add_argument("--seed", type=int, default=0, help="global seed (model init, data order, noise)")
    g.add_argument("--report-to", choices=("none", "wandb", "tensorboard"), default="none",
                   help="experiment tracker; wandb honours WANDB_MODE=offline and needs no account then")
    g.add_argument("--logging-steps", type=int, default=100, help="log losses, grad norm and throughput every N steps")
    g.add_argument("--checkpointing-steps", type=int, default=10000, help="write a checkpoint every N steps")
    g.add_argument("--keep-last", type=int, default=2, help="retain the newest N checkpoints ...")
    g.add_argument("--keep-every", type=int, default=50000,
                   help="... and every checkpoint whose step is a multiple of this (0: none)")
    g.add_argument("--sampling-steps", "--sample-every", dest="sample_every", type=int, default=10000,
                   help="save a sample grid from the EMA model every N steps (0: never; REPA's --sampling-steps)")
    g.add_argument("--sample-grid-size", type=int, default=16, help="images in the sample grid")
    g.add_argument("--sample-grid-steps", type=int, default=50, help="Euler ODE steps for the sample grid")

    g = p.add_argument_group("model")
    g.add_argument("--model", choices=MODEL_NAMES, default="SiT-B/2", help="architecture")
    g.add_argument("--depth", type=int, default=None, help="override the number of blocks (small experiments)")
    g.add_argument("--hidden-size", type=int, default=None, help="override the hidden size (small experiments)")
    g.add_argument("--num-heads", type=int, default=None, help="override the attention heads (small experiments)")
    g.add_argument("--qk-norm", action="store_true", help="LayerNorm on queries and keys")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")

    g = p.add_argument_group("objective")
    g.add_argument("--path-type", choices=PATH_TYPES, default="linear", help="interpolant")
    g.add_argument("--prediction", choices=("v",), default="v", help="model output (velocity)")
    g.add_argument("--weighting", choices=WEIGHTINGS, default="uniform",
                   help="training time distribution: uniform; lognormal (REPA's: log sigma ~ N(0, 1)); "
                        "lognormal-edm (EDM's: log sigma ~ N(-1.2, 1.2^2)); sigma = noise-to-signal ratio")
    g.add_argument("--cfg-prob", type=float, default=0.1, help="label dropout probability for CFG")

    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=256, help="global batch size (all GPUs, all accumulation steps)")
    g.add_argument("--gradient-accumulation-steps", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--max-train-steps", type=int, default=400000, help="optimizer steps to train for")
    g.add_argument("--learning-rate", type=float, default=1e-4, help="AdamW learning rate (constant)")
    g.add_argument("--adam-beta1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--adam-beta2", type=float, default=0.999, help="AdamW beta2")
    g.add_argument("--adam-epsilon", type=float, default=1e-8, help="AdamW epsilon")
    g.add_argument("--adam-weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm (0: off)")
    g.add_argument("--ema-decay", type=float, default=0.9999, help="EMA decay per optimizer step")
    g.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="bf16", help="autocast precision")
    g.add_argument("--allow-tf32", action=argparse.BooleanOptionalAction, default=True,
                   help="TF32 matmuls on Ampere and newer GPUs")
    g.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="where to train (default: cuda when a GPU is visible, else cpu); each process takes the GPU "
                        "of its local rank, and several processes on the CPU form a gloo group")
    g.add_argument("--deterministic", action="store_true",
                   help="bitwise-reproducible CUDA kernels (deterministic algorithms, fixed cuBLAS workspace, math "
                        "attention), so that a resumed run equals an uninterrupted one on the same GPUs; slower")
    g.add_argument("--num-workers", type=int, default=4, help="data loader workers per process")
    g.add_argument("--in-memory", action="store_true", help="load the latent shards into RAM")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True,
                   help="use the flipped-image latents (probability 0.5) when the dataset has them")
    alignment.add_arguments(p)
    evaluation.add_arguments(p)
    args = p.parse_args(argv)
    args.notes = alignment.resolve_args(args, argv, p.error)
    if args.exp_name is None:
        args.exp_name = f"{args.model.replace('/', '-')}-{'+'.join(args.align) or 'vanilla'}"
    for name in ("batch_size", "gradient_accumulation_steps", "max_train_steps", "checkpointing_steps",
                 "logging_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive")
    evaluation.check_arguments(args, p.error)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        train(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
