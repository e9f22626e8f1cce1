"""SMoLALinear against the paper's equations: values, gradients, masks, bf16, init."""
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import smola
from smola_reference import smola_delta


def _block(d_in=6, d_out=5, experts=4, rank=2, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    block = smola.SMoLALinear(nn.Linear(d_in, d_out), experts, rank).to(dtype)
    with torch.no_grad():
        block.w_out.normal_(0, 0.5)  # non-zero experts so the mixture shows
        block.alpha.fill_(1.7)
    return block


def _params(block):
    return block.phi, block.alpha, block.w_in, block.w_out


def test_parameters_named_and_shaped_as_the_issue_says():
    block = smola.SMoLALinear(nn.Linear(6, 5), num_experts=4, rank=3)
    shapes = {n: tuple(p.shape) for n, p in block.named_parameters() if p.requires_grad}
    assert shapes == {"phi": (4, 6), "alpha": (1,), "w_in": (4, 3, 6), "w_out": (4, 5, 3)}
    assert not block.base.weight.requires_grad and not block.base.bias.requires_grad


def test_zero_init_output_equals_frozen_layer_exactly():
    block = smola.SMoLALinear(nn.Linear(6, 5), 4)
    x = torch.randn(3, 7, 6)
    assert torch.equal(block(x), block.base(x))


def test_forward_matches_loop_transcription_of_eqs_1_to_4():
    block = _block()
    x = torch.randn(3, 5, 6, dtype=torch.float64)
    expected = block.base(x) + smola_delta(x, *_params(block))
    torch.testing.assert_close(block(x), expected, rtol=1e-10, atol=1e-10)


def test_gradients_match_autograd_through_the_transcription():
    block = _block()
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    x = torch.randn(3, 5, 6, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(3, 5, 5, dtype=torch.float64)
    params = [x, *_params(block)]
    got = torch.autograd.grad((block(x, mask) * grad).sum(), params)
    want = torch.autograd.grad(((block.base(x) + smola_delta(x, *_params(block), mask)) * grad).sum(), params)
    for name, g, w in zip(["x", "phi", "alpha", "w_in", "w_out"], got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10, msg=name)


def test_gradcheck_of_the_fused_backward():
    block = _block(d_in=4, d_out=3, experts=3, rank=2)
    mask = torch.tensor([[1, 0, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    x = torch.randn(2, 4, 4, dtype=torch.float64, requires_grad=True)
    fn = lambda x, phi, alpha, w_in, w_out: smola.add_soft_mixture(block.base(x), x, phi, alpha, w_in, w_out, mask)
    assert torch.autograd.gradcheck(fn, (x, *_params(block)))


def test_padding_and_fully_masked_rows():
    block = _block()
    x = torch.randn(3, 5, 6, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 0, 1, 0, 1]], dtype=torch.bool)
    out = block(x, mask)
    torch.testing.assert_close(out, block.base(x) + smola_delta(x, *_params(block), mask), rtol=1e-10, atol=1e-10)
    # masked tokens get the frozen output only, and a fully masked example is the frozen layer
    torch.testing.assert_close(out[~mask], block.base(x)[~mask], rtol=0, atol=0)
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in _params(block))
    # padded tokens influence nothing: their gradient is the frozen layer's alone
    frozen_grad = block.base.weight.sum(0).expand(3, 5, 6)
    torch.testing.assert_close(x.grad[~mask], frozen_grad[~mask])
    # and the real tokens' outputs do not depend on what the padding holds
    x2 = x.detach().clone()
    x2[~mask] = 1e3 * torch.randn_like(x2[~mask])
    torch.testing.assert_close(block(x2, mask)[mask], out.detach()[mask], rtol=1e-10, atol=1e-10)


def test_two_dimensional_input_is_one_token_per_example():
    block = _block()
    x = torch.randn(4, 6, dtype=torch.float64)
    expected = block.base(x) + smola_delta(x.unsqueeze(1), *_params(block))[:, 0]
    torch.testing.assert_close(block(x), expected, rtol=1e-10, atol=1e-10)
    # with one token, dispatch is 1: each expert sees x itself
    assert block(x).shape == (4, 5)


def test_bf16_path_close_to_fp64_reference_and_finite():
    block64 = _block()
    block16 = _block().to(torch.bfloat16)
    x = torch.randn(2, 9, 6, dtype=torch.float64)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 4:] = False
    xb = x.to(torch.bfloat16).requires_grad_(True)
    out = block16(xb, mask)
    assert out.dtype == torch.bfloat16
    want = block64(xb.detach().double(), mask)
    torch.testing.assert_close(out.double(), want, rtol=0.05, atol=0.05)
    out.float().sum().backward()
    for p in (xb, *_params(block16)):
        assert p.grad is not None and p.grad.dtype == torch.bfloat16 and torch.isfinite(p.grad.float()).all()


def test_declared_padding_mask_is_used_and_checkpoint_recompute_keeps_it():
    block = _block()
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 1, 1, 1]], dtype=torch.bool)
    with smola.token_masks(valid=mask):
        declared = block(x)
    torch.testing.assert_close(declared, block(x, mask))
    def grads(run):
        x.grad = block.phi.grad = None
        (run() ** 2).sum().backward()
        return x.grad.clone(), block.phi.grad.clone()

    want = grads(lambda: block(x, mask))
    unmasked = grads(lambda: block(x))
    assert not torch.allclose(want[1], unmasked[1])  # the mask matters for these gradients
    for reentrant in (False, True):
        def run():
            with smola.token_masks(valid=mask):  # declared outside the checkpointed region
                return checkpoint(lambda t: block(t) * 1.0, x, use_reentrant=reentrant)
        for g, w in zip(grads(run), want):
            torch.testing.assert_close(g, w)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda b: b(torch.randn(2, 5, 6), torch.ones(2, 4, dtype=torch.bool)), "does not match"),
        (lambda b: b(torch.randn(2, 5, 6), torch.ones(2, 5)), "bool"),
        (lambda b: b(torch.randn(6)), "expects inputs"),
    ],
)
def test_bad_input_is_named(call, message):
    with pytest.raises(ValueError, match=message):
        call(smola.SMoLALinear(nn.Linear(6, 5), 4))


def test_bad_construction_is_named():
    with pytest.raises(ValueError, match="num_experts"):
        smola.SMoLALinear(nn.Linear(6, 5), 0)
    with pytest.raises(TypeError, match="Conv2d"):
        smola.SMoLALinear(nn.Conv2d(3, 3, 1), 4)
