#!/usr/bin/env bash
# FIDs of a scripts/train_vavae_table2.sh run at its checkpoints, printed beside the published figure. Two protocols
# (PROTOCOL), both 50K samples with random labels, decoded by the VA-VAE the data recorded:
#   repa              (default for RECIPE=table2 runs) REPA's and the paper's: Euler-Maruyama SDE, 250 steps, no
#                     guidance, REPA's pixel rounding. Table 2's figures were measured this way.
#   lightningdit      LightningDiT's FID protocol (its configs/reproductions/lightningdit_xl_vavae_f16d32_64ep_cfg.yaml,
#                     sample section; default for RECIPE=lightningdit-64ep runs): Euler ODE on 250 grid points
#                     (249 steps), timestep shift 0.3 (1/0.3 in our time), applied with or without guidance, CFG 10 on
#                     the first 3 latent channels (its forward_with_cfg) from interval start 0.10 (t <= 0.9 here),
#                     DiT's pixel rounding. CFG=1 gives its figure without guidance (5.14 at 64 epochs).
#   lightningdit-800ep the same with its 800-epoch config's guidance: CFG 6.7 from interval start 0.125.
#   RUN=runs/vavae-table2-LightningDiT-XL-1-vae-repa REF=VIRTUAL_imagenet256_labeled.npz \
#       bash scripts/sample_vavae_table2.sh
set -euo pipefail
LAUNCHER_TOOL=generate.py
source "$(dirname "${BASH_SOURCE[0]}")/launcher_lib.sh"  # --help, run names, resuming
launcher_help "$@"
RUN=${RUN:?set RUN to a run directory of scripts/train_vavae_table2.sh}
REF=${REF:?set REF to the ADM reference batch VIRTUAL_imagenet256_labeled.npz}
GPUS=${GPUS:-8}
check_gpus
case "$RUN" in
    *-lightningdit-64ep-*) STEPS=${STEPS:-80000}; PROTOCOL=${PROTOCOL:-lightningdit} ;;
    *) STEPS=${STEPS:-"100000 200000 400000"}; PROTOCOL=${PROTOCOL:-repa} ;;
esac
case "$PROTOCOL" in
    repa) CFG=1.0; SAMPLER=(--mode sde --num-steps 250 --cfg-scale 1.0) ;;
    lightningdit | lightningdit-800ep)
        # 3.3333333333333335 is the float nearest 1/0.3 (not 3.33, another grid)
        if [ "$PROTOCOL" = lightningdit ]; then CFG=${CFG:-10.0}; HIGH=0.9; else CFG=${CFG:-6.7}; HIGH=0.875; fi
        SAMPLER=(--mode ode --num-steps 249 --time-shift 3.3333333333333335 --cfg-scale "$CFG" --cfg-channels 3
                 --guidance-low 0.0 --guidance-high "$HIGH" --pixel-rounding dit) ;;
    *) echo "PROTOCOL must be repa, lightningdit or lightningdit-800ep, got $PROTOCOL" >&2; exit 2 ;;
esac
# The published figure for this run's row, protocol and guidance, and the step it was measured at
case "$RUN:$PROTOCOL:$CFG" in
    *-lightningdit-64ep-*-vanilla:lightningdit:1 | *-lightningdit-64ep-*-vanilla:lightningdit:1.0)
        ROW="LightningDiT-XL/1, 64 epochs"; PAPER="5.14 (LightningDiT's README, no guidance)"; AT=80000 ;;
    *-lightningdit-64ep-*-vanilla:lightningdit:10 | *-lightningdit-64ep-*-vanilla:lightningdit:10.0)
        ROW="LightningDiT-XL/1, 64 epochs"; PAPER="2.11 (LightningDiT's README, CFG 10 on 3 channels)"; AT=80000 ;;
    *-lightningdit-64ep-*) ROW=$(basename "$RUN"); PAPER="- (no published figure)"; AT=none ;;
    *-vae-repa:repa:*) ROW="VAVAE + VAE-REPA"; PAPER="4.4 (paper, Table 2)"; AT=400000 ;;
    *:repa:*) ROW="VAVAE"; PAPER="4.9 (paper, Table 2)"; AT=400000 ;;
    *) ROW=$(basename "$RUN"); PAPER="- (no published figure)"; AT=none ;;
esac

for step in $STEPS; do
    ckpt=$(printf "%s/checkpoints/%07d.pt" "$RUN" "$step")
    [ -f "$ckpt" ] || { echo "step $step: no checkpoint $ckpt yet"; continue; }
    torchrun --nproc_per_node "$GPUS" generate.py --ckpt "$ckpt" "${SAMPLER[@]}" \
        --num-fid-samples 50000 --per-proc-batch-size 128 --sample-dir samples "$@" | tee /dev/stderr |
        grep -o '[^ ]*\.npz' | tail -1 > "$RUN/.last_npz"
    fid=$(python -m evaluations.evaluator "$REF" "$(cat "$RUN/.last_npz")" | awk '/^FID:/ {print $2}')
    paper="-"
    [ "$step" = "$AT" ] && paper=$PAPER
    printf '%s, %dK iterations, %s protocol, CFG %s: FID %s (ours) | %s\n' "$ROW" $((step / 1000)) "$PROTOCOL" \
        "$CFG" "$fid" "$paper"
done
