"""Every README snippet works as printed, checked without training anything.

- ```python blocks run in a subprocess (cwd a temporary directory, PYTHONPATH the repository).
  A block right after ``<!-- test_readme: compile only: REASON -->`` needs what earlier
  commands leave behind (a finished run, a local model): it is compiled and its imports run.
- ```bash blocks: every vlmoe command, also behind ``deepspeed ... --module vlmoe``,
  ``torchrun ... -m vlmoe``, ``bash -c "..."`` or ``bash scripts/quickstart.sh``, line
  continuations joined: a config with its overrides loads and validates (``load_config``), a
  study grid loads with the study's grid loader, an eval's overrides load on the config of the
  run it evaluates. Other lines (apt, pip, other scripts) are skipped.
- ```yaml blocks: study grids load with the grid loader, config fragments as config files.
- README training commands that share a run_dir train the same model (pretraining: equal
  ``model`` and ``moe`` but its EP size) or the same fine-tune (equal ``finetune``, ``model``, ``moe``): a
  different one could not resume from what the first left there.
"""
from __future__ import annotations

import ast
import functools
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
import yaml

from vlmoe.config import ConfigError, load_config, to_dict

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
QUICKSTART = REPO / "scripts" / "quickstart.sh"
FENCE = re.compile(r"^```(\w*)[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
COMPILE_ONLY = re.compile(r"<!--\s*test_readme:\s*compile only\b:?\s*(.*?)\s*-->")
SHELL_LANGS = ("bash", "sh", "shell", "console")
CONFIG_COMMANDS = ("prepare", "pretrain", "finetune")
TRAINING_COMMANDS = ("pretrain", "finetune")
# what a run's identity is made of: a run_dir holds one model (pretraining) or one fine-tune
IDENTITY_SECTIONS = {"pretrain": ("model", "moe"), "finetune": ("finetune", "model", "moe")}
GRID_SECTIONS = {"study", "stages", "axes", "cells"}
EVAL_TAG = re.compile(r"step_\d+")
SNIPPET_TIMEOUT_S = 600


@dataclass(frozen=True)
class Block:
    """One fenced code block of the README."""

    lang: str
    text: str
    line: int  # of the opening fence
    compile_only: Optional[str] = None  # the reason, where the block is marked compile-only


@dataclass(frozen=True)
class Launch:
    """One vlmoe invocation found in a README shell block: ``vlmoe COMMAND ARGS``."""

    where: str  # README.md:LINE
    command: str
    args: tuple[str, ...]

    @property
    def target(self) -> str:
        """The config (prepare / pretrain / finetune), run dir (eval) or grid (study)."""
        return self.args[0] if self.args else ""

    @property
    def overrides(self) -> list[str]:
        """The key=value arguments after the target (options such as --emit and their values are not)."""
        return [a for a in self.args[1:] if "=" in a and not a.startswith("-")]


def readme_blocks(text: Optional[str] = None) -> list[Block]:
    """The fenced code blocks of README.md (or of ``text``), in order."""
    text = README.read_text(encoding="utf-8") if text is None else text
    blocks = []
    for match in FENCE.finditer(text):
        above = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = COMPILE_ONLY.search(above)
        blocks.append(Block(lang=match.group(1).lower(), text=match.group(2),
                            line=text.count("\n", 0, match.start()) + 1,
                            compile_only=(marker.group(1) or "marked compile only") if marker else None))
    return blocks


def logical_lines(script: str, first_line: int) -> list[tuple[int, str]]:
    """Lines of a shell block with backslash continuations joined, each with its README line."""
    out: list[tuple[int, str]] = []
    pending, start = "", first_line
    for number, line in enumerate(script.splitlines(), first_line):
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((start, pending + line))
        pending = ""
    if pending:
        out.append((start, pending))
    return out


def simple_commands(line: str) -> list[list[str]]:
    """The simple commands of one shell line (split at && || ; |, comments dropped), with the
    commands inside ``bash -c "..."`` added after the command that holds them."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token and set(token) <= set(";&|"):
            commands.append([])
        else:
            commands[-1].append(token)
    out = []
    for argv in filter(None, commands):
        out.append(argv)
        for i, word in enumerate(argv[:-2]):
            if Path(word).name in ("bash", "sh") and argv[i + 1] == "-c":
                out.extend(simple_commands(argv[i + 2]))
    return out


@functools.lru_cache(maxsize=1)
def quickstart_config() -> str:
    """The config ``bash scripts/quickstart.sh [overrides]`` pretrains (its extra arguments are overrides)."""
    script = QUICKSTART.read_text(encoding="utf-8")
    default = re.search(r"CONFIG=\$\{CONFIG:-([\w./-]+)\}", script)
    # if the script stops passing "$@" as overrides to pretraining, this mapping must change with it
    assert default and 'vlmoe pretrain "$CONFIG" "$@"' in script, "scripts/quickstart.sh changed: update test_readme"
    return default.group(1)


def vlmoe_args(argv: list[str]) -> Optional[list[str]]:
    """What vlmoe receives from one simple command, or None if the command does not run vlmoe."""
    program = Path(argv[0]).name
    if program == "vlmoe":
        return argv[1:]
    if program in ("bash", "sh") and len(argv) > 1 and (REPO / argv[1]).resolve() == QUICKSTART.resolve():
        return ["pretrain", quickstart_config(), *argv[2:]]
    if program in ("deepspeed", "torchrun") or program.startswith("python"):
        for i, word in enumerate(argv[:-1]):
            if word in ("--module", "-m") and argv[i + 1] == "vlmoe":
                return argv[i + 2:]
    return None


def shell_launches(block: Block) -> tuple[list[Launch], int]:
    """The vlmoe launches of one shell block, and how many other commands it has (skipped)."""
    launches, skipped = [], 0
    for line_number, line in logical_lines(block.text, block.line + 1):
        for argv in simple_commands(line):
            args = vlmoe_args(argv)
            if args is None:
                skipped += 1
            elif args:
                launches.append(Launch(f"README.md:{line_number}", args[0], tuple(args[1:])))
    return launches, skipped


@functools.lru_cache(maxsize=1)
def readme_launches() -> tuple[Launch, ...]:
    """Every vlmoe launch of the README's shell blocks, in order."""
    return tuple(launch for block in readme_blocks() if block.lang in SHELL_LANGS
                 for launch in shell_launches(block)[0])


def is_grid(tree: object) -> bool:
    """A YAML mapping with a study's sections is a grid; any other mapping is a config (fragment)."""
    return isinstance(tree, dict) and bool(GRID_SECTIONS & set(tree))


def readme_grid_blocks() -> list[Block]:
    return [b for b in readme_blocks() if b.lang in ("yaml", "yml") and is_grid(yaml.safe_load(b.text))]


def grid_path(name: str, workdir: Path) -> str:
    """A grid name as ``vlmoe study`` resolves it; a file name the README does not ship (``my_grid.yaml``)
    stands for the README's own example grid, written to ``workdir`` under that name."""
    from vlmoe.study.grid import GridError, resolve_grid_path

    try:
        return str(resolve_grid_path(name))
    except GridError:
        grids = readme_grid_blocks()
        assert len(grids) == 1, f"grid '{name}' is neither shipped nor the README's one example grid"
        path = workdir / Path(name).name
        path.write_text(grids[0].text, encoding="utf-8")
        return str(path)


@functools.lru_cache(maxsize=1)
def trained_runs() -> tuple[tuple[Launch, object], ...]:
    """Each README pretraining / fine-tuning launch whose config loads, with that config (the
    ones that do not load fail test_shell_blocks_load_as_printed, which names them)."""
    runs = []
    for launch in readme_launches():
        if launch.command in TRAINING_COMMANDS:
            try:
                runs.append((launch, load_config(launch.target, launch.overrides)))
            except ConfigError:
                continue
    return tuple(runs)


def producer_of(run_dir: str) -> Optional[Launch]:
    """The README training launch that writes ``run_dir`` (the last one, if several do)."""
    found = None
    for launch, cfg in trained_runs():
        if os.path.normpath(cfg.run_dir) == os.path.normpath(run_dir):
            found = launch
    return found


def check_eval(launch: Launch) -> None:
    """``vlmoe eval RUN_DIR overrides`` loads RUN_DIR's config with the overrides (as
    vlmoe/train/evaluate.py does), so they must load on the config of the run that wrote it."""
    from vlmoe.train.evaluate import POINTERS

    producer = producer_of(launch.target)
    if producer is None:
        raise ConfigError(f"no README pretrain / finetune command writes run_dir {launch.target}")
    cfg = load_config(producer.target, [*producer.overrides, *launch.overrides, f"run_dir={launch.target}"])
    if cfg.eval.checkpoint not in POINTERS and not EVAL_TAG.fullmatch(cfg.eval.checkpoint):
        raise ConfigError(f"eval.checkpoint {cfg.eval.checkpoint!r} is not one of {POINTERS} or a step_N tag")


def check_launch(launch: Launch, workdir: Path) -> bool:
    """Check one launch without running it; False if it is a command with nothing to load (report)."""
    from vlmoe.study.grid import load_grid

    if launch.command in CONFIG_COMMANDS:
        load_config(launch.target, launch.overrides)
    elif launch.command == "eval":
        check_eval(launch)
    elif launch.command == "study":
        load_grid(grid_path(launch.target, workdir), launch.overrides)
    elif launch.command == "report":
        return False  # reads a study directory that only a study run makes
    else:
        raise ConfigError(f"unknown vlmoe command '{launch.command}'")
    return True


def run_identity(command: str, cfg) -> dict:
    """What must be equal for two training commands to share a run_dir (not moe.ep_size: expert
    checkpoints do not depend on it, so a run resumes under another EP size)."""
    tree = to_dict(cfg)
    identity = {"command": command, **{section: tree.get(section) for section in IDENTITY_SECTIONS[command]}}
    if isinstance(identity.get("moe"), dict):
        identity["moe"] = {k: v for k, v in identity["moe"].items() if k != "ep_size"}
    return identity


def python_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env["HF_HUB_OFFLINE"] = "1"  # a snippet that would download fails at once instead of hanging
    return env


def imports_only(source: str) -> str:
    """The top-level import statements of a snippet, as source."""
    return "\n".join(ast.unparse(node) for node in ast.parse(source).body
                     if isinstance(node, (ast.Import, ast.ImportFrom)))


# ---- the parsing itself, on made-up text (so that a parser that silently finds nothing fails) ----


def test_parser_finds_vlmoe_behind_launchers_and_joins_continuations():
    block = Block("bash", "\n".join([
        "# a comment line",
        "deepspeed --num_gpus 2 --module vlmoe pretrain pretrain_tiny \\",
        "    train.steps=5   # trailing comment",
        "torchrun --nproc_per_node 2 -m vlmoe finetune finetune_tiny_nli run_dir=runs/x",
        'docker run img bash -c "vlmoe prepare pretrain_tiny && deepspeed --module vlmoe eval runs/x eval.checkpoint=best"',
        "bash scripts/quickstart.sh train.steps=7",
        "apt-get install -y foo; pip install bar",
        "vlmoe study my_grid.yaml study.ranks=16 --emit slurm --sbatch-arg=--partition=gpu",
    ]), line=10)
    launches, skipped = shell_launches(block)
    assert [(x.command, x.target, x.overrides) for x in launches] == [
        ("pretrain", "pretrain_tiny", ["train.steps=5"]),
        ("finetune", "finetune_tiny_nli", ["run_dir=runs/x"]),
        ("prepare", "pretrain_tiny", []),
        ("eval", "runs/x", ["eval.checkpoint=best"]),
        ("pretrain", quickstart_config(), ["train.steps=7"]),
        ("study", "my_grid.yaml", ["study.ranks=16"]),
    ]
    assert launches[0].where == "README.md:12"  # the line the continued command starts on
    assert skipped == 3  # docker, apt-get, pip


def test_a_mistyped_override_fails_the_check(tmp_path):
    with pytest.raises(ConfigError, match="stepz"):
        check_launch(Launch("x", "pretrain", ("pretrain_tiny", "train.stepz=3")), tmp_path)


def test_compile_only_marker_is_read():
    text = "a\n<!-- test_readme: compile only: needs a run -->\n```python\nimport x\n```\n\n```python\npass\n```\n"
    assert [(b.line, b.compile_only) for b in readme_blocks(text)] == [(3, "needs a run"), (7, None)]


# ---- the README ----


def python_blocks() -> list[Block]:
    return [b for b in readme_blocks() if b.lang in ("python", "py")]


@pytest.mark.parametrize("block", python_blocks(), ids=lambda b: f"line{b.line}")
def test_python_block_runs_as_printed(block, tmp_path):
    source = imports_only(block.text) if block.compile_only else block.text
    compile(block.text, f"README.md:{block.line}", "exec")
    try:
        proc = subprocess.run([sys.executable, "-c", source], cwd=tmp_path, env=python_env(),
                              capture_output=True, text=True, timeout=SNIPPET_TIMEOUT_S)
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)  # the BASE snippet writes a 0.5 GB adapter
    assert proc.returncode == 0, (f"README.md:{block.line} {'(imports) ' if block.compile_only else ''}"
                                  f"failed:\n{source}\n--- stderr\n{proc.stderr[-4000:]}")


def test_shell_blocks_load_as_printed(tmp_path):
    failures, checked, skipped = [], {}, 0
    for block in readme_blocks():
        if block.lang not in SHELL_LANGS:
            continue
        launches, others = shell_launches(block)
        skipped += others
        for launch in launches:
            try:
                if check_launch(launch, tmp_path):
                    checked[launch.command] = checked.get(launch.command, 0) + 1
            except (ConfigError, AssertionError) as exc:
                failures.append(f"{launch.where}: vlmoe {launch.command} {' '.join(launch.args)}\n    {exc}")
    assert not failures, "README commands that would fail:\n" + "\n".join(failures)
    # the check must have found the README's commands, not silently parsed nothing
    assert sum(checked.values()) >= 15, (checked, skipped)
    assert set(checked) >= {"prepare", "pretrain", "finetune", "eval", "study"}, checked


def test_yaml_blocks_load(tmp_path):
    from vlmoe.study.grid import load_grid

    kinds = []
    for block in readme_blocks():
        if block.lang not in ("yaml", "yml"):
            continue
        path = tmp_path / f"readme_line{block.line}.yaml"
        path.write_text(block.text, encoding="utf-8")
        tree = yaml.safe_load(block.text)
        if is_grid(tree):
            load_grid(str(path))
            kinds.append("grid")
        else:  # a fragment of a config file: the rest takes its defaults
            load_config(str(path))
            kinds.append("config")
    assert "grid" in kinds and "config" in kinds, kinds


def test_commands_sharing_a_run_dir_train_the_same_thing():
    by_dir: dict[str, list[tuple[Launch, dict]]] = {}
    for launch, cfg in trained_runs():
        by_dir.setdefault(os.path.normpath(cfg.run_dir), []).append((launch, run_identity(launch.command, cfg)))
    clashes = []
    for run_dir, runs in by_dir.items():
        first_launch, first = runs[0]
        for launch, identity in runs[1:]:
            if identity != first:
                keys = sorted(k for k in identity if identity[k] != first[k])
                clashes.append(f"{run_dir}: {launch.where} differs from {first_launch.where} in {keys}; "
                               f"give it its own run_dir=runs/...")
    assert not clashes, "\n".join(clashes)
    assert len(by_dir) >= 5, sorted(by_dir)
