"""Multiway backbone, heads and pretraining model: shapes, routing of modalities, masks, init, losses."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from smola.context import current_token_masks
from vlmoe.model.config import PRESETS, ModelConfig, model_config
from vlmoe.model.multiway import DropPath, MultiwayTransformer
from vlmoe.nn.feed_forward import FeedForward
from vlmoe.model.pretraining import VLMoEForPretraining
from vlmoe.nn.task_scope import current_task, task_scope
from vlmoe.model.objectives import prediction_accuracy, prediction_loss, pretraining_loss

torch.set_num_threads(1)


def tiny(**overrides) -> ModelConfig:
    return model_config("tiny", **{"drop_path": 0.0, **overrides})


def random_pixels(batch: int, cfg: ModelConfig, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(seed))


def random_ids(batch: int, length: int, cfg: ModelConfig, seed: int = 0) -> torch.Tensor:
    return torch.randint(5, cfg.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- config

def test_presets_follow_the_paper():
    base, small = model_config("base"), model_config("small")
    assert (base.depth, base.dim, base.heads, base.ffn_dim) == (12, 768, 12, 3072)
    assert (small.depth, small.dim, small.heads) == (8, 384, 6)
    assert (base.image_size, base.patch_size, base.max_text_len, base.vocab_size) == (224, 16, 128, 64000)
    assert base.num_patches == 196 and base.num_vl_ffn_blocks == 2  # VLMO's vlffn_start_layer_index=10
    assert small.num_vl_ffn_blocks == 1  # "VL-FFN is used in the 8th layer" of 8
    assert base.drop_path == 0.1 and base.dropout == 0.0
    assert model_config("tiny", depth=2, vl_ffn_start=1).depth == 2


@pytest.mark.parametrize("call, message", [
    (lambda: model_config("huge"), "unknown model preset 'huge'"),
    (lambda: model_config("tiny", dimm=3), "unknown ModelConfig field(s) ['dimm']"),
    (lambda: model_config("tiny", heads=3), "dim=128 is not divisible by heads=3"),
    (lambda: model_config("tiny", image_size=30), "image_size=30 is not divisible by patch_size=8"),
    (lambda: model_config("tiny", vl_ffn_start=9), "vl_ffn_start must be an int in [0, depth=4]"),
    (lambda: model_config("tiny", drop_path=1.0), "drop_path must be in [0, 1)"),
    (lambda: model_config("tiny", dim=0), "dim must be a positive int"),
    (lambda: ModelConfig.from_dict({**PRESETS["tiny"], "extra": 1}), "unknown ModelConfig field(s) ['extra']"),
])
def test_config_errors_name_the_problem(call, message):
    with pytest.raises(ValueError) as info:
        call()
    assert message in str(info.value)


def test_config_round_trips_through_dict():
    cfg = tiny(depth=3)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


# ---------------------------------------------------------------- shapes and parameter counts

def test_shapes_for_each_input_kind():
    cfg = tiny()
    model = MultiwayTransformer(cfg).eval()
    pixels, ids = random_pixels(2, cfg), random_ids(2, 7, cfg)
    n_image = cfg.num_patches + 1
    image = model(pixels=pixels)
    assert image.hidden.shape == (2, n_image, cfg.dim)
    assert image.image_slice == slice(0, n_image) and image.text_slice is None and image.valid is None
    text = model(text_ids=ids, text_pad_mask=torch.ones(2, 7, dtype=torch.bool))
    assert text.hidden.shape == (2, 7, cfg.dim) and text.text_slice == slice(0, 7) and text.image_slice is None
    pair = model(pixels=pixels, text_ids=ids)
    assert pair.hidden.shape == (2, n_image + 7, cfg.dim)
    assert pair.text_slice == slice(n_image, n_image + 7)
    # the final LayerNorm is applied: per-token mean 0, variance 1 (weight 1, bias 0 at init)
    assert torch.allclose(pair.hidden.mean(-1), torch.zeros(2, n_image + 7), atol=1e-5)
    assert torch.allclose(pair.hidden.var(-1, unbiased=False), torch.ones(2, n_image + 7), atol=1e-3)


def dense_parameter_count(cfg: ModelConfig) -> int:
    """Independent formula: embeddings + blocks (attention, 2 LayerNorms, V/T-FFN, VL-FFN on top) + norm + heads."""
    d, f = cfg.dim, cfg.ffn_dim
    patch = 3 * cfg.patch_size ** 2 * d + d
    embeddings = patch + 2 * d + (cfg.num_patches + 1) * d + cfg.vocab_size * d + cfg.max_text_len * d + 2 * d
    attention = 4 * d * d + 4 * d
    ffn = d * f + f + f * d + d
    blocks = cfg.depth * (attention + 4 * d + 2 * ffn) + cfg.num_vl_ffn_blocks * ffn
    heads = cfg.vocab_size + (d * cfg.codebook_size + cfg.codebook_size)  # MLM bias (weight tied) + MIM
    return embeddings + blocks + 2 * d + heads


@pytest.mark.parametrize("preset", ["tiny", "small", "base"])
def test_parameter_counts(preset):
    cfg = model_config(preset)
    with torch.device("meta"):  # no memory or init time for small / base
        model = VLMoEForPretraining(cfg)
    total = sum(p.numel() for p in model.parameters())
    assert total == dense_parameter_count(cfg)
    if preset == "base":
        # dense BASE: ~152M in the backbone beyond the 64k x 768 word table, as VLMO-Base (175M with 30k vocab)
        assert 200e6 < total < 215e6
        backbone_without_words = sum(p.numel() for p in model.backbone.parameters()) - 64000 * 768
        assert 145e6 < backbone_without_words < 160e6


def test_grad_checkpointing_flag_comes_from_config():
    cfg = tiny(grad_checkpointing=True)
    assert MultiwayTransformer(cfg).grad_checkpointing


# ---------------------------------------------------------------- padding, masking and modality routing

def test_padding_does_not_change_real_tokens():
    cfg = tiny()
    torch.manual_seed(0)
    model = MultiwayTransformer(cfg).eval()
    pixels, ids = random_pixels(1, cfg), random_ids(1, 6, cfg)
    padded = torch.cat([ids, torch.zeros(1, 5, dtype=torch.long)], dim=1)
    pad_mask = torch.arange(11).unsqueeze(0) < 6
    with torch.no_grad():
        for px in (None, pixels):
            plain = model(pixels=px, text_ids=ids).hidden
            with_pad = model(pixels=px, text_ids=padded, text_pad_mask=pad_mask).hidden
            assert torch.allclose(with_pad[:, :plain.shape[1]], plain, atol=1e-5)
            assert not torch.allclose(model(pixels=px, text_ids=padded).hidden[:, :plain.shape[1]], plain, atol=1e-3)


def test_batched_rows_of_different_lengths_match_single_rows():
    cfg = tiny()
    model = MultiwayTransformer(cfg).eval()
    short, long = random_ids(1, 4, cfg, seed=1), random_ids(1, 9, cfg, seed=2)
    batch = torch.zeros(2, 9, dtype=torch.long)
    batch[0, :4], batch[1] = short[0], long[0]
    pad_mask = torch.tensor([[True] * 4 + [False] * 5, [True] * 9])
    with torch.no_grad():
        out = model(text_ids=batch, text_pad_mask=pad_mask).hidden
        assert torch.allclose(out[0, :4], model(text_ids=short).hidden[0], atol=1e-5)
        assert torch.allclose(out[1], model(text_ids=long).hidden[0], atol=1e-5)


def test_masked_patches_do_not_see_their_pixels():
    cfg = tiny()
    model = MultiwayTransformer(cfg).eval()
    pixels = random_pixels(1, cfg)
    image_mask = torch.zeros(1, cfg.num_patches, dtype=torch.bool)
    image_mask[0, 0] = True  # the top-left patch
    changed = pixels.clone()
    changed[..., :cfg.patch_size, :cfg.patch_size] += 5.0
    with torch.no_grad():
        a = model(pixels=pixels, image_mask=image_mask).hidden
        b = model(pixels=changed, image_mask=image_mask).hidden
        c = model(pixels=changed).hidden
    assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(a, c, atol=1e-3)


def count_ffn_calls(model: MultiwayTransformer) -> dict[tuple[int, str], int]:
    calls: dict[tuple[int, str], int] = {}
    for block in model.blocks:
        for name in ("ffn_v", "ffn_t", "ffn_vl"):
            module = getattr(block, name)
            if module is not None:
                def hook(mod, args, output, key=(block.index, name)):
                    calls[key] = calls.get(key, 0) + args[0].shape[1]  # tokens seen
                module.register_forward_hook(hook)
    return calls


def test_vl_ffn_serves_only_pairs_in_top_blocks():
    cfg = tiny(depth=4, vl_ffn_start=2)
    model = MultiwayTransformer(cfg).eval()
    assert [b.ffn_vl is not None for b in model.blocks] == [False, False, True, True]
    calls = count_ffn_calls(model)
    pixels, ids = random_pixels(2, cfg), random_ids(2, 5, cfg)
    n_image = cfg.num_patches + 1
    with torch.no_grad():
        model(pixels=pixels)
        assert calls == {(i, "ffn_v"): n_image for i in range(4)}
        calls.clear()
        model(text_ids=ids)
        assert calls == {(i, "ffn_t"): 5 for i in range(4)}
        calls.clear()
        model(pixels=pixels, text_ids=ids)
        assert calls == {(0, "ffn_v"): n_image, (0, "ffn_t"): 5, (1, "ffn_v"): n_image, (1, "ffn_t"): 5,
                         (2, "ffn_vl"): n_image + 5, (3, "ffn_vl"): n_image + 5}


class RecordingFFN(FeedForward):
    """A dense FFN that records what the backbone declares around its calls."""

    def __init__(self, cfg: ModelConfig, log: list, index: int, modality: str) -> None:
        super().__init__(cfg.dim, cfg.ffn_dim)
        self.log, self.key = log, (index, modality)

    def forward(self, x, token_mask=None):
        masks = current_token_masks()
        self.log.append((self.key, x.shape[1], token_mask, masks.valid, masks.visual, current_task()))
        return super().forward(x, token_mask)


def test_token_masks_declared_around_ffn_and_attention_calls():
    cfg = tiny(depth=2, vl_ffn_start=1)
    log: list = []
    model = MultiwayTransformer(cfg, ffn_factory=lambda i, m: RecordingFFN(cfg, log, i, m)).eval()
    attention_masks = []
    model.blocks[0].attn.q_proj.register_forward_hook(lambda mod, args, out: attention_masks.append(current_token_masks()))
    pixels, ids = random_pixels(2, cfg), random_ids(2, 6, cfg)
    pad_mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    n_image = cfg.num_patches + 1
    with torch.no_grad():
        model(pixels=pixels, text_ids=ids, text_pad_mask=pad_mask)
    full_valid = torch.cat([torch.ones(2, n_image, dtype=torch.bool), pad_mask], dim=1)
    visual = torch.arange(n_image + 6).expand(2, -1) < n_image
    assert torch.equal(attention_masks[0].valid, full_valid) and torch.equal(attention_masks[0].visual, visual)
    by_key = {entry[0]: entry for entry in log}
    _, n, token_mask, valid, vis, _ = by_key[(0, "v")]
    assert n == n_image and token_mask.all() and valid.all() and vis.all()
    _, n, token_mask, valid, vis, _ = by_key[(0, "t")]
    assert n == 6 and torch.equal(token_mask, pad_mask) and torch.equal(valid, pad_mask) and not vis.any()
    _, n, token_mask, valid, vis, _ = by_key[(1, "vl")]
    assert n == n_image + 6 and torch.equal(token_mask, full_valid) and torch.equal(vis, visual)
    log.clear()
    with torch.no_grad():
        model(pixels=pixels)  # nothing padded: masks say so with None
    assert all(entry[2] is None and entry[3] is None and entry[4].all() for entry in log)


def test_pretraining_passes_run_in_their_task_scope():
    cfg = tiny(depth=1, vl_ffn_start=1)
    log: list = []
    model = VLMoEForPretraining(cfg, ffn_factory=lambda i, m: RecordingFFN(cfg, log, i, m))
    model(make_batch(cfg, batch=2))
    assert {(entry[0][1], entry[5]) for entry in log} == {("t", "mlm"), ("v", "mim"), ("v", "vlm"), ("t", "vlm")}
    assert current_task() is None
    with task_scope("mlm"):
        with task_scope("vlm"):
            assert current_task() == "vlm"
        assert current_task() == "mlm"


# ---------------------------------------------------------------- init, stochastic depth, checkpointing

def test_beit_init_rescales_deeper_output_weights():
    cfg = model_config("tiny", dim=256, ffn_dim=1024, depth=4, heads=4)
    torch.manual_seed(0)
    model = MultiwayTransformer(cfg)
    std0 = model.blocks[0].attn.q_proj.weight.std().item()
    assert 0.8 * cfg.init_std < std0 < 0.95 * cfg.init_std  # truncated at 2 sigma: std 0.88 sigma
    for block in model.blocks:
        factor = 1 / math.sqrt(2 * (block.index + 1))
        assert block.attn.out_proj.weight.std().item() == pytest.approx(std0 * factor, rel=0.05)
        assert block.ffn_v.fc2.weight.std().item() == pytest.approx(std0 * factor, rel=0.05)
        assert block.ffn_v.fc1.weight.std().item() == pytest.approx(std0, rel=0.05)
        assert torch.equal(block.norm1.weight, torch.ones(cfg.dim)) and not block.norm1.bias.any()
    assert model.embeddings.text.tokens.weight.abs().max() <= 2 * cfg.init_std


def test_drop_path_rates_and_statistics():
    model = MultiwayTransformer(model_config("tiny", drop_path=0.3, depth=4, vl_ffn_start=3))
    assert [b.drop_path.p for b in model.blocks] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    drop = DropPath(0.25).train()
    torch.manual_seed(0)
    out = drop(torch.ones(20000, 3, 2))
    per_sample = out[:, 0, 0]
    assert torch.all((out == out[:, :1, :1]))  # whole samples kept or dropped
    assert (per_sample == 0).float().mean().item() == pytest.approx(0.25, abs=0.015)
    assert per_sample.mean().item() == pytest.approx(1.0, abs=0.03)
    assert torch.equal(drop.eval()(torch.ones(4, 2)), torch.ones(4, 2))


def test_gradient_checkpointing_gives_the_same_gradients():
    cfg = tiny()
    batch = make_batch(cfg, batch=2)
    grads = []
    for flag in (False, True):
        torch.manual_seed(0)
        model = VLMoEForPretraining(cfg)
        model.backbone.grad_checkpointing = flag
        model(batch)["loss"].backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs, message", [
    (dict(), "needs pixels, text_ids or both"),
    (dict(pixels=torch.zeros(1, 3, 16, 16)), "pixels must have shape [B, 3, 32, 32]"),
    (dict(text_ids=torch.zeros(1, 40, dtype=torch.long)), "text length 40 exceeds max_text_len=32"),
    (dict(text_ids=torch.full((1, 3), 2000)), "text_ids out of range [0, vocab_size=2000)"),
    (dict(text_ids=torch.zeros(1, 3)), "text_ids must be an integer tensor"),
    (dict(text_ids=torch.zeros(1, 3, dtype=torch.long), text_pad_mask=torch.ones(1, 3)), "text_pad_mask must be bool"),
    (dict(text_ids=torch.zeros(1, 3, dtype=torch.long), text_pad_mask=torch.zeros(1, 3, dtype=torch.bool)),
     "text_pad_mask has a row with no real token"),
    (dict(text_ids=torch.zeros(1, 3, dtype=torch.long), image_mask=torch.zeros(1, 16, dtype=torch.bool)),
     "image_mask given without pixels"),
    (dict(pixels=torch.zeros(1, 3, 32, 32), image_mask=torch.zeros(1, 15, dtype=torch.bool)), "image_mask must be bool [B=1, P=16]"),
    (dict(pixels=torch.zeros(2, 3, 32, 32), text_ids=torch.zeros(1, 3, dtype=torch.long)), "batch sizes differ: 2 vs 1"),
])
def test_backbone_rejects_bad_input(kwargs, message):
    model = MultiwayTransformer(tiny())
    with pytest.raises(ValueError) as info:
        model(**kwargs)
    assert message in str(info.value)


def test_ffn_factory_contract_is_checked():
    cfg = tiny()
    with pytest.raises(TypeError, match=r"ffn_factory\(0, 'v'\) returned function"):
        MultiwayTransformer(cfg, ffn_factory=lambda i, m: (lambda x, mask: x))

    class Halves(nn.Module):
        def forward(self, x, token_mask=None):
            return x[:, : x.shape[1] // 2]

    model = MultiwayTransformer(cfg, ffn_factory=lambda i, m: Halves())
    with pytest.raises(TypeError, match=r"block 0 t-FFN must return a tensor of shape \(1, 4, 128\), got \(1, 2, 128\)"):
        model(text_ids=torch.ones(1, 4, dtype=torch.long))


def test_pretraining_rejects_bad_batches():
    cfg = tiny()
    model = VLMoEForPretraining(cfg)
    batch = make_batch(cfg, batch=1)
    with pytest.raises(KeyError, match=r"batch\['pair'\] is missing key\(s\) \['mim_targets'\]"):
        model({"pair": {k: v for k, v in batch["pair"].items() if k != "mim_targets"}})
    with pytest.raises(KeyError, match=r"unknown subset\(s\) \['video'\]"):
        model({"video": {}})
    with pytest.raises(ValueError, match="batch holds none of"):
        model({})
    with pytest.raises(ValueError, match=r"text labels shape \(1, 3\) does not match"):
        model({"text": {**batch["text"], "labels": torch.zeros(1, 3, dtype=torch.long)}})


# ---------------------------------------------------------------- objectives and training

def make_batch(cfg: ModelConfig, batch: int, text_len: int = 8, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    P = cfg.num_patches

    def text_part():
        ids = torch.randint(5, cfg.vocab_size, (batch, text_len), generator=gen)
        pad_mask = torch.ones(batch, text_len, dtype=torch.bool)
        pad_mask[0, text_len // 2:] = False
        chosen = (torch.rand(batch, text_len, generator=gen) < 0.4) & pad_mask
        chosen[:, 1] = True
        labels = torch.where(chosen, ids, torch.full_like(ids, -100))
        return {"ids": torch.where(chosen, torch.full_like(ids, 4), ids), "pad_mask": pad_mask, "labels": labels}

    def image_part():
        mim_mask = torch.rand(batch, P, generator=gen) < 0.4
        mim_mask[:, 0] = True
        return {"pixels": torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=gen), "mim_mask": mim_mask,
                "mim_targets": torch.randint(0, cfg.codebook_size, (batch, P), generator=gen)}

    return {"text": text_part(), "image": image_part(), "pair": {**text_part(), **image_part()}}


def test_objectives_are_cross_entropy_on_masked_positions():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]], requires_grad=True)
    targets = torch.tensor([0, 2])
    expected = (-F.log_softmax(logits, -1)[0, 0] - F.log_softmax(logits, -1)[1, 2]) / 2
    assert prediction_loss(logits, targets).item() == pytest.approx(expected.item())
    assert prediction_accuracy(logits, targets).item() == 0.5
    empty = prediction_loss(logits[:0], targets[:0])
    assert empty.item() == 0.0 and empty.requires_grad
    assert pretraining_loss({"a": torch.tensor(1.5), "b": torch.tensor(2.0)}).item() == 3.5
    with pytest.raises(ValueError, match="logits must be"):
        prediction_loss(logits, targets[:1])


def test_pretraining_outputs_and_loss_composition():
    cfg = tiny()
    torch.manual_seed(0)
    model = VLMoEForPretraining(cfg).eval()
    batch = make_batch(cfg, batch=3)
    with torch.no_grad():
        out = model(batch)
    assert set(out) == {"loss", "mlm", "mim", "vlm", "vlm_text", "vlm_image", "mlm_acc", "mim_acc", "vlm_text_acc",
                        "vlm_image_acc"}
    assert out["loss"].item() == pytest.approx((out["mlm"] + out["mim"] + out["vlm"]).item(), rel=1e-6)
    assert out["vlm"].item() == pytest.approx((out["vlm_text"] + out["vlm_image"]).item(), rel=1e-6)
    # near-uniform predictions at init: CE ~ log(classes)
    assert out["mlm"].item() == pytest.approx(math.log(cfg.vocab_size), rel=0.1)
    assert out["mim"].item() == pytest.approx(math.log(cfg.codebook_size), rel=0.1)
    # MLM recomputed by hand from the backbone and the tied head
    with torch.no_grad():
        hidden = model.backbone(text_ids=batch["text"]["ids"], text_pad_mask=batch["text"]["pad_mask"]).hidden
        labels = batch["text"]["labels"]
        logits = hidden[labels != -100] @ model.backbone.embeddings.text.tokens.weight.T + model.mlm_head.bias
    assert out["mlm"].item() == pytest.approx(F.cross_entropy(logits, labels[labels != -100]).item(), rel=1e-5)
    assert model.mlm_head.weight is model.backbone.embeddings.text.tokens.weight
    with torch.no_grad():
        only_text = model({"text": batch["text"]})
    assert set(only_text) == {"loss", "mlm", "mlm_acc"} and only_text["loss"].item() == pytest.approx(out["mlm"].item())


def test_a_few_steps_on_a_fixed_batch_lower_every_loss():
    cfg = tiny()
    torch.manual_seed(0)
    model = VLMoEForPretraining(cfg)
    batch = make_batch(cfg, batch=4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    history = []
    for _ in range(15):
        out = model(batch)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        history.append({k: v.item() for k, v in out.items()})
    first, last = history[0], history[-1]
    assert last["loss"] < 0.6 * first["loss"], (first, last)
    for key in ("mlm", "mim", "vlm_text", "vlm_image"):
        assert last[key] < 0.75 * first[key], (key, first[key], last[key])


def test_weight_decay_skips_biases_norms_tokens_and_positions():
    from vlmoe.train.trainer import param_groups

    model = VLMoEForPretraining(tiny())
    decay, no_decay = param_groups(model, weight_decay=0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    for name in ("backbone.embeddings.image.cls_token", "backbone.embeddings.image.mask_token",
                 "backbone.embeddings.image.positions", "backbone.embeddings.text.positions", "backbone.norm.weight",
                 "backbone.blocks.0.attn.q_proj.bias"):
        assert name in skipped, name
    assert "backbone.blocks.0.attn.q_proj.weight" not in skipped
    assert "backbone.embeddings.modality_type.weight" not in skipped


def test_weight_decay_skips_the_experts_biases():
    from vlmoe.moe import MoEConfig
    from vlmoe.train.pretrain import build_pretraining_model
    from vlmoe.train.trainer import param_groups

    model = build_pretraining_model(tiny(), MoEConfig(num_experts=4), world_size=1)
    decay, no_decay = param_groups(model, weight_decay=0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)].rsplit(".", 1)[-1] for p in no_decay["params"]}
    decayed = {names[id(p)].rsplit(".", 1)[-1] for p in decay["params"]}
    assert {"b_in", "b_out"} <= skipped and not {"b_in", "b_out"} & decayed
    assert {"w_in", "w_out"} <= decayed
