"""Rank program for tests/test_zero3_construction.py (torchrun, 2 ranks, gloo).

  construct VIT_DIR OUT   models built partitioned under ZeRO-3 against the same models built whole:
                          our VL-MoE (init, tied weights, loading, export), a HF ViT (from a config, from weights)
Writes OUT.<rank> (JSON).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from _rank_exit import skip_interpreter_teardown

from vlmoe import zero3
from vlmoe.model.config import model_config
from vlmoe.model.pretraining import VLMoEForPretraining
from vlmoe.moe import MoEConfig, moe_ffn_factory
from vlmoe.moe.expert_checkpoint import global_expert_state, load_global_expert_state
from vlmoe.train.base_model import load_hf_image_classifier, load_multiway_base
from vlmoe.train.distributed import init_distributed
from vlmoe.train.export import MODEL_DIR, export_model

DS_CONFIG = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
DS_CONFIG_BF16 = {**DS_CONFIG, "bf16": {"enabled": True}}


def whole_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer as a whole tensor (gathered where partitioned)."""
    with zero3.full_parameters(model):
        return {n: t.detach().clone() for n, t in [*model.named_parameters(remove_duplicate=False),
                                                    *model.named_buffers()]}


def differing(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return sorted(n for n in a if not torch.equal(a[n], b[n]))


def same_on_all_ranks(state: dict[str, torch.Tensor]) -> bool:
    total = torch.tensor([sum(float(t.double().sum()) for t in state.values())], dtype=torch.float64)
    gathered = [torch.zeros_like(total) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, total)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def load_hf_classifier(path: str, labels: int, ds_config: dict | None = None) -> torch.nn.Module:
    return load_hf_image_classifier(path, labels, ds_config).module


def vlmoe_model() -> VLMoEForPretraining:
    cfg = model_config("tiny", depth=4, vl_ffn_start=3, drop_path=0.0)
    torch.manual_seed(3)
    return VLMoEForPretraining(cfg, moe_ffn_factory(cfg, MoEConfig(num_experts=4)))


def construct(vit_dir: str, out: str) -> None:
    report: dict = {}
    whole = vlmoe_model()
    with zero3.partitioned_construction(DS_CONFIG) as partitioned:
        parted = vlmoe_model()
    report["partitioned"] = partitioned
    report["local_fraction"] = zero3.local_fraction(parted)
    report["vlmoe_init_differs"] = differing(whole_state(parted), whole_state(whole))
    report["tied"] = parted.mlm_head.weight is parted.backbone.embeddings.text.tokens.weight

    # loading: another model's weights (dense and experts) go into the partitioned one
    torch.manual_seed(4)
    other = VLMoEForPretraining(whole.cfg, moe_ffn_factory(whole.cfg, MoEConfig(num_experts=4)))
    zero3.load_state_dict(parted, other.state_dict(), strict=False, source="other")
    load_global_expert_state(parted, global_expert_state(other), source="other")
    report["loaded_differs"] = differing(whole_state(parted), whole_state(other))
    report["experts_saved_whole"] = all(torch.equal(t, global_expert_state(other)[n])
                                        for n, t in global_expert_state(parted).items())
    bad = {k: (v[:1] if k.endswith("norm.weight") else v) for k, v in other.state_dict().items()}
    try:
        zero3.load_state_dict(parted, bad, source="bad.pt")
    except ValueError as exc:
        report["shape_error"] = str(exc)
    try:
        zero3.load_state_dict(parted, {k: v for k, v in other.state_dict().items() if "mim_head" not in k},
                              source="partial.pt")
    except ValueError as exc:
        report["missing_error"] = str(exc)

    # the export of a partitioned model holds its whole weights (experts as whole pools); a base built
    # from it in bf16, as fine-tuning builds one (zero.Init makes the model in bf16), holds their bf16 values
    run_dir = Path(out).parent / "base_run"
    record = {"model": other.cfg.to_dict(), "moe": MoEConfig(num_experts=4).to_dict(), "step": 1}
    tokenizer = Path(out).parent / "text_tokenizer.model"
    export_model(parted, run_dir / MODEL_DIR, record, [tokenizer], is_main=dist.get_rank() == 0)
    dist.barrier()
    from safetensors.torch import load_file
    exported = load_file(str(run_dir / MODEL_DIR / "model.safetensors"))
    expected = {**other.state_dict(), **global_expert_state(other)}
    report["export_differs"] = sorted(k for k in expected if k not in exported or not torch.equal(exported[k], expected[k]))
    backbone16 = load_multiway_base(run_dir, DS_CONFIG_BF16).module
    report["bf16_local_fraction"] = zero3.local_fraction(backbone16)
    report["bf16_loaded_differs"] = differing(
        whole_state(backbone16), {n: t.to(torch.bfloat16) if t.is_floating_point() else t
                                  for n, t in whole_state(other.backbone).items()})

    # Hugging Face: from weights (the same head size, then a new one) and from a config
    torch.manual_seed(5)
    reference = load_hf_classifier(vit_dir, 3)
    report["vit_bf16_differs"] = differing(whole_state(load_hf_classifier(vit_dir, 3, DS_CONFIG_BF16)),
                                           {n: t.to(torch.bfloat16) for n, t in whole_state(reference).items()})
    for labels in (3, 5):
        vit = load_hf_classifier(vit_dir, labels, DS_CONFIG)
        state = whole_state(vit)
        report[f"vit{labels}_local_fraction"] = zero3.local_fraction(vit)
        report[f"vit{labels}_differs"] = differing(state, whole_state(reference)) if labels == 3 else \
            differing({k: v for k, v in state.items() if not k.startswith("classifier")},
                      {k: v for k, v in whole_state(reference).items() if not k.startswith("classifier")})
        report[f"vit{labels}_head_std"] = float(state["classifier.weight"].std())
        report[f"vit{labels}_same_on_ranks"] = same_on_all_ranks(state)
    vit = load_hf_classifier(f"{vit_dir}/config.json", 3, DS_CONFIG)
    state = whole_state(vit)
    report["vit_config_same_on_ranks"] = same_on_all_ranks(state)
    report["vit_config_layernorm_ones"] = bool(torch.equal(state["vit.layernorm.weight"],
                                                           torch.ones_like(state["vit.layernorm.weight"])))
    report["vit_config_dense_std"] = float(state["vit.layers.0.attention.q_proj.weight"].std())
    report["vit_config_local_fraction"] = zero3.local_fraction(vit)
    with open(f"{out}.{dist.get_rank()}", "w", encoding="utf-8") as f:
        json.dump(report, f)


if __name__ == "__main__":
    init_distributed(timeout_s=120, shm_comm=False)
    try:
        {"construct": construct}[sys.argv[1]](*sys.argv[2:])
    finally:
        dist.destroy_process_group()
    skip_interpreter_teardown()
