#!/usr/bin/env bash
# Table 2 (and the baselines of Tables 3-4): SiT-L/2 (400K steps) or SiT-XL/2 (up to 4M steps), batch 256 on
# 8 GPUs, with the method set METHODS (train.py's --align):
#   vae-repa        VAE-REPA after block 8 (default)
#   none            vanilla SiT
#   repa            REPA: DINOv2 ViT-B/14, projector after block 8, coefficient 0.5 (REPA's defaults)
#   repa,vae-repa   Table 2's "SiT-XL/2 + REPA + VAE-REPA" rows (100K/200K/400K)
#   sra             SRA: student block 8 -> EMA teacher block 20, t_max 0.2 (SRA's XL/2 setting)
# REPA needs the images beside the latents: preprocess with --save-images. Expected on 8 H100s: L/2 about
# 11 hours for 400K steps; XL/2 + VAE-REPA about 15 hours per 400K steps (the paper's Table 4: 7.2 it/s), REPA
# and SRA about 20 hours (5.4 and 5.1 it/s); measure yours with scripts/benchmark_train.py --table4.
# Set MODEL, METHODS and STEPS as needed; the run is runs/<MODEL with - for />-<METHODS with + for ,> (none:
# vanilla), e.g. runs/SiT-XL-2-vae-repa, train.py's name. Resume an interrupted run by re-running this script.
set -euo pipefail
LAUNCHER_TOOL=train.py
source "$(dirname "${BASH_SOURCE[0]}")/launcher_lib.sh"  # --help, run names, resuming
launcher_help "$@"
DATA=${DATA:-data/imagenet256}
GPUS=${GPUS:-8}
check_gpus
MODEL=${MODEL:-SiT-XL/2}
METHODS=${METHODS:-vae-repa}
STEPS=${STEPS:-400000}
OLD_NAME=$(echo "$MODEL" | tr '/' '-' | tr 'A-Z' 'a-z')-$(echo "$METHODS" | tr ',' '+')  # before: lowercased
run_args "$(default_name "$MODEL" "$METHODS")" "$OLD_NAME" "$@"

accelerate launch "${LAUNCH_PROCS[@]}" train.py --model "$MODEL" --data-dir "$DATA" \
    --align "$METHODS" --batch-size 256 --max-train-steps "$STEPS" --checkpointing-steps 50000 \
    --keep-every 100000 "${RUN_ARGS[@]}" "$@"
