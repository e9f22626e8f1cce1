"""Config loading, overrides and the errors a mistyped run gets before it starts."""
from __future__ import annotations

import json
import subprocess
import sys
import typing

import pytest

from conftest import REPO
from vlmoe.config import ConfigError, load_config, parse_overrides
from vlmoe.train.trainer import deepspeed_config


def test_shipped_config_and_overrides():
    cfg = load_config("pretrain_tiny", ["train.steps=7", "train.lr=1e-3", "model.depth=6", "train.betas=[0.8, 0.9]"])
    assert cfg.train.steps == 7 and cfg.train.lr == 1e-3 and cfg.train.betas == [0.8, 0.9]
    assert cfg.model.preset == "tiny" and cfg.model.overrides == {"depth": 6}
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
    ("prepare.visual_tokenizer=vqkd", "config key 'prepare.visual_tokenizer' must be 'kmeans' or "
                                      "'python:package.module:factory', got 'vqkd'"),
    ("prepare.visual_tokenizer=python:my_module", "config key 'prepare.visual_tokenizer'"),
])
def test_bad_keys_and_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("pretrain_tiny", [override])
    assert message in str(err.value)


# one per class of bad value; each message names the key, the value and what is allowed
BAD_VALUES = [
    # negative
    ("train.lr=-1", "config key 'train.lr' must be a finite number > 0, got -1.0"),
    ("train.min_lr=-1e-5", "config key 'train.min_lr' must be a finite number >= 0, got -1e-05"),
    ("train.weight_decay=-0.1", "config key 'train.weight_decay' must be a finite number >= 0, got -0.1"),
    ("train.grad_clip=-1", "config key 'train.grad_clip' must be a finite number >= 0 (0: no clipping), got -1.0"),
    ("data.eval_batches=-3", "config key 'data.eval_batches' must be an integer >= 0 (0: no evaluation), got -3"),
    ("data.num_workers=-1", "config key 'data.num_workers' must be an integer >= 0 (0: load in the training process), got -1"),
    ("data.text_batch=-1", "config key 'data.text_batch' must be an integer >= 0 (0: leave the text objective out), got -1"),
    ("seed=-5", "config key 'seed' must be an integer in [0, 9223372036854775807], got -5"),
    ("train.betas=[-0.1, 0.9]", "config key 'train.betas' must be two numbers, each in [0, 1), got [-0.1, 0.9]"),
    # NaN and infinity, as YAML writes them and as Python does
    ("train.lr=nan", "config key 'train.lr' must be a finite number > 0, got nan"),
    ("train.lr=.nan", "config key 'train.lr' must be a finite number > 0, got nan"),
    ("train.lr=inf", "config key 'train.lr' must be a finite number > 0, got inf"),
    ("train.eps=.inf", "config key 'train.eps' must be a finite number > 0, got inf"),
    ("train.min_lr=-inf", "config key 'train.min_lr' must be a finite number >= 0, got -inf"),
    ("train.weight_decay=nan", "config key 'train.weight_decay' must be a finite number >= 0, got nan"),
    ("train.grad_clip=inf", "config key 'train.grad_clip' must be a finite number >= 0 (0: no clipping), got inf"),
    ("prepare.val_fraction=nan", "config key 'prepare.val_fraction' must be a number in [0, 1), got nan"),
    ("pretrain.mim_ratio=nan", "config key 'pretrain.mim_ratio' must be a number in (0, 1), got nan"),
    ("train.betas=[0.9, .nan]", "config key 'train.betas' must be two numbers, each in [0, 1), got [0.9, nan]"),
    ("model.init_std=inf", "config key 'model.init_std' must be a finite number, got inf"),
    # zero (or too small) where a positive value is needed
    ("train.lr=0", "config key 'train.lr' must be a finite number > 0, got 0.0"),
    ("train.eps=0", "config key 'train.eps' must be a finite number > 0, got 0.0"),
    ("train.keep_checkpoints=0", "config key 'train.keep_checkpoints' must be an integer >= 1, got 0"),
    ("train.dist_timeout_s=0", "config key 'train.dist_timeout_s' must be an integer >= 1, got 0"),
    ("data.batch_size=0", "config key 'data.batch_size' must be an integer >= 1, got 0"),
    ("data.eval_max_examples=0", "config key 'data.eval_max_examples' must be an integer >= 1 or null (null: all), got 0"),
    ("prepare.max_items_per_source=0",
     "config key 'prepare.max_items_per_source' must be an integer >= 1 or null (null: all), got 0"),
    ("prepare.tokenizer_fit_images=0", "config key 'prepare.tokenizer_fit_images' must be an integer >= 1, got 0"),
    ("prepare.codebook_size=1", "config key 'prepare.codebook_size' must be an integer >= 2, got 1"),
    ("prepare.text_vocab_size=8", "config key 'prepare.text_vocab_size' must be an integer >= 16, got 8"),
    ("model.depth=0", "config section 'model' (preset 'tiny', model.depth=0): ModelConfig.depth must be a positive int"),
    # fractions out of range, and keys bounded by another key
    ("prepare.val_fraction=1", "config key 'prepare.val_fraction' must be a number in [0, 1), got 1.0"),
    ("finetune.val_fraction=0", "config key 'finetune.val_fraction' must be a number in (0, 1), got 0.0"),
    ("pretrain.vlm_image_ratio=1", "config key 'pretrain.vlm_image_ratio' must be a number in (0, 1), got 1.0"),
    ("train.betas=[0.9, 1.0]", "config key 'train.betas' must be two numbers, each in [0, 1), got [0.9, 1.0]"),
    ("train.betas=[0.9]", "config key 'train.betas' must be two numbers, each in [0, 1), got [0.9]"),
    ("train.min_lr=0.01", "config key 'train.min_lr' must be <= train.lr (0.002), got 0.01"),
    ("model.vl_ffn_start=5", "config section 'model' (preset 'tiny', model.vl_ffn_start=5): ModelConfig.vl_ffn_start"),
    # wrong type, unknown key or name
    ("train.betas=[fast, 0.9]", "config key 'train.betas[0]': expected float, got 'fast'"),
    ("model.depth=two", "config key 'model.depth': expected int, got 'two'"),
    ("model.qkv_bias=3", "config key 'model.qkv_bias': expected bool, got 3"),
    ("model.depthh=2", "unknown config key 'model.depthh' (did you mean 'depth'?)"),
    ("model.preset=huge", "config key 'model.preset' must be one of ['base', 'small', 'tiny'], got 'huge'"),
    ("model.vocab_size=30522", "config key 'model.vocab_size' is set by the prepared tokenizers"),
    ("finetune.smola.rank=-1", "config section 'finetune.smola': rank must be a positive int"),
    # the typed sections: one unknown-key check, their own checks named by section, finite floats
    ("finetune.smola.rnak=2", "unknown config key 'finetune.smola.rnak' (did you mean 'rank'?)"),
    ("finetune.lora.scale=nan", "config key 'finetune.lora.scale' must be a finite number, got nan"),
    ("finetune.lora.rank=two", "config key 'finetune.lora.rank': expected int, got 'two'"),
    ("moe.num_expert=8", "unknown config key 'moe.num_expert' (did you mean 'num_experts'?)"),
    ("moe.capacity_factor=nan", "config key 'moe.capacity_factor' must be a finite number, got nan"),
    ("moe.num_experts=6", "config section 'moe': MoEConfig.num_experts=6 is not divisible by ep_size=4"),
    ("moe.placement=top", "config section 'moe': MoEConfig.placement must be one of ('lower', 'all'), got 'top'"),
    ("moe.aux_losses.t=[swich]", "config section 'moe': MoEConfig.aux_losses['t']: unknown loss 'swich'"),
]


@pytest.mark.parametrize("override, message", BAD_VALUES)
def test_every_bad_value_is_an_error_naming_key_value_and_range(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("pretrain_tiny", [override, *(["moe.ep_size=4"] if override.startswith("moe.") else [])])
    assert message in str(err.value)


def test_sections_are_typed_once_at_load_and_round_trip(tmp_path):
    from smola.config import LoRAConfig, SMoLAConfig
    from vlmoe.config import dump_config
    from vlmoe.moe.config import MoEConfig

    cfg = load_config("pretrain_tiny", ["moe.num_experts=8", "moe.aux_losses.t=[switch]",
                                        "finetune.smola.num_experts=4", "finetune.lora.rank=8"])
    assert cfg.moe == MoEConfig(num_experts=8, aux_losses={"v": ["vloss"], "t": ["switch"]})
    assert cfg.finetune.smola == SMoLAConfig(num_experts=4) and cfg.finetune.lora == LoRAConfig(rank=8)
    assert load_config("pretrain_tiny").moe is None
    dump_config(cfg, tmp_path / "config.yaml")  # what a run directory records loads back to the same config
    assert load_config(str(tmp_path / "config.yaml")) == cfg


def test_every_numeric_key_has_a_range_rule():
    from vlmoe import config

    numeric = set()
    for prefix, cls in [("", config.RunConfig), ("data.", config.DataConfig), ("prepare.", config.PrepareConfig),
                        ("pretrain.", config.PretrainConfig), ("finetune.", config.FinetuneConfig),
                        ("train.", config.TrainConfig)]:
        for name, typ in typing.get_type_hints(cls).items():
            scalar = typing.get_origin(typ) in (None, typing.Union)  # train.betas (a list) has its own check
            if scalar and {int, float} & {typ, *typing.get_args(typ)}:
                numeric.add(prefix + name)
    assert numeric == set(config.RULES)
    assert numeric >= {"seed", "train.lr", "train.grad_clip", "data.eval_batches", "train.keep_checkpoints"}


def test_boundary_values_are_accepted():
    cfg = load_config("pretrain_tiny", [
        "train.grad_clip=0", "data.eval_batches=0", "train.min_lr=2e-3", "train.weight_decay=0",
        "train.betas=[0, 0.999]", "prepare.val_fraction=0", "seed=0", "data.image_batch=0", "data.num_workers=0",
        "train.warmup_steps=0", "train.keep_checkpoints=1", "data.eval_max_examples=null",
        "model.depth=2", "model.vl_ffn_start=1", "model.init_std=1e-3", "finetune.smola.rank=2"])
    assert cfg.train.grad_clip == 0.0 and cfg.data.eval_batches == 0 and cfg.train.min_lr == cfg.train.lr == 2e-3
    assert cfg.train.betas == [0.0, 0.999] and all(isinstance(b, float) for b in cfg.train.betas)
    assert cfg.model.overrides == {"depth": 2, "vl_ffn_start": 1, "init_std": 1e-3}  # "1e-3": a float, not a string


def test_eval_batches_zero_builds_no_evaluation(prepared_data, tmp_path):
    import torch

    from vlmoe.train.distributed import DistInfo
    from vlmoe.train.pretrain import build_pretrain_task

    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    cfg = load_config("pretrain_tiny", [f"data.dir={prepared_data}", "data.eval_batches=0", "train.steps=2"])
    assert build_pretrain_task(cfg, info).eval_batches is None
    assert len(build_pretrain_task(load_config("pretrain_tiny", [f"data.dir={prepared_data}", "data.eval_batches=2"]),
                                   info).eval_batches) == 2
    # `vlmoe eval` of such a run says what to add instead of evaluating nothing
    with pytest.raises(ConfigError, match=r"'data.eval_batches' is 0 .* data.eval_batches=4"):
        build_pretrain_task(cfg, info, model_dir=tmp_path / "model")


@pytest.mark.parametrize("command, override, message", [
    ("pretrain", "train.lr=nan", "config key 'train.lr' must be a finite number > 0, got nan"),
    ("pretrain", "train.keep_checkpoints=0", "config key 'train.keep_checkpoints' must be an integer >= 1, got 0"),
    ("pretrain", "model.depth=0", "config section 'model' (preset 'tiny', model.depth=0): ModelConfig.depth"),
    ("prepare", "model.depthh=2", "unknown config key 'model.depthh' (did you mean 'depth'?)"),
])
def test_cli_rejects_bad_value_before_any_work(tmp_path, command, override, message):
    proc = subprocess.run([sys.executable, "-m", "vlmoe", command, "pretrain_tiny", override, f"run_dir={tmp_path}/run",
                           f"data.dir={tmp_path}/data", "train.shm_comm=false"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"vlmoe: error: {message}" in proc.stderr and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("vlmoe: error: "), errors
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()  # nothing created


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
    assert ds["optimizer"]["params"]["fused"] is True  # torch's fused AdamW has a CPU kernel
    no_fused = deepspeed_config(load_config("pretrain_tiny", ["deepspeed.optimizer.params.fused=false"]), world_size=1)
    assert no_fused["optimizer"]["params"]["fused"] is False and no_fused["optimizer"]["params"]["lr"] > 0
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


def test_skipping_non_finite_steps_needs_one_micro_batch_per_step():
    with pytest.raises(ConfigError, match="'skip' needs train.grad_accum=1, got 2"):
        load_config("pretrain_tiny", ["train.on_nonfinite=skip", "train.grad_accum=2"])
    assert load_config("pretrain_tiny", ["train.on_nonfinite=skip"]).train.on_nonfinite == "skip"
