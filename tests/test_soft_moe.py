"""Soft MoE (moe.type: soft) against a loop transcription of its equations, gradcheck, per-example
routing, padding, metrics, the backbone factory, the DeepSpeed bridge and config errors."""
import math

import pytest
import torch

from vlmoe.config import ConfigError, load_config
from vlmoe.model.config import model_config
from vlmoe.model.pretraining import VLMoEForPretraining
from vlmoe.moe import (MoEConfig, SoftMoE, collect_aux_loss, collect_metrics, moe_ffn_factory, moe_layers,
                       parameter_report, soft_logits, soft_weights)

from test_moe_layer import _batch


def loop_soft_moe(layer: SoftMoE, x: torch.Tensor, mask: torch.Tensor) -> list:
    """The Soft MoE equations in plain Python loops over b, t, s (float64 lists)."""
    B, n, D = x.shape
    S, p = layer.num_slots, layer.slots_per_expert
    xs, phi, scale = x.tolist(), layer.router.phi.tolist(), layer.router.scale.item()
    w_in, b_in = layer.experts.w_in.tolist(), layer.experts.b_in.tolist()
    w_out, b_out = layer.experts.w_out.tolist(), layer.experts.b_out.tolist()
    d_ff = len(b_in[0][0])

    def norm(v):
        return [a / math.sqrt(sum(c * c for c in v) + 1e-6) for a in v]

    def gelu(z):
        return 0.5 * z * (1.0 + math.erf(z / math.sqrt(2.0)))

    def expert(e, v):
        hidden = [gelu(sum(v[d] * w_in[e][d][f] for d in range(D)) + b_in[e][0][f]) for f in range(d_ff)]
        return [sum(hidden[f] * w_out[e][f][d] for f in range(d_ff)) + b_out[e][0][d] for d in range(D)]

    columns = [norm([phi[d][s] for d in range(D)]) for s in range(S)]
    out = []
    for b in range(B):
        real = [t for t in range(n) if mask[b][t]]
        logits = [[sum(scale * a * c for a, c in zip(norm(xs[b][t]), columns[s])) for s in range(S)] for t in range(n)]
        slot_out = []
        for s in range(S):
            top = max((logits[t][s] for t in real), default=0.0)
            total = sum(math.exp(logits[t][s] - top) for t in real)
            slot = [0.0] * D
            for t in real:
                weight = math.exp(logits[t][s] - top) / total
                slot = [acc + weight * v for acc, v in zip(slot, xs[b][t])]
            slot_out.append(expert(s // p, slot))
        rows = []
        for t in range(n):
            if t not in real:
                rows.append([0.0] * D)
                continue
            top = max(logits[t])
            total = sum(math.exp(v - top) for v in logits[t])
            rows.append([sum(math.exp(logits[t][s] - top) / total * slot_out[s][d] for s in range(S))
                         for d in range(D)])
        out.append(rows)
    return out


def tiny_layer(seed: int = 0, **kwargs) -> SoftMoE:
    torch.manual_seed(seed)
    layer = SoftMoE(6, 10, MoEConfig(type="soft", num_experts=3, slots_per_expert=2), init_std=0.5, seed=seed, **kwargs).double()
    with torch.no_grad():  # non-zero biases and a scale other than 1, so that both are checked
        for param in (layer.experts.b_in, layer.experts.b_out):
            param.normal_(std=0.3)
        layer.router.scale.fill_(1.7)
    return layer


MASKS = {
    "no padding": [[1] * 5] * 3,
    "padding": [[1, 1, 1, 0, 0], [1] * 5, [1, 0, 1, 1, 0]],
    "all-padding example": [[1, 1, 0, 0, 0], [0] * 5, [1] * 5],
}


@pytest.mark.parametrize("case", list(MASKS))
def test_layer_matches_loop_transcription(case):
    layer = tiny_layer()
    x = torch.randn(3, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2
    mask = torch.tensor(MASKS[case], dtype=torch.bool)
    out = layer(x, None if case == "no padding" else mask)
    expected = torch.tensor(loop_soft_moe(layer, x, mask), dtype=torch.float64)
    assert out.shape == x.shape and torch.isfinite(out).all()
    torch.testing.assert_close(out.detach(), expected, rtol=1e-10, atol=1e-10)
    assert torch.equal(out[~mask], torch.zeros_like(out[~mask]))  # padding: exactly zero


def test_weights_all_padding_example_is_zero_without_nan():
    logits = torch.randn(2, 4, 3, requires_grad=True)
    mask = torch.tensor([[True, True, False, False], [False] * 4])
    weights = soft_weights(logits, mask)
    assert torch.equal(weights.dispatch[1], torch.zeros(4, 3)) and torch.equal(weights.combine[1], torch.zeros(4, 3))
    torch.testing.assert_close(weights.dispatch[0].sum(0), torch.ones(3))  # per slot, over the real tokens
    torch.testing.assert_close(weights.combine[0, :2].sum(-1), torch.ones(2))  # per token, over the slots
    (weights.dispatch.sum() + weights.combine.sum()).backward()
    assert torch.isfinite(logits.grad).all()


def test_logits_are_float32_and_cosines_times_scale():
    x, phi = torch.randn(2, 3, 8, dtype=torch.bfloat16), torch.randn(8, 5)
    logits = soft_logits(x, phi, torch.tensor(3.0))
    assert logits.dtype == torch.float32 and logits.shape == (2, 3, 5)
    assert logits.abs().max() <= 3.0 + 1e-5


def test_gradcheck_inputs_phi_and_scale():
    layer = tiny_layer()
    layer.experts.requires_grad_(False)
    x = torch.randn(2, 4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    mask = torch.tensor([[True, True, True, False], [True] * 4])
    phi = layer.router.phi.detach().clone().requires_grad_(True)
    scale = layer.router.scale.detach().clone().requires_grad_(True)

    def f(x, phi, scale):
        return torch.func.functional_call(layer, {"router.phi": phi, "router.scale": scale}, (x, mask))

    assert torch.autograd.gradcheck(f, (x, phi, scale))


def test_routing_of_an_example_does_not_depend_on_the_others():
    torch.manual_seed(0)
    layer = SoftMoE(16, 32, MoEConfig(type="soft", num_experts=4, slots_per_expert=2))
    x = torch.randn(4, 7, 16)
    mask = torch.ones(4, 7, dtype=torch.bool)
    mask[2, 5:] = False
    out = layer(x, mask)
    other = x.clone()
    other[1:] = torch.randn(3, 7, 16) * 5
    torch.testing.assert_close(layer(other, mask)[0], out[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x[2:3], mask[2:3])[0], out[2], rtol=0, atol=1e-6)


def test_inputs_in_one_call_match_separate_calls():
    torch.manual_seed(1)
    layer = SoftMoE(16, 32, MoEConfig(type="soft", num_experts=4, slots_per_expert=2), metric_prefix="s")
    xs = [torch.randn(3, 7, 16, requires_grad=True), torch.randn(2, 4, 16, requires_grad=True)]
    masks = [None, torch.tensor([[True] * 4, [True, False, False, False]])]
    params = [*xs, layer.router.phi, layer.experts.w_in]
    separate = [layer(x, m) for x, m in zip(xs, masks)]
    separate_metrics = layer.pop_metrics()
    together = layer(xs, masks)
    assert layer.pop_metrics() == pytest.approx(separate_metrics)
    for a, b in zip(separate, together):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    grads = [torch.autograd.grad(sum(o.square().sum() for o in outs), params) for outs in (separate, together)]
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_metrics_per_mode_and_no_aux_loss():
    layer = tiny_layer(metric_prefix="moe/L1/v").float()
    x = torch.randn(3, 5, 6)
    mask = torch.tensor(MASKS["all-padding example"], dtype=torch.bool)
    layer(x, mask).sum().backward()
    layer(x, mask)
    assert layer.pop_aux_loss() is None
    layer.eval()
    assert layer.pop_metrics() == {}  # training's calls are not evaluation's
    layer.train()
    metrics = layer.pop_metrics()
    weights = soft_weights(soft_logits(x, layer.router.phi, layer.router.scale), mask)
    real = mask.unsqueeze(-1).expand_as(weights.combine)
    assert metrics["moe/L1/v/dispatch/min"] == pytest.approx(weights.dispatch[real].min().item())
    assert metrics["moe/L1/v/dispatch/max"] == pytest.approx(weights.dispatch[real].max().item())
    assert metrics["moe/L1/v/combine/min"] == pytest.approx(weights.combine[real].min().item())
    assert metrics["moe/L1/v/combine/max"] == pytest.approx(weights.combine[real].max().item())
    combine = weights.combine[mask]
    entropy = -(combine * combine.log()).sum(-1).mean().item()
    assert metrics["moe/L1/v/entropy"] == pytest.approx(entropy, rel=1e-5)
    assert 0 < entropy <= math.log(layer.num_slots)
    assert layer.pop_metrics() == {}  # reset


def tiny_soft_model(**moe_overrides):
    cfg = model_config("tiny", depth=4, vl_ffn_start=3, drop_path=0.0)
    moe_cfg = MoEConfig(type="soft", num_experts=4, slots_per_expert=2, **moe_overrides)
    return cfg, VLMoEForPretraining(cfg, moe_ffn_factory(cfg, moe_cfg))


def test_factory_builds_soft_layers_per_modality_and_the_trainer_interface_works():
    cfg, model = tiny_soft_model()
    kinds = [(type(b.ffn_v).__name__, type(b.ffn_t).__name__) for b in model.backbone.blocks]
    assert kinds == [("FeedForward", "FeedForward"), ("SoftMoE", "SoftMoE")] * 2
    layers = moe_layers(model)
    assert len(layers) == 4 and all(layer.num_slots == 8 for layer in layers)
    assert layers[0].router.phi is not layers[1].router.phi and layers[0].experts is not layers[1].experts
    out = model(_batch(cfg))
    assert collect_aux_loss(model) is None
    out["loss"].backward()
    metrics = collect_metrics(model)
    assert {"moe/L1/v/entropy", "moe/L1/t/combine/min", "moe/L3/v/dispatch/max"} <= set(metrics)
    report = parameter_report(model)
    expert = cfg.dim * cfg.ffn_dim * 2 + cfg.ffn_dim + cfg.dim
    assert report["routers"] == 4 * (cfg.dim * 8 + 1)
    assert report["experts"] == 4 * 4 * expert
    assert report["total"] == sum(p.numel() for p in model.parameters())
    _, frozen = tiny_soft_model(freeze=True)
    assert not any(p.requires_grad for layer in moe_layers(frozen) for p in layer.parameters())


def test_deepspeed_bridge_tags_soft_experts_and_checkpoints_round_trip(tmp_path):
    from vlmoe.moe.deepspeed_bridge import DeepSpeedExperts, moe_param_groups, prepare_for_deepspeed
    from vlmoe.moe.expert_checkpoint import load_experts, save_experts

    _, model = tiny_soft_model()
    assert prepare_for_deepspeed(model, 2) == 4
    layer = moe_layers(model)[0]
    assert isinstance(layer.experts, DeepSpeedExperts)
    assert all(p.allreduce is False for p in layer.experts.parameters())
    assert getattr(layer.router.phi, "allreduce", True) and getattr(layer.router.scale, "allreduce", True)  # dense params
    groups = moe_param_groups(model.parameters())
    expert_ids = {id(p) for g in groups if g.get("moe") for p in g["params"]}
    assert id(layer.experts.w_in) in expert_ids and id(layer.router.phi) not in expert_ids
    save_experts(model, tmp_path / "experts.safetensors")
    _, other = tiny_soft_model()
    load_experts(other, tmp_path / "experts.safetensors")
    assert torch.equal(moe_layers(other)[2].experts.w_out, moe_layers(model)[2].experts.w_out)


def test_zero3_marks_soft_layers_as_leaves():
    from vlmoe.moe.deepspeed_bridge import prepare_for_deepspeed

    _, model = tiny_soft_model()
    prepare_for_deepspeed(model, 3)
    assert all(getattr(layer, "_z3_leaf", False) for layer in moe_layers(model))


@pytest.mark.parametrize("values, message", [
    ({"type": "bogus"}, "MoEConfig.type must be one of ('sparse', 'soft'), got 'bogus'"),
    ({"type": "soft", "slots_per_expert": 0}, "MoEConfig.slots_per_expert must be a positive int, got 0"),
])
def test_config_refuses_bad_type_and_slots(values, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        MoEConfig(**values)
    overrides = [f"moe.{key}={value}" for key, value in values.items()]
    with pytest.raises(ConfigError, match="config section 'moe'"):
        load_config("pretrain_tiny_moe", overrides)
