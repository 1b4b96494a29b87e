#!/usr/bin/env bash
# FID without guidance of a scripts/train_vavae_table2.sh run at 100K / 200K / 400K iterations, printed beside
# Table 2's figures. Protocol: 50K samples, random labels, Euler-Maruyama SDE with 250 steps, no guidance (REPA's
# and the paper's; LightningDiT's own choice, an Euler ODE with a timestep shift, is
# `--mode ode --time-shift 3.33`, and changes the figure). Samples are decoded by the VA-VAE the data recorded.
#   RUN=runs/vavae-lightningdit-LightningDiT-XL-1-vae-repa REF=VIRTUAL_imagenet256_labeled.npz \
#       bash scripts/sample_vavae_table2.sh
set -euo pipefail
LAUNCHER_TOOL=generate.py
source "$(dirname "${BASH_SOURCE[0]}")/launcher_lib.sh"  # --help, run names, resuming
launcher_help "$@"
RUN=${RUN:?set RUN to a run directory of scripts/train_vavae_table2.sh}
REF=${REF:?set REF to the ADM reference batch VIRTUAL_imagenet256_labeled.npz}
GPUS=${GPUS:-8}
STEPS=${STEPS:-"100000 200000 400000"}
case "$RUN" in  # the paper's Table 2 (400K only for these rows)
    *-vae-repa) PAPER_400K=4.4; ROW="VAVAE + VAE-REPA" ;;
    *) PAPER_400K=4.9; ROW="VAVAE" ;;
esac

for step in $STEPS; do
    ckpt=$(printf "%s/checkpoints/%07d.pt" "$RUN" "$step")
    [ -f "$ckpt" ] || { echo "step $step: no checkpoint $ckpt yet"; continue; }
    torchrun --nproc_per_node "$GPUS" generate.py --ckpt "$ckpt" --mode sde --num-steps 250 --cfg-scale 1.0 \
        --num-fid-samples 50000 --per-proc-batch-size 128 --sample-dir samples "$@" | tee /dev/stderr |
        grep -o '[^ ]*\.npz' | tail -1 > "$RUN/.last_npz"
    fid=$(python -m evaluations.evaluator "$REF" "$(cat "$RUN/.last_npz")" | awk '/^FID:/ {print $2}')
    paper="-"
    [ "$step" = 400000 ] && paper=$PAPER_400K
    printf '%s, %dK iterations: FID %s (ours) | %s (paper, Table 2)\n' "$ROW" $((step / 1000)) "$fid" "$paper"
done
