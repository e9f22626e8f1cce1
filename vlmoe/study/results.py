"""A study's results: one row per cell (its axes, seed count, accounting, final validation losses,
each task's main metric), means and standard deviations over seeds; and the findings checked on them.

Per run and seed the values come from what the runs wrote: ``metrics.jsonl`` (final validation
losses per objective, loss spikes, dropped tokens, tokens/s, peak memory), ``accounting.json``
(parameters, FLOPs), ``eval/results.json`` (the task's main metric) and the study's
``status.json`` (wall-clock of each launch). Columns are "<stage>/<name>": ``pretrain/mlm_loss``,
``vqa/accuracy``, ``vqa/params_adapter``.
"""
from __future__ import annotations

import csv
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from vlmoe.study.grid import Finding, Grid
from vlmoe.study.plan import CellRuns, Job, Plan
from vlmoe.train.metrics import read_metrics

OBJECTIVES = ("mlm", "mim", "vlm")
ACCOUNTING_KEYS = ("params_total", "params_trainable", "params_applied_per_token", "params_adapter",
                   "train_flops_per_step", "infer_flops_per_example", "flops_per_token", "train_flops_ratio")
# a logged training loss this much above the lowest of the previous SPIKE_WINDOW logged losses
SPIKE_RATIO = 1.2
SPIKE_WINDOW = 5


def loss_spikes(losses: list[float], ratio: float = SPIKE_RATIO, window: int = SPIKE_WINDOW) -> int:
    """How many logged losses exceed ``ratio`` x the lowest of the ``window`` before them (non-finite: a spike)."""
    spikes = 0
    for i in range(window, len(losses)):
        if not math.isfinite(losses[i]) or losses[i] > ratio * min(losses[i - window:i]):
            spikes += 1
    return spikes


def _training_values(run_dir: Path) -> dict[str, float]:
    records = read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
    warmup = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))["train"]["warmup_steps"]
    train = [r for r in records if "loss" in r and r["step"] > warmup]  # spikes after the warmup
    values: dict[str, float] = {}
    if train:
        values["loss_spikes"] = loss_spikes([r["loss"] for r in train])
        values["tokens_per_s"] = statistics.fmean(r["tokens_per_s"] for r in train if "tokens_per_s" in r)
        peaks = [r["peak_mem_mb"] for r in train if "peak_mem_mb" in r]
        if peaks:
            values["peak_mem_mb"] = max(peaks)
        tail = train[-max(1, len(train) // 5):]  # routing once it has settled: the last fifth of training
        dropped = [v for r in tail for k, v in r.items() if k.startswith("moe/") and k.endswith("/dropped")]
        if dropped:
            values["dropped"] = statistics.fmean(dropped)
    val = [r for r in records if "val/loss" in r]
    if val:
        final = val[-1]
        values["val_loss"] = final["val/loss"]
        for objective in OBJECTIVES:
            if f"val/{objective}" in final:
                values[f"{objective}_loss"] = final[f"val/{objective}"]
    return values


def _read_json(path: Path) -> Optional[dict]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _run_values(job: Job, status: dict) -> dict[str, float]:
    values = _training_values(job.run_dir)
    accounting = _read_json(job.run_dir / "accounting.json") or {}
    values.update({k: accounting[k] for k in ACCOUNTING_KEYS if k in accounting})
    wall = status.get(job.name, {}).get("wall_s")
    if wall is not None:
        values["wall_s"] = wall
    return values


def seed_values(runs: CellRuns, status: dict) -> dict[str, float]:
    """All values of one cell and seed, as "<stage>/<name>" -> number."""
    from vlmoe.tasks import get_task

    out: dict[str, float] = {}
    if runs.pretrain is not None and status.get(runs.pretrain.name, {}).get("state") == "done":
        for key, value in _run_values(runs.pretrain, status).items():
            out[f"pretrain/{key}"] = value
    for task, job in runs.finetune.items():
        if status.get(job.name, {}).get("state") != "done":
            continue
        for key, value in _run_values(job, status).items():
            out[f"{task}/{key}"] = value
        results = _read_json(job.run_dir / "eval" / "results.json")
        main = get_task(task).main_metric
        if results is not None and main in results:
            out[f"{task}/{main}"] = results[main]
    return out


@dataclass(frozen=True)
class Summary:
    mean: float
    std: float  # sample standard deviation over seeds (0 for one seed)
    n: int

    def __str__(self) -> str:
        return f"{_fmt(self.mean)} ± {self.std:.2g}" if self.n > 1 else _fmt(self.mean)


def _fmt(value: float) -> str:
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.4g}"
    return f"{value:.3g}"


def summarize(values: list[float]) -> Summary:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return Summary(math.nan, math.nan, 0)
    return Summary(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values))


def cell_table(grid: Grid, plan: Plan, status: dict) -> tuple[list[str], dict[str, dict[str, Summary]], dict]:
    """(columns, cell -> column -> Summary over seeds, cell -> seeds with results)."""
    per_cell: dict[str, list[dict]] = {}
    for runs in plan.cells:
        per_cell.setdefault(runs.cell, []).append(seed_values(runs, status))
    columns = sorted({k for rows in per_cell.values() for row in rows for k in row})
    table = {cell: {c: summarize([row.get(c) for row in rows]) for c in columns} for cell, rows in per_cell.items()}
    seeds = {cell: sum(1 for row in rows if row) for cell, rows in per_cell.items()}
    return columns, table, seeds


def write_results(grid: Grid, plan: Plan, status: dict, study_dir: Path) -> tuple[Path, Path]:
    """STUDY_DIR/results.csv (every column, mean and std) and results.md (the main columns)."""
    columns, table, seeds = cell_table(grid, plan, status)
    axes = list(dict.fromkeys(k for cell in grid.cells for k in cell.axes))
    csv_path = study_dir / "results.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["cell", *axes, "seeds", *[f"{c}_{s}" for c in columns for s in ("mean", "std")]])
        for cell in grid.cells:
            row = table.get(cell.name, {})
            writer.writerow([cell.name, *[json.dumps(cell.axes[a]) if a in cell.axes else "" for a in axes],
                             seeds.get(cell.name, 0),
                             *[x for c in columns for x in (row[c].mean, row[c].std) if c in row]])
    md_path = study_dir / "results.md"
    shown = [c for c in columns if _main_column(c)]
    lines = [f"# Results: {study_dir.name}", "",
             f"Mean ± standard deviation over seeds {grid.seeds}; every column (and std) in results.csv.", "",
             "| cell | seeds | " + " | ".join(shown) + " |", "|---|---|" + "---|" * len(shown)]
    for cell in grid.cells:
        row = table.get(cell.name, {})
        lines.append(f"| {cell.name} | {seeds.get(cell.name, 0)} | "
                     + " | ".join(str(row[c]) if c in row and row[c].n else "" for c in shown) + " |")
    failed = {name: entry for name, entry in status.items() if entry.get("state") in ("failed", "blocked")}
    if failed:
        lines += ["", "## Failed jobs", ""]
        lines += [f"- `{name}`: {entry.get('error')} (log: `{entry.get('log', '-')}`)" for name, entry in failed.items()]
    md_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return csv_path, md_path


def _main_column(column: str) -> bool:
    stage, _, name = column.partition("/")
    if stage == "pretrain":
        return name in ("val_loss", "mlm_loss", "mim_loss", "vlm_loss", "dropped", "loss_spikes",
                        "params_applied_per_token", "train_flops_per_step", "wall_s")
    return name in ("accuracy", "r_mean", "params_adapter", "train_flops_per_step", "wall_s")


@dataclass(frozen=True)
class Verdict:
    """A finding on one metric: each cell's summary and whether the expected order held."""

    finding: Finding
    metric: str
    summaries: tuple[Summary, ...]
    outcome: str  # "reproduced" (", one seed (no spread)" / " within noise"), "not reproduced", "no difference", "no data"


def judge(finding: Finding, metric: str, summaries: list[Summary]) -> str:
    """Whether the means follow ``finding.expect`` along its cells; "within noise" when some step
    between neighbours is smaller than the larger of their standard deviations."""
    if any(s.n == 0 for s in summaries):
        return "no data"
    steps = [b.mean - a.mean for a, b in zip(summaries, summaries[1:])]
    if all(step == 0 for step in steps):
        return "no difference"
    ordered = all(s > 0 for s in steps) if finding.expect == "increasing" else all(s < 0 for s in steps)
    if not ordered:
        return "not reproduced"
    if any(s.n < 2 for s in summaries):
        return "reproduced, one seed (no spread)"
    noisy = any(abs(step) < max(a.std, b.std) for step, a, b in zip(steps, summaries, summaries[1:]))
    return "reproduced within noise" if noisy else "reproduced"


def verdicts(grid: Grid, plan: Plan, status: dict) -> list[Verdict]:
    _, table, _ = cell_table(grid, plan, status)
    out = []
    for finding in grid.findings:
        for metric in finding.metrics:
            summaries = tuple(table.get(cell, {}).get(metric, Summary(math.nan, math.nan, 0)) for cell in finding.cells)
            out.append(Verdict(finding, metric, summaries, judge(finding, metric, list(summaries))))
    return out
