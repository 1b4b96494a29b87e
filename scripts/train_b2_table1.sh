#!/usr/bin/env bash
# Table 1 / Table 2 (SiT-B/2, 400K steps, batch 256): vanilla SiT and VAE-REPA (alignment after block 2).
# 8 GPUs on one node. Expected: about 4-6 hours per run on 8 H100s (an estimate scaled from the paper's
# Table 4 by FLOPs; measure yours with scripts/benchmark_train.py). The runs are runs/SiT-B-2-vanilla and
# runs/SiT-B-2-vae-repa (train.py's names; RUNS picks them); re-run this script to resume them. Ablations of Table 1
# are flags given to this script, with a name of their own, e.g. RUNS=vae-repa ... --vae-repa-depth 4 --exp-name d4:
#   --vae-repa-depth 3|4|6|8   --vae-repa-t-range 0 0.5|0.5 1   --vae-repa-loss l1|l2|cosine
#   --vae-repa-coeff 0.1|0.5   --vae-repa-head-layers 2
set -euo pipefail
LAUNCHER_TOOL=train.py
source "$(dirname "${BASH_SOURCE[0]}")/launcher_lib.sh"  # --help, run names, resuming
launcher_help "$@"
DATA=${DATA:-data/imagenet256}
GPUS=${GPUS:-8}
check_gpus
COMMON=(--model SiT-B/2 --data-dir "$DATA" --batch-size 256 --max-train-steps 400000
        --checkpointing-steps 50000 --keep-every 50000 --mixed-precision bf16)

RUNS=${RUNS:-vanilla vae-repa}
if [ "$RUNS" != vanilla ] && [ "$RUNS" != vae-repa ] && [ -n "$(launcher_flag --exp-name --exp_name "$@")" ]; then
    echo "train_b2_table1.sh: --exp-name names one run: set RUNS=vanilla or RUNS=vae-repa" >&2
    exit 2
fi
for run in $RUNS; do
    case "$run" in
        vanilla) METHOD=(--no-align) ;;
        vae-repa) METHOD=(--align vae-repa --vae-repa-depth 2) ;;
        *) echo "train_b2_table1.sh: RUNS holds vanilla and/or vae-repa, got $run" >&2; exit 2 ;;
    esac
    run_args "$(default_name SiT-B/2 "${run/vanilla/none}")" "sit-b2-$run" "$@"
    accelerate launch "${LAUNCH_PROCS[@]}" train.py "${COMMON[@]}" "${METHOD[@]}" "${RUN_ARGS[@]}" "$@"
done
