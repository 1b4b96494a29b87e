#!/usr/bin/env bash
# Table 1 / Table 2 (SiT-B/2, 400K steps, batch 256): vanilla SiT and VAE-REPA (alignment after block 2).
# 8 GPUs on one node. Expected: about 4-6 hours per run on 8 H100s (an estimate scaled from the paper's
# Table 4 by FLOPs; measure yours with scripts/benchmark_train.py). Ablations of Table 1 are flags:
#   --vae-repa-depth 3|4|6|8   --vae-repa-t-range 0 0.5|0.5 1   --vae-repa-loss l1|l2|cosine
#   --vae-repa-coeff 0.1|0.5   --vae-repa-head-layers 2
set -euo pipefail
DATA=${DATA:-data/imagenet256}
GPUS=${GPUS:-8}
COMMON=(--model SiT-B/2 --data-dir "$DATA" --batch-size 256 --max-train-steps 400000
        --checkpointing-steps 50000 --keep-every 50000 --mixed-precision bf16)

accelerate launch --multi_gpu --num_processes "$GPUS" train.py "${COMMON[@]}" --no-align --exp-name sit-b2-vanilla
accelerate launch --multi_gpu --num_processes "$GPUS" train.py "${COMMON[@]}" --align vae-repa --vae-repa-depth 2 \
    --exp-name sit-b2-vae-repa
