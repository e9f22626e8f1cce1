"""``vlmoe report STUDY_DIR``: report.md with the results table, each finding judged, and the plots.

Plots (PNG, under STUDY_DIR/plots/): validation loss per objective against training FLOPs and
against wall-clock (a line per pretraining cell, the band spans the seeds); each task's score
against the number of SMoLA experts (a line per method and base); SMoLA against LoRA at their
added parameters; dropped tokens per expert, modality and pretraining task (VL-MoE Fig. 6);
expert load over training (a heatmap per MoE layer); the Phi Phi^T maps of SMoLA runs
(Omni-SMoLA Fig. 4).
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Optional

import yaml

from vlmoe.study.grid import Grid
from vlmoe.study.plan import CellRuns, Plan
from vlmoe.study.results import OBJECTIVES, Summary, cell_table, seed_values, verdicts, write_results
from vlmoe.train.metrics import read_metrics

MOE_KEY = re.compile(r"^(?:val/)?moe/(?P<layer>[^/]+)/(?P<modality>[vt])/")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    _plt().close(fig)
    return path


def _config(run_dir: Path) -> dict:
    return yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))


def _done(status: dict, job) -> bool:
    return job is not None and status.get(job.name, {}).get("state") == "done"


def _pretrain_groups(plan: Plan, status: dict) -> dict[str, list[CellRuns]]:
    """Cell -> its seeds' runs, for cells with finished pretraining of their own (a run shared by
    cells is drawn once, under the first)."""
    groups: dict[str, list[CellRuns]] = {}
    owner: dict[str, str] = {}
    for runs in plan.cells:
        if _done(status, runs.pretrain) and owner.setdefault(runs.pretrain.name, runs.cell) == runs.cell:
            groups.setdefault(runs.cell, []).append(runs)
    return groups


def _label(ax, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _band(ax, x, ys: list[list[float]], label: str) -> None:
    n = min(len(y) for y in ys)
    mean = [sum(y[i] for y in ys) / len(ys) for i in range(n)]
    line, = ax.plot(x[:n], mean, marker=".", label=label)
    if len(ys) > 1:
        ax.fill_between(x[:n], [min(y[i] for y in ys) for i in range(n)], [max(y[i] for y in ys) for i in range(n)],
                        color=line.get_color(), alpha=0.2)


def plot_loss_curves(plan: Plan, status: dict, out: Path) -> list[Path]:
    """Validation loss per objective against training FLOPs and against wall-clock."""
    groups = _pretrain_groups(plan, status)
    if not groups:
        return []
    plt, paths = _plt(), []
    for axis in ("flops", "time"):
        curves = {cell: [c for c in (_val_curve(runs, status, axis) for runs in seeds) if c is not None]
                  for cell, seeds in groups.items()}
        curves = {cell: c for cell, c in curves.items() if c}
        if not curves:  # no run has what this axis needs (accounting, or a clock)
            continue
        if axis == "flops":
            scale, unit = _flops_unit(max(x for c in curves.values() for x in c[0][0]))
            label = f"training compute ({unit})"
        else:
            scale, label = 1.0, "wall-clock of training (s)"
        fig, axes = plt.subplots(1, len(OBJECTIVES), figsize=(4.2 * len(OBJECTIVES), 3.6))
        for cell, runs in curves.items():
            x = [v / scale for v in runs[0][0]]
            for ax, objective in zip(axes, OBJECTIVES):
                _band(ax, x, [c[1][objective] for c in runs], cell)
        for ax, objective in zip(axes, OBJECTIVES):
            ax.set_title(f"{objective.upper()} validation loss")
            ax.set_xlabel(label)
            ax.set_ylabel("loss (nats)")
            ax.grid(alpha=0.3)
        axes[-1].legend(fontsize=7)
        paths.append(_save(fig, out / f"val_loss_vs_{axis}.png"))
    return paths


def _flops_unit(largest: float) -> tuple[float, str]:
    for scale, unit in ((1e18, "EFLOPs"), (1e15, "PFLOPs"), (1e12, "TFLOPs")):
        if largest >= scale:
            return scale, unit
    return 1e9, "GFLOPs"


def _val_curve(runs: CellRuns, status: dict, axis: str) -> Optional[tuple[list[float], dict]]:
    records = read_metrics(runs.pretrain.run_dir)
    val = [r for r in records if "val/loss" in r and r["step"] > 0]
    if not val:
        return None
    if axis == "flops":
        values = seed_values(runs, status)
        per_step = values.get("pretrain/train_flops_per_step")
        if per_step is None:
            return None
        x = [r["step"] * per_step for r in val]
    else:
        clock = {r["step"]: r["time_s"] for r in records if "time_s" in r}
        if not all(r["step"] in clock for r in val):
            return None
        x = [clock[r["step"]] for r in val]
    return x, {o: [r.get(f"val/{o}", math.nan) for r in val] for o in OBJECTIVES}


def _finetune_setting(runs: CellRuns, task: str) -> dict:
    cfg = _config(runs.finetune[task].run_dir)
    f = cfg["finetune"]
    base = "sparse base" if runs.pretrain is not None and _config(runs.pretrain.run_dir).get("moe") else "dense base"
    return {"method": f["method"], "mode": f.get("smola", {}).get("mode", "omni"),
            "experts": f.get("smola", {}).get("num_experts"), "base": base}


def plot_score_vs_experts(grid: Grid, plan: Plan, status: dict, out: Path) -> list[Path]:
    """Each task's main metric against the number of SMoLA experts, a line per mode and base."""
    from vlmoe.tasks import get_task

    _, table, _ = cell_table(grid, plan, status)
    plt, paths = _plt(), []
    for task in grid.finetune_configs:
        metric = f"{task}/{get_task(task).main_metric}"
        series: dict[str, dict[int, Summary]] = {}
        for runs in plan.cells:
            if task not in runs.finetune or not _done(status, runs.finetune[task]):
                continue
            setting = _finetune_setting(runs, task)
            if setting["method"] != "smola" or setting["experts"] is None or metric not in table[runs.cell]:
                continue
            series.setdefault(f"SMoLA {setting['mode']}, {setting['base']}", {})[setting["experts"]] = \
                table[runs.cell][metric]
        series = {k: v for k, v in series.items() if len(v) > 1}
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for label, points in sorted(series.items()):
            xs = sorted(points)
            ax.errorbar(xs, [points[x].mean for x in xs], yerr=[points[x].std for x in xs], marker="o", capsize=3,
                        label=label)
        ax.set_xscale("log", base=2)
        ticks = sorted({x for points in series.values() for x in points})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        _label(ax, "experts per SMoLA block (log scale)", f"{metric.split('/')[1]} (mean ± std over seeds)",
               f"{task}: score against SMoLA experts")
        paths.append(_save(fig, out / f"{task}_score_vs_experts.png"))
    return paths


def plot_smola_vs_lora(grid: Grid, plan: Plan, status: dict, out: Path) -> list[Path]:
    """Task score against added (adapter) parameters, SMoLA and LoRA cells."""
    from vlmoe.tasks import get_task

    _, table, _ = cell_table(grid, plan, status)
    plt, paths = _plt(), []
    for task in grid.finetune_configs:
        metric = f"{task}/{get_task(task).main_metric}"
        points = []
        for runs in plan.cells:
            if task not in runs.finetune or not _done(status, runs.finetune[task]) or runs.seed != grid.seeds[0]:
                continue
            setting = _finetune_setting(runs, task)
            row = table[runs.cell]
            if setting["method"] in ("smola", "lora") and metric in row and f"{task}/params_adapter" in row:
                points.append((setting["method"], runs.cell, row[f"{task}/params_adapter"].mean, row[metric]))
        if not {p[0] for p in points} >= {"smola", "lora"}:
            continue
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for method, marker in (("smola", "o"), ("lora", "s")):
            chosen = [p for p in points if p[0] == method]
            ax.errorbar([p[2] / 1e6 for p in chosen], [p[3].mean for p in chosen], yerr=[p[3].std for p in chosen],
                        fmt=marker, capsize=3, label="SMoLA" if method == "smola" else "LoRA")
            for p in chosen:
                ax.annotate(p[1], (p[2] / 1e6, p[3].mean), fontsize=6, xytext=(3, 3), textcoords="offset points")
        _label(ax, "added parameters (millions)", metric.split("/")[1], f"{task}: SMoLA against LoRA")
        paths.append(_save(fig, out / f"{task}_smola_vs_lora.png"))
    return paths


def _moe_runs(plan: Plan, status: dict) -> dict[str, CellRuns]:
    """One finished sparse pretraining run per cell (the first seed's)."""
    out = {}
    for cell, seeds in _pretrain_groups(plan, status).items():
        if _config(seeds[0].pretrain.run_dir).get("moe"):
            out[cell] = seeds[0]
    return out


def plot_dropped(plan: Plan, status: dict, out: Path) -> list[Path]:
    """VL-MoE Fig. 6: fraction of each expert's tokens dropped, per modality and pretraining task,
    at the final evaluation (the evaluation capacity factor), one figure per sparse cell."""
    plt, paths = _plt(), []
    pattern = re.compile(r"^val/moe/(?P<layer>[^/]+)/(?P<modality>[vt])/dropped/(?P<task>[a-z]+)/(?P<expert>\d+)$")
    for cell, runs in _moe_runs(plan, status).items():
        val = [r for r in read_metrics(runs.pretrain.run_dir) if "val/loss" in r]
        if not val:
            continue
        bars: dict[tuple[str, str], dict[str, dict[int, float]]] = {}
        for key, value in val[-1].items():
            m = pattern.match(key)
            if m:
                bars.setdefault((m["modality"], m["task"]), {}).setdefault(m["layer"], {})[int(m["expert"])] = value
        if not bars:
            continue
        panels = sorted(bars)
        fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.2), squeeze=False)
        for ax, (modality, task) in zip(axes[0], panels):
            layers = sorted(bars[(modality, task)])
            width = 0.8 / len(layers)
            for i, layer in enumerate(layers):
                experts = sorted(bars[(modality, task)][layer])
                ax.bar([e + i * width for e in experts], [bars[(modality, task)][layer][e] for e in experts],
                       width=width, label=layer)
            ax.set_title(f"{task.upper()}, {'image' if modality == 'v' else 'text'} tokens", fontsize=9)
            ax.set_xlabel("expert")
            ax.set_ylabel("fraction of its tokens dropped")
            ax.set_ylim(0, 1)
            ax.legend(fontsize=6)
        fig.suptitle(f"{cell}: dropped tokens per expert (final evaluation)", fontsize=10)
        paths.append(_save(fig, out / f"dropped_{cell}.png"))
    return paths


def plot_expert_load(plan: Plan, status: dict, out: Path) -> list[Path]:
    """Expert load (fraction of routed choices) over training, a heatmap per MoE layer and modality."""
    plt, paths = _plt(), []
    pattern = re.compile(r"^moe/(?P<layer>[^/]+)/(?P<modality>[vt])/load/(?P<expert>\d+)$")
    for cell, runs in _moe_runs(plan, status).items():
        train = [r for r in read_metrics(runs.pretrain.run_dir) if "loss" in r and "val/loss" not in r]
        maps: dict[tuple[str, str], dict[int, list[float]]] = {}
        steps = [r["step"] for r in train]
        for r in train:
            for key, value in r.items():
                m = pattern.match(key)
                if m:
                    maps.setdefault((m["layer"], m["modality"]), {}).setdefault(int(m["expert"]), []).append(value)
        if not maps:
            continue
        panels = sorted(maps)
        fig, axes = plt.subplots(len(panels), 1, figsize=(7, 1.9 * len(panels) + 0.6), squeeze=False)
        for ax, panel in zip(axes[:, 0], panels):
            experts = sorted(maps[panel])
            image = ax.imshow([maps[panel][e] for e in experts], aspect="auto", cmap="magma", origin="lower",
                              extent=(steps[0], steps[-1], -0.5, len(experts) - 0.5), vmin=0)
            ax.set_title(f"{panel[0]} {'V' if panel[1] == 'v' else 'T'}-FFN experts", fontsize=9)
            ax.set_xlabel("training step")
            ax.set_ylabel("expert")
            fig.colorbar(image, ax=ax, label="share of tokens")
        fig.suptitle(f"{cell}: expert load over training", fontsize=10)
        paths.append(_save(fig, out / f"expert_load_{cell}.png"))
    return paths


def plot_phi_maps(plan: Plan, status: dict, out: Path, max_maps: int = 6) -> list[Path]:
    """Omni-SMoLA Fig. 4: norm(Phi) norm(Phi)^T of the first seed's SMoLA adapters, per cell and task."""
    from smola.adapter_io import read_adapter_tensors
    from smola.heatmaps import MODALITY_TITLES, phi_grams

    plt, paths = _plt(), []
    for runs in plan.cells:
        for task, job in runs.finetune.items():
            if runs.seed != plan.cells[0].seed or not _done(status, job) or not (job.run_dir / "adapter").is_dir():
                continue
            grams = phi_grams(read_adapter_tensors(job.run_dir / "adapter"))
            if not grams:
                continue
            chosen = _spread(sorted(grams), max_maps)
            fig, axes = plt.subplots(1, len(chosen), figsize=(2.3 * len(chosen) + 1, 2.9), squeeze=False,
                                     constrained_layout=True)
            for i, (ax, key) in enumerate(zip(axes[0], chosen)):
                image = ax.imshow(grams[key].numpy(), cmap="viridis", vmin=-1, vmax=1)
                ax.set_title(f"{key[0].replace('backbone.', '')}\n{MODALITY_TITLES[key[1]]}", fontsize=7)
                ax.set_xlabel("expert")
                if i == 0:
                    ax.set_ylabel("expert")
            fig.colorbar(image, ax=list(axes[0]), label="cosine of routing vectors")
            fig.suptitle(f"{runs.cell} ({task}): $\\Phi\\Phi^T$", fontsize=9)
            fig.savefig(out / f"phi_{runs.cell}_{task}.png", dpi=90)
            plt.close(fig)
            paths.append(out / f"phi_{runs.cell}_{task}.png")
    return paths


def _spread(items: list, n: int) -> list:
    if len(items) <= n:
        return items
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)]


def write_report(grid: Grid, plan: Plan, status: dict, study_dir: Path) -> Path:
    """results.csv / results.md, the plots, and report.md with the findings; returns report.md."""
    _, results_md = write_results(grid, plan, status, study_dir)
    plots = study_dir / "plots"
    plots.mkdir(exist_ok=True)
    for stale in plots.glob("*.png"):  # a plot whose data is gone must not outlive it
        stale.unlink()
    figures = [*plot_loss_curves(plan, status, plots), *plot_score_vs_experts(grid, plan, status, plots),
               *plot_smola_vs_lora(grid, plan, status, plots), *plot_dropped(plan, status, plots),
               *plot_expert_load(plan, status, plots), *plot_phi_maps(plan, status, plots)]
    lines = [f"# Study report: {study_dir.name}", "",
             f"{len(grid.cells)} cells x seeds {grid.seeds}, {grid.ranks} rank(s) per training run.", ""]
    findings = verdicts(grid, plan, status)
    if findings:
        lines += ["## Findings", ""]
        current = None
        for v in findings:
            if v.finding is not current:
                current = v.finding
                lines += [f"### {v.finding.name}", "", f"**Claim:** {v.finding.claim}", "",
                          "| metric | " + " | ".join(v.finding.cells) + " | expected | outcome |",
                          "|---|" + "---|" * (len(v.finding.cells) + 2)]
            lines.append(f"| {v.metric} | " + " | ".join(str(s) if s.n else "-" for s in v.summaries)
                         + f" | {v.finding.expect} along the cells | **{v.outcome}** |")
            if v is findings[-1] or findings[findings.index(v) + 1].finding is not current:
                lines += ["", *([current.note, ""] if current.note else [])]
    lines += ["## Results", "", *results_md.read_text(encoding="utf-8").splitlines()[2:], "", "## Plots", ""]
    lines += [f"![{p.stem}](plots/{p.name})" for p in figures]
    report = study_dir / "report.md"
    report.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return report

