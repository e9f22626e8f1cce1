"""Omni composition (MM + V + T placed back at token positions), masks, hooks, fallback."""
import warnings

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import smola
import smola.omni
from smola_reference import gathered_delta, smola_delta


def _omni(branches=("mm", "v", "t"), seed=0):
    torch.manual_seed(seed)
    block = smola.OmniSMoLALinear(nn.Linear(6, 5), num_experts=3, rank=2, branches=branches).double()
    with torch.no_grad():
        for name in block.branches:
            getattr(block, name).w_out.normal_(0, 0.5)
            getattr(block, name).alpha.fill_(1.0 + 0.5 * len(name))
    return block


def _params(block, name):
    b = getattr(block, name)
    return b.phi, b.alpha, b.w_in, b.w_out


X = torch.randn(3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
VALID = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
VISUAL = torch.tensor([[1, 1, 0, 0, 0, 0], [0, 1, 0, 1, 0, 1], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)


@pytest.fixture(autouse=True)
def _fresh_warning_state(monkeypatch):
    monkeypatch.setattr(smola.omni, "_warned_no_modality", False)


def test_omni_equals_frozen_plus_mm_plus_v_and_t_placed_back():
    block = _omni()
    expected = (
        block.base(X)
        + smola_delta(X, *_params(block, "mm"), VALID)
        + gathered_delta(X, _params(block, "v"), VALID & VISUAL)
        + gathered_delta(X, _params(block, "t"), VALID & ~VISUAL)
    )
    torch.testing.assert_close(block(X, VALID, VISUAL), expected, rtol=1e-10, atol=1e-10)
    with smola.token_masks(valid=VALID, visual=VISUAL):
        torch.testing.assert_close(block(X), expected, rtol=1e-10, atol=1e-10)


def test_omni_gradients_match_the_gathered_reference():
    block = _omni()
    x = X.clone().requires_grad_(True)
    grad = torch.randn(3, 6, 5, dtype=torch.float64)
    params = [x] + [p for n in ("mm", "v", "t") for p in _params(block, n)]
    got = torch.autograd.grad((block(x, VALID, VISUAL) * grad).sum(), params)
    reference = (
        block.base(x)
        + smola_delta(x, *_params(block, "mm"), VALID)
        + gathered_delta(x, _params(block, "v"), VALID & VISUAL)
        + gathered_delta(x, _params(block, "t"), VALID & ~VISUAL)
    )
    want = torch.autograd.grad((reference * grad).sum(), params)
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10, msg=f"parameter {i}")


def test_omni_zero_init_is_the_frozen_layer():
    block = smola.OmniSMoLALinear(nn.Linear(6, 5), 4)
    x = X.float()
    assert torch.equal(block(x, VALID, VISUAL), block.base(x))


def test_single_modality_branches():
    for branch, group in (("v", VISUAL), ("t", ~VISUAL)):
        block = _omni(branches=(branch,))
        expected = block.base(X) + gathered_delta(X, _params(block, branch), VALID & group)
        torch.testing.assert_close(block(X, VALID, VISUAL), expected, rtol=1e-10, atol=1e-10)


def test_branch_without_tokens_gets_no_gradient_and_others_do():
    block = _omni()
    all_visual = torch.ones(3, 6, dtype=torch.bool)
    block(X, None, all_visual).sum().backward()
    assert block.t.w_out.grad is None  # no text token: the T experts did not run
    assert block.v.w_out.grad.abs().sum() > 0 and block.mm.w_out.grad.abs().sum() > 0


def test_no_modality_information_falls_back_to_mm_with_one_warning():
    block = _omni()
    with pytest.warns(RuntimeWarning, match="no modality information"):
        out = block(X, VALID)
    torch.testing.assert_close(out, block.base(X) + smola_delta(X, *_params(block, "mm"), VALID), rtol=1e-10, atol=1e-10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        block(X, VALID)  # warned once per process


def test_v_or_t_alone_without_modality_is_an_error():
    with pytest.raises(ValueError, match="no visual mask"):
        _omni(branches=("v",))(X)


def test_bad_masks_and_branches_are_named():
    with pytest.raises(ValueError, match="visual_mask"):
        _omni()(X, VALID, VISUAL[:, :4])
    with pytest.raises(ValueError, match="branches"):
        smola.OmniSMoLALinear(nn.Linear(6, 5), 3, branches=("mm", "audio"))


class _TinyEncoder(nn.Module):
    """Two blocks of adapted linears; masks arrive only as forward kwargs."""

    def __init__(self, checkpointed=None):
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6)) for _ in range(2))
        self.checkpointed = checkpointed

    def forward(self, x, attention_mask=None, visual_mask=None):
        for layer in self.layers:
            if self.checkpointed is None:
                x = x + layer(x)
            else:
                x = x + checkpoint(layer, x, use_reentrant=self.checkpointed)
        return x


def _adapted_encoder(checkpointed=None):
    torch.manual_seed(0)
    model = smola.inject(_TinyEncoder(checkpointed).double(), smola.SMoLAConfig(num_experts=3, rank=2))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("w_out"):
                p.normal_(0, 0.3)
    return model


def test_modality_hooks_declare_masks_like_the_backbone_does():
    model = _adapted_encoder()
    handle = smola.modality_hooks(model, smola.masks_from_inputs(valid="attention_mask", visual="visual_mask"))
    hooked = model(X, attention_mask=VALID.long(), visual_mask=VISUAL)
    handle.remove()
    with smola.token_masks(valid=VALID, visual=VISUAL):
        declared = model(X)
    torch.testing.assert_close(hooked, declared, rtol=0, atol=0)
    assert smola.current_token_masks() is None  # the hook closed its block
    with pytest.warns(RuntimeWarning, match="no modality information"):
        unhooked = model(X)
    assert not torch.allclose(unhooked, hooked)


@pytest.mark.parametrize("reentrant", [False, True])
def test_hook_masks_survive_gradient_checkpointing(reentrant):
    plain, ckpt = _adapted_encoder(), _adapted_encoder(checkpointed=reentrant)
    fn = smola.masks_from_inputs(valid="attention_mask", visual="visual_mask")
    grads = []
    for model in (plain, ckpt):
        smola.modality_hooks(model, fn)
        x = X.clone().requires_grad_(True)
        (model(x, attention_mask=VALID, visual_mask=VISUAL) ** 2).sum().backward()
        grads.append([x.grad] + [p.grad for n, p in sorted(model.named_parameters()) if p.requires_grad])
    for g, w in zip(*grads):
        torch.testing.assert_close(g, w)


def test_mask_function_with_bad_return_is_named():
    model = _adapted_encoder()
    smola.modality_hooks(model, lambda args, kwargs: "visual")
    with pytest.raises(ValueError, match="must return TokenMasks"):
        model(X)


def test_reachable_branches_keep_mm_and_the_declared_modality():
    from smola.omni import reachable_branches

    assert reachable_branches(("mm", "v", "t"), None) == ("mm", "v", "t")
    assert reachable_branches(("t", "v", "mm"), "v") == ("mm", "v")
    assert reachable_branches(("mm", "v", "t"), "t") == ("mm", "t")
    assert reachable_branches(("v",), "t") == ()
    with pytest.raises(ValueError, match="token modality"):
        reachable_branches(("mm",), "image")
