#!/usr/bin/env bash
# Every downstream task x fine-tuning method on the quick start's base, one run after another, with
# the shipped configs (same data, schedule and evaluation; only the method changes), then a table of
# the validation metrics and wall-clock times (the README's table came from this script).
#   bash scripts/finetune_methods.sh                   # all tasks, methods smola-omni smola-mm lora full
#   TASKS="vqa nli" METHODS="smola-omni lora" bash scripts/finetune_methods.sh train.steps=100
# Extra arguments are overrides for every run. Full fine-tuning trains every weight of the base and
# runs at FULL_LR (default 3e-4): the adapters' 2e-3 makes the whole backbone collapse.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VLMOE_VENV:-.venv}
export PATH="$PWD/$VENV/bin:$PATH"
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/$VENV/torch_extensions}
TASKS=${TASKS:-"image_classification vqa retrieval nlvr2 nli"}
METHODS=${METHODS:-"smola-omni smola-mm lora full"}
OUT=${OUT:-runs/methods}
mkdir -p "$OUT"
for task in $TASKS; do
  for method in $METHODS; do
    case $method in
      smola-omni) args=(finetune.method=smola finetune.smola.mode=omni) ;;
      smola-mm) args=(finetune.method=smola finetune.smola.mode=mm) ;;
      lora) args=(finetune.method=lora) ;;
      full) args=(finetune.method=full "train.lr=${FULL_LR:-3e-4}") ;;
      *) echo "unknown method $method (smola-omni, smola-mm, lora, full)" >&2; exit 2 ;;
    esac
    run_dir="$OUT/$task-$method"
    start=$(date +%s)
    deepspeed --num_gpus "${NUM_RANKS:-2}" --master_port "${MASTER_PORT:-29531}" --module vlmoe finetune \
      "finetune_tiny_$task" "run_dir=$run_dir" train.progress_bar=false "${args[@]}" "$@" > "$run_dir.log" 2>&1
    echo "$(( $(date +%s) - start ))" > "$run_dir.seconds"
    echo "$task $method: $(cat "$run_dir.seconds") s"
  done
done
python - "$OUT" $TASKS -- $METHODS <<'EOF'
import json, sys
from pathlib import Path

out, rest = Path(sys.argv[1]), sys.argv[2:]
tasks, methods = rest[:rest.index("--")], rest[rest.index("--") + 1:]
main = {"retrieval": "r_mean"}
print(f"| task | metric | trivial baseline | untrained head | " + " | ".join(methods) + " |")
print("|" + "---|" * (4 + len(methods)))
for task in tasks:
    key = f"val/{main.get(task, 'accuracy')}"
    cells, start = [], {}
    for method in methods:
        run = out / f"{task}-{method}"
        records = [json.loads(line) for line in open(run / "metrics.jsonl") if key in line]
        start = start or next(r for r in records if r["step"] == 0)
        best = max(r[key] for r in records if r["step"] > 0)
        final = [r for r in records if r["step"] > 0][-1][key]
        cells.append(f"{final:.3f} (best {best:.3f}, {int((out / f'{task}-{method}.seconds').read_text())} s)")
    baseline = start[key.replace("val/", "baseline/")]
    print(f"| {task} | {key[4:]} | {baseline:.3f} | {start[key]:.3f} | " + " | ".join(cells) + " |")
EOF
