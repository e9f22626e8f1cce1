#!/usr/bin/env bash
# Several nodes from a hostfile (see scripts/hostfile.example). Two ways:
#
# 1. passwordless ssh from the first node: DeepSpeed starts every node
#      HOSTFILE=hostfile bash scripts/launch_multinode.sh pretrain pretrain_tiny
# 2. no ssh (containers, schedulers): run this on every node with its NODE_RANK
#      NO_SSH=1 NODE_RANK=0 MASTER_ADDR=node-001 HOSTFILE=hostfile bash scripts/launch_multinode.sh pretrain ...
#      NO_SSH=1 NODE_RANK=1 MASTER_ADDR=node-001 HOSTFILE=hostfile bash scripts/launch_multinode.sh pretrain ...
#    or with torchrun on every node:
#      torchrun --nnodes 2 --node_rank R --nproc_per_node 8 --master_addr node-001 --master_port 29500 -m vlmoe pretrain ...
# run_dir must be on a filesystem every node sees: rank 0 commits checkpoints there.
set -euo pipefail
HOSTFILE=${HOSTFILE:?path to a hostfile}
MASTER_PORT=${MASTER_PORT:-29500}
if [ -n "${NO_SSH:-}" ]; then
  exec deepspeed --hostfile "$HOSTFILE" --no_ssh --node_rank "${NODE_RANK:?}" --master_addr "${MASTER_ADDR:?}" \
       --master_port "$MASTER_PORT" --module vlmoe "$@"
fi
exec deepspeed --hostfile "$HOSTFILE" --master_port "$MASTER_PORT" --module vlmoe "$@"
