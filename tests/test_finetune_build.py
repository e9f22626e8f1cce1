"""Building fine-tuning models in one process: HF bases (pretrained dir or config), methods, errors."""
from __future__ import annotations

import pytest
import torch

import smola
from vlmoe.config import ConfigError, load_config
from vlmoe.train.finetune import add_method, build_classifier, load_hf_classifier


def _tiny_vit(tmp_path, with_weights: bool):
    from transformers import ViTConfig, ViTForImageClassification
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64, num_labels=3)
    directory = tmp_path / ("vit-weights" if with_weights else "vit-config")
    if with_weights:
        torch.manual_seed(0)
        model = ViTForImageClassification(config)
        model.save_pretrained(str(directory))
        return directory, model
    config.save_pretrained(str(directory))
    return directory / "config.json", None


def test_hf_pretrained_directory_keeps_its_weights_and_resizes_the_head(tmp_path):
    directory, original = _tiny_vit(tmp_path, with_weights=True)
    loaded = load_hf_classifier(str(directory), num_classes=5)
    assert loaded.classifier.out_features == 5
    for name, param in original.vit.named_parameters():
        assert torch.equal(param, dict(loaded.vit.named_parameters())[name]), name


def test_hf_config_builds_a_random_model_and_methods_train_the_right_tensors(tmp_path):
    path, _ = _tiny_vit(tmp_path, with_weights=False)
    for method in ("smola", "lora", "full"):
        cfg = load_config("finetune_tiny_smola", [f"finetune.hf_model={path}", "finetune.base_run=null",
                                                  f"finetune.method={method}", "finetune.smola.mode=mm",
                                                  "finetune.smola.num_experts=4"])
        model, image_size, tokens = build_classifier(cfg, num_classes=4)
        assert (image_size, tokens) == (32, 17)
        add_method(cfg, model)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert {"model.classifier.weight", "model.classifier.bias"} <= trainable
        if method == "full":
            assert "model.vit.embeddings.patch_embeddings.projection.weight" in trainable
        else:
            assert smola.adapter_parameters(model.model) and all(p.requires_grad for p in
                                                                 smola.adapter_parameters(model.model).values())
            assert not any(n.endswith("projection.weight") for n in trainable)
        out = model({"pixels": torch.randn(2, 3, 32, 32), "labels": torch.tensor([0, 3])})
        assert out["loss"].requires_grad and 0.0 <= float(out["accuracy"]) <= 1.0


def test_bad_fine_tuning_settings_are_named(tmp_path):
    with pytest.raises(ConfigError, match="finetune.hf_model"):
        load_hf_classifier(str(tmp_path / "absent"), num_classes=2)
    with pytest.raises(ConfigError, match="set only one"):
        load_config("finetune_tiny_smola", [f"finetune.hf_model={tmp_path}"])
    with pytest.raises(ConfigError, match="finetune.method"):
        load_config("finetune_tiny_smola", ["finetune.method=prefix"])
    with pytest.raises(ConfigError, match="specialist"):
        load_config("finetune_tiny_smola", [f"finetune.generalist={tmp_path}"])
    cfg = load_config("finetune_tiny_smola", [f"finetune.base_run={tmp_path}"])
    with pytest.raises(ConfigError, match="model_config.json"):
        build_classifier(cfg, num_classes=2)
    cfg = load_config("finetune_tiny_smola", ["finetune.smola.num_experts=0", f"finetune.base_run={tmp_path}"])
    from vlmoe.train.finetune import adapter_config
    with pytest.raises(ConfigError, match="finetune.smola"):
        adapter_config(cfg)
