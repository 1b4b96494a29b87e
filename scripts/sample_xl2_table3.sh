#!/usr/bin/env bash
# Table 3 sampling setting (guided FID of SiT-XL/2 + VAE-REPA): 50K samples, Euler-Maruyama SDE, 250 steps,
# random labels and REPA's pixel rounding, as in REPA's protocol. The guidance, CFG 1.8 applied for t <= 0.7,
# is REPA's (its README's guided setting, also in SRA's scripts): the VAE-REPA paper does not state its CFG
# scale or interval. 8 GPUs: about 1-1.5 hours on H100s (an estimate).
# Then score with: python -m evaluations.evaluator VIRTUAL_imagenet256_labeled.npz <npz>
set -euo pipefail
LAUNCHER_TOOL=generate.py
source "$(dirname "${BASH_SOURCE[0]}")/launcher_lib.sh"  # --help, run names, resuming
launcher_help "$@"
CKPT=${CKPT:?set CKPT to a checkpoint file or run directory}
GPUS=${GPUS:-8}
check_gpus

torchrun --nproc_per_node "$GPUS" generate.py --ckpt "$CKPT" --mode sde --num-steps 250 \
    --cfg-scale 1.8 --guidance-low 0.0 --guidance-high 0.7 --num-fid-samples 50000 \
    --per-proc-batch-size 128 --sample-dir samples "$@"
