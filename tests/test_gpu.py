"""CUDA against CPU: the MoE layer and the SMoLA block give the CPU's results on a GPU.

The tests marked ``gpu`` skip without CUDA; ``pytest -m gpu`` (scripts/gpu_check.sh) runs them
on a GPU machine. Single process, small shapes, a few seconds. On CUDA the MoE experts run as
one batched tile over whole buffers and the routing's sorts and scatters run as CUDA kernels, so
equality with the CPU path (tiles, skipped empty rows) is what is checked. fp32 comparisons run
with TF32 off. The last test checks, on a machine without CUDA, that gpu_check.sh refuses.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import smola
from vlmoe.moe import MoE, MoEConfig
from vlmoe.moe.router import expert_capacity, route

REPO = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")

# small, but with more tokens than capacity so that some are dropped (the capacity and Batch
# Priority Routing paths run), k=2, and the routing losses that need no noise (noise is drawn
# from each device's own generator, so it would differ between CPU and CUDA)
D_MODEL, D_FF, EXPERTS, TOKENS = 32, 64, 4, (4, 16)
MOE_CONFIG = MoEConfig(num_experts=EXPERTS, k=2, capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=0,
                       noise_std=0.0, aux_losses={"v": ["importance", "switch"], "t": []}, aux_weight=0.01,
                       z_loss_weight=0.001)


@contextlib.contextmanager
def full_fp32():
    """fp32 matmuls in full precision on CUDA (TF32 off), restored afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def moe_layer() -> MoE:
    """The test's layer, identical on every call (seeded), with a router sharp enough that the
    gates are far apart (no near-ties for CPU and CUDA rounding to break differently)."""
    torch.manual_seed(0)
    layer = MoE(D_MODEL, D_FF, MOE_CONFIG, seed=7)
    with torch.no_grad():
        layer.router.weight.mul_(20)
        layer.experts.b_in.normal_(0, 0.1)
        layer.experts.b_out.normal_(0, 0.1)
    return layer.train()


def moe_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [B, N, d] and a padding mask [B, N] (the last tokens of the second row are padding)."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(*TOKENS, D_MODEL, generator=generator)
    mask = torch.ones(*TOKENS, dtype=torch.bool)
    mask[1, -5:] = False
    return x, mask


def run_moe(layer: MoE, x: torch.Tensor, mask: torch.Tensor, device: str, dtype: torch.dtype = torch.float32,
            autocast: bool = False) -> dict[str, torch.Tensor]:
    """Forward + backward of ``layer`` on ``device``: the output, the aux loss and every gradient, on CPU in fp32."""
    layer = layer.to(device=device, dtype=dtype)
    x = x.detach().to(device=device, dtype=dtype).requires_grad_(True)  # a leaf of its own
    with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
        out = layer(x, mask.to(device))
    aux = layer.pop_aux_loss()
    (out.float().pow(2).mean() + aux).backward()
    results = {"out": out, "aux": aux, "x.grad": x.grad}
    results.update({f"{name}.grad": p.grad for name, p in layer.named_parameters()})
    return {name: t.detach().float().cpu() for name, t in results.items()}


def assert_close_all(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rtol: float, atol: float) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm().clamp_min(1e-12)).item()


def test_moe_test_data_has_no_near_ties():
    """Runs everywhere: the inputs above route with clear margins, so that CUDA's rounding cannot
    pick another expert or another BPR order than the CPU's, and some tokens are dropped."""
    layer, (x, mask) = moe_layer(), moe_inputs()
    tokens = x[mask]
    logits = nn.functional.linear(tokens, layer.router.weight)
    gates = logits.softmax(-1)
    top = gates.topk(3, dim=-1).values
    assert (top[:, 1] - top[:, 2]).min() > 1e-4  # the top-2 experts are unambiguous
    first = top[:, 0].sort().values
    assert (first[1:] - first[:-1]).min() > 1e-6  # BPR's order is unambiguous
    capacity = expert_capacity(tokens.shape[0], EXPERTS, 2, MOE_CONFIG.capacity_factor, 0)
    routing = route(logits, 2, capacity, batch_priority=True)
    assert 0 < (routing.slot < 0).sum() < routing.slot.numel()  # some, not all, choices dropped


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("k", [1, 2])
def test_routing_on_cuda_equals_cpu(k):
    """Top-k, BPR order and capacity slots: the sorts, cumsums and scatters on CUDA."""
    torch.manual_seed(3)
    logits = torch.randn(200, 8) * 3
    want = route(logits, k, 40, batch_priority=True)
    got = route(logits.cuda(), k, 40, batch_priority=True)
    for field in ("expert", "slot"):
        assert torch.equal(getattr(got, field).cpu(), getattr(want, field)), field
    torch.testing.assert_close(got.weight.cpu(), want.weight)


@pytest.mark.gpu
@needs_cuda
def test_routing_its_losses_and_statistics_queue_without_a_device_sync():
    """route(), the aux terms and RoutingStats.update leave their work queued (no bincount, no
    boolean indexing, no host copies); only the summary at a log step reads values back."""
    from vlmoe.moe.losses import RouterTensors, aux_loss_terms
    from vlmoe.moe.metrics import RoutingStats

    torch.manual_seed(3)
    logits = (torch.randn(200, 8) * 3).cuda()
    noisy = logits + torch.randn_like(logits)
    stats = RoutingStats(8)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        routing = route(noisy, 2, 40, batch_priority=True)
        tensors = RouterTensors(logits=logits, noisy_logits=noisy, gates=logits.softmax(-1), expert=routing.expert,
                                k=2, noise_std=1.0)
        terms = aux_loss_terms(("importance", "load", "vloss", "switch"), tensors, z_loss_weight=0.001)
        stats.update(routing, "mim", terms)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert stats.summary("moe")["moe/dropped/mim"] > 0


@pytest.mark.gpu
@needs_cuda
def test_moe_layer_on_cuda_equals_cpu_fp32():
    x, mask = moe_inputs()
    want = run_moe(moe_layer(), x, mask, "cpu")
    with full_fp32():
        got = run_moe(moe_layer(), x, mask, "cuda")
    assert_close_all(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@needs_cuda
def test_moe_layer_bf16_on_cuda_is_finite_and_close():
    """bf16 as training runs it (DeepSpeed's bf16 mode casts the module), against fp32 on the same
    bf16-rounded weights and inputs (so both route alike)."""
    x, mask = moe_inputs()
    x = x.bfloat16().float()
    reference = moe_layer().bfloat16().float()
    want = run_moe(reference, x, mask, "cpu")
    got = run_moe(moe_layer(), x, mask, "cuda", dtype=torch.bfloat16)
    for name in want:
        assert torch.isfinite(got[name]).all(), name
        assert relative_error(got[name], want[name]) < 0.03, name


@pytest.mark.gpu
@needs_cuda
def test_moe_layer_under_bf16_autocast_on_cuda_is_finite():
    x, mask = moe_inputs()
    got = run_moe(moe_layer(), x, mask, "cuda", autocast=True)
    for name, value in got.items():
        assert torch.isfinite(value).all(), name


def smola_block() -> smola.SMoLALinear:
    """A SMoLA block with non-zero experts (zero-initialised ones would hide the mixture)."""
    torch.manual_seed(0)
    block = smola.SMoLALinear(nn.Linear(24, 20), num_experts=6, rank=3)
    with torch.no_grad():
        block.w_out.normal_(0, 0.5)
        block.alpha.fill_(1.7)
    return block


def run_smola(block: smola.SMoLALinear, device: str, dtype: torch.dtype = torch.float32,
              autocast: bool = False) -> dict[str, torch.Tensor]:
    """Forward + backward of a padded batch: the output and the gradients, on CPU in fp32."""
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(3, 11, 24, generator=generator)
    mask = torch.ones(3, 11, dtype=torch.bool)
    mask[1, 6:] = False
    mask[2, :] = False  # a fully masked example: the frozen layer alone
    block = block.to(device=device, dtype=dtype)
    x = x.to(device=device, dtype=dtype).requires_grad_(True)
    with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
        out = block(x, mask.to(device))
    out.float().pow(2).mean().backward()
    results = {"out": out, "x.grad": x.grad}
    results.update({f"{name}.grad": p.grad for name, p in block.named_parameters() if p.requires_grad})
    return {name: t.detach().float().cpu() for name, t in results.items()}


@pytest.mark.gpu
@needs_cuda
def test_smola_block_on_cuda_equals_cpu_fp32():
    want = run_smola(smola_block(), "cpu")
    with full_fp32():
        got = run_smola(smola_block(), "cuda")
    assert_close_all(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("mode", ["bf16 weights", "bf16 autocast"])
def test_smola_block_bf16_on_cuda_is_finite_and_close(mode):
    want = run_smola(smola_block(), "cpu")
    if mode == "bf16 weights":
        got = run_smola(smola_block(), "cuda", dtype=torch.bfloat16)
    else:
        got = run_smola(smola_block(), "cuda", autocast=True)
    for name in want:
        assert torch.isfinite(got[name]).all(), name
        assert relative_error(got[name], want[name]) < 0.05, name


@pytest.mark.skipif(CUDA, reason="checks the refusal on a machine without CUDA")
def test_gpu_check_refuses_without_cuda(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "VLMOE_VENV": sys.prefix}  # the script's python: this one
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no CUDA device" in proc.stderr
    assert not (tmp_path / "summary.txt").exists()  # nothing ran
