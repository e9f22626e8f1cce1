"""The jobs a grid implies, in dependency order: pretrain -> finetune(s) -> eval, each run accounted.

Every job is a launch of an existing command: ``vlmoe pretrain|finetune CONFIG`` on the grid's
ranks, ``vlmoe eval RUN_DIR`` and ``python -m vlmoe.study.accounting RUN_DIR`` in one process.
The configs are resolved and written to ``STUDY_DIR/configs/`` so that a local run, the emitted
shell file and the emitted SLURM script launch exactly the same thing. Runs live in
``STUDY_DIR/runs/<cell>/seed<S>/{pretrain,finetune-<task>}``; a pretraining run shared by
cells lives under the first of them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from vlmoe.config import dump_config, load_config
from vlmoe.study.grid import Grid, override_strings, pretrain_identity, stage_overrides

TRAIN_KINDS = ("pretrain", "finetune")


@dataclass(frozen=True)
class Job:
    """One launch. ``args`` are the command's arguments after the module (vlmoe, or accounting)."""

    name: str  # "<cell>/seed<S>/<stage>", unique
    kind: str  # pretrain | finetune | eval | account
    run_dir: Path
    args: tuple[str, ...]
    ranks: int  # processes: the grid's ranks for training, 1 for eval and accounting
    depends: tuple[str, ...] = ()
    steps: Optional[int] = None  # training jobs: the step that finishes them

    @property
    def module(self) -> str:
        return "vlmoe.study.accounting" if self.kind == "account" else "vlmoe"

    @property
    def fingerprint(self) -> str:
        return json.dumps([self.kind, str(self.run_dir), list(self.args)])


@dataclass
class CellRuns:
    """The jobs of one cell and seed, by stage: what the results read."""

    cell: str
    seed: int
    pretrain: Optional[Job] = None
    finetune: dict[str, Job] = field(default_factory=dict)
    eval: dict[str, Job] = field(default_factory=dict)


@dataclass
class Plan:
    jobs: list[Job]
    cells: list[CellRuns]

    def job(self, name: str) -> Job:
        return next(j for j in self.jobs if j.name == name)


def _write_config(grid_dir: Path, name: str, base: str, overrides: list[str]) -> tuple[Path, int]:
    cfg = load_config(base, overrides)
    path = grid_dir / "configs" / (name.replace("/", "__") + ".yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, path)
    return path, cfg.train.steps


def make_plan(grid: Grid, study_dir: Path) -> Plan:
    """Resolve every run of the grid under ``study_dir`` (absolute paths; configs written)."""
    study_dir = study_dir.resolve()
    jobs: list[Job] = []
    shared: dict[str, Job] = {}  # pretraining identity -> its job
    cells = []
    for seed in grid.seeds:
        for cell in grid.cells:
            runs = CellRuns(cell=cell.name, seed=seed)
            root = study_dir / "runs" / cell.name / f"seed{seed}"
            base_run = None
            if grid.pretrain_config:
                identity = pretrain_identity(grid, cell, seed)
                if identity not in shared:
                    name = f"{cell.name}/seed{seed}/pretrain"
                    run_dir = root / "pretrain"
                    config, steps = _write_config(study_dir, name, grid.pretrain_config,
                                                  [*stage_overrides(grid, cell, "pretrain", seed), f"run_dir={run_dir}"])
                    shared[identity] = Job(name, "pretrain", run_dir, ("pretrain", str(config)), grid.ranks, steps=steps)
                    jobs += [shared[identity], _account(shared[identity])]
                runs.pretrain = shared[identity]
                base_run = runs.pretrain.run_dir
            for task in cell.tasks:
                name = f"{cell.name}/seed{seed}/finetune-{task}"
                run_dir = root / f"finetune-{task}"
                base = [f"finetune.base_run={base_run}"] if base_run is not None else []
                config, steps = _write_config(study_dir, name, grid.finetune_configs[task],
                                              [*stage_overrides(grid, cell, "finetune", seed), *base, f"run_dir={run_dir}"])
                depends = (runs.pretrain.name,) if runs.pretrain else ()
                job = Job(name, "finetune", run_dir, ("finetune", str(config)), grid.ranks, depends, steps=steps)
                evaluation = Job(f"{name}/eval", "eval", run_dir,
                                 ("eval", str(run_dir), *override_strings(grid.eval_overrides),
                                  *stage_overrides(grid, cell, "eval", seed)), 1, (name,))
                jobs += [job, _account(job), evaluation]
                runs.finetune[task], runs.eval[task] = job, evaluation
            cells.append(runs)
    return Plan(jobs=jobs, cells=cells)


def _account(job: Job) -> Job:
    return Job(f"{job.name}/account", "account", job.run_dir, (str(job.run_dir),), 1, (job.name,))
