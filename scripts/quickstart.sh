#!/usr/bin/env bash
# The main job on a fresh machine: install, prepare the embedded real data, pretrain the tiny
# multiway model with masked data modeling (MLM, MIM, VLM) on 2 ranks (CPU: gloo; GPU: nccl).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
VENV=${VLMOE_VENV:-.venv}
export PATH="$PWD/$VENV/bin:$PATH"
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/$VENV/torch_extensions}
CONFIG=${CONFIG:-pretrain_tiny}
# prepared data is reused (an interrupted prepare resumes); delete data/default to prepare again
[ -f data/default/manifest.json ] || vlmoe prepare "$CONFIG"
deepspeed --num_gpus "${NUM_RANKS:-2}" --master_port "${MASTER_PORT:-29511}" --module vlmoe pretrain "$CONFIG" "$@"
