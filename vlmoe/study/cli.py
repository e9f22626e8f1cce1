"""``vlmoe study GRID [key=value ...] [--emit commands|slurm]`` and ``vlmoe report STUDY_DIR``.

``study`` validates the whole grid, then runs every job here in order (skipping finished ones,
resuming interrupted ones), writes results.csv / results.md and exits 1 if a job failed; with
``--emit`` it only writes the launch files for elsewhere. The grid as run (with the command
line's overrides) is kept as STUDY_DIR/grid.yaml, which ``report`` reads.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from vlmoe.config import resolve_config_path
from vlmoe.study.grid import Grid, GridError, load_grid, resolve_grid_path
from vlmoe.study.plan import make_plan

GRID_COPY = "grid.yaml"


def _frozen_grid_tree(grid_name: str, overrides: list[str], grid: Grid) -> dict:
    """The grid file with the command line applied and config names made absolute paths."""
    from vlmoe.study.grid import apply_cli_overrides

    tree = yaml.safe_load(resolve_grid_path(grid_name).read_text(encoding="utf-8")) or {}
    tree = apply_cli_overrides(tree, overrides)
    stages = dict(tree.get("stages") or {})
    if stages.get("pretrain"):
        stages["pretrain"] = str(resolve_config_path(stages["pretrain"]).resolve())
    stages["finetune"] = {t: str(resolve_config_path(c).resolve()) for t, c in (stages.get("finetune") or {}).items()}
    tree["stages"] = stages
    tree["study"] = {**(tree.get("study") or {}), "dir": str(grid.dir.resolve())}
    return tree


def study_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vlmoe study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grid", help="a grid YAML file, or a shipped study name (default)")
    parser.add_argument("overrides", nargs="*", help="study.dir=..., study.ranks=..., or config keys for every "
                                                     "cell (finetune:train.steps=50)")
    parser.add_argument("--emit", choices=("commands", "slurm"), help="write launch files instead of running")
    parser.add_argument("--nodes", type=int, default=1, help="--emit slurm: nodes per training run")
    parser.add_argument("--gpus-per-node", type=int, default=None, help="--emit slurm: GPUs per node "
                                                                        "(default: study.ranks / nodes)")
    parser.add_argument("--sbatch-arg", action="append", default=[], help="--emit slurm: an extra #SBATCH line, "
                                                                          "e.g. --sbatch-arg=--partition=gpu")
    args = parser.parse_intermixed_args(argv)
    grid = load_grid(args.grid, args.overrides)
    study_dir = grid.dir.resolve()
    study_dir.mkdir(parents=True, exist_ok=True)
    (study_dir / GRID_COPY).write_text(yaml.safe_dump(_frozen_grid_tree(args.grid, args.overrides, grid),
                                                      sort_keys=False), encoding="utf-8")
    plan = make_plan(grid, study_dir)
    print(f"[study] {grid.path}: {len(grid.cells)} cells x {len(grid.seeds)} seeds, {len(plan.jobs)} jobs "
          f"-> {study_dir}", flush=True)
    if args.emit == "commands":
        from vlmoe.study.emit import write_commands

        print(f"[study] wrote {write_commands(plan, study_dir, grid.launcher)}")
        return 0
    if args.emit == "slurm":
        from vlmoe.study.emit import write_slurm

        gpus = args.gpus_per_node or max(1, grid.ranks // args.nodes)
        for path in write_slurm(plan, study_dir, grid.launcher, args.nodes, gpus, args.sbatch_arg):
            print(f"[study] wrote {path}")
        return 0

    from vlmoe.study.results import write_results
    from vlmoe.study.runner import run_plan

    status = run_plan(plan, study_dir, grid.launcher, log=lambda line: print(line, flush=True))
    csv_path, md_path = write_results(grid, plan, status.jobs, study_dir)
    print(md_path.read_text(encoding="utf-8"))
    print(f"[study] results: {csv_path}, {md_path}; plots and findings: vlmoe report {study_dir}")
    failed = [n for n, e in status.jobs.items() if e.get("state") in ("failed", "blocked")]
    if failed:
        print(f"[study] {len(failed)} job(s) failed or blocked: {', '.join(failed)}")
    return 1 if failed else 0


def report_main(argv: list[str]) -> int:
    from vlmoe.study.report import write_report
    from vlmoe.study.runner import Status

    parser = argparse.ArgumentParser(prog="vlmoe report", description="report.md and plots of a study directory")
    parser.add_argument("study_dir")
    args = parser.parse_args(argv)
    study_dir = Path(args.study_dir).resolve()
    if not (study_dir / GRID_COPY).is_file():
        raise GridError(f"'{study_dir}' is not a study directory (no {GRID_COPY}; run vlmoe study first)")
    grid = load_grid(str(study_dir / GRID_COPY))
    plan = make_plan(grid, study_dir)
    report = write_report(grid, plan, Status(study_dir).jobs, study_dir)
    print(report.read_text(encoding="utf-8"))
    print(f"[report] {report}")
    return 0
