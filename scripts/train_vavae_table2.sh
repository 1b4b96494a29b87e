#!/usr/bin/env bash
# Table 2's last rows: VAVAE (FID 4.9 at 400K iterations) and VAVAE + VAE-REPA (4.4), without guidance.
#   METHODS=none      the VAVAE row
#   METHODS=vae-repa  + VAE-REPA (head after block 8: 32 values per token, VA-VAE's channels at patch 1)
# Global batch 256 on 8 GPUs, 400K steps, a checkpoint every 100K for the FIDs at 100K / 200K / 400K (see
# scripts/sample_vavae_table2.sh).
#
# Which backbone: the paper gives 675M parameters and cites VAVAE (Yao & Wang, 2025), whose model is
# LightningDiT-XL/1; SiT-XL/1 has the same size. We read it as LightningDiT-XL/1 trained with LightningDiT's recipe
# (logit-normal time, velocity cosine term, AdamW beta2 0.95, lr 2e-4, clipping at 1): that paper reports FID 5.14
# without guidance after 64 epochs, and 400K steps at batch 256 are 80 epochs, in line with the row's 4.9.
# The other reading is one variable away: MODEL=SiT-XL/1 RECIPE=sit (uniform time, no cosine term, beta2 0.999,
# lr 1e-4: the paper's SiT settings).
#
# Data: encode ImageNet with the VA-VAE file (channel-wise statistics from latents_stats.pt beside it):
#   torchrun --nproc-per-node 8 -m preprocessing.encode --source ImageNet/train --dest data/imagenet256-vavae \
#       --vae vae/vavae-imagenet256-f16d32-dinov2.pt --flip
# (download vavae-imagenet256-f16d32-dinov2.pt and latents_stats.pt from the Hugging Face repository
# hustvl/vavae-imagenet256-f16d32-dinov2 into vae/). Resume an interrupted run by re-running this script.
set -euo pipefail
LAUNCHER_TOOL=train.py
source "$(dirname "${BASH_SOURCE[0]}")/launcher_lib.sh"  # --help, run names, resuming
launcher_help "$@"
DATA=${DATA:-data/imagenet256-vavae}
GPUS=${GPUS:-8}
MODEL=${MODEL:-LightningDiT-XL/1}
METHODS=${METHODS:-vae-repa}
RECIPE=${RECIPE:-lightningdit}
STEPS=${STEPS:-400000}
case "$RECIPE" in
    lightningdit) OBJECTIVE=(--weighting logit-normal --cos-loss-coeff 1 --adam-beta2 0.95 --learning-rate 2e-4) ;;
    sit) OBJECTIVE=(--weighting uniform --cos-loss-coeff 0 --adam-beta2 0.999 --learning-rate 1e-4) ;;
    *) echo "RECIPE must be lightningdit or sit, got $RECIPE" >&2; exit 2 ;;
esac
OLD_NAME=vavae-$(echo "$MODEL" | tr '/' '-' | tr 'A-Z' 'a-z')-$RECIPE-$(echo "$METHODS" | tr ',' '+')
run_args "vavae-$RECIPE-$(default_name "$MODEL" "$METHODS")" "$OLD_NAME" "$@"

accelerate launch --multi_gpu --num_processes "$GPUS" train.py --model "$MODEL" --data-dir "$DATA" \
    --align "$METHODS" "${OBJECTIVE[@]}" --max-grad-norm 1.0 --batch-size 256 --max-train-steps "$STEPS" \
    --checkpointing-steps 100000 --keep-every 100000 "${RUN_ARGS[@]}" "$@"
