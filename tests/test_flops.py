"""FLOP and parameter accounting: FlopCounterMode and the analytic count against hand arithmetic
(dense FFN, sparse MoE with known routing, SMoLA, LoRA, attention), on an adapted backbone, and
`python -m vlmoe.study.accounting` on a real ZeRO-3 pretraining run of 2 ranks.

Conventions (vlmoe.study.flops): a GEMM [m, k] x [k, n] is 2mkn FLOPs forward; its backward adds
the same again for the input gradient (when the input needs grad) and for the weight gradient
(when the weight trains).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import smola
from vlmoe.config import ConfigError
from vlmoe.model.config import model_config
from vlmoe.model.multiway import MultiwayTransformer, SelfAttention
from vlmoe.nn.feed_forward import FeedForward
from vlmoe.moe.config import MoEConfig
from vlmoe.moe.layer import MoE
from vlmoe.study.accounting import ACCOUNTING_FILE, account_run, main
from vlmoe.study.flops import CATEGORIES, kernel_flops, measure_flops

REPO = Path(__file__).resolve().parents[1]


def _training_step(module: nn.Module, *inputs: torch.Tensor):
    """(counted, analytic) of module(*inputs).sum() forward and backward."""
    return measure_flops(module, lambda: module(*inputs).sum().backward())


def test_dense_ffn_forward_and_training_step():
    ffn = FeedForward(dim=8, ffn_dim=32)
    x = torch.randn(2, 5, 8)  # 10 tokens
    gemm = 2 * 10 * 8 * 32  # fc1 and fc2 cost the same: 5120
    counted, analytic = measure_flops(ffn, lambda: ffn(x))
    assert counted == analytic.forward_total == 2 * gemm
    # trainable FFN on the input layer: fc1 its weight gradient (2x), fc2 both gradients (3x)
    counted, analytic = _training_step(ffn, x)
    assert counted == analytic.training_total == 2 * gemm + 3 * gemm == 25600
    # inside a network (the input needs grad): both 3x
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    counted, analytic = _training_step(ffn, hidden)
    assert counted == analytic.training_total == 6 * gemm
    # frozen (a fine-tuned base): input gradients only, 2x
    ffn.requires_grad_(False)
    counted, analytic = _training_step(ffn, hidden)
    assert counted == analytic.training_total == 4 * gemm
    assert analytic.training == {**dict.fromkeys(CATEGORIES, 0), "dense": 4 * gemm}


def _routed_moe() -> tuple[MoE, torch.Tensor]:
    """4 experts of 8 -> 16 -> 8; 6 one-hot tokens whose router logit is 10 at their expert
    (0, 0, 0, 1, 2, 2) and 0 elsewhere, so top-1 routing is known; no noise."""
    layer = MoE(d_model=8, d_ff=16, config=MoEConfig(num_experts=4, k=1, capacity_factor=2.0, eval_capacity_factor=1.0,
                                                    min_capacity=1, noise_std=0.0, aux_losses={"v": ["switch"], "t": ["switch"]}))
    with torch.no_grad():
        layer.router.weight.copy_(10 * torch.eye(8)[:4])
    tokens = torch.eye(8)[[0, 0, 0, 1, 2, 2]].unsqueeze(0)
    return layer, tokens


def test_moe_layer_counts_kept_tokens_against_computed_capacity_buffers():
    layer, tokens = _routed_moe()
    router = 2 * 6 * 8 * 4  # [6, 8] x [8, 4] = 384
    per_row = 2 * 8 * 16  # one token row through one expert GEMM (fc1 or fc2) = 256
    # Training: C = ceil(2.0 * 6 / 4) = 3, nothing dropped; buffers of C_buf = 4 rows (aligned to 4),
    # and the 4 experts fit one CPU tile, which runs all 4 x 4 = 16 rows.
    hidden = tokens.clone().requires_grad_(True)
    counted, analytic = measure_flops(layer, lambda: (layer(hidden).sum() + layer.pop_aux_loss()).backward())
    assert layer.pop_metrics()["moe/dropped"] == 0.0
    # router: forward, input and weight gradients; experts, per GEMM: forward, and in backward fc2's
    # input gradient, both weight gradients, fc1's input gradient
    assert analytic.training["routers"] == 3 * router == 1152
    assert analytic.training["experts"] == 6 * (2 + 4) * per_row == 9216  # the 6 kept tokens
    assert counted == 3 * router + 16 * 2 * 3 * per_row == 25728  # the 16 computed rows
    # counted / analytic on the experts = computed rows / kept tokens = 16 / 6 (forward and backward)
    assert (counted - analytic.training["routers"]) * 6 == analytic.training["experts"] * 16

    # Evaluation: C = ceil(1.0 * 6 / 4) = 2, so expert 0 drops one of its 3 tokens: 5 kept, still 16 rows.
    layer.eval()
    with torch.no_grad():
        counted, analytic = measure_flops(layer, lambda: layer(tokens))
    assert layer.pop_metrics()["moe/dropped"] == pytest.approx(1 / 6)
    assert analytic.forward_total == router + 5 * 2 * per_row == 2944
    assert counted == router + 16 * 2 * per_row == 8576
    assert analytic.backward == dict.fromkeys(CATEGORIES, 0)  # no_grad

    # One call with two groups (the backbone's way with a step's objectives), each routed alone:
    # the 6 tokens as above (5 kept), and t0, t1, t2 (all to expert 0) with a padding row, whose
    # C = ceil(3 / 4) = 1 keeps one. The router GEMM counts the real tokens of both: 6 + 3.
    second, mask = tokens[0, :4].view(2, 2, 8), torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    with torch.no_grad():
        _, analytic = measure_flops(layer, lambda: layer([tokens, second], [None, mask]))
    assert analytic.forward["routers"] == 2 * (6 + 3) * 8 * 4
    assert analytic.forward["experts"] == (5 + 1) * 2 * per_row


def test_smola_block_counts_its_routing_and_experts_exactly():
    torch.manual_seed(0)
    block = smola.SMoLALinear(nn.Linear(8, 6), num_experts=3, rank=2)
    with torch.no_grad():
        block.w_out.normal_()  # not zero, as after training
    x = torch.randn(2, 5, 8)  # B = 2, N = 5, d_in = 8; d_out = 6, E = 3, r = 2
    base = 2 * 10 * 8 * 6  # the frozen linear: 960
    logits = 2 * 2 * 5 * 8 * 3  # x phi_n^T: [B*N, d_in] x [d_in, E] = 480
    slots = 2 * 2 * 3 * 5 * 8  # D^T x: [B, E, N] x [B, N, d_in] = 480
    combine = 2 * 2 * 5 * 3 * 6  # C y: [B, N, E] x [B, E, d_out] = 360
    low, high = 2 * 2 * 3 * 8 * 2, 2 * 2 * 3 * 2 * 6  # experts d_in -> r -> d_out per slot: 192, 144
    forward = base + logits + slots + combine + low + high
    with torch.no_grad():  # the in-place combine (baddbmm_) path
        counted, analytic = measure_flops(block, lambda: block(x))
    assert counted == analytic.forward_total == forward == 2616

    # Backward on the first layer (x needs no grad): the frozen linear nothing; the combine GEMM
    # d_combine and d_expert_out; each expert GEMM its input and weight gradients; SoftRouting's
    # d_dispatch = x d_slots^T and d_phi_n = scaled^T x.
    counted, analytic = _training_step(block, x)
    backward = 2 * combine + 2 * high + 2 * low + 2 * logits
    assert counted == analytic.training_total == forward + backward == 4968
    # inside a network: plus the linear's input gradient and SoftRouting's d_x ([N, 2E] x [2E, d_in])
    counted, analytic = _training_step(block, x.clone().requires_grad_(True))
    assert counted == analytic.training_total == forward + backward + base + 2 * slots == 6888
    assert analytic.training["smola_routing"] == 3 * combine + 3 * logits + 3 * slots
    assert analytic.training["smola_experts"] == 3 * low + 3 * high


def test_lora_counts_both_low_rank_gemms():
    torch.manual_seed(0)
    block = smola.LoRALinear(nn.Linear(8, 6), rank=2)
    x = torch.randn(2, 5, 8, requires_grad=True)
    base, a, b = 2 * 10 * 8 * 6, 2 * 10 * 8 * 2, 2 * 10 * 2 * 6  # 960, 320, 240
    counted, analytic = _training_step(block, x)
    # frozen base: input gradient; A and B: both gradients each
    assert counted == analytic.training_total == 2 * base + 3 * a + 3 * b == 3600
    assert analytic.training["lora"] == 3 * a + 3 * b


def test_attention_counted_adds_the_fused_kernels_recomputation():
    torch.manual_seed(0)
    x = torch.randn(2, 7, 16)  # B = 2, T = 7, D = 16, 4 heads of 4
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[1, 5:] = False  # padded keys are still computed
    one = 2 * 2 * 4 * 7 * 7 * 4  # Q K^T (or P V): 3136
    projection = 2 * 14 * 16 * 16  # each of q, k, v, out: 7168
    fused = SelfAttention(16, heads=4, qkv_bias=True, dropout=0.0, init_std=0.02)
    counted, analytic = _training_step(fused, x, valid)
    # q, k, v on the input: weight gradients (2x); out: both (3x); attention: 2 GEMMs forward, 4 backward
    assert analytic.training == {**dict.fromkeys(CATEGORIES, 0), "dense": 3 * 2 * projection + 3 * projection,
                                 "attention": 6 * one}
    # scaled_dot_product_attention without dropout runs the fused kernel, whose backward recomputes Q K^T
    assert counted == analytic.training_total + one
    # with dropout, CPU runs the math path: it keeps P, no recomputation
    math_path = SelfAttention(16, heads=4, qkv_bias=True, dropout=0.1, init_std=0.02)
    counted, analytic = _training_step(math_path, x, valid)
    assert counted == analytic.training_total


def test_omni_smola_on_the_multiway_backbone():
    torch.manual_seed(0)
    cfg = model_config("tiny", depth=2, vl_ffn_start=1, drop_path=0.0)
    backbone = MultiwayTransformer(cfg)
    smola.inject(backbone, smola.SMoLAConfig(num_experts=2, rank=2, mode="omni"))
    pixels = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    text = torch.randint(0, cfg.vocab_size, (2, 6))
    pad = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    for inputs in ((pixels, None, None), (None, text, pad), (pixels, text, pad)):
        counted, analytic = measure_flops(backbone, lambda: backbone(*inputs).hidden.sum().backward())
        # exact, Omni's branches without a token (T on images, V on texts) left out as they run nothing;
        # the fused attention recomputes 1 of its 6 GEMMs
        assert counted == analytic.training_total + analytic.training["attention"] // 6
        assert analytic.training["smola_routing"] > 0 and analytic.training["smola_experts"] > 0
    # activation checkpointing re-runs the blocks' forwards in the backward: counted, not analytic
    backbone.grad_checkpointing = True
    recounted, reanalytic = measure_flops(backbone, lambda: backbone(*inputs).hidden.sum().backward())
    assert reanalytic == analytic and recounted > counted


def test_account_run_of_a_dense_zero3_pretraining(base_run):
    assert main([str(base_run)]) == 0
    result = json.loads((base_run / ACCOUNTING_FILE).read_text())
    assert set(result) == {
        "params_total", "params_trainable", "params_applied_per_token", "params_adapter", "params_head",
        "train_flops_per_step", "train_flops_per_step_analytic", "train_flops_ratio", "infer_flops_per_example",
        "infer_flops_per_example_analytic", "tokens_per_step", "flops_per_token", "world_size", "grad_accum",
        *[f"flops_breakdown.{c}" for c in CATEGORIES]}
    assert all(isinstance(v, (int, float)) for v in result.values())
    # dense pretraining: every parameter trains and is applied to every token; no adapter, no task head
    assert result["params_applied_per_token"] == result["params_trainable"] == result["params_total"] > 0
    assert result["params_adapter"] == result["params_head"] == 0
    assert result["world_size"] == 2 and result["grad_accum"] == 1
    breakdown = {c: result[f"flops_breakdown.{c}"] for c in CATEGORIES}
    assert sum(breakdown.values()) == result["train_flops_per_step_analytic"]
    assert min(breakdown["embeddings"], breakdown["dense"], breakdown["attention"], breakdown["heads"]) > 0
    assert breakdown["experts"] == breakdown["smola_routing"] == breakdown["lora"] == 0
    # No zero tolerance needed: a dense model's counted FLOPs are the analytic ones plus the fused
    # attention backward's recomputation of Q K^T, 1 of the 6 attention GEMMs the analytic count has
    # per training step (in inference nothing is recomputed).
    assert result["train_flops_per_step"] == result["train_flops_per_step_analytic"] + breakdown["attention"] // 6
    assert 1.0 < result["train_flops_ratio"] < 1.02
    assert result["infer_flops_per_example"] == result["infer_flops_per_example_analytic"] > 0
    assert result["flops_per_token"] == pytest.approx(result["train_flops_per_step"] / result["tokens_per_step"])


def test_account_run_needs_a_run_with_a_committed_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="not a vlmoe run directory"):
        account_run(tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({"command": "pretrain"}))
    (tmp_path / "config.yaml").write_text((REPO / "vlmoe" / "configs" / "pretrain_tiny.yaml").read_text())
    with pytest.raises(ConfigError, match="no 'last_good' checkpoint committed"):
        account_run(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "missing")])
    assert exit_info.value.code == 2


def test_soft_moe_counts_its_three_routing_gemms_and_every_slot_row_exactly():
    from vlmoe.moe.soft import SoftMoE

    torch.manual_seed(0)
    layer = SoftMoE(d_model=8, d_ff=16, config=MoEConfig(type="soft", num_experts=3, slots_per_expert=2))  # S = 6 slots per example
    x = torch.randn(2, 5, 8, requires_grad=True)  # B = 2, n = 5 (padding is in every GEMM too)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    one = 2 * 2 * 5 * 8 * 6  # one thin GEMM over the batch = 960
    rows = 2 * 6  # every slot of every example through its expert
    per_row = 2 * 8 * 16
    counted, analytic = measure_flops(layer, lambda: layer(x, mask).sum().backward())
    # routing: 3 GEMMs forward; backward d_x and d_phi of the logits, d_dispatch and d_x of the slots,
    # d_combine and d_expert_out of the output
    assert analytic.training["routers"] == 3 * one + 6 * one
    assert analytic.training["experts"] == rows * (2 + 4) * per_row
    assert counted == analytic.training_total
    layer.requires_grad_(False)  # frozen (fine-tuning a soft base): no d_phi, and the experts only pass d_x on
    counted, analytic = measure_flops(layer, lambda: layer(x, mask).sum().backward())
    assert analytic.training["routers"] == 3 * one + 5 * one and counted == analytic.training_total
    # two inputs in one call: each input's routing GEMMs, its own batch and length
    other = torch.randn(1, 4, 8)
    counted, analytic = measure_flops(layer, lambda: layer([x, other]))
    assert analytic.forward["routers"] == 3 * one + 3 * (2 * 1 * 4 * 8 * 6)
    assert analytic.forward["experts"] == (rows + 6) * 2 * per_row and counted == analytic.forward_total


def test_accounting_training_step_of_a_soft_moe_model_which_has_no_aux_loss():
    # Soft MoE has no balancing loss: the pretraining task's extra_loss returns None, which the
    # trainer skips; the accounting's training step must too (it added None to the loss).
    from vlmoe.moe.backbone import collect_aux_loss
    from vlmoe.moe.soft import SoftMoE
    from vlmoe.study.accounting import training_step
    from vlmoe.train.trainer import Task

    class SoftModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.moe = SoftMoE(d_model=8, d_ff=16, config=MoEConfig(type="soft", num_experts=2, slots_per_expert=2))

        def forward(self, batch: dict) -> dict:
            return {"loss": self.moe(batch["x"], batch["mask"]).pow(2).mean()}

    torch.manual_seed(0)
    model = SoftModel()
    task = Task(model=model, train_batches=None, eval_batches=None, count_tokens=lambda batch: 0,
                extra_loss=collect_aux_loss)
    batch = {"x": torch.randn(2, 5, 8), "mask": torch.tensor([[1, 1, 1, 0, 0], [1] * 5], dtype=torch.bool)}
    counted, analytic = training_step(task, batch, seed=0)
    assert collect_aux_loss(model) is None
    # the experts see 2 examples x 4 slots; everything is counted exactly (no capacity, no attention)
    assert analytic.training["experts"] == 2 * 4 * (2 + 4) * (2 * 8 * 16)
    assert counted == analytic.training_total
    assert all(p.grad is None for p in model.parameters())  # the step's gradients are cleared


def test_kernel_flops_of_each_matrix_product_from_its_profiled_input_shapes():
    # shapes as torch.profiler records them: scalar arguments (beta, alpha) as []
    assert kernel_flops("aten::mm", [[6, 5], [5, 3]]) == 2 * 6 * 5 * 3
    assert kernel_flops("aten::addmm", [[3], [6, 5], [5, 3], [], []]) == 2 * 6 * 5 * 3
    assert kernel_flops("aten::bmm", [[4, 6, 5], [4, 5, 3]]) == 2 * 4 * 6 * 5 * 3
    assert kernel_flops("aten::baddbmm_", [[4, 6, 3], [4, 6, 5], [4, 5, 3], [], []]) == 2 * 4 * 6 * 5 * 3
    assert kernel_flops("aten::softmax", [[4, 6, 5], [], []]) == 0
    assert kernel_flops("SoftRouting", [[4, 6, 5]]) == 0
