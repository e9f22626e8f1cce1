"""The MoE layer against a per-token reference, padding, metrics, the backbone factory, config errors."""
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from vlmoe.model.config import model_config
from vlmoe.model.multiway import MultiwayTransformer
from vlmoe.model.pretraining import VLMoEForPretraining
from vlmoe.nn.task_scope import task_scope
from vlmoe.moe import MoE, MoEConfig, collect_aux_loss, collect_metrics, freeze_moe, moe_ffn_factory, parameter_report
from vlmoe.moe.backbone import moe_layers


def reference_moe(layer: MoE, tokens: torch.Tensor, capacity: int) -> torch.Tensor:
    """Token-by-token MoE in plain Python: top-k of the gates, BPR order, k-major capacity."""
    e = layer.experts
    gates = F.linear(tokens, layer.router.weight).softmax(-1)
    top = gates.topk(layer.k, dim=-1)
    order = sorted(range(tokens.shape[0]), key=lambda s: (-top.values[s, 0].item(), s))
    fill = [0] * layer.num_experts
    out = torch.zeros_like(tokens)
    for choice in range(layer.k):
        for s in order:
            expert = top.indices[s, choice].item()
            if fill[expert] < capacity:
                hidden = F.gelu(tokens[s] @ e.w_in[expert] + e.b_in[expert, 0])
                out[s] += top.values[s, choice] * (hidden @ e.w_out[expert] + e.b_out[expert, 0])
            fill[expert] += 1
    return out


@pytest.mark.parametrize("k", [1, 2])
def test_layer_matches_per_token_reference(k):
    torch.manual_seed(0)
    layer = MoE(8, 16, MoEConfig(num_experts=4, k=k, capacity_factor=1.0, eval_capacity_factor=0.75, min_capacity=0)).eval()
    with torch.no_grad():
        layer.experts.b_in.normal_()
        layer.experts.b_out.normal_()
        layer.router.weight.mul_(50)  # confident, unbalanced routing so that some tokens drop
    x = torch.randn(3, 8, 8)
    capacity = math.ceil(k * 0.75 * 24 / 4)
    expected = reference_moe(layer, x.reshape(-1, 8), capacity).view_as(x)
    got = layer(x)
    assert torch.allclose(got, expected, atol=1e-5)
    metrics = layer.pop_metrics()
    dropped_rows = (expected.reshape(-1, 8).abs().sum(-1) == 0).float().mean().item()
    assert metrics["moe/dropped"] == pytest.approx(dropped_rows)
    assert 0 < metrics["moe/dropped"] < 1
    assert metrics["moe/capacity"] == capacity
    assert sum(metrics[f"moe/load/{i}"] for i in range(4)) == pytest.approx(1.0)


def test_gradients_match_reference():
    torch.manual_seed(1)
    layer = MoE(6, 10, MoEConfig(num_experts=3, k=2, eval_capacity_factor=0.8, min_capacity=0)).eval()
    x = torch.randn(12, 6, requires_grad=True)
    layer(x).pow(2).sum().backward()
    grads = [p.grad.clone() for p in (layer.router.weight, layer.experts.w_in, layer.experts.w_out)]
    gx = x.grad.clone()
    layer.zero_grad()
    x.grad = None
    reference_moe(layer, x, math.ceil(2 * 0.8 * 12 / 3)).pow(2).sum().backward()
    for got, param in zip(grads, (layer.router.weight, layer.experts.w_in, layer.experts.w_out)):
        assert torch.allclose(got, param.grad, atol=1e-5)
    assert torch.allclose(gx, x.grad, atol=1e-5)
    assert layer.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("frozen", [False, True])
def test_tiled_experts_match_one_batched_matmul(monkeypatch, frozen):
    """CPU tiles (here 2-3 experts each) that skip each tile's empty rows give the outputs on used
    rows and every gradient of the plain batched FFN over whole buffers."""
    from vlmoe.moe import experts as experts_module

    torch.manual_seed(0)
    pool = experts_module.Experts(8, 16, num_local=5, seed=3)
    with torch.no_grad():
        pool.b_in.normal_()
        pool.b_out.normal_()
    pool.requires_grad_(not frozen)
    rows_used = torch.tensor([6, 0, 3, 8, 1])
    buffers = torch.randn(5, 8, 8) * (torch.arange(8) < rows_used[:, None]).unsqueeze(-1)
    buffers.requires_grad_(True)
    used = (torch.arange(8) < rows_used[:, None]).unsqueeze(-1)
    upstream = torch.randn(5, 8, 8) * used  # combine sends nothing back to empty rows

    plain = torch.baddbmm(pool.b_out, F.gelu(torch.baddbmm(pool.b_in, buffers, pool.w_in)), pool.w_out)
    params = [buffers] + ([] if frozen else [pool.w_in, pool.b_in, pool.w_out, pool.b_out])
    expected = torch.autograd.grad(plain, params, upstream)
    for tile in (2, 3):
        monkeypatch.setattr(experts_module, "CPU_TILE_BYTES", tile * 8 * 16 * 4)
        out = pool(buffers, rows_used)
        torch.testing.assert_close(out * used, plain * used, rtol=1e-5, atol=1e-6)
        for start in range(0, 5, tile):  # rows after a tile's last used row are not computed
            assert not out[start:start + tile, rows_used[start:start + tile].max():].any()
        got = torch.autograd.grad(out, params, upstream)
        for name, a, b in zip(["buffers", "w_in", "b_in", "w_out", "b_out"], got, expected):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_expert_weight_gradients_reuse_memory_only_when_nobody_holds_it():
    from vlmoe.moe.experts import Experts

    torch.manual_seed(0)
    pool = Experts(8, 16, num_local=3, seed=1)
    inputs = [torch.randn(3, 4, 8) for _ in range(3)]

    def expected_grad(x):
        out = torch.baddbmm(pool.b_out, F.gelu(torch.baddbmm(pool.b_in, x, pool.w_in)), pool.w_out)
        return torch.autograd.grad(out.square().sum(), pool.w_in)[0]

    pool(inputs[0]).square().sum().backward()
    first_grad = pool.w_in.grad
    held = first_grad.clone()
    pool(inputs[1]).square().sum().backward()  # .grad still held: accumulate, never overwrite it
    pooled = {b.data_ptr() for b in pool.grad_buffers._pools["w_in"]}
    assert len(pooled) == 2  # the second backward's gradient took a second buffer, kept for the next step
    torch.testing.assert_close(pool.w_in.grad, expected_grad(inputs[0]) + expected_grad(inputs[1]))
    assert pool.w_in.grad is first_grad
    kept = pool.w_in.grad
    pool.zero_grad(set_to_none=True)
    pool(inputs[2]).square().sum().backward()  # `kept` still refers to the first memory: not that one
    torch.testing.assert_close(kept, held + expected_grad(inputs[1]))
    torch.testing.assert_close(pool.w_in.grad, expected_grad(inputs[2]))
    del kept, first_grad
    pooled = {b.data_ptr() for b in pool.grad_buffers._pools["w_in"]}
    assert pool.w_in.grad.data_ptr() in pooled and len(pooled) == 2  # the second buffer was free again
    pool.zero_grad(set_to_none=True)
    pool(inputs[0]).square().sum().backward()  # nobody holds them now: pooled memory again
    pool(inputs[1]).square().sum().backward()  # a second call in the same step: the pool's too
    assert pool.w_in.grad.data_ptr() in pooled
    assert {b.data_ptr() for b in pool.grad_buffers._pools["w_in"]} == pooled  # nothing new allocated
    torch.testing.assert_close(pool.w_in.grad, expected_grad(inputs[0]) + expected_grad(inputs[1]))


def test_padding_takes_no_capacity_and_gets_zero_output():
    torch.manual_seed(2)
    layer = MoE(8, 16, MoEConfig(num_experts=4, min_capacity=0)).eval()
    x = torch.randn(2, 6, 8)
    mask = torch.tensor([[True] * 6, [True, True, True, False, False, False]])
    out = layer(x, mask)
    assert out[1, 3:].abs().sum() == 0
    # same result as routing only the 9 real tokens as one group
    real = layer(x[mask])
    assert torch.allclose(out[mask], real, atol=1e-6)
    assert layer.pop_metrics()["moe/capacity"] == math.ceil(9 / 4)
    with pytest.raises(ValueError, match="token_mask shape"):
        layer(x, mask[:, :3])


def test_experts_run_in_the_autocast_dtype_and_train_their_fp32_weights():
    # a custom autograd function is not cast by autocast: the layer casts for it (it used to fail
    # with "Input dtypes must be the same" in the second expert GEMM)
    torch.manual_seed(0)
    layer = MoE(16, 32, MoEConfig(num_experts=4, noise_std=0.0, aux_losses={"v": ["switch"], "t": ["switch"]})).train()
    x = torch.randn(2, 12, 16)
    reference = layer(x)
    layer.pop_aux_loss()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    (out.float().sum() + layer.pop_aux_loss()).backward()
    assert torch.allclose(out.float(), reference, atol=0.05, rtol=0.05)
    assert layer.experts.w_in.grad.dtype == torch.float32 and layer.experts.w_in.grad.abs().sum() > 0


def test_training_noise_aux_loss_and_task_metrics():
    torch.manual_seed(3)
    layer = MoE(8, 16, MoEConfig(num_experts=4, aux_losses={"v": ["vloss", "switch"]}, z_loss_weight=0.001),
                metric_prefix="moe/L1/v").train()
    x = torch.randn(32, 8)
    with task_scope("mim"):
        layer(x)
    with task_scope("vlm"):
        layer(x[:16])
    metrics = layer.pop_metrics()
    for name in ("dropped", "dropped/mim", "dropped/vlm", "entropy", "aux/vloss", "aux/switch", "aux/z", "load/3"):
        assert f"moe/L1/v/{name}" in metrics
    assert 0 < metrics["moe/L1/v/entropy"] <= math.log(4) + 1e-6
    aux = layer.pop_aux_loss()
    expected = 0.01 * (metrics["moe/L1/v/aux/vloss"] + metrics["moe/L1/v/aux/switch"]) + 0.001 * metrics["moe/L1/v/aux/z"]
    assert aux.item() == pytest.approx(expected, rel=1e-5)
    aux.backward()
    assert layer.router.weight.grad.abs().sum() > 0
    assert layer.pop_aux_loss() is None and layer.pop_metrics() == {}
    # noise makes training routing stochastic, evaluation is deterministic
    layer.eval()
    assert torch.equal(layer(x), layer(x))


def test_groups_in_one_call_route_alone_and_match_separate_calls():
    # the backbone sends a step's objectives through one call: each must still be its own routing
    # group (capacity, priority, aux terms, per-task metrics) and get what a call of its own gives
    cfg = MoEConfig(num_experts=4, capacity_factor=1.0, min_capacity=0, aux_losses={"v": ["vloss", "switch"]},
                    z_loss_weight=0.001)
    torch.manual_seed(4)
    layer = MoE(8, 16, cfg, metric_prefix="m").train()
    xs = [torch.randn(3, 7, 8, requires_grad=True), torch.randn(2, 5, 8, requires_grad=True)]
    masks = [None, torch.tensor([[True] * 5, [True, True, False, False, False]])]
    upstream = [torch.randn(x.shape) for x in xs]
    params = [xs[0], xs[1], layer.router.weight, layer.experts.w_in, layer.experts.w_out]

    def run(together: bool):
        torch.manual_seed(5)  # the same router noise: each group draws its own, in group order
        if together:
            outs = layer(xs, masks, tasks=["mim", "vlm"])
        else:
            outs = []
            for x, mask, task in zip(xs, masks, ["mim", "vlm"]):
                with task_scope(task):
                    outs.append(layer(x, mask))
        aux = layer.pop_aux_loss()
        loss = sum((out * g).sum() for out, g in zip(outs, upstream)) + aux
        return outs, aux, torch.autograd.grad(loss, params), layer.pop_metrics()

    separate, together = run(False), run(True)
    for a, b in zip(separate[0], together[0]):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(together[1], separate[1])
    for a, b in zip(separate[2], together[2]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert together[3] == pytest.approx(separate[3])
    assert together[3]["m/capacity"] == (math.ceil(21 / 4) + math.ceil(7 / 4)) / 2  # each group's own, per call
    assert {"m/dropped/mim", "m/dropped/vlm"} <= set(together[3])
    with pytest.raises(ValueError, match="2 inputs, 1 token masks and 2 tasks"):
        layer(xs, masks[:1], tasks=["mim", "vlm"])


def test_eval_uses_eval_capacity_factor():
    layer = MoE(4, 8, MoEConfig(num_experts=2, capacity_factor=2.0, eval_capacity_factor=0.5, min_capacity=0))
    layer.train()(torch.randn(8, 4))
    assert layer.pop_metrics()["moe/capacity"] == 8
    layer.eval()(torch.randn(8, 4))
    assert layer.pop_metrics()["moe/capacity"] == 2


def tiny_model(**moe_overrides):
    cfg = model_config("tiny", depth=4, vl_ffn_start=3, drop_path=0.0)
    moe_cfg = MoEConfig(num_experts=4, **moe_overrides)
    return cfg, VLMoEForPretraining(cfg, moe_ffn_factory(cfg, moe_cfg))


def test_factory_places_moe_in_every_second_v_and_t_ffn_of_all_blocks_by_default():
    assert MoEConfig().placement == "all"
    cfg, model = tiny_model()
    kinds = [(type(b.ffn_v).__name__, type(b.ffn_t).__name__) for b in model.backbone.blocks]
    assert kinds == [("FeedForward", "FeedForward"), ("MoE", "MoE"), ("FeedForward", "FeedForward"), ("MoE", "MoE")]
    assert type(model.backbone.blocks[3].ffn_vl).__name__ == "FeedForward"  # the VL-FFN stays dense


def test_base_parameter_report_matches_paper_scale():
    cfg = model_config("base")
    with torch.device("meta"):
        default = parameter_report(MultiwayTransformer(cfg, moe_ffn_factory(cfg, MoEConfig())))
        lower = parameter_report(MultiwayTransformer(cfg, moe_ffn_factory(cfg, MoEConfig(placement="lower"))))
    expert = 2 * 768 * 3072 + 3072 + 768
    # default: every second V-FFN and T-FFN of all 12 blocks (1, 3, ..., 11), 32 experts each
    assert default["experts"] == 12 * 32 * expert and lower["experts"] == 10 * 32 * expert
    assert 1.9e9 < default["total"] < 2.1e9 and default["routers"] < 0.5e6  # the paper's "2B total, routers < 0.5M"
    assert 1.6e9 < lower["total"] < 1.7e9  # blocks 1, 3, ..., 9 only: short of the paper's 2B
    assert lower["applied_per_token"] == default["applied_per_token"] - 2 * 768 * 32  # one expert per token each
    # Applied per token (LIMoE's count, both modality paths) is the dense model's size plus the
    # routers: ~201M with BEiT-3's 64k vocabulary; the paper's ~180M is VLMO's, with BERT's 30522.
    with torch.device("meta"):
        dense = sum(p.numel() for p in MultiwayTransformer(cfg).parameters())
        vlmo_cfg = model_config("base", vocab_size=30522)
        vlmo = parameter_report(MultiwayTransformer(vlmo_cfg, moe_ffn_factory(vlmo_cfg, MoEConfig())))
    assert default["applied_per_token"] == dense + default["routers"]
    assert 170e6 < vlmo["applied_per_token"] < 185e6


def test_factory_placement_lower_keeps_moe_below_the_vl_ffn_blocks():
    cfg, model = tiny_model(placement="lower")
    blocks = model.backbone.blocks
    kinds = [(type(b.ffn_v).__name__, type(b.ffn_t).__name__, type(b.ffn_vl).__name__) for b in blocks]
    assert kinds == [("FeedForward", "FeedForward", "NoneType"), ("MoE", "MoE", "NoneType"),
                     ("FeedForward", "FeedForward", "NoneType"), ("FeedForward", "FeedForward", "FeedForward")]
    assert blocks[1].ffn_v is not blocks[1].ffn_t
    assert blocks[1].ffn_v.router.weight.data_ptr() != blocks[1].ffn_t.router.weight.data_ptr()


def test_default_aux_losses_are_the_papers_vloss_for_v_and_load_for_t():
    # VL-MoE 4.1 and footnote 1: V-MoE's vloss for V-MoE, Shazeer et al.'s load loss for T-MoE
    assert MoEConfig().aux_losses == {"v": ["vloss"], "t": ["load"]} and MoEConfig().noise_std > 0
    cfg, model = tiny_model()
    blocks = model.backbone.blocks
    assert blocks[1].ffn_v.aux_losses == ("vloss",) and blocks[1].ffn_t.aux_losses == ("load",)
    assert MoEConfig(aux_losses={"v": ["vloss"], "t": ["switch"]}).losses_for("t") == ("switch",)  # still an option
    with pytest.raises(ValueError, match="'load' needs noise_std > 0"):
        MoEConfig(noise_std=0.0, aux_losses={"v": [], "t": ["load"]})
    # a modality left out keeps its default, so that overriding one does not silently drop the other's
    assert MoEConfig(aux_losses={"t": ["switch"]}).aux_losses == {"v": ["vloss"], "t": ["switch"]}
    assert MoEConfig(aux_losses={"v": []}).losses_for("v") == ()


def test_shipped_sparse_config_uses_the_papers_aux_losses():
    path = Path(__file__).resolve().parents[1] / "vlmoe" / "configs" / "pretrain_tiny_moe.yaml"
    moe = MoEConfig.from_dict(yaml.safe_load(path.read_text())["moe"])
    assert moe.aux_losses == MoEConfig().aux_losses == {"v": ["vloss"], "t": ["load"]}


def _batch(cfg, b=2):
    g = torch.Generator().manual_seed(0)
    P, T = cfg.num_patches, 6
    pad = torch.ones(b, T, dtype=torch.bool)
    pad[1, 4:] = False
    labels = torch.full((b, T), -100)
    labels[:, 1] = 5
    mim = torch.zeros(b, P, dtype=torch.bool)
    mim[:, :3] = True
    targets = torch.randint(0, cfg.codebook_size, (b, P), generator=g)
    pixels = torch.randn(b, 3, cfg.image_size, cfg.image_size, generator=g)
    ids = torch.randint(5, cfg.vocab_size, (b, T), generator=g)
    return {"text": {"ids": ids, "pad_mask": pad, "labels": labels},
            "image": {"pixels": pixels, "mim_mask": mim, "mim_targets": targets},
            "pair": {"pixels": pixels, "ids": ids, "pad_mask": pad, "labels": labels, "mim_mask": mim,
                     "mim_targets": targets}}


def test_pretraining_model_collects_aux_loss_and_per_task_metrics():
    torch.manual_seed(0)
    cfg, model = tiny_model()
    out = model(_batch(cfg))
    aux = collect_aux_loss(model)
    assert aux.item() > 0
    (out["loss"] + aux).backward()
    metrics = collect_metrics(model)
    assert {"moe/L1/v/dropped/mim", "moe/L1/v/dropped/vlm", "moe/L1/t/dropped/mlm", "moe/L1/t/dropped/vlm",
            "moe/L1/v/aux/vloss", "moe/L1/t/aux/load", "moe/L1/t/load/3", "moe/L1/v/entropy",
            "moe/L3/v/aux/vloss", "moe/L3/t/aux/load"} <= set(metrics)
    assert not any(name.endswith("/aux/switch") for name in metrics)
    assert "moe/L1/v/dropped/mlm" not in metrics  # no image tokens in the text-only task
    assert collect_metrics(model) == {} and collect_aux_loss(model) is None


@pytest.mark.parametrize("kind", ["sparse", "soft"])
def test_objectives_share_each_expert_call_and_match_separate_backbone_passes(kind):
    # pretraining sends the objectives through the backbone together: the experts of every MoE
    # layer run once per step (once per objective before), with the same outputs and gradients
    from vlmoe.model.multiway import EncoderInput

    torch.manual_seed(0)
    # no router noise: the order of the routers' calls differs between the two ways
    cfg, model = tiny_model(type=kind, noise_std=0.0, aux_losses={"v": ["switch"], "t": ["switch"]})
    batch = _batch(cfg)
    text, image, pair = batch["text"], batch["image"], batch["pair"]
    inputs = [EncoderInput(text_ids=text["ids"], text_pad_mask=text["pad_mask"], task="mlm"),
              EncoderInput(pixels=image["pixels"], image_mask=image["mim_mask"], task="mim"),
              EncoderInput(pixels=pair["pixels"], text_ids=pair["ids"], text_pad_mask=pair["pad_mask"],
                           image_mask=pair["mim_mask"], task="vlm")]
    expert_calls = []
    for layer in moe_layers(model):
        layer.experts.register_forward_hook(lambda module, args, out: expert_calls.append(module))
    backbone, params = model.backbone, [p for p in model.parameters() if p.requires_grad]

    def run(together: bool):
        expert_calls.clear()
        if together:
            hidden = [o.hidden for o in backbone.forward_many(inputs)]
        else:
            hidden = []
            for given in inputs:
                with task_scope(given.task):
                    hidden.append(backbone(given.pixels, given.text_ids, given.text_pad_mask, given.image_mask).hidden)
        loss = sum(h.square().mean() for h in hidden) + (collect_aux_loss(model) or 0)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return hidden, grads, collect_metrics(model), len(expert_calls)

    separate, together = run(False), run(True)
    for a, b in zip(separate[0], together[0]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    for a, b in zip(separate[1], together[1]):
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    assert together[2] == pytest.approx(separate[2], rel=1e-5)
    # MoE V and T in blocks 1 and 3: in block 1 two objectives reach each (images or texts, and
    # pairs), in block 3 one (pairs take the dense VL-FFN there)
    assert (separate[3], together[3]) == (2 + 2 + 1 + 1, 4)


def test_evaluation_neither_takes_nor_adds_to_the_training_routing_statistics():
    # eval_every not a multiple of log_every: an evaluation falls between two log steps
    torch.manual_seed(0)
    cfg, model = tiny_model()
    model(_batch(cfg))
    collect_aux_loss(model)
    trained_calls = [layer.train_stats.calls for layer in moe_layers(model)]
    model.eval()
    with torch.no_grad():
        model(_batch(cfg))
    assert collect_aux_loss(model) is None  # no balancing loss is measured in evaluation: none logged
    validation = collect_metrics(model)
    assert validation and [layer.train_stats.calls for layer in moe_layers(model)] == trained_calls
    assert all(layer.eval_stats.calls == 0 for layer in moe_layers(model))
    assert not any("/aux/" in name for name in validation)
    model.train()
    training = collect_metrics(model)  # the training steps' routing, read at the next log step
    assert set(training) > set(validation) and all(layer.train_stats.calls == 0 for layer in moe_layers(model))
    assert any("/aux/" in name for name in training)


def test_activation_checkpointing_does_not_double_count():
    torch.manual_seed(0)
    cfg = model_config("tiny", depth=2, vl_ffn_start=2, drop_path=0.0, grad_checkpointing=True)
    # block 1 holds the MoE; checkpointing re-runs it (noise included) inside backward
    model = VLMoEForPretraining(cfg, moe_ffn_factory(cfg, MoEConfig(num_experts=4)))
    batch = _batch(cfg)
    del batch["image"], batch["pair"]
    out = model(batch)
    aux = collect_aux_loss(model)
    (out["loss"] + aux).backward()  # re-runs the block forward inside backward
    assert collect_aux_loss(model) is None
    assert [layer.stats.calls for layer in moe_layers(model)] == [0, 1]  # text-only batch: T-MoE only (V first)
    assert "moe/L1/t/dropped/mlm" in collect_metrics(model)


def test_activation_checkpointing_of_a_shared_expert_call_gives_the_same_gradients():
    # all three objectives share each MoE call; the re-run inside backward must route (noise
    # included) and count exactly as the first run did
    cfg = model_config("tiny", depth=2, vl_ffn_start=2, drop_path=0.0)
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = VLMoEForPretraining(cfg, moe_ffn_factory(cfg, MoEConfig(num_experts=4)))
        model.backbone.grad_checkpointing = checkpointing
        (model(_batch(cfg))["loss"] + collect_aux_loss(model)).backward()
        results.append(([p.grad for p in model.parameters()], collect_metrics(model)))
    for a, b in zip(results[0][0], results[1][0]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    assert results[1][1] == pytest.approx(results[0][1])
    assert {"moe/L1/v/dropped/mim", "moe/L1/v/dropped/vlm", "moe/L1/t/dropped/mlm"} <= set(results[1][1])


def test_freeze_switch_and_parameter_report():
    cfg, model = tiny_model(freeze=True)
    layers = moe_layers(model)
    assert len(layers) == 4 and all(not p.requires_grad for layer in layers for p in layer.parameters())
    cfg, model = tiny_model()
    assert freeze_moe(model) == sum(p.numel() for layer in moe_layers(model) for p in layer.parameters())
    report = parameter_report(model)
    d, f, E, n = cfg.dim, cfg.ffn_dim, 4, 4  # n: V and T MoE layers of blocks 1 and 3
    expert = d * f + f + f * d + d
    dense = sum(p.numel() for p in VLMoEForPretraining(cfg).parameters())
    assert report["routers"] == n * d * E
    assert report["experts"] == n * E * expert
    assert report["total"] == dense - n * expert + n * E * expert + n * d * E
    assert report["applied_per_token"] == dense + n * d * E
    assert report["trainable"] == report["total"] - report["experts"] - report["routers"]


def test_moe_config_rejects_bad_values():
    cases = [
        (dict(num_experts=6, ep_size=4), "num_experts=6 is not divisible by ep_size=4"),
        (dict(num_experts=4, k=5), "k=5 is larger than num_experts=4"),
        (dict(capacity_factor=0.0), "capacity_factor must be > 0"),
        (dict(eval_capacity_factor=-1.0), "eval_capacity_factor must be > 0"),
        (dict(aux_losses={"v": ["vlos"]}), "unknown loss 'vlos'"),
        (dict(aux_losses={"x": ["vloss"]}), "unknown modality 'x'"),
        (dict(noise_std=0.0), "'vloss' needs noise_std > 0"),
        (dict(backend="megablocks"), "backend must be one of"),
        (dict(placement="top"), "placement must be one of"),
        (dict(num_experts=0), "num_experts must be a positive int"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            MoEConfig(**kwargs)
    with pytest.raises(ValueError, match="ep_size=2 does not divide the world size 3"):
        MoEConfig(ep_size=2).check_world(3)
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['experts'\]"):
        MoEConfig.from_dict({"experts": 4})
    assert MoEConfig.from_dict(MoEConfig().to_dict()) == MoEConfig()
    with pytest.raises(ValueError, match="unknown loss 'nope'"):
        MoEConfig(num_experts=2, aux_losses={"v": ["nope"]})


def test_dropped_fraction_per_expert_and_task_by_hand():
    from vlmoe.moe.metrics import RoutingStats
    from vlmoe.moe.router import route

    # 6 tokens, 3 experts, capacity 2, top-1 in token order: expert 0 is chosen by tokens
    # 0, 1, 2, 3 (2 and 3 dropped), expert 1 by token 4, expert 2 by token 5
    logits = torch.tensor([[5.0, 0, 0]] * 4 + [[0, 5.0, 0], [0, 0, 5.0]])
    stats = RoutingStats(3)
    stats.update(route(logits, 1, 2, batch_priority=False), "mlm", {})
    # a second mlm call: all 2 tokens to expert 1, capacity 1 (one dropped)
    stats.update(route(torch.tensor([[0, 5.0, 0]] * 2), 1, 1, batch_priority=False), "mlm", {})
    out = stats.summary("moe")
    assert out["moe/dropped/mlm"] == pytest.approx(3 / 8)
    # expert 0: 2 of 4 dropped; expert 1: 1 of 3; expert 2: 0 of 1
    assert [out[f"moe/dropped/mlm/{e}"] for e in range(3)] == pytest.approx([0.5, 1 / 3, 0.0])
