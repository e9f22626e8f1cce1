"""vlmoe study / report: grid checks, the plan, emitted launch files, results, and a real small grid
end to end (killed mid-run and resumed, a failing cell recorded, the report's plots drawn)."""
from __future__ import annotations

import json
import os
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, TASK_CAP, launch_env
from vlmoe.study.grid import GridError, load_grid, stage_of
from vlmoe.study.plan import make_plan
from vlmoe.study.results import Summary, judge, loss_spikes


def _grid_file(tmp_path: Path, tree: dict, name: str = "grid.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tree, sort_keys=False), encoding="utf-8")
    return path


def _tree(tmp_path: Path, **sections) -> dict:
    tree = {"study": {"dir": str(tmp_path / "study"), "ranks": 2, "seeds": [1, 2]},
            "stages": {"pretrain": "pretrain_tiny", "finetune": {"vqa": "finetune_tiny_vqa"}}}
    tree.update(sections)
    return tree


# ---- grid checks, before anything runs -----------------------------------------------------


@pytest.mark.parametrize("sections, message", [
    ({"axes": {"finetune.metod": ["smola"]}}, "unknown config key 'finetune.metod' (did you mean 'method'?)"),
    ({"axes": {"finetune.method": []}}, "grid axis 'finetune.method' is empty"),
    ({"axes": {"pretrain:train.steps": ["many"]}}, "config key 'train.steps': expected int, got 'many'"),
    ({"axes": {"finetune.method": ["smola", "adapterfusion"]}}, "'finetune.method': 'adapterfusion' is not one of"),
    ({"cells": {"a": {"moe": {"num_experts": 8, "k": 9}}}}, "config section 'moe'"),
    ({"cells": {"a": {"finetune.smola": {"num_experts": 4, "rnk": 2}}}}, "unknown config key 'finetune.smola.rnk' (did you mean 'rank'?)"),
    ({"cells": {"a": {"tasks": ["nli"]}}}, "'tasks' must be a list of the finetune stages ['vqa']"),
    ({"cells": {"a": {"seed": 3}}}, "'seed' is the replication axis"),
    ({"axes": {"train:steps": [1]}}, "stage prefix 'train' is not one of"),
    ({"findings": [{"name": "f", "cells": ["a", "nope"], "metrics": ["vqa/accuracy"], "expect": "increasing"}],
      "cells": {"a": {}}}, "needs 2+ cells of the grid; unknown: ['nope']"),
    ({"extra": 1}, "unknown section(s) ['extra']"),
])
def test_bad_grids_are_refused_naming_the_key(tmp_path, sections, message):
    path = _grid_file(tmp_path, _tree(tmp_path, **sections))
    with pytest.raises(GridError) as info:
        load_grid(str(path))
    assert message in str(info.value)
    assert not (tmp_path / "study").exists()  # nothing ran, nothing written


def test_command_line_overrides_are_checked_too(tmp_path):
    path = _grid_file(tmp_path, _tree(tmp_path))
    with pytest.raises(GridError, match="study.ranks"):
        load_grid(str(path), ["study.ranks=two"])
    with pytest.raises(GridError, match="unknown config key 'train.stpes'"):
        load_grid(str(path), ["finetune:train.stpes=3"])


def test_keys_go_to_the_stage_they_belong_to():
    assert stage_of("moe.num_experts") == (("pretrain",), "moe.num_experts")
    assert stage_of("model.depth") == (("pretrain",), "model.depth")
    assert stage_of("finetune.method") == (("finetune",), "finetune.method")
    assert stage_of("eval.checkpoint") == (("eval",), "eval.checkpoint")
    assert stage_of("train.lr") == (("pretrain", "finetune"), "train.lr")
    assert stage_of("finetune:train.lr") == (("finetune",), "train.lr")


def test_plan_shares_identical_pretraining_and_orders_the_stages(tmp_path):
    moe = {"num_experts": 4, "ep_size": 2}
    path = _grid_file(tmp_path, _tree(
        tmp_path, stages={"pretrain": "pretrain_tiny", "finetune": {"vqa": "finetune_tiny_vqa"},
                          "eval": {"data.eval_max_examples": 64}},
        overrides={"finetune:train.steps": 7},
        axes={"finetune.method": ["smola", "lora"]},
        cells={"sparse": {"moe": moe, "finetune.method": "smola"}, "dense-only": {"tasks": []}}))
    grid = load_grid(str(path))
    assert [c.name for c in grid.cells] == ["method=smola", "method=lora", "sparse", "dense-only"]
    plan = make_plan(grid, tmp_path / "study")
    pretrain = [j for j in plan.jobs if j.kind == "pretrain"]
    # per seed: one dense run shared by three cells, one sparse run
    assert [j.name for j in pretrain] == ["method=smola/seed1/pretrain", "sparse/seed1/pretrain",
                                          "method=smola/seed2/pretrain", "sparse/seed2/pretrain"]
    by_cell = {(r.cell, r.seed): r for r in plan.cells}
    assert by_cell[("method=lora", 1)].pretrain is by_cell[("dense-only", 1)].pretrain is pretrain[0]
    assert by_cell[("dense-only", 1)].finetune == {}
    lora = by_cell[("method=lora", 2)].finetune["vqa"]
    assert lora.depends == ("method=smola/seed2/pretrain",) and lora.steps == 7
    config = yaml.safe_load(Path(lora.args[1]).read_text())
    assert config["finetune"]["method"] == "lora" and config["seed"] == 2
    assert config["finetune"]["base_run"] == str(pretrain[2].run_dir)
    sparse_config = yaml.safe_load(Path(pretrain[1].args[1]).read_text())
    assert sparse_config["moe"].items() >= moe.items() and yaml.safe_load(Path(pretrain[0].args[1]).read_text())["moe"] is None
    evaluation = by_cell[("sparse", 1)].eval["vqa"]
    assert evaluation.args[-1] == "data.eval_max_examples=64" and evaluation.depends == ("sparse/seed1/finetune-vqa",)
    # every job after the jobs it depends on
    order = {j.name: i for i, j in enumerate(plan.jobs)}
    assert all(order[d] < order[j.name] for j in plan.jobs for d in j.depends)


def test_default_grid_has_a_soft_moe_cell_in_the_sparse_cells_layers(tmp_path):
    from vlmoe.config import load_config, to_dict

    grid = load_grid("default", [f"study.dir={tmp_path / 'study'}"])
    cells = {c.name: c for c in grid.cells}
    assert list(cells)[:6] == ["dense", "sparse-load", "sparse-vloss", "sparse-vloss-bpr", "sparse-vloss-z", "soft"]
    assert cells["soft"].tasks == ()  # pretraining only
    plan = make_plan(grid, tmp_path / "study")
    runs = {(r.cell, r.seed): r for r in plan.cells}
    # each seed pretrains dense, the 4 sparse cells and soft (the SMoLA cells share dense and
    # sparse-vloss-bpr's runs), and accounts each run
    assert [j.name for j in plan.jobs if j.kind == "pretrain"][:6] == [
        f"{c}/seed1/pretrain" for c in ("dense", "sparse-load", "sparse-vloss", "sparse-vloss-bpr", "sparse-vloss-z",
                                        "soft")]
    assert sum(j.kind == "pretrain" for j in plan.jobs) == 12 and len(plan.jobs) == 60
    soft = load_config(runs[("soft", 1)].pretrain.args[1])
    sparse = load_config(runs[("sparse-vloss-bpr", 1)].pretrain.args[1])
    dense = load_config(runs[("dense", 1)].pretrain.args[1])
    assert soft.moe.type == "soft" and sparse.moe.type == "sparse" and dense.moe is None
    assert soft.moe.slots_per_expert == 3
    for key in ("num_experts", "every", "placement", "ep_size"):
        assert getattr(soft.moe, key) == getattr(sparse.moe, key), key
    # everything but the MoE section (and where it runs) as the dense cell trains it
    soft_tree, dense_tree = to_dict(soft), to_dict(dense)
    assert {k for k in soft_tree if k not in ("moe", "run_dir") and soft_tree[k] != dense_tree[k]} == set()
    assert soft.train.steps == 200 and soft.seed == 1
    finding = next(f for f in grid.findings if "soft" in f.cells)
    assert finding.cells == ("dense", "sparse-vloss-bpr", "soft") and finding.expect == "decreasing"
    assert finding.metrics == ("pretrain/mlm_loss", "pretrain/mim_loss", "pretrain/vlm_loss")


def test_emitted_slurm_script_and_commands(tmp_path):
    path = _grid_file(tmp_path, _tree(tmp_path, axes={"finetune.method": ["smola", "lora"]},
                                      cells={"sparse": {"moe": {"num_experts": 16, "ep_size": 8}}}))
    env = launch_env()
    for emit in ("slurm", "commands"):
        subprocess.run([sys.executable, "-m", "vlmoe", "study", str(path), "--emit", emit, "--nodes", "2",
                        "--gpus-per-node", "8", "--sbatch-arg=--partition=gpu"], cwd=REPO, env=env, check=True,
                       capture_output=True, timeout=120)
    study = tmp_path / "study"
    for script in ("pretrain.sbatch", "finetune.sbatch", "submit.sh", "commands.sh"):
        subprocess.run(["bash", "-n", str(study / script)], check=True)
    pretrain, finetune = (study / "pretrain.sbatch").read_text(), (study / "finetune.sbatch").read_text()
    # 2 pretraining runs (dense, sparse) per seed; 3 cells x 2 seeds fine-tune
    assert "#SBATCH --array=0-3" in pretrain and "#SBATCH --array=0-5" in finetune
    assert len(re.findall(r"^  \d+\)", pretrain, re.M)) == 4 and len(re.findall(r"^  \d+\)", finetune, re.M)) == 6
    for script in (pretrain, finetune):
        assert "#SBATCH --nodes=2" in script and "#SBATCH --gpus-per-node=8" in script
        assert "#SBATCH --partition=gpu" in script
        assert "--no_ssh --node_rank $SLURM_NODEID" in script
    submit = (study / "submit.sh").read_text()
    assert "PRETRAIN=$(sbatch --parsable pretrain.sbatch)" in submit
    assert "sbatch --dependency=afterok:$PRETRAIN finetune.sbatch" in submit
    # each array task fine-tunes, accounts and evaluates its own cell, after its base exists
    task0 = finetune.split("  0)")[1].split(";;")[0]
    assert "finetune" in task0 and "vlmoe.study.accounting" in task0 and "vlmoe eval" in task0
    commands = (study / "commands.sh").read_text().splitlines()
    launches = [l for l in commands if l.startswith(("deepspeed", "python"))]
    assert len(launches) == len(make_plan(load_grid(str(study / "grid.yaml")), study).jobs) == 4 * 2 + 6 * 3


# ---- pure pieces of the results --------------------------------------------------------------


def test_loss_spikes_by_hand():
    # after 5 values, 4.0 > 1.2 x min(3.0, ...) is a spike; 3.5 is not (< 1.2 x 3.0); NaN is one
    assert loss_spikes([5.0, 4.0, 3.5, 3.2, 3.0, 4.0, 3.5, float("nan")]) == 2
    assert loss_spikes([1.0] * 4) == 0


def test_findings_are_judged_with_their_spread():
    from vlmoe.study.grid import Finding

    up = Finding(name="n", claim="c", cells=("a", "b", "c"), metrics=("m",), expect="increasing")
    assert judge(up, "m", [Summary(0.1, 0.01, 2), Summary(0.2, 0.01, 2), Summary(0.3, 0.01, 2)]) == "reproduced"
    # ordered, but a step (0.05) smaller than a neighbour's spread (0.1)
    assert judge(up, "m", [Summary(0.1, 0.1, 2), Summary(0.15, 0.01, 2), Summary(0.3, 0.01, 2)]) \
        == "reproduced within noise"
    assert judge(up, "m", [Summary(0.3, 0, 2), Summary(0.2, 0, 2), Summary(0.4, 0, 2)]) == "not reproduced"
    assert judge(up, "m", [Summary(0, 0, 2)] * 3) == "no difference"
    assert judge(up, "m", [Summary(0.1, 0, 1), Summary(0.2, 0, 1), Summary(0.3, 0, 1)]) \
        == "reproduced, one seed (no spread)"
    assert judge(up, "m", [Summary(0.1, 0, 2), Summary(math.nan, math.nan, 0), Summary(0.3, 0, 2)]) == "no data"


# ---- a real grid, end to end ------------------------------------------------------------------

STEPS = 8


def _small_grid(tmp_path: Path, data: Path) -> Path:
    """A sparse base shared by every cell, SMoLA with 2 and 4 experts, LoRA, and a cell that fails."""
    return _grid_file(tmp_path, {
        "study": {"dir": str(tmp_path / "study"), "ranks": 2, "launcher": "torchrun", "seeds": [1, 2]},
        "stages": {"pretrain": "pretrain_tiny", "finetune": {"image_classification": "finetune_tiny_image_classification"},
                   "eval": {"data.eval_max_examples": 32}},
        "overrides": {
            "data.dir": str(data), "train.progress_bar": False, "train.shm_comm": False, "train.dist_timeout_s": 120,
            "moe": {"num_experts": 4, "ep_size": 2, "placement": "all"},
            "pretrain:train.steps": 12, "pretrain:train.eval_every": 6, "pretrain:train.save_every": 12,
            "pretrain:train.log_every": 2, "pretrain:train.warmup_steps": 2,
            "pretrain:data.image_batch": 8, "pretrain:data.text_batch": 8, "pretrain:data.pair_batch": 8,
            "pretrain:data.eval_batches": 2,
            "finetune:train.steps": STEPS, "finetune:train.save_every": 4, "finetune:train.eval_every": STEPS,
            "finetune:train.log_every": 2, "finetune:train.warmup_steps": 2, "finetune:data.batch_size": 16,
            "finetune:data.eval_max_examples": 32, "finetune.max_items_per_source": TASK_CAP,
            "finetune.val_fraction": 0.1,
        },
        "cells": {
            "smola-e2": {"finetune.smola": {"num_experts": 2, "rank": 2}},
            "smola-e4": {"finetune.smola": {"num_experts": 4, "rank": 2}},
            "lora": {"finetune.method": "lora", "finetune.lora": {"rank": 8}},
            "broken": {"finetune.data": "jsonl:/no/such/labels.jsonl"},
        },
        "findings": [{"name": "more experts", "claim": "more is better", "cells": ["smola-e2", "smola-e4"],
                      "metrics": ["image_classification/accuracy"], "expect": "increasing"}],
    }, "small.yaml")


def _study(grid: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlmoe", "study", str(grid), *args], cwd=REPO, env=launch_env(),
                          capture_output=True, text=True, timeout=timeout)


def _mtimes(root: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for p in root.rglob("trainer_state.json")}


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant (torchrun starts its ranks in sessions of their own)."""
    import psutil

    root = psutil.Process(pid)
    for process in [root, *root.children(recursive=True)]:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def _not_blank(png: Path) -> bool:
    import matplotlib.image

    pixels = matplotlib.image.imread(str(png))
    return pixels.shape[0] > 100 and pixels.shape[1] > 100 and float(pixels[..., :3].std()) > 0.05


def test_small_grid_end_to_end_killed_resumed_and_reported(task_data, tmp_path):
    grid = _small_grid(tmp_path, task_data)
    study = tmp_path / "study"
    first = study / "runs" / "smola-e4" / "seed1" / "finetune-image_classification"

    # killed (every process, as on a lost node) once a fine-tune has committed its middle checkpoint
    proc = subprocess.Popen([sys.executable, "-m", "vlmoe", "study", str(grid)], cwd=REPO, env=launch_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not (first / "checkpoints" / "last_good").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-4000:]
            time.sleep(0.05)
        _kill_tree(proc.pid)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            _kill_tree(proc.pid)
    assert (first / "checkpoints" / "last_good").read_text().strip() == "step_00000004"
    before = _mtimes(study / "runs")

    done = _study(grid)
    assert done.returncode == 1, done.stdout[-4000:] + done.stderr[-4000:]  # the broken cell failed
    out = done.stdout
    assert "[study] done     smola-e2/seed1/pretrain" in out
    assert "[study] done     smola-e2/seed1/finetune-image_classification" in out
    assert "[study] resume   smola-e4/seed1/finetune-image_classification" in out
    log = (study / "logs" / "smola-e4__seed1__finetune-image_classification.log").read_text()
    assert "resuming from" in log and "at step 4" in log
    after = _mtimes(study / "runs")
    finished = [p for p in before if "smola-e4/seed1" not in p]
    assert finished and all(after[p] == before[p] for p in finished)  # nothing finished was trained again

    # one pretraining run per seed, shared by every cell
    assert sorted(str(p.relative_to(study)) for p in study.rglob("pretrain") if p.is_dir()) == \
        ["runs/smola-e2/seed1/pretrain", "runs/smola-e2/seed2/pretrain"]
    status = json.loads((study / "status.json").read_text())
    broken = status["broken/seed1/finetune-image_classification"]
    assert broken["state"] == "failed" and "/no/such/labels.jsonl" in broken["error"]
    assert Path(broken["log"]).is_file()
    assert status["broken/seed1/finetune-image_classification/eval"]["state"] == "blocked"
    others = {k: v for k, v in status.items() if not k.startswith("broken/")}
    assert len(others) == 2 * (2 + 3 * 3) and all(v["state"] == "done" for v in others.values())

    # results: one row per cell, two seeds each, real numbers
    import csv

    rows = {r["cell"]: r for r in csv.DictReader(open(study / "results.csv"))}
    assert list(rows) == ["smola-e2", "smola-e4", "lora", "broken"]
    assert [rows[c]["seeds"] for c in rows] == ["2", "2", "2", "2"]  # broken still has its shared base
    for cell in ("smola-e2", "smola-e4", "lora"):
        accuracy = float(rows[cell]["image_classification/accuracy_mean"])
        assert 0.0 <= accuracy <= 1.0
        assert float(rows[cell]["image_classification/train_flops_per_step_mean"]) > 0
        assert float(rows[cell]["pretrain/mlm_loss_mean"]) > 0
    assert rows["broken"]["image_classification/accuracy_mean"] == "nan"
    # the eval stage's number is what vlmoe eval wrote
    results = json.loads((first / "eval" / "results.json").read_text())
    assert results["num_examples"] == 32 and results["step"] == STEPS

    # rerun: everything done is skipped (the broken cell's two fine-tunes are retried and fail again)
    again = _study(grid)
    assert again.stdout.count("[study] run") == 2
    assert "failed   broken/seed1" in again.stdout and "failed   broken/seed2" in again.stdout
    assert _mtimes(study / "runs") == after

    report = subprocess.run([sys.executable, "-m", "vlmoe", "report", str(study)], cwd=REPO, env=launch_env(),
                            capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-4000:]
    text = (study / "report.md").read_text()
    assert "### more experts" in text and "image_classification/accuracy" in text
    plots = {p.name: p for p in (study / "plots").glob("*.png")}
    expected = {"val_loss_vs_flops.png", "val_loss_vs_time.png", "image_classification_score_vs_experts.png",
                "image_classification_smola_vs_lora.png", "dropped_smola-e2.png", "expert_load_smola-e2.png",
                "phi_smola-e2_image_classification.png", "phi_smola-e4_image_classification.png"}
    assert expected <= set(plots), sorted(plots)
    assert all(_not_blank(p) for p in plots.values())
    assert all(f"(plots/{name})" in text for name in plots)


def test_a_run_directory_with_another_config_is_refused_and_outputs_count_as_done(tmp_path):
    from vlmoe.study.runner import Status, config_change, run_plan

    path = _grid_file(tmp_path, _tree(tmp_path, cells={"a": {"finetune.method": "lora"}}))
    grid = load_grid(str(path))
    grid.seeds = [1]
    plan = make_plan(grid, tmp_path / "study")
    pretrain, account = plan.jobs[0], plan.jobs[1]
    assert config_change(pretrain) is None  # nothing there yet
    pretrain.run_dir.mkdir(parents=True)
    written = yaml.safe_load(Path(pretrain.args[1]).read_text())
    written["train"]["lr"] = 0.5
    written["model"]["depth"] = 2
    (pretrain.run_dir / "config.yaml").write_text(yaml.safe_dump(written))
    assert config_change(pretrain) == "model.depth, train.lr"
    lines = []
    status = run_plan(plan, tmp_path / "study", "deepspeed", log=lines.append)
    entry = status.jobs[pretrain.name]
    assert entry["state"] == "failed" and "model.depth, train.lr" in entry["error"]
    # everything after it needs it: blocked, nothing launched
    assert {e["state"] for n, e in status.jobs.items() if n != pretrain.name} == {"blocked"}
    assert not (tmp_path / "study" / "logs").exists()

    # an accounting written by a job run elsewhere (not in the status) after the run's last commit is done
    (pretrain.run_dir / "checkpoints").mkdir()
    (pretrain.run_dir / "checkpoints" / "last_good").write_text("step_00000001")
    (pretrain.run_dir / "accounting.json").write_text("{}")
    fresh = Status(tmp_path / "elsewhere")
    assert fresh.is_done(account)
    os.utime(pretrain.run_dir / "accounting.json", (0, 0))  # older than the checkpoint: stale
    assert not fresh.is_done(account)
