#!/usr/bin/env bash
# Multi-node example: 2 nodes x 8 GPUs, global batch 256 (16 per GPU). Run this on every node with
# NODE_RANK=0 on the first one and MASTER_ADDR set to its address. Identical results to one node
# require the same number of processes; resuming with a different count continues with another data order.
# The run is runs/SiT-XL-2-vae-repa, as on one node; re-run on every node to resume it.
set -euo pipefail
LAUNCHER_TOOL=train.py
source "$(dirname "${BASH_SOURCE[0]}")/launcher_lib.sh"  # --help, run names, resuming
launcher_help "$@"
DATA=${DATA:-data/imagenet256}
NNODES=${NNODES:-2}
NODE_RANK=${NODE_RANK:?set NODE_RANK (0 on the first node)}
MASTER_ADDR=${MASTER_ADDR:?set MASTER_ADDR to the first node}
MASTER_PORT=${MASTER_PORT:-29500}
run_args "$(default_name SiT-XL/2 vae-repa)" sit-xl2-vae-repa-multinode "$@"

torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node 8 \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    train.py --model SiT-XL/2 --data-dir "$DATA" --batch-size 256 --vae-repa-depth 8 \
    --max-train-steps 4000000 "${RUN_ARGS[@]}" "$@"
