#!/usr/bin/env bash
# The GPU acceptance check, in one run on a CUDA machine with one or more NVIDIA GPUs (about 5-8
# minutes on one H200, most of it the data preparation when data.dir is not prepared yet):
#   1 pytest       pytest -m gpu: the CUDA-against-CPU tests (tests/test_gpu.py)
#   2 prepare      vlmoe prepare pretrain_tiny_moe, unless data.dir already holds prepared data
#   3 pretrain     sparse VL-MoE (the tiny MoE preset), bf16, 100 steps, nccl on all visible GPUs,
#                  moe.ep_size = gcd(GPUs, num_experts); its metrics.jsonl: loss finite and falling
#   4 bench_moe    scripts/bench_moe.py --device cuda (our layer / DeepSpeed's against a dense FFN)
#   5 bench_smola  scripts/bench_smola.py --device cuda (SMoLA / LoRA against the frozen linear)
# then one summary (each step PASS or FAIL with its key numbers), also written to summary.txt.
# Exit 0: all passed; 1: a step failed (its log says why); 2: refused, nothing run (no CUDA device
# visible to torch, or no torch).
#
#   bash scripts/gpu_check.sh                        # from a checkout set up by scripts/setup_env.sh
#   OUT=/tmp/gpu-check bash scripts/gpu_check.sh     # where the logs, the run and summary.txt go
#
# OUT: the output folder (default: a new temporary folder). VLMOE_VENV: the venv to use (default
# .venv; where it does not exist, python and deepspeed come from PATH, e.g. the Docker image).
# NUM_GPUS (default: every GPU torch sees), VLMOE_DATA_DIR (default data/default), STEPS (100),
# MASTER_PORT (default: a free port), STAGE_TIMEOUT_S (600: a hung stage fails instead of hanging).
set -euo pipefail

CONFIG=pretrain_tiny_moe
STAGES=(pytest prepare pretrain bench_moe bench_smola)
declare -A RESULT=() DETAIL=()

say() { echo "gpu_check: $*"; }

# Use the project's venv where there is one; a relative VLMOE_VENV is relative to the repository.
use_environment() {
  local venv=${VLMOE_VENV:-.venv}
  if [ -x "$venv/bin/python" ]; then
    venv=$(cd "$venv" && pwd)
    export PATH="$venv/bin:$PATH"
    export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$venv/torch_extensions}
  fi
  export PYTHONUNBUFFERED=1
}

# Prints the number of CUDA devices torch sees; refuses (exit 2) when there are none.
cuda_devices() {
  local count
  if ! count=$(python -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>/dev/null); then
    echo "gpu_check: refused: cannot import torch with '$(command -v python || echo python)'; run scripts/setup_env.sh first" >&2
    exit 2
  fi
  if [ "$count" -lt 1 ]; then
    local torch_info
    torch_info=$(python -c "import torch; print(f'torch {torch.__version__}, built for CUDA {torch.version.cuda}')" 2>/dev/null)
    echo "gpu_check: refused: no CUDA device visible to torch ($torch_info). This check needs a machine with" \
         "NVIDIA GPUs and a CUDA build of torch; nothing was run." >&2
    exit 2
  fi
  echo "$count"
}

# run_logged LOG CMD...: the command's output to LOG, bounded by STAGE_TIMEOUT_S; returns its status.
run_logged() {
  local log=$1
  shift
  echo "\$ $*" >"$log"
  timeout --kill-after=30 "${STAGE_TIMEOUT_S:-600}" "$@" >>"$log" 2>&1
}

record() {  # record STAGE PASS|FAIL DETAIL
  RESULT[$1]=$2
  DETAIL[$1]=$3
}

# The checks of the logs and metrics, one subcommand each; prints one line of key numbers, exits 1
# when the check fails.
check() {
  python - "$@" <<'PY'
import json, math, re, statistics, sys

what, path = sys.argv[1], sys.argv[2]

def done(ok, line):
    print(line)
    sys.exit(0 if ok else 1)

try:
    text = open(path, encoding="utf-8", errors="replace").read()
except OSError as exc:
    done(False, f"no {path}: {exc.strerror}")

if what == "prepared":
    report = json.loads(text)
    subsets = ", ".join(f"{name} {sum(splits.values()):,}" for name, splits in report["subsets"].items())
    done(all(sum(splits.values()) > 0 for splits in report["subsets"].values()), f"{subsets} records")

if what == "pytest":
    # the last summary line: "9 passed, 1 xfailed, 250 deselected in 12.34s"
    lines = [l for l in text.splitlines() if re.search(r"\d+ (passed|failed|error|skipped|deselected)", l)]
    summary = lines[-1].strip("= ") if lines else "no pytest summary"
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed)", summary)}
    bad = counts.get("failed", 0) + counts.get("error", 0) + counts.get("errors", 0)
    # on a CUDA machine no gpu test may skip: a skip would hide exactly what this checks
    done(counts.get("passed", 0) > 0 and not bad and not counts.get("skipped", 0), summary)

if what == "metrics":
    steps = int(sys.argv[3])
    records = [json.loads(l) for l in text.splitlines() if l.strip()]
    train = [r for r in records if "loss" in r and not any(k.startswith("val/") for k in r)]
    if len(train) < 2:
        done(False, f"{len(train)} training records in metrics.jsonl")
    bad = [r["step"] for r in train if not isinstance(r["loss"], (int, float)) or not math.isfinite(r["loss"])]
    first, last = train[0], train[-1]
    speed = [r["tokens_per_s"] for r in train[1:] if isinstance(r.get("tokens_per_s"), (int, float))]
    memory = max((r.get("peak_mem_mb") or 0 for r in train), default=0)
    line = (f"loss {first['loss']:.3f} (step {first['step']}) -> {last['loss']:.3f} (step {last['step']}), "
            f"{len(train)} records, {statistics.median(speed) if speed else float('nan'):,.0f} tokens/s, "
            f"peak {memory:,.0f} MB") if not bad else f"non-finite loss at steps {bad}"
    ok = not bad and last["step"] == steps and last["loss"] < first["loss"]
    if not bad and last["step"] != steps:
        line += f"; stopped at step {last['step']} of {steps}"
    elif not bad and last["loss"] >= first["loss"]:
        line += "; the loss did not fall"
    done(ok, line)

if what == "bench_moe":
    # "  ours E=32      12.3 ms    1.10x dense": the first table (the main comparison) only
    table = text.split("sweep over the number of experts")[0]
    ratios = dict(re.findall(r"^\s+(\S+(?: \S+)? E=\d+)\s+[\d.]+ ms\s+([\d.]+)x dense", table, re.M))
    ours = [k for k in ratios if k.startswith("ours E=")]
    done(bool(ours), ", ".join(f"{k} {v}x dense" for k, v in ratios.items()) or "no timings in the log")

if what == "bench_smola":
    # "smola E=48        1.2   1.300  1.190        3.4   1.500  1.280": name, fwd ms, fwd x, floor, f+b ms, f+b x
    rows = {m[0]: (m[1], m[2]) for m in re.findall(r"^(smola E=\d+|lora r=\d+)\s+[\d.]+\s+([\d.]+)\s+[\d.]+\s+[\d.]+\s+([\d.]+)",
                                                   text, re.M)}
    overhead = re.search(r"overhead (-?[\d.]+)%", text)
    picked = [k for k in ("smola E=48", "lora r=192") if k in rows] or list(rows)[:2]
    parts = [f"{k} fwd {rows[k][0]}x f+b {rows[k][1]}x" for k in picked]
    if overhead:
        parts.append(f"BASE SMoLA_O 48 forward +{overhead.group(1)}%")
    done(bool(rows) and overhead is not None, "; ".join(parts) or "no timings in the log")

sys.exit(f"unknown check {what}")
PY
}

# stage NAME LOG CHECK-ARGS... -- CMD...: run CMD logged, then the check; records PASS or FAIL.
stage() {
  local name=$1 log=$2 detail status=0 start=$SECONDS
  shift 2
  local check_args=()
  while [ "$1" != "--" ]; do check_args+=("$1"); shift; done
  shift
  say "$name: $* (log: $log)"
  run_logged "$log" "$@" || status=$?
  if [ "$status" -ne 0 ]; then
    # what the check still finds, and the log's last line (usually the error)
    detail=$( (check "${check_args[@]}" 2>/dev/null || true) | tail -n 1)
    detail+="; log: $(grep -v '^\s*$' "$log" | tail -n 1 | cut -c1-200)"
    record "$name" FAIL "exit $status$([ "$status" -eq 124 ] && echo " (timed out)"): $detail"
  elif detail=$(check "${check_args[@]}" 2>&1); then
    record "$name" PASS "$detail"
  else
    record "$name" FAIL "$detail"
  fi
  DETAIL[$name]+=" ($((SECONDS - start)) s)"
}

# summary ABOUT: every stage's line, to stdout and summary.txt; returns 1 if any stage failed.
summary() {
  local failed=0 name text
  text="vlmoe GPU check: $1"$'\n'
  for name in "${STAGES[@]}"; do
    text+=$(printf '  %-4s  %-11s  %s' "${RESULT[$name]:-FAIL}" "$name" "${DETAIL[$name]:-not run}")$'\n'
    [ "${RESULT[$name]:-FAIL}" = PASS ] || failed=$((failed + 1))
  done
  if [ "$failed" -eq 0 ]; then
    text+="gpu_check: PASS (${#STAGES[@]} of ${#STAGES[@]} steps; logs in $OUT_DIR)"
  else
    text+="gpu_check: FAIL ($failed of ${#STAGES[@]} steps failed; logs in $OUT_DIR)"
  fi
  echo "$text" | tee "$OUT_DIR/summary.txt"
  [ "$failed" -eq 0 ]
}

main() {
  cd "$(dirname "${BASH_SOURCE[0]}")/.."
  use_environment
  local gpus num_gpus
  gpus=$(cuda_devices) || exit $?  # 2: refused, without CUDA
  num_gpus=${NUM_GPUS:-$gpus}
  OUT_DIR=${OUT:-$(mktemp -d -t vlmoe-gpu-check.XXXXXX)}
  mkdir -p "$OUT_DIR"
  OUT_DIR=$(cd "$OUT_DIR" && pwd)
  local steps=${STEPS:-100} data_dir=${VLMOE_DATA_DIR:-data/default}
  local run_dir=$OUT_DIR/pretrain-tiny-moe-bf16 port ep_size about
  port=${MASTER_PORT:-$(python -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")}
  # EP must divide both the world size and the experts of each MoE layer
  ep_size=$(python -c "import math; from vlmoe.config import load_config; \
print(math.gcd($num_gpus, load_config('$CONFIG').moe.num_experts))")
  # (DeepSpeed logs to stdout on import: the line is picked out by its prefix)
  about=$(python -c "import torch, deepspeed; \
print(f'about: {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, torch {torch.__version__} (CUDA {torch.version.cuda}), deepspeed {deepspeed.__version__}')" 2>/dev/null \
    | sed -n 's/^about: //p' || true)
  about=${about:-"$gpus CUDA device(s)"}
  say "$about; output in $OUT_DIR"
  if command -v nvidia-smi >/dev/null; then nvidia-smi >"$OUT_DIR/0-nvidia-smi.log" 2>&1 || true; fi

  stage pytest "$OUT_DIR/1-pytest-gpu.log" pytest "$OUT_DIR/1-pytest-gpu.log" -- \
    python -m pytest -q -p no:cacheprovider -m gpu -rfEsxX tests

  local detail
  if [ -f "$data_dir/prepare_report.json" ]; then  # as scripts/quickstart.sh: prepared data is reused
    if detail=$(check prepared "$data_dir/prepare_report.json" 2>&1); then
      record prepare PASS "reused $data_dir: $detail"
    else
      record prepare FAIL "$data_dir: $detail"
    fi
  else
    stage prepare "$OUT_DIR/2-prepare.log" prepared "$data_dir/prepare_report.json" -- \
      python -m vlmoe prepare "$CONFIG" "data.dir=$data_dir"
  fi

  # deepspeed --num_gpus N takes GPUs 0..N-1 whatever CUDA_VISIBLE_DEVICES says: name the visible ones
  local gpu_args=(--num_gpus "$num_gpus")
  if [[ "${CUDA_VISIBLE_DEVICES:-}" =~ ^[0-9]+(,[0-9]+)*$ ]]; then
    gpu_args=(--include "localhost:$(cut -d, -f1-"$num_gpus" <<<"$CUDA_VISIBLE_DEVICES")")
  fi
  if [ "${RESULT[prepare]}" = PASS ]; then
    rm -rf "$run_dir"  # a fresh run: an old one there would only resume
    stage pretrain "$OUT_DIR/3-pretrain.log" metrics "$run_dir/metrics.jsonl" "$steps" -- \
      deepspeed "${gpu_args[@]}" --master_port "$port" --module vlmoe pretrain "$CONFIG" \
      train.precision=bf16 "train.steps=$steps" "run_dir=$run_dir" "data.dir=$data_dir" "moe.ep_size=$ep_size" \
      train.progress_bar=false
    DETAIL[pretrain]="bf16, $num_gpus GPU(s), EP $ep_size: ${DETAIL[pretrain]}"
  else
    record pretrain FAIL "not run: no prepared data"
  fi

  # (bench_moe's one-rank process group for DeepSpeed's layer takes the free port too)
  stage bench_moe "$OUT_DIR/4-bench_moe.log" bench_moe "$OUT_DIR/4-bench_moe.log" -- \
    env MASTER_PORT="$port" python scripts/bench_moe.py --device cuda
  stage bench_smola "$OUT_DIR/5-bench_smola.log" bench_smola "$OUT_DIR/5-bench_smola.log" -- \
    python scripts/bench_smola.py --device cuda

  summary "$about"
}

# Sourcing the file (e.g. to try `check` on a CPU machine's metrics.jsonl) defines the functions only.
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  main "$@"
fi
