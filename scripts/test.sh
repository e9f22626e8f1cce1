#!/usr/bin/env bash
# Install what the tests need, then run them all: unit, 2-rank (gloo) and end-to-end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
VENV=${VLMOE_VENV:-.venv}
# each venv builds DeepSpeed's C++ ops into its own cache
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/$VENV/torch_extensions}
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests "$@"
