"""Injection into torch and Hugging Face models: patterns, zero-init equality, reports,
LoRA and full fine-tuning through the same path, merging."""
import pytest
import torch
from torch import nn
import transformers

import smola


def _tiny_vit():
    cfg = transformers.ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=16, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=32, num_labels=3)
    return transformers.ViTForImageClassification(cfg).eval(), {"pixel_values": torch.randn(2, 3, 16, 16)}


def _tiny_bert():
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, num_labels=2)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    return transformers.BertForSequenceClassification(cfg).eval(), {"input_ids": torch.randint(0, 50, (2, 7)), "attention_mask": mask}


def _tiny_t5():
    cfg = transformers.T5Config(vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2,
                                num_heads=2, decoder_start_token_id=0, pad_token_id=0)
    return transformers.T5ForConditionalGeneration(cfg).eval(), {
        "input_ids": torch.randint(1, 50, (2, 6)), "decoder_input_ids": torch.randint(1, 50, (2, 4))}


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _perturb(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("w_out", "lora_b")):
                p.normal_(0, 0.5)


@pytest.mark.parametrize("make", [_tiny_vit, _tiny_bert, _tiny_t5], ids=["vit", "bert", "t5"])
@pytest.mark.parametrize("mode", ["omni", "mm"])
def test_zero_init_equality_on_hugging_face_models(make, mode):
    torch.manual_seed(0)
    model, inputs = make()
    before = _logits(model, inputs)
    smola.inject(model, smola.SMoLAConfig(num_experts=4, rank=2, mode=mode))
    if "attention_mask" in inputs:  # padding mask from the model's own input
        smola.modality_hooks(model, smola.masks_from_inputs("attention_mask"))
    with pytest.warns(RuntimeWarning) if mode == "omni" else _no_warning():
        after = _logits(model, inputs)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    _perturb(model)
    assert not torch.allclose(_logits(model, inputs), before, atol=1e-4)


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.fixture(autouse=True)
def _fresh_warning_state(monkeypatch):
    import smola.omni
    monkeypatch.setattr(smola.omni, "_warned_no_modality", False)


def test_all_linear_leaves_output_heads_and_targets_attention_and_mlp():
    model, _ = _tiny_bert()
    smola.inject(model, smola.SMoLAConfig(num_experts=2, mode="mm"))
    wrapped = sorted(n for n, m in model.named_modules() if isinstance(m, smola.SMoLALinear))
    assert "classifier" not in wrapped and isinstance(model.classifier, nn.Linear)
    per_layer = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                 "intermediate.dense", "output.dense"]
    assert wrapped == sorted([f"bert.encoder.layer.{i}.{s}" for i in range(2) for s in per_layer] + ["bert.pooler.dense"])
    t5, _ = _tiny_t5()
    smola.inject(t5, smola.SMoLAConfig(num_experts=2, mode="mm"))
    assert isinstance(t5.lm_head, nn.Linear)


def test_list_regex_and_exclude_patterns():
    model, _ = _tiny_bert()
    smola.inject(model, smola.SMoLAConfig(num_experts=2, mode="mm", target_modules=["query", "attention.output.dense"]))
    assert sorted(n.split("layer.")[1] for n, m in model.named_modules() if isinstance(m, smola.SMoLALinear)) == [
        "0.attention.output.dense", "0.attention.self.query", "1.attention.output.dense", "1.attention.self.query"]
    model, _ = _tiny_bert()
    smola.inject(model, smola.SMoLAConfig(num_experts=2, mode="mm", target_modules=r".*layer\.1\..*(key|value)"))
    assert sorted(n for n, m in model.named_modules() if isinstance(m, smola.SMoLALinear)) == [
        "bert.encoder.layer.1.attention.self.key", "bert.encoder.layer.1.attention.self.value"]
    model, _ = _tiny_bert()
    smola.inject(model, smola.SMoLAConfig(num_experts=2, mode="mm", exclude_modules=["pooler.dense", "intermediate.dense"]))
    names = [n for n, m in model.named_modules() if isinstance(m, smola.SMoLALinear)]
    assert len(names) == 10 and not any("pooler" in n or "intermediate" in n for n in names)


@pytest.mark.parametrize("targets, message", [(["querry"], "querry"), (r"nothing\.here", "matched no nn.Linear"), ([], "regex string")])
def test_bad_targets_are_named(targets, message):
    model, _ = _tiny_bert()
    with pytest.raises(ValueError, match=message):
        smola.inject(model, smola.SMoLAConfig(num_experts=2, target_modules=targets))


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="mode"):
        smola.SMoLAConfig(mode="audio")
    with pytest.raises(ValueError, match="num_experts"):
        smola.SMoLAConfig(num_experts=0)
    with pytest.raises(ValueError, match="unknown key"):
        smola.config_from_dict({"method": "smola", "experts": 4})
    with pytest.raises(ValueError, match="'method'"):
        smola.config_from_dict({"method": "adapterx"})
    assert smola.config_from_dict(smola.config_to_dict(smola.LoRAConfig(rank=8))) == smola.LoRAConfig(rank=8)


def test_trainable_report_counts_exactly_and_base_is_frozen():
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    base_total = sum(p.numel() for p in model.parameters())
    smola.inject(model, smola.SMoLAConfig(num_experts=3, rank=2, mode="omni"))
    per_block = lambda i, o: 3 * i + 1 + 3 * 2 * i + 3 * o * 2
    added = 3 * (per_block(8, 6) + per_block(6, 4))
    report = smola.trainable_parameters(model)
    assert (report.total, report.trainable, report.adapter_modules) == (base_total + added, added, 2)
    assert "trainable params: " in str(report)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".base." in n)


def test_lora_baseline_and_full_fine_tuning_through_inject():
    model, inputs = _tiny_bert()
    before = _logits(model, inputs)
    smola.inject(model, smola.LoRAConfig(rank=4))
    assert torch.equal(_logits(model, inputs), before)
    loras = [m for m in model.modules() if isinstance(m, smola.LoRALinear)]
    assert len(loras) == 13 and smola.trainable_parameters(model).trainable == sum(4 * (m.in_features + m.out_features) for m in loras)
    full, _ = _tiny_bert()
    smola.inject(full, smola.FullConfig())
    assert all(p.requires_grad for p in full.parameters())
    part, _ = _tiny_bert()
    smola.inject(part, smola.FullConfig(target_modules=["classifier"]))
    assert [n for n, p in part.named_parameters() if p.requires_grad] == ["classifier.weight", "classifier.bias"]


def test_lora_specialist_stacks_on_a_smola_generalist():
    model, inputs = _tiny_bert()
    smola.inject(model, smola.SMoLAConfig(num_experts=2, mode="mm", target_modules=["query", "value"]))
    _perturb(model)
    generalist = _logits(model, inputs)
    smola_names = set(smola.adapter_parameters(model))
    smola.inject(model, smola.LoRAConfig(rank=4, target_modules=["query", "value"]))
    assert torch.equal(_logits(model, inputs), generalist)  # LoRA starts at zero
    assert smola_names < set(smola.adapter_parameters(model))  # SMoLA tensors keep their names
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)  # the generalist is frozen
    query = model.bert.encoder.layer[0].attention.self.query
    assert isinstance(query, smola.SMoLALinear) and isinstance(query.base, smola.LoRALinear)
    assert [c["method"] for c in smola.adapter_stack(model)] == ["smola", "lora"]


def test_merge_refuses_smola_and_folds_lora():
    model, inputs = _tiny_bert()
    smola.inject(model, smola.SMoLAConfig(num_experts=2))
    with pytest.raises(ValueError, match="cannot be merged"):
        smola.merge_adapter(model)
    model, inputs = _tiny_bert()
    smola.inject(model, smola.LoRAConfig(rank=4))
    _perturb(model)
    adapted = _logits(model, inputs)
    smola.merge_adapter(model)
    assert not any(isinstance(m, smola.LoRALinear) for m in model.modules())
    torch.testing.assert_close(_logits(model, inputs), adapted, rtol=1e-5, atol=1e-5)


class _TwoTowers(nn.Module):
    """A vision tower, a text tower and a shared layer; the towers declared modality-specific."""

    def __init__(self, declare=True):
        super().__init__()
        torch.manual_seed(0)
        self.vision = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 8))
        self.text = nn.ModuleDict({"mlp": nn.Linear(8, 8)})
        self.shared = nn.Linear(8, 4)
        if declare:
            self.smola_modalities = {"vision": "v", "text": "t"}  # an instance attribute works as well as a class one

    def forward(self, x, visual):
        n = int(visual[0].sum())
        with smola.token_masks(visual=visual[:, :n]):
            image = self.vision(x[:, :n])
        with smola.token_masks(visual=visual[:, n:]):
            text = self.text["mlp"](x[:, n:])
        with smola.token_masks(visual=visual):
            return self.shared(torch.cat([image, text], dim=1))


def _branches(model):
    return {n: m.branches for n, m in model.named_modules() if isinstance(m, smola.OmniSMoLALinear)}


def test_declared_modality_modules_get_only_their_reachable_branches():
    model = smola.inject(_TwoTowers(), smola.SMoLAConfig(num_experts=3, rank=2, mode="omni"))
    assert _branches(model) == {"vision.0": ("mm", "v"), "vision.1": ("mm", "v"), "text.mlp": ("mm", "t"),
                                "shared": ("mm", "v", "t")}
    per_block = lambda i, o: 3 * i + 1 + 3 * 2 * i + 3 * o * 2
    dead = per_block(8, 6) + per_block(6, 8) + per_block(8, 8)  # T blocks of the vision tower, V block of the text one
    undeclared = smola.inject(_TwoTowers(declare=False), smola.SMoLAConfig(num_experts=3, rank=2, mode="omni"))
    assert all(b == ("mm", "v", "t") for b in _branches(undeclared).values())
    assert smola.trainable_parameters(undeclared).trainable - smola.trainable_parameters(model).trainable == dead
    # the same outputs as with every branch, the unreachable blocks perturbed too
    with torch.no_grad():
        for p in smola.adapter_parameters(undeclared).values():
            p.normal_(0, 0.5)
        params = smola.adapter_parameters(model)
        for name, p in smola.adapter_parameters(undeclared).items():
            if name in params:
                params[name].copy_(p)
        x = torch.randn(2, 5, 8)
        visual = torch.tensor([[1, 1, 1, 0, 0]] * 2, dtype=torch.bool)
        torch.testing.assert_close(model(x, visual), undeclared(x, visual), rtol=0, atol=0)


def test_single_modality_mode_leaves_the_other_towers_linears_alone():
    model = smola.inject(_TwoTowers(), smola.SMoLAConfig(num_experts=3, rank=2, mode="v"))
    assert _branches(model) == {"vision.0": ("v",), "vision.1": ("v",), "shared": ("v",)}
    assert type(model.text["mlp"]) is nn.Linear
    with pytest.raises(ValueError, match="none of the 2 targeted linears receives text tokens"):
        smola.inject(_TwoTowers(), smola.SMoLAConfig(num_experts=3, rank=2, mode="t", target_modules=["vision.0", "vision.1"]))
    model = smola.inject(_TwoTowers(), smola.SMoLAConfig(num_experts=3, rank=2, mode="mm"))
    assert sum(isinstance(m, smola.SMoLALinear) for m in model.modules()) == 4  # mm reaches every linear


def test_bad_modality_declarations_are_named():
    model = _TwoTowers()
    model.smola_modalities = {"vision": "image"}
    with pytest.raises(ValueError, match="smola_modalities must map child names to one of"):
        smola.inject(model, smola.SMoLAConfig(num_experts=3, rank=2))
    model = _TwoTowers()
    model.vision.smola_modalities = {"1": "t"}
    with pytest.raises(ValueError, match="declares '1' 't'-only inside a 'v'-only module"):
        smola.inject(model, smola.SMoLAConfig(num_experts=3, rank=2))
