"""SMoLA on our multiway backbone: its declared masks reach every adapted linear."""
import warnings

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
