#!/usr/bin/env bash
# Table 2's last rows, VAVAE (FID 4.9 at 400K iterations) and VAVAE + VAE-REPA (4.4), without guidance, and
# LightningDiT's own 64-epoch run, on VA-VAE latents:
#   METHODS=none      no alignment (the VAVAE row; LightningDiT as published)
#   METHODS=vae-repa  + VAE-REPA (head after block 8: 32 values per token, VA-VAE's channels at patch 1)
# RECIPE chooses the training settings:
#   table2            (default) our reading of the Table 2 row. The paper gives only "675M, 400K iterations,
#                     FID 4.9" and cites VAVAE (Yao & Wang, 2025), whose model is LightningDiT-XL/1 (675M): we
#                     train it with LightningDiT's objective and optimizer (logit-normal time, velocity cosine term,
#                     AdamW lr 2e-4, beta2 0.95, no gradient clipping, as LightningDiT) for 400K steps at the
#                     paper's global batch of 256 (80 epochs), with a checkpoint every 100K for the FIDs at
#                     100K / 200K / 400K (scripts/sample_vavae_table2.sh). LightningDiT chose lr and beta2 for a
#                     batch of 1024: this recipe is our reading, not LightningDiT's config.
#   lightningdit-64ep LightningDiT's own reproduction config, value by value (its configs/reproductions/
#                     lightningdit_xl_vavae_f16d32_64ep_cfg.yaml; docs/lightningdit.md has the table): global batch
#                     1024, 80K steps (64 epochs), lr 2e-4, beta2 0.95, no clipping, EMA 0.9999, logit-normal time,
#                     cosine term, bf16, flips, a checkpoint every 20K. LightningDiT reports FID 5.14 without
#                     guidance and 2.11 with its guidance (scripts/sample_vavae_table2.sh PROTOCOL=lightningdit):
#                     first reproduce that with METHODS=none, then add VAE-REPA (METHODS=vae-repa, the only change).
#   sit               the other reading of the row, one variable away: MODEL=SiT-XL/1 RECIPE=sit (uniform time,
#                     no cosine term, beta2 0.999, lr 1e-4, clipping at 1: the paper's SiT settings), 400K x 256.
#
# Data: encode ImageNet with the VA-VAE file (channel-wise statistics from latents_stats.pt beside it):
#   torchrun --nproc-per-node 8 -m preprocessing.encode --source ImageNet/train --dest data/imagenet256-vavae \
#       --vae pretrained/vavae-imagenet256-f16d32-dinov2/vavae-imagenet256-f16d32-dinov2.pt --flip
# (first, where there is network: hf download hustvl/vavae-imagenet256-f16d32-dinov2
#  vavae-imagenet256-f16d32-dinov2.pt latents_stats.pt --local-dir pretrained/vavae-imagenet256-f16d32-dinov2).
# Resume an interrupted run by re-running this script.
set -euo pipefail
LAUNCHER_TOOL=train.py
source "$(dirname "${BASH_SOURCE[0]}")/launcher_lib.sh"  # --help, run names, resuming
launcher_help "$@"
DATA=${DATA:-data/imagenet256-vavae}
GPUS=${GPUS:-8}
check_gpus
MODEL=${MODEL:-LightningDiT-XL/1}
METHODS=${METHODS:-vae-repa}
RECIPE=${RECIPE:-table2}
if [ "$RECIPE" = lightningdit ]; then  # its name before the 64-epoch config was added
    echo "note: RECIPE=lightningdit is now called RECIPE=table2 (LightningDiT's own config: lightningdit-64ep)" >&2
    RECIPE=table2
fi
# LightningDiT's objective and optimizer (its configs' transport and optimizer sections, its train.py's AdamW):
LIGHTNINGDIT=(--weighting logit-normal --cos-loss-coeff 1 --path-type linear --learning-rate 2e-4 --adam-beta1 0.9
              --adam-beta2 0.95 --adam-weight-decay 0 --max-grad-norm 0 --ema-decay 0.9999 --cfg-prob 0.1)
case "$RECIPE" in
    table2)
        STEPS=${STEPS:-400000}
        RECIPE_FLAGS=("${LIGHTNINGDIT[@]}" --batch-size 256 --max-train-steps "$STEPS" --checkpointing-steps 100000
                      --keep-every 100000) ;;
    lightningdit-64ep)
        STEPS=${STEPS:-80000}
        RECIPE_FLAGS=("${LIGHTNINGDIT[@]}" --batch-size 1024 --max-train-steps "$STEPS" --checkpointing-steps 20000
                      --keep-every 20000 --seed 0 --mixed-precision bf16 --flip) ;;
    sit)
        STEPS=${STEPS:-400000}
        RECIPE_FLAGS=(--weighting uniform --cos-loss-coeff 0 --adam-beta2 0.999 --learning-rate 1e-4
                      --max-grad-norm 1.0 --batch-size 256 --max-train-steps "$STEPS" --checkpointing-steps 100000
                      --keep-every 100000) ;;
    *) echo "RECIPE must be table2, lightningdit-64ep or sit, got $RECIPE" >&2; exit 2 ;;
esac
# Runs are named as train.py names them (vavae-<recipe>-LightningDiT-XL-1-vae-repa). A run started by an earlier
# version of this script keeps its lowercase name; RECIPE=table2 was then called lightningdit and clipped gradients
# at 1, which LightningDiT does not: such a run resumes under its own name and settings.
OLD_RECIPE=$RECIPE
[ "$RECIPE" = table2 ] && OLD_RECIPE=lightningdit
OLD_NAME=vavae-$(echo "$MODEL" | tr '/' '-' | tr 'A-Z' 'a-z')-$OLD_RECIPE-$(echo "$METHODS" | tr ',' '+')
run_args "vavae-$RECIPE-$(default_name "$MODEL" "$METHODS")" "$OLD_NAME" "$@"
if [ "$RECIPE" = table2 ] && [ "${RUN_ARGS[3]}" = "$OLD_NAME" ]; then
    echo "note: $OLD_NAME was started by an earlier version of this script, with gradient clipping at 1: it keeps it" >&2
    RECIPE_FLAGS+=(--max-grad-norm 1.0)
fi

accelerate launch "${LAUNCH_PROCS[@]}" train.py --model "$MODEL" --data-dir "$DATA" \
    --align "$METHODS" "${RECIPE_FLAGS[@]}" "${RUN_ARGS[@]}" "$@"
