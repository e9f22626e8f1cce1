"""A study grid: base configs per stage, axes and named cells, expanded into runs, checked first.

A grid file (YAML) has these sections:

    study:    {dir: studies/x, ranks: 2, launcher: deepspeed, seeds: [1, 2]}
    stages:   {pretrain: CONFIG, finetune: {TASK: CONFIG, ...}, eval: {KEY: VALUE, ...}}
    overrides: {KEY: VALUE, ...}            # every cell
    axes:     {KEY: [VALUE, ...], ...}      # the product of the axes is a set of cells
    cells:    {NAME: {KEY: VALUE, ...}, ...}  # named cells beside the product (or instead)
    findings: [{name, claim, cells: [...], metrics: [...], expect: increasing|decreasing, note}, ...]
    _anything: ...                          # ignored: a place for YAML anchors (&moe, *moe)

A KEY is a run config key (``finetune.method``, ``moe.num_experts``) and goes to the stage it
belongs to: ``model``, ``moe``, ``pretrain`` and ``prepare`` keys to pretraining, ``finetune``
keys to fine-tuning, ``eval`` keys to evaluation, any other key (``train.steps``, ``data.dir``) to
pretraining and fine-tuning both; a ``pretrain:``, ``finetune:`` or ``eval:`` prefix sends it to
that stage only (``pretrain:train.steps: 200``). ``seed`` is the replication axis
(``study.seeds``): every cell runs once per seed, and results are means over seeds. In a cell,
``tasks: [vqa]`` picks which of the fine-tuning stages it runs (``[]``: pretraining only).

Every config a grid implies is loaded and validated before anything runs, so an unknown key,
an empty axis or a value of the wrong type is an error that names the key (and the cell).
Cells whose pretraining configs are identical share one pretraining run per seed.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from vlmoe.config import ConfigError, load_config, parse_overrides, resolve_shipped, to_dict

GRID_SECTIONS = ("study", "stages", "overrides", "axes", "cells", "findings")
STUDY_KEYS = {"dir": str, "ranks": int, "launcher": str, "seeds": list}
LAUNCHERS = ("deepspeed", "torchrun")
STAGES = ("pretrain", "finetune", "eval")
PRETRAIN_SECTIONS = ("model", "moe", "pretrain", "prepare")
STUDIES_DIR = Path(__file__).resolve().parents[1] / "studies"
# keys of a pretraining config that do not change what it trains
NOT_PRETRAINING = ("run_dir", "finetune", "eval")
EXPECTATIONS = ("increasing", "decreasing")


class GridError(ConfigError):
    """A grid that cannot be run; the message names the grid file and the key."""


@dataclass(frozen=True)
class Finding:
    """A claim checked on the results: ``metric`` along ``cells`` should be ``expect``-ing."""

    name: str
    claim: str
    cells: tuple[str, ...]
    metrics: tuple[str, ...]
    expect: str
    note: str = ""  # shown under the verdicts: what the scale of the study means for the claim


@dataclass(frozen=True)
class Cell:
    """One combination of settings: its overrides per stage and the tasks it fine-tunes."""

    name: str
    axes: dict  # key -> value, as written in the grid (the results' columns)
    overrides: dict  # stage -> {key: value}
    tasks: tuple[str, ...]


@dataclass
class Grid:
    path: Path
    dir: Path
    ranks: int
    launcher: str
    seeds: list[int]
    pretrain_config: Optional[str]
    finetune_configs: dict[str, str]  # task -> config
    eval_overrides: dict
    cells: list[Cell]
    findings: list[Finding] = field(default_factory=list)


def resolve_grid_path(name: str) -> Path:
    """A grid file path, or the name of one shipped in vlmoe/studies (``default``)."""
    try:
        return resolve_shipped(name, STUDIES_DIR, "grid")
    except ConfigError as exc:
        raise GridError(str(exc)) from exc


def apply_cli_overrides(tree: dict, overrides: list[str]) -> dict:
    """``study.dir=x`` / ``stages.pretrain=y`` set grid keys; any other ``KEY=VALUE`` (a config
    key, with an optional stage prefix) joins ``overrides``, applied to every cell."""
    tree = {**tree, "overrides": dict(tree.get("overrides") or {})}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise GridError(f"override '{item}' is not of the form key=value")
        section = key.split(".", 1)[0]
        if section in ("study", "stages"):
            parsed = parse_overrides([item])
            tree[section] = {**(tree.get(section) or {}), **parsed[section]}
        else:
            tree["overrides"][key] = yaml.safe_load(raw) if raw.strip() else ""
    return tree


def stage_of(key: str) -> tuple[tuple[str, ...], str]:
    """(stages, config key) of a grid key: its prefix, or where its section belongs."""
    prefix, sep, rest = key.partition(":")
    if sep:
        if prefix not in STAGES:
            raise GridError(f"grid key '{key}': stage prefix '{prefix}' is not one of {STAGES}")
        return (prefix,), rest
    section = key.split(".", 1)[0]
    if section in PRETRAIN_SECTIONS:
        return ("pretrain",), key
    if section in ("finetune", "eval"):
        return (section,), key
    return ("pretrain", "finetune"), key


def override_strings(values: dict) -> list[str]:
    # YAML flow style keeps lists and mappings on one line: key=[a, b]
    return [f"{k}={yaml.safe_dump(v, default_flow_style=True, width=1 << 20).strip().removesuffix('...').strip()}"
            for k, v in values.items()]


def _split_by_stage(settings: dict) -> dict:
    out: dict = {stage: {} for stage in STAGES}
    for key, value in settings.items():
        stages, config_key = stage_of(key)
        for stage in stages:
            out[stage][config_key] = value
    return out


def _cell_name(axes: dict) -> str:
    parts = [f"{key.rsplit('.', 1)[-1].split(':')[-1]}={value}" for key, value in axes.items()]
    return re.sub(r"[^A-Za-z0-9_.=,+-]", "_", ",".join(parts)) or "base"


def _expect_mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise GridError(f"{where}: expected a mapping, got {value!r}")
    return value


def load_grid(name: str, overrides: Optional[list[str]] = None) -> Grid:
    """Read, expand and validate a grid; every config it implies is loaded once here."""
    path = resolve_grid_path(name)
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise GridError(f"grid '{path}' is not valid YAML: {exc}") from exc
    if not isinstance(tree, dict):
        raise GridError(f"grid '{path}': expected a mapping of sections {GRID_SECTIONS}")
    tree = apply_cli_overrides(tree, overrides or [])
    try:
        grid = _build(path, tree)
        check_grid(grid)
    except GridError:
        raise
    except ConfigError as exc:
        raise GridError(f"grid '{path}': {exc}") from exc
    return grid


def _build(path: Path, tree: dict) -> Grid:
    unknown = sorted(k for k in set(tree) - set(GRID_SECTIONS) if not str(k).startswith("_"))  # _x: YAML anchors
    if unknown:
        raise GridError(f"grid '{path}': unknown section(s) {unknown}; sections are {GRID_SECTIONS}")
    study = _expect_mapping(tree.get("study"), f"grid '{path}' section 'study'")
    for key, value in study.items():
        if key not in STUDY_KEYS:
            raise GridError(f"grid key 'study.{key}' is unknown; keys are {sorted(STUDY_KEYS)}")
        if not isinstance(value, STUDY_KEYS[key]) or isinstance(value, bool):
            raise GridError(f"grid key 'study.{key}': expected {STUDY_KEYS[key].__name__}, got {value!r}")
    seeds = study.get("seeds", [1234])
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise GridError(f"grid key 'study.seeds': expected a non-empty list of integers, got {seeds!r}")
    launcher = study.get("launcher", "deepspeed")
    if launcher not in LAUNCHERS:
        raise GridError(f"grid key 'study.launcher': {launcher!r} is not one of {LAUNCHERS}")
    ranks = study.get("ranks", 1)
    if ranks < 1:
        raise GridError(f"grid key 'study.ranks' must be >= 1, got {ranks}")

    stages = _expect_mapping(tree.get("stages"), f"grid '{path}' section 'stages'")
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise GridError(f"grid key 'stages': unknown stage(s) {unknown}; stages are {STAGES}")
    finetune = stages.get("finetune") or {}
    if isinstance(finetune, str):
        raise GridError("grid key 'stages.finetune': expected a mapping task -> config, "
                        f"e.g. {{vqa: {finetune}}}")
    finetune = _expect_mapping(finetune, "grid key 'stages.finetune'")
    if not stages.get("pretrain") and not finetune:
        raise GridError(f"grid '{path}': 'stages' needs a pretrain config, finetune configs, or both")
    eval_overrides = _expect_mapping(stages.get("eval"), "grid key 'stages.eval'")

    common = _expect_mapping(tree.get("overrides"), "grid section 'overrides'")
    axes = _expect_mapping(tree.get("axes"), "grid section 'axes'")
    cells_spec = _expect_mapping(tree.get("cells"), "grid section 'cells'")
    for key, values in axes.items():
        if not isinstance(values, list):
            raise GridError(f"grid axis '{key}': expected a list of values, got {values!r}")
        if not values:
            raise GridError(f"grid axis '{key}' is empty")
    if "seed" in axes:  # the replication axis
        seeds = axes.pop("seed")
    all_tasks = tuple(finetune)
    cells = []
    for combo in itertools.product(*axes.values()) if axes else []:
        chosen = dict(zip(axes, combo))
        cells.append(_cell(_cell_name(chosen), chosen, common, all_tasks))
    for name, spec in cells_spec.items():
        spec = dict(_expect_mapping(spec, f"grid cell '{name}'"))
        tasks = spec.pop("tasks", list(all_tasks))
        if not isinstance(tasks, list) or not set(tasks) <= set(all_tasks):
            raise GridError(f"grid cell '{name}': 'tasks' must be a list of the finetune stages {list(all_tasks)}, "
                            f"got {tasks!r}")
        cells.append(_cell(str(name), spec, common, tuple(tasks)))
    if not cells:
        cells.append(_cell("base", {}, common, all_tasks))
    names = [c.name for c in cells]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise GridError(f"grid '{path}': cell name(s) {duplicates} appear twice")

    findings = [_finding(f, names) for f in tree.get("findings") or []]
    return Grid(path=path, dir=Path(study.get("dir", f"studies/{path.stem}")), ranks=ranks, launcher=launcher,
                seeds=list(seeds), pretrain_config=stages.get("pretrain"), finetune_configs=dict(finetune),
                eval_overrides=eval_overrides, cells=cells, findings=findings)


def _cell(name: str, axes: dict, common: dict, tasks: tuple[str, ...]) -> Cell:
    if "/" in name or name in ("", ".", ".."):
        raise GridError(f"grid cell name '{name}' cannot be a directory name")
    if "seed" in axes:
        raise GridError(f"grid cell '{name}': 'seed' is the replication axis; set study.seeds")
    return Cell(name=name, axes=dict(axes), overrides=_split_by_stage({**common, **axes}), tasks=tasks)


def _finding(spec: Any, cell_names: list[str]) -> Finding:
    spec = _expect_mapping(spec, "grid section 'findings'")
    missing = [k for k in ("name", "cells", "metrics", "expect") if k not in spec]
    if missing:
        raise GridError(f"grid finding {spec.get('name', spec)!r}: missing key(s) {missing}")
    unknown_cells = [c for c in spec["cells"] if c not in cell_names]
    if unknown_cells or len(spec["cells"]) < 2:
        raise GridError(f"grid finding '{spec['name']}': needs 2+ cells of the grid; unknown: {unknown_cells}")
    if spec["expect"] not in EXPECTATIONS:
        raise GridError(f"grid finding '{spec['name']}': expect must be one of {EXPECTATIONS}")
    metrics = spec["metrics"] if isinstance(spec["metrics"], list) else [spec["metrics"]]
    return Finding(name=spec["name"], claim=spec.get("claim", ""), cells=tuple(spec["cells"]),
                   metrics=tuple(metrics), expect=spec["expect"], note=spec.get("note", ""))


# ---- the runs a grid implies -------------------------------------------------------------


def stage_overrides(grid: Grid, cell: Cell, stage: str, seed: int) -> list[str]:
    """The ``key=value`` overrides of one stage of one cell and seed (without run_dir)."""
    values = dict(cell.overrides[stage])
    if stage != "eval":
        values["seed"] = seed
    return override_strings(values)


def pretrain_identity(grid: Grid, cell: Cell, seed: int) -> str:
    """A hash of what a cell's pretraining trains: equal for cells that can share the run."""
    cfg = to_dict(load_config(grid.pretrain_config, stage_overrides(grid, cell, "pretrain", seed)))
    for key in NOT_PRETRAINING:
        cfg.pop(key, None)
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_grid(grid: Grid) -> None:
    """Load and validate every config the grid implies (names the cell and the key on error)."""
    from vlmoe.train.adapters import adapter_config
    from vlmoe.train.finetune import named_task

    for cell in grid.cells:
        seed = grid.seeds[0]
        try:
            if grid.pretrain_config:
                load_config(grid.pretrain_config, stage_overrides(grid, cell, "pretrain", seed))
            elif cell.overrides["pretrain"]:
                raise GridError(f"keys {sorted(cell.overrides['pretrain'])} set pretraining, and the grid has no "
                                f"'stages.pretrain'")
            for task in cell.tasks:
                cfg = load_config(grid.finetune_configs[task], stage_overrides(grid, cell, "finetune", seed))
                if cfg.finetune.task != task:
                    raise GridError(f"stage 'finetune.{task}': its config fine-tunes '{cfg.finetune.task}'")
                named_task(cfg)
                adapter_config(cfg)
                if grid.pretrain_config is None and cfg.finetune.base_run is None and cfg.finetune.hf_model is None:
                    raise GridError(f"stage 'finetune.{task}' has no base: set stages.pretrain or finetune.base_run")
                load_config(grid.finetune_configs[task], [*stage_overrides(grid, cell, "finetune", seed),
                                                          *override_strings(grid.eval_overrides),
                                                          *stage_overrides(grid, cell, "eval", seed)])
        except ConfigError as exc:
            raise GridError(f"grid '{grid.path}', cell '{cell.name}': {exc}") from exc
