#!/usr/bin/env bash
# One machine, N ranks (GPUs; on a CPU-only machine DeepSpeed starts N CPU ranks on gloo).
#   bash scripts/launch_single_node.sh 8 pretrain pretrain_tiny train.steps=1000
# torchrun works the same way:
#   torchrun --nproc_per_node 8 -m vlmoe pretrain pretrain_tiny
set -euo pipefail
NUM_RANKS=${1:?number of ranks}; shift
exec deepspeed --num_gpus "$NUM_RANKS" --master_port "${MASTER_PORT:-29500}" --module vlmoe "$@"
