"""SMoLA on our multiway backbone: its declared masks reach every adapted linear."""
import warnings

import pytest
import torch

import smola
from vlmoe.model.config import model_config
from vlmoe.model.multiway import MultiwayTransformer


def _backbones(**overrides):
    torch.manual_seed(0)
    cfg = model_config("tiny", depth=2, vl_ffn_start=1, **overrides)
    frozen = MultiwayTransformer(cfg).eval()
    adapted = MultiwayTransformer(cfg).eval()
    adapted.load_state_dict(frozen.state_dict())
    smola.inject(adapted, smola.SMoLAConfig(num_experts=4, rank=2, mode="omni"))
    return cfg, frozen, adapted


def _inputs(cfg):
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=g)
    text = torch.randint(0, cfg.vocab_size, (2, 6), generator=g)
    pad = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    return pixels, text, pad


def test_omni_on_multiway_is_exact_at_init_and_needs_no_hooks():
    cfg, frozen, adapted = _backbones()
    pixels, text, pad = _inputs(cfg)
    assert smola.trainable_parameters(adapted).adapter_modules == sum(
        isinstance(m, torch.nn.Linear) for m in frozen.modules())
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # modality masks come from the backbone: no fallback warning
        for args in ((pixels, text, pad), (pixels, None, None), (None, text, pad)):
            torch.testing.assert_close(adapted(*args).hidden, frozen(*args).hidden, rtol=0, atol=0)


def test_padding_text_does_not_change_real_tokens_and_checkpointing_matches():
    cfg, _, adapted = _backbones(drop_path=0.0)  # deterministic in train mode
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if name.endswith("w_out"):
                p.normal_(0, 0.3)
    pixels, text, pad = _inputs(cfg)
    garbage = text.clone()
    garbage[1, 3:] = (garbage[1, 3:] + 7) % cfg.vocab_size
    with torch.no_grad():
        a, b = adapted(pixels, text, pad).hidden, adapted(pixels, garbage, pad).hidden
    torch.testing.assert_close(a[1, : a.shape[1] - 3], b[1, : a.shape[1] - 3])
    adapted.train()
    grads = []
    for checkpointed in (False, True):
        adapted.grad_checkpointing = checkpointed
        adapted.zero_grad()
        adapted(pixels, text, pad).hidden.square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in adapted.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


def _per_block(linear, experts, rank):
    """Parameters of one SMoLA block (phi, alpha, w_in, w_out) around ``linear``."""
    i, o = linear.in_features, linear.out_features
    return experts * i + 1 + experts * rank * i + experts * o * rank


def _tiny_base():
    torch.manual_seed(0)  # the same frozen base every time
    return MultiwayTransformer(model_config("tiny")).eval()


def _omni_tiny(monkeypatch=None, declared=True, experts=4, rank=2):
    """The tiny preset backbone with Omni-SMoLA; declared=False injects as if the backbone declared
    no modality-specific modules (every linear gets mm, v and t: the layout before)."""
    from vlmoe.model.multiway import MultiwayBlock

    model = _tiny_base()
    if not declared:
        monkeypatch.setattr(MultiwayBlock, "smola_modalities", {}, raising=False)
    smola.inject(model, smola.SMoLAConfig(num_experts=experts, rank=rank, mode="omni"))
    if not declared:
        monkeypatch.undo()
    return model


def test_omni_gives_v_and_t_ffn_linears_only_the_blocks_their_tokens_reach(monkeypatch):
    model = _omni_tiny()
    adapted = {n: m for n, m in model.named_modules() if isinstance(m, smola.OmniSMoLALinear)}
    assert len(adapted) == 34  # every linear of the 4 blocks (4 attention + 2 per FFN) and the patch projection
    for name, module in adapted.items():
        if ".ffn_v." in name:
            assert module.branches == ("mm", "v"), name
        elif ".ffn_t." in name:
            assert module.branches == ("mm", "t"), name
        else:  # attention, VL-FFN, patch projection: any token
            assert module.branches == ("mm", "v", "t"), name
    # the trainable count drops by exactly the T blocks of V-FFN linears and the V blocks of T-FFN linears
    dead = sum(_per_block(m.base, 4, 2) for n, m in adapted.items() if ".ffn_v." in n or ".ffn_t." in n)
    full = _omni_tiny(monkeypatch, declared=False)
    assert dead == 4 * 2 * (_per_block(torch.nn.Linear(128, 512), 4, 2) + _per_block(torch.nn.Linear(512, 128), 4, 2))
    before, after = smola.trainable_parameters(full).trainable, smola.trainable_parameters(model).trainable
    assert before - after == dead
    assert after == sum(len(m.branches) * _per_block(m.base, 4, 2) for m in adapted.values())
    assert not any(".ffn_v." in n and ".t." in n or ".ffn_t." in n and ".v." in n for n in smola.adapter_parameters(model))


def _copy_shared_and_perturb(full, model):
    with torch.no_grad():
        for p in smola.adapter_parameters(full).values():
            p.normal_(0, 0.3)  # the unreachable blocks too: no token may reach them
        params = smola.adapter_parameters(model)
        for name, p in smola.adapter_parameters(full).items():
            if name in params:
                params[name].copy_(p)


def test_left_out_blocks_were_unreachable_the_outputs_are_the_same(monkeypatch):
    model = _omni_tiny()
    full = _omni_tiny(monkeypatch, declared=False)
    _copy_shared_and_perturb(full, model)
    cfg = model.cfg
    pixels, text, pad = _inputs(cfg)
    with torch.no_grad():
        for args in ((pixels, text, pad), (pixels, None, None), (None, text, pad)):
            torch.testing.assert_close(model(*args).hidden, full(*args).hidden, rtol=0, atol=0)


def test_omni_adapter_with_fewer_blocks_round_trips(tmp_path):
    model = _omni_tiny()
    with torch.no_grad():
        for p in smola.adapter_parameters(model).values():
            p.normal_(0, 0.3)
    smola.save_adapter(model, tmp_path)
    fresh = _tiny_base()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        smola.load_adapter(fresh, tmp_path)
    assert smola.adapter_parameters(fresh).keys() == smola.adapter_parameters(model).keys()
    pixels, text, pad = _inputs(model.cfg)
    with torch.no_grad():
        torch.testing.assert_close(fresh(pixels, text, pad).hidden, model(pixels, text, pad).hidden, rtol=0, atol=0)


def test_adapter_saved_with_unreachable_blocks_still_loads(monkeypatch, tmp_path):
    full = _omni_tiny(monkeypatch, declared=False)
    with torch.no_grad():  # trained as before: the unreachable blocks never got a gradient, w_out stays zero
        for name, p in smola.adapter_parameters(full).items():
            if not (".ffn_v." in name and ".t." in name or ".ffn_t." in name and ".v." in name):
                p.normal_(0, 0.3)
    smola.save_adapter(full, tmp_path / "old")
    model = _tiny_base()
    with pytest.warns(RuntimeWarning, match="16 SMoLA blocks that no token reaches"):
        smola.load_adapter(model, tmp_path / "old")
    assert all(m.branches == ("mm", "v") for n, m in model.named_modules() if n.endswith((".ffn_v.fc1", ".ffn_v.fc2")))
    pixels, text, pad = _inputs(model.cfg)
    with torch.no_grad():
        for args in ((pixels, text, pad), (pixels, None, None), (None, text, pad)):
            torch.testing.assert_close(model(*args).hidden, full(*args).hidden, rtol=0, atol=0)
    # a file whose V-FFN T block was trained does not describe this model: refused, not dropped
    with torch.no_grad():
        full.blocks[0].ffn_v.fc1.t.w_out.fill_(0.1)
    smola.save_adapter(full, tmp_path / "trained")
    with pytest.raises(ValueError, match="unexpected .*blocks.0.ffn_v.fc1.t"):
        smola.load_adapter(_tiny_base(), tmp_path / "trained")
