"""The tutel backend: tutel's dispatch kernels behind our routing agree with our index dispatch.

Tutel is not on PyPI: where it is not installed (CI here) the agreement test is skipped and the
backend must be refused with a message that says how to install it; the Docker image has it.
"""
from __future__ import annotations

import pytest
import torch

from vlmoe.moe import MoE, MoEConfig
from vlmoe.moe.backends import tutel_installed


def test_tutel_backend_needs_tutel_installed():
    if tutel_installed():
        assert MoEConfig(backend="tutel").backend == "tutel"
        assert MoE(8, 16, MoEConfig(num_experts=4, backend="tutel")).backend == "tutel"
    else:
        with pytest.raises(ValueError, match="backend='tutel' needs tutel.*pip install"):
            MoEConfig(backend="tutel")
    with pytest.raises(ValueError, match="backend must be one of"):
        MoEConfig(num_experts=4, backend="megablocks")


@pytest.mark.skipif(not tutel_installed(), reason="tutel is not installed (not on PyPI; the Docker image has it)")
@pytest.mark.parametrize("k, capacity_factor", [(1, 1.05), (2, 0.5)])
def test_tutel_dispatch_agrees_with_ours(k, capacity_factor):
    layers = {}
    for backend in ("ours", "tutel"):
        torch.manual_seed(0)
        layers[backend] = MoE(16, 32, MoEConfig(num_experts=4, k=k, capacity_factor=capacity_factor, min_capacity=0,
                                                noise_std=0.0, aux_losses={"v": ["switch"], "t": ["switch"]}, backend=backend),
                              seed=3).train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 24, 16, generator=g)
    mask = torch.ones(2, 24, dtype=torch.bool)
    mask[1, 17:] = False
    upstream = torch.randn(2, 24, 16, generator=g)
    results = {}
    for backend, layer in layers.items():
        xi = x.clone().requires_grad_(True)
        out = layer(xi, mask)
        ((out * upstream).sum() + layer.pop_aux_loss()).backward()
        results[backend] = {"out": out.detach(), "x": xi.grad,
                            **{n: p.grad for n, p in layer.named_parameters()}}
        results[backend]["dropped"] = layer.pop_metrics()["moe/dropped"]
    assert results["ours"]["dropped"] == results["tutel"]["dropped"]
    assert results["ours"]["dropped"] > 0  # dropped tokens are exercised in both settings
    for name, value in results["ours"].items():
        if torch.is_tensor(value):
            assert value.abs().max() > 0, name
            torch.testing.assert_close(results["tutel"][name], value, rtol=1e-5, atol=1e-6, msg=name)
