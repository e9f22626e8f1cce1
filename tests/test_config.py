"""Config loading, overrides and the errors a mistyped run gets before it starts."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO
from vlmoe.config import ConfigError, load_config, parse_overrides
from vlmoe.train.trainer import deepspeed_config


def test_shipped_config_and_overrides():
    cfg = load_config("pretrain_tiny", ["train.steps=7", "train.lr=1e-3", "model.depth=2", "train.betas=[0.8, 0.9]"])
    assert cfg.train.steps == 7 and cfg.train.lr == 1e-3 and cfg.train.betas == [0.8, 0.9]
    assert cfg.model.preset == "tiny" and cfg.model.overrides == {"depth": 2}
    assert cfg.train.zero_stage == 1 and cfg.data.dir == "data/default"


@pytest.mark.parametrize("override, message", [
    ("train.stpes=5", "unknown config key 'train.stpes' (did you mean 'steps'?)"),
    ("trian.steps=5", "unknown config key 'trian'"),
    ("train.steps=five", "config key 'train.steps': expected int, got 'five'"),
    ("train.precision=fp8", "config key 'train.precision'"),
    ("train.zero_stage=4", "config key 'train.zero_stage'"),
    ("pretrain.mlm_prob=1.5", "config key 'pretrain.mlm_prob'"),
    ("train.warmup_steps=-1", "config key 'train.warmup_steps'"),
    ("data.image_batch=true", "config key 'data.image_batch': expected int"),
])
def test_bad_keys_and_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("pretrain_tiny", [override])
    assert message in str(err.value)


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not of the form key=value"):
        parse_overrides(["train.steps"])
    with pytest.raises(ConfigError, match="config file 'nope.yaml' not found"):
        load_config("nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))


def test_deepspeed_config_merges_file_then_mapping(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2, "overlap_comm": True}, "gradient_clipping": 0.5}))
    cfg = load_config("pretrain_tiny", [f"ds_config={path}", "deepspeed.gradient_clipping=0.25", "train.grad_accum=4"])
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert ds["gradient_clipping"] == 0.25
    assert ds["train_batch_size"] == 8 and ds["gradient_accumulation_steps"] == 4
    assert ds["optimizer"]["params"]["torch_adam"] is True
    shipped = deepspeed_config(load_config("pretrain_tiny", ["ds_config=zero2_bf16"]), world_size=1)
    assert shipped["bf16"]["enabled"] is True and shipped["zero_optimization"]["stage"] == 2
    with pytest.raises(ConfigError, match="ds_config"):
        deepspeed_config(load_config("pretrain_tiny", ["ds_config=missing_file"]), world_size=1)


def test_cli_reports_missing_data_before_training(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "vlmoe", "pretrain", "pretrain_tiny", f"data.dir={tmp_path}/absent",
                           f"run_dir={tmp_path}/run", "train.shm_comm=false"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert f"data directory '{tmp_path}/absent' does not exist" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


def test_cli_rejects_unknown_key_with_message(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "vlmoe", "pretrain", "pretrain_tiny", "train.stepz=3"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown config key 'train.stepz'" in proc.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="fp16 is supported on GPUs")
def test_cli_rejects_fp16_on_cpu(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "vlmoe", "pretrain", "pretrain_tiny", "train.precision=fp16",
                           f"run_dir={tmp_path}/run", "train.shm_comm=false"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "'train.precision': fp16 is not supported by DeepSpeed's cpu accelerator" in proc.stderr


def test_single_pass_batches_cover_every_row_once_across_ranks():
    from vlmoe.data.loader import StepBatches
    rows = list(range(23))
    dataset = type("Rows", (), {"__len__": lambda self: len(rows),
                                "__getitem__": lambda self, idx: {"x": [rows[i] for i in idx]}})()
    seen = []
    for rank in (0, 1):
        batches = StepBatches({"image": dataset}, {"image": 4}, rank=rank, world_size=2, seed=0,
                              load_example=lambda subset, row: {"x": row["x"]},
                              collate=lambda examples, step, r: examples["image"])
        assert len(batches) == 3  # ceil(23 / (4 * 2))
        for i in range(len(batches)):
            seen += [e["x"] for e in batches[i] if e["valid"]]
    assert sorted(seen) == rows
    shuffled = StepBatches({"image": dataset}, {"image": 4}, rank=0, world_size=2, seed=0, length=10,
                           load_example=lambda subset, row: {"x": row["x"]},
                           collate=lambda examples, step, r: examples["image"])
    assert all(e["valid"] for i in range(10) for e in shuffled[i])
