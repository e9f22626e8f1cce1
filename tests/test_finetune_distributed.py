"""Fine-tuning on 2 real ranks under ZeRO-3: SMoLA on our backbone, a HF model, a LoRA specialist."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import REPO, TEST_OVERRIDES, deepspeed_cmd, launch_env, rank_pid, run, wait_for_commit
from vlmoe.config import load_config
from vlmoe.train.checkpoint import committed_tag, tag_for
from vlmoe.train.metrics import read_metrics

STEPS = 12
FT_OVERRIDES = [o for o in TEST_OVERRIDES if not o.startswith("data.")] + [
    "data.image_batch=16", "data.eval_batches=1", "train.lr=5e-3", "train.save_every=4", "train.eval_every=4",
    f"train.steps={STEPS}", "finetune.smola.num_experts=8"]


def held_share(stdout: str) -> float:
    """The percentage of the base that rank 0 held after building it, as fine-tuning reports it."""
    match = re.search(r"rank 0 holds ([0-9.]+)% of the base", stdout)
    assert match, stdout[-2000:]
    return float(match.group(1))


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir, "loss")}


@pytest.fixture(scope="module")
def base_run(prepared_data, tmp_path_factory) -> Path:
    """A short pretraining run: the backbone every fine-tune here starts from."""
    run_dir = tmp_path_factory.mktemp("base") / "pretrain"
    run(deepspeed_cmd(2, "pretrain", "pretrain_tiny", f"data.dir={prepared_data}", f"run_dir={run_dir}",
                      "train.steps=4", *TEST_OVERRIDES), timeout=600)
    return run_dir


def finetune_args(data: Path, base: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["finetune", "finetune_tiny_smola", f"data.dir={data}", f"finetune.base_run={base}",
            f"run_dir={run_dir}", *FT_OVERRIDES, *extra]


@pytest.fixture(scope="module")
def smola_run(prepared_data, base_run, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("ft") / "smola"
    run(deepspeed_cmd(2, *finetune_args(prepared_data, base_run, run_dir)), timeout=600)
    return run_dir


def test_zero3_smola_loss_falls_and_adapter_is_complete(prepared_data, base_run, smola_run):
    curve = losses(smola_run)
    first, last = sum(curve[s] for s in (1, 2, 3)) / 3, sum(curve[s] for s in (10, 11, 12)) / 3
    assert last < 0.95 * first, f"loss did not fall: {first:.3f} -> {last:.3f}"
    val = read_metrics(smola_run, "val/accuracy")
    assert [r["step"] for r in val] == [4, 8, 12]

    adapter = smola_run / "adapter"
    stack = json.loads((adapter / "adapter_config.json").read_text())["stack"]
    assert [s["method"] for s in stack] == ["smola"] and stack[0]["mode"] == "omni"
    from safetensors.torch import load_file
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    w_out = [t for n, t in tensors.items() if n.endswith("w_out")]
    assert w_out and all(t.shape[0] == 8 and t.numel() > 0 for t in w_out)  # gathered, not ZeRO-3 stubs
    assert sum(float(t.abs().sum()) for t in w_out) > 0  # trained away from zero-init

    # The exported files alone rebuild the model: its validation loss is the one logged.
    from vlmoe.train.distributed import DistInfo
    from vlmoe.train.finetune import build_finetune_task, load_finetuned
    cfg = load_config("finetune_tiny_smola", finetune_args(prepared_data, base_run, smola_run)[2:])
    loss_sum, correct, seen = 0.0, 0.0, 0
    for rank in (0, 1):
        task = build_finetune_task(cfg, DistInfo(rank, 2, 0, torch.device("cpu")))
        model = load_finetuned(cfg, task.model.classifier.out_features)
        for i in range(len(task.eval_batches)):
            with torch.no_grad():
                out = model(task.eval_batches[i])
            n = int(out["num_examples"])
            loss_sum, correct, seen = loss_sum + float(out["loss"]) * n, correct + float(out["accuracy"]) * n, seen + n
    assert seen == 30  # the whole validation split, each image once
    logged = val[-1]
    assert abs(loss_sum / seen - logged["val/loss"]) < 1e-4 * max(1.0, abs(logged["val/loss"])), (loss_sum / seen, logged)
    assert abs(correct / seen - logged["val/accuracy"]) < 1e-6


def test_zero3_resume_after_kill_matches(prepared_data, base_run, smola_run, tmp_path):
    run_dir = tmp_path / "killed"
    cmd = deepspeed_cmd(2, *finetune_args(prepared_data, base_run, run_dir))
    job = subprocess.Popen(cmd, cwd=REPO, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_commit(run_dir, tag_for(4), job, timeout=400)
        os.kill(rank_pid(run_dir, 0), signal.SIGKILL)
        job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0
    proc = run(cmd, timeout=600)
    assert "resuming from" in proc.stdout
    assert losses(run_dir) == losses(smola_run)
    assert committed_tag(run_dir / "checkpoints") == tag_for(STEPS)


def test_lora_specialist_on_the_smola_generalist(prepared_data, base_run, smola_run, tmp_path):
    run_dir = tmp_path / "specialist"
    proc = run(deepspeed_cmd(2, *finetune_args(prepared_data, base_run, run_dir, "finetune.method=lora",
                                               f"finetune.generalist={smola_run}", "train.steps=4")), timeout=600)
    assert "finetune lora" in proc.stdout
    assert held_share(proc.stdout) < 60.0  # the base was built partitioned (zero.Init), never whole
    stack = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["stack"]
    assert [s["method"] for s in stack] == ["smola", "lora"]
    from safetensors.torch import load_file
    generalist = load_file(str(smola_run / "adapter" / "adapter_model.safetensors"))
    specialist = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    # the generalist's experts stay frozen under the specialist's LoRA
    for name, tensor in generalist.items():
        assert torch.equal(specialist[name], tensor), name
    assert any("lora" in n for n in specialist)


def test_pretrained_hugging_face_vit_with_a_new_head_and_smola_in_bf16(prepared_data, tmp_path):
    from transformers import ViTConfig, ViTForImageClassification
    vit_dir = tmp_path / "vit"  # pretrained weights with a 3-class head; the task has more classes
    ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, intermediate_size=128, num_labels=3)
                              ).save_pretrained(str(vit_dir))
    run_dir = tmp_path / "hf"
    proc = run(deepspeed_cmd(2, "finetune", "finetune_tiny_smola", f"data.dir={prepared_data}", f"run_dir={run_dir}",
                             f"finetune.hf_model={vit_dir}", "finetune.base_run=null", "finetune.smola.mode=mm",
                             "train.precision=bf16", *[o for o in FT_OVERRIDES if not o.startswith("train.steps")],
                             "train.steps=8"),
               timeout=600)
    assert held_share(proc.stdout) < 60.0  # transformers built it partitioned under our ZeRO-3 config
    curve = losses(run_dir)
    assert sorted(curve) == list(range(1, 9)) and all(v == v for v in curve.values())
    assert curve[8] < curve[1]
    stack = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["stack"]
    assert stack[0]["method"] == "smola" and stack[0]["mode"] == "mm"
