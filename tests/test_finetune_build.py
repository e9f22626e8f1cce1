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


def _write_pretraining_run(run_dir, moe_record: dict):
    """A pretraining run directory as `vlmoe pretrain` leaves it: config record, committed tag, experts."""
    import json

    from vlmoe.model.config import model_config
    from vlmoe.model.pretraining import VLMoEForPretraining
    from vlmoe.moe import MoEConfig, moe_ffn_factory
    from vlmoe.moe.expert_checkpoint import save_experts
    from vlmoe.train.checkpoint import EXPERTS_FILE, POINTER, tag_for
    from vlmoe.train.pretrain import MODEL_CONFIG_FILE

    cfg = model_config("tiny", depth=4, vl_ffn_start=3, drop_path=0.0)
    torch.manual_seed(3)
    model = VLMoEForPretraining(cfg, moe_ffn_factory(cfg, MoEConfig(num_experts=4)))
    tag_dir = run_dir / "checkpoints" / tag_for(2)
    tag_dir.mkdir(parents=True)
    torch.save({"module": model.state_dict()}, tag_dir / "mp_rank_00_model_states.pt")
    save_experts(model, tag_dir / EXPERTS_FILE)
    (run_dir / "checkpoints" / POINTER).write_text(tag_for(2) + "\n")
    (run_dir / MODEL_CONFIG_FILE).write_text(json.dumps({"model": cfg.to_dict(), "moe": moe_record}))
    return model


def test_a_run_pretrained_with_tutel_fine_tunes_where_tutel_is_missing(tmp_path):
    from vlmoe.moe import MoEConfig, moe_layers
    from vlmoe.moe.tutel_dispatch import tutel_installed
    from vlmoe.train.finetune import load_pretrained_backbone

    # the record as a tutel run on a GPU cluster writes it (MoEConfig checks tutel, a dict does not)
    record = {**MoEConfig(num_experts=4).to_dict(), "backend": "tutel", "ep_size": 2}
    pretrained = _write_pretraining_run(tmp_path, record)
    if tutel_installed():
        backbone = load_pretrained_backbone(tmp_path)
    else:
        with pytest.warns(RuntimeWarning, match="pretrained with tutel's dispatch; tutel is not installed here"):
            backbone = load_pretrained_backbone(tmp_path)
    layers = moe_layers(backbone)
    assert layers and {m.backend for m in layers} == {"tutel" if tutel_installed() else "ours"}
    state = pretrained.backbone.state_dict()
    assert all(torch.equal(t, state[n]) for n, t in backbone.state_dict().items())
    assert all(not p.requires_grad for m in layers for p in m.parameters())  # frozen for fine-tuning
