"""Sparse VL-MoE through the trainer: EP=2 pretraining on 2 ranks (and its whole-pool export), resume at
EP=1, SMoLA fine-tuning of the EP=2 base on 1 rank."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import TEST_OVERRIDES, deepspeed_cmd, run
from vlmoe.train.checkpoint import EXPERTS_FILE, committed_tag, tag_for
from vlmoe.train.metrics import read_metrics

MOE_ARGS = ["train.save_every=4", "train.eval_every=8", "train.steps=8", *TEST_OVERRIDES]


@pytest.fixture(scope="module")
def moe_run(prepared_data, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("moe") / "ep2"
    run(deepspeed_cmd(2, "pretrain", "pretrain_tiny_moe", f"data.dir={prepared_data}", f"run_dir={run_dir}",
                      *MOE_ARGS), timeout=600)
    return run_dir


def test_ep2_pretraining_loss_falls_and_logs_routing(moe_run):
    records = read_metrics(moe_run, "loss")
    assert [r["step"] for r in records] == list(range(1, 9))
    for key in ("mlm", "mim", "vlm"):
        assert sum(r[key] for r in records[-2:]) < sum(r[key] for r in records[:2]), key
    last = records[-1]
    for layer in ("L1", "L3"):  # every second V-FFN and T-FFN of the lower blocks
        assert 0.0 <= last[f"moe/{layer}/v/dropped/mim"] <= 1.0 and f"moe/{layer}/v/dropped/vlm" in last
        assert 0.0 <= last[f"moe/{layer}/t/dropped/mlm"] <= 1.0
        assert abs(sum(last[f"moe/{layer}/v/load/{e}"] for e in range(8)) - 1.0) < 1e-5
        assert last[f"moe/{layer}/v/aux/vloss"] > 0 and last[f"moe/{layer}/t/aux/load"] > 0
    assert "moe/L2/v/dropped" not in last and last["aux_loss"] > 0
    val = read_metrics(moe_run, "val/loss")[-1]
    assert "val/moe/L1/v/dropped" in val
    assert (moe_run / "checkpoints" / tag_for(8) / EXPERTS_FILE).exists()
    record = json.loads((moe_run / "model" / "model_config.json").read_text())
    assert record["moe"]["ep_size"] == 2 and record["step"] == 8
    from safetensors.torch import load_file
    exported = load_file(str(moe_run / "model" / "model.safetensors"))
    experts = {k: v for k, v in exported.items() if ".experts." in k}
    assert experts and all(v.shape[0] == 8 for v in experts.values())  # whole pools, gathered over EP=2
    assert (moe_run / "model" / "text_tokenizer.model").is_file()


def test_resume_ep2_checkpoint_on_one_rank_with_ep1_and_back(moe_run, prepared_data, tmp_path):
    import shutil
    run_dir = tmp_path / "ep1"
    shutil.copytree(moe_run, run_dir)
    proc = run(deepspeed_cmd(1, "pretrain", "pretrain_tiny_moe", f"data.dir={prepared_data}", f"run_dir={run_dir}",
                             *[a.replace("train.steps=8", "train.steps=10") for a in MOE_ARGS], "moe.ep_size=1"),
               timeout=600)
    assert "resuming from" in proc.stdout and "at step 8" in proc.stdout
    assert "optimizer moments restart" in proc.stdout
    records = {r["step"]: r for r in read_metrics(run_dir, "loss")}
    assert sorted(records) == list(range(1, 11))
    assert records[9]["loss"] < records[1]["loss"]  # continues from trained weights, not from scratch
    assert committed_tag(run_dir / "checkpoints") == tag_for(10)

    # and back: the EP=1 checkpoint resharded over 2 ranks
    proc = run(deepspeed_cmd(2, "pretrain", "pretrain_tiny_moe", f"data.dir={prepared_data}", f"run_dir={run_dir}",
                             *[a.replace("train.steps=8", "train.steps=12") for a in MOE_ARGS]), timeout=600)
    assert "at step 10" in proc.stdout and "optimizer moments restart" in proc.stdout
    records = {r["step"]: r for r in read_metrics(run_dir, "loss")}
    assert sorted(records) == list(range(1, 13)) and records[11]["loss"] < records[1]["loss"]


def test_the_ep2_base_fine_tunes_on_one_rank_with_frozen_routing(moe_run, task_data, tmp_path):
    from conftest import finetune_args
    run_dir = tmp_path / "smola-on-moe"
    proc = run(deepspeed_cmd(1, *finetune_args("vqa", task_data, moe_run, run_dir, "train.steps=6", "train.save_every=3",
                                               "train.eval_every=3")), timeout=600)
    assert "finetune vqa smola" in proc.stdout
    curve = read_metrics(run_dir, "loss")
    assert len(curve) == 6 and all(r["loss"] == r["loss"] for r in curve)
    last = curve[-1]
    assert "moe/L1/v/dropped" in last and "moe/L1/t/dropped" in last  # both pools route: pairs hold image and text
    assert "aux_loss" not in last and not any("/aux/" in k for k in last)  # no balancing loss reaches the adapters
    assert "val/moe/L1/t/dropped" in read_metrics(run_dir, "val/accuracy")[-1]
    from safetensors.torch import load_file
    names = load_file(str(run_dir / "adapter" / "adapter_model.safetensors")).keys()
    assert names and not any("router" in n or "experts" in n for n in names)


def test_soft_moe_ep2_pretraining_loss_falls_without_aux_loss(prepared_data, tmp_path):
    """moe.type=soft through the trainer: 2 ranks, experts sharded (EP=2), 12 steps."""
    run_dir = tmp_path / "soft"
    args = [a.replace("train.steps=8", "train.steps=12").replace("train.eval_every=8", "train.eval_every=12")
            for a in MOE_ARGS]
    run(deepspeed_cmd(2, "pretrain", "pretrain_tiny_moe", f"data.dir={prepared_data}", f"run_dir={run_dir}",
                      *args, "moe.type=soft", "moe.slots_per_expert=2"), timeout=600)
    records = read_metrics(run_dir, "loss")
    assert [r["step"] for r in records] == list(range(1, 13))
    for key in ("mlm", "mim", "vlm"):
        assert sum(r[key] for r in records[-3:]) < sum(r[key] for r in records[:3]), key
    last = records[-1]
    assert "aux_loss" not in last and not any("/aux/" in k or "/dropped" in k for k in last)
    for name in ("L1/v", "L1/t", "L3/v", "L3/t"):
        assert 0 < last[f"moe/{name}/entropy"] <= math.log(16) + 1e-5
        assert 0 <= last[f"moe/{name}/dispatch/min"] <= last[f"moe/{name}/dispatch/max"] <= 1
        assert 0 <= last[f"moe/{name}/combine/min"] <= last[f"moe/{name}/combine/max"] <= 1
    assert "val/moe/L1/v/entropy" in read_metrics(run_dir, "val/loss")[-1]
    from safetensors.torch import load_file
    exported = load_file(str(run_dir / "model" / "model.safetensors"))
    assert all(v.shape[0] == 8 for k, v in exported.items() if ".experts." in k)  # whole pools
    assert any(k.endswith(".phi") for k in exported)

    # resumed from its committed step-8 checkpoint, the run computes steps 9-12 exactly again
    import shutil
    resumed = tmp_path / "soft-resumed"
    shutil.copytree(run_dir, resumed)
    (resumed / "checkpoints" / "last_good").write_text(tag_for(8) + "\n")
    proc = run(deepspeed_cmd(2, "pretrain", "pretrain_tiny_moe", f"data.dir={prepared_data}", f"run_dir={resumed}",
                             *args, "moe.type=soft", "moe.slots_per_expert=2"), timeout=600)
    assert "at step 8" in proc.stdout and "done: step 12 (4 steps in" in proc.stdout  # steps 9-12 ran again
    again = {r["step"]: r for r in read_metrics(resumed, "loss")}
    assert sorted(again) == list(range(1, 13))  # the resumed run's records replaced the copied ones
    for record in records[8:]:
        assert [again[record["step"]][k] for k in ("loss", "mlm", "mim", "vlm")] == \
            [record[k] for k in ("loss", "mlm", "mim", "vlm")], record["step"]
