"""Reruns into a run directory: refused before anything is written when they cannot resume."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, launch_env
from vlmoe.config import ConfigError, dump_config, load_config
from vlmoe.train.run_dir import check_rerun, describe, differing_keys


def _committed_run(run_dir: Path, overrides: list[str], step: int, command: str = "pretrain") -> None:
    """A run directory as a run leaves it: its config, its command and a committed checkpoint."""
    (run_dir / "checkpoints" / f"step_{step:08d}").mkdir(parents=True)
    (run_dir / "checkpoints" / "last_good").write_text(f"step_{step:08d}\n")
    dump_config(load_config("pretrain_tiny_moe", [f"run_dir={run_dir}", *overrides]), run_dir / "config.yaml")
    (run_dir / "run.json").write_text(json.dumps({"command": command}))


def test_differing_keys_names_leaves_and_whole_sections():
    old = {"train": {"lr": 1.0, "steps": 5}, "moe": None, "new_in_old_version": 1}
    new = {"train": {"lr": 2.0, "steps": 5}, "moe": {"num_experts": 8}}
    assert list(differing_keys(old, new)) == ["moe", "train.lr"]
    assert list(differing_keys(old, new, one_sided=True)) == ["moe", "new_in_old_version", "train.lr"]


def test_rerun_that_cannot_resume_is_refused_naming_run_dir_and_keys(tmp_path):
    run_dir = tmp_path / "run"
    _committed_run(run_dir, [], step=600)
    cfg = load_config("pretrain_tiny_moe", [f"run_dir={run_dir}", "moe.num_experts=32", "model.ffn_dim=384",
                                            "moe.aux_losses.t=[switch]"])
    with pytest.raises(ConfigError) as err:
        check_rerun(cfg, "pretrain")
    message = str(err.value)
    assert f"run_dir '{run_dir}' holds a run at step 600 that this config cannot resume" in message
    # a field at its preset's value is compared as that value, not as absent
    for part in ("moe.num_experts: 8 -> 32", "moe.aux_losses.t: ['load'] -> ['switch']", "model.ffn_dim: 512 -> 384"):
        assert part in message, message
    with pytest.raises(ConfigError, match=f"run_dir '{run_dir}' holds a pretrain run; this is finetune"):
        check_rerun(load_config("pretrain_tiny_moe", [f"run_dir={run_dir}"]), "finetune")


def test_rerun_may_change_cadence_and_ep_size_and_is_warned_of_a_changed_schedule(tmp_path):
    run_dir = tmp_path / "run"
    _committed_run(run_dir, [], step=600)
    same = check_rerun(load_config("pretrain_tiny_moe", [f"run_dir={run_dir}", "train.log_every=1", "moe.ep_size=1",
                                                         "train.keep_checkpoints=5", "data.num_workers=2"]), "pretrain")
    assert same.step == 600 and same.changed_schedule == ()
    cfg = load_config("pretrain_tiny_moe", [f"run_dir={run_dir}", "train.steps=900", "train.lr=1e-3"])
    rerun = check_rerun(cfg, "pretrain")
    assert rerun.changed_schedule == ("train.lr", "train.steps")
    assert describe(rerun, cfg) == (f"warning: resuming {run_dir} at step 600 with changed train.lr, train.steps: "
                                    "from here the run differs from an uninterrupted run of its first config")


def test_train_steps_below_the_committed_step_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    _committed_run(run_dir, [], step=600)
    with pytest.raises(ConfigError, match=r"'train.steps' is 20, below step 600 of the checkpoint committed in "
                                          rf"run_dir '{run_dir}': set train.steps >= 600"):
        check_rerun(load_config("pretrain_tiny_moe", [f"run_dir={run_dir}", "train.steps=20"]), "pretrain")
    assert check_rerun(load_config("pretrain_tiny_moe", [f"run_dir={run_dir}", "train.steps=600"]), "pretrain").step == 600


def test_a_directory_without_a_committed_checkpoint_starts_fresh(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    dump_config(load_config("pretrain_tiny_moe", [f"run_dir={run_dir}"]), run_dir / "config.yaml")
    rerun = check_rerun(load_config("pretrain_tiny_moe", [f"run_dir={run_dir}", "moe.num_experts=32"]), "pretrain")
    assert rerun.step is None and describe(rerun, load_config("pretrain_tiny")) is None


def _vlmoe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlmoe", *args, "train.shm_comm=false"], cwd=REPO, env=launch_env(),
                          capture_output=True, text=True, timeout=300)


def test_cli_refuses_an_incompatible_rerun_and_leaves_the_run_untouched(tmp_path):
    # the README's 32-expert command into the 8-expert run's directory
    run_dir = tmp_path / "run"
    _committed_run(run_dir, [], step=600)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    proc = _vlmoe("pretrain", "pretrain_tiny_moe", f"run_dir={run_dir}", "moe.num_experts=32")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"vlmoe: error: run_dir '{run_dir}' holds a run at step 600 that this config cannot resume " \
           "(moe.num_experts: 8 -> 32)" in proc.stderr
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_cli_failing_after_config_validation_writes_no_run_directory(tmp_path):
    # the config is valid, the data directory is not there: found while building the task
    proc = _vlmoe("pretrain", "pretrain_tiny", f"data.dir={tmp_path}/absent", f"run_dir={tmp_path}/run")
    assert proc.returncode == 2 and f"data directory '{tmp_path}/absent' does not exist" in proc.stderr
    assert not (tmp_path / "run").exists()
