"""Building fine-tuning models in one process: HF bases (pretrained dir or config), what each method
trains, bases from exported pretraining runs (sparse ones frozen, without router noise or aux loss),
and setting errors that name the key."""
from __future__ import annotations

import json

import pytest
import torch

import smola
from vlmoe.config import ConfigError, load_config
from vlmoe.model.config import model_config
from vlmoe.model.pretraining import VLMoEForPretraining
from vlmoe.moe import MoEConfig, moe_ffn_factory, moe_layers
from vlmoe.tasks import get_task
from vlmoe.tasks.base import TaskInputs
from vlmoe.train.adapters import add_method
from vlmoe.train.base_model import load_hf_image_classifier, load_multiway_base
from vlmoe.train.export import MODEL_DIR, export_model


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
    base = load_hf_image_classifier(str(directory), num_classes=5)
    assert base.module.classifier.out_features == 5 and (base.image_size, base.tokens_per_image) == (32, 17)
    for name, param in original.vit.named_parameters():
        assert torch.equal(param, dict(base.module.vit.named_parameters())[name]), name


def test_hf_config_builds_a_random_model_and_methods_train_the_right_tensors(tmp_path):
    path, _ = _tiny_vit(tmp_path, with_weights=False)
    task = get_task("image_classification")
    for method in ("smola", "lora", "full"):
        cfg = load_config("finetune_tiny_image_classification",
                          [f"finetune.hf_model={path}", "finetune.base_run=null", f"finetune.method={method}",
                           "finetune.smola.mode=mm", "finetune.smola.num_experts=4"])
        model = task.wrap_hf_model(load_hf_image_classifier(str(path), num_classes=4).module)
        add_method(cfg, model)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert {"backbone.classifier.weight", "backbone.classifier.bias"} <= trainable
        if method == "full":
            assert "backbone.vit.embeddings.patch_embeddings.projection.weight" in trainable
        else:
            adapters = smola.adapter_parameters(model.backbone)
            assert adapters and all(p.requires_grad for p in adapters.values())
            assert not any(n.endswith("projection.weight") for n in trainable)
        out = model({"pixels": torch.randn(2, 3, 32, 32), "labels": torch.tensor([0, 3])})
        assert out["loss"].requires_grad and 0.0 <= float(out["accuracy"]) <= 1.0


def test_bad_fine_tuning_settings_are_named(tmp_path):
    with pytest.raises(ConfigError, match="finetune.hf_model"):
        load_hf_image_classifier(str(tmp_path / "absent"), num_classes=2)
    with pytest.raises(ConfigError, match="set only one"):
        load_config("finetune_tiny_vqa", [f"finetune.hf_model={tmp_path}"])
    with pytest.raises(ConfigError, match="finetune.method"):
        load_config("finetune_tiny_vqa", ["finetune.method=prefix"])
    with pytest.raises(ConfigError, match="specialist"):
        load_config("finetune_tiny_vqa", [f"finetune.generalist={tmp_path}"])
    with pytest.raises(ConfigError, match="finetune.val_fraction"):
        load_config("finetune_tiny_vqa", ["finetune.val_fraction=1.5"])
    with pytest.raises(ConfigError, match="data.eval_max_examples"):
        load_config("finetune_tiny_vqa", ["data.eval_max_examples=0"])
    with pytest.raises(ConfigError, match="no exported model in .*model_config.json"):
        load_multiway_base(tmp_path, None)
    with pytest.raises(ConfigError, match="finetune.smola"):  # at load, before any work
        load_config("finetune_tiny_vqa", ["finetune.smola.num_experts=0"])


def _exported_sparse_run(run_dir, tokenizer_file, moe_record: dict) -> VLMoEForPretraining:
    """A pretraining run's export, as `vlmoe pretrain` leaves it after a committed checkpoint."""
    cfg = model_config("tiny", depth=4, vl_ffn_start=3, drop_path=0.0)
    torch.manual_seed(3)
    model = VLMoEForPretraining(cfg, moe_ffn_factory(cfg, MoEConfig(num_experts=4)))
    export_model(model, run_dir / MODEL_DIR, {"model": cfg.to_dict(), "moe": moe_record, "step": 2}, [tokenizer_file],
                 is_main=True)
    return model


def test_a_sparse_base_is_frozen_without_router_noise_or_aux_loss_and_tutel_falls_back(tmp_path, prepared_data):
    from vlmoe.moe.backends import tutel_installed

    # the record as a tutel run on a GPU cluster writes it (MoEConfig checks tutel, a dict does not)
    record = {**MoEConfig(num_experts=4).to_dict(), "backend": "tutel", "ep_size": 2}
    pretrained = _exported_sparse_run(tmp_path, prepared_data / "text_tokenizer.model", record)
    assert json.loads((tmp_path / MODEL_DIR / "model_config.json").read_text())["step"] == 2
    if tutel_installed():
        base = load_multiway_base(tmp_path, None)
    else:
        with pytest.warns(RuntimeWarning, match="pretrained with tutel's dispatch; tutel is not installed here"):
            base = load_multiway_base(tmp_path, None)
    layers = moe_layers(base.module)
    assert layers and {m.backend for m in layers} == {"tutel" if tutel_installed() else "ours"}
    state = pretrained.backbone.state_dict()
    assert all(torch.equal(t, state[n]) for n, t in base.module.state_dict().items())
    assert all(not p.requires_grad for m in layers for p in m.parameters())
    assert all(m.config.noise_std == 0.0 and m.aux_losses == () for m in layers)  # nothing reaches the adapters from routing

    # a fine-tuning model on it: the aux loss stays off, adapters stay off routers, routing metrics are kept
    cfg = load_config("finetune_tiny_vqa", ["finetune.smola.num_experts=4"])
    task = get_task("vqa")
    inputs = TaskInputs.create(base.text_tokenizer, base.image_size, base.max_text_len, {"answers": ["yes", "no"]})
    model = task.build_model(base.module, inputs)
    add_method(cfg, model)
    assert not any("router" in n for n in smola.adapter_parameters(model.backbone))
    model.train()
    ids = torch.tensor([[2, 10, 11, 3], [2, 12, 3, 0]])
    out = model({"pixels": torch.randn(2, 3, 32, 32), "text_ids": ids, "text_pad_mask": ids != 0,
                 "targets": torch.tensor([[1.0, 0.0], [0.0, 1.0]]), "valid": torch.tensor([True, True])})
    assert all(m.pop_aux_loss() is None for m in moe_layers(model))
    assert any("dropped" in k for m in moe_layers(model) for k in m.pop_metrics())
    out["loss"].backward()

    with pytest.raises(ConfigError, match="need router noise"):  # vloss / load need the noisy gates
        load_multiway_base(tmp_path, None, aux_loss=True)
    with_aux = load_multiway_base(tmp_path, None, aux_loss=True, router_noise=True)
    assert all(m.aux_losses and m.config.noise_std > 0 for m in moe_layers(with_aux.module))


def test_a_run_refuses_a_base_that_changed_since_it_started(tmp_path, prepared_data):
    from vlmoe.train.finetune import check_same_base

    _exported_sparse_run(tmp_path / "base", prepared_data / "text_tokenizer.model", MoEConfig(num_experts=4).to_dict())
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    identity = check_same_base(run_dir, load_multiway_base(tmp_path / "base", None))
    (run_dir / "base.json").write_text(json.dumps(identity))  # what the trainer records once all checks pass
    assert check_same_base(run_dir, load_multiway_base(tmp_path / "base" / "model", None)) == identity  # the same base
    record = json.loads((tmp_path / "base" / MODEL_DIR / "model_config.json").read_text())
    (tmp_path / "base" / MODEL_DIR / "model_config.json").write_text(json.dumps({**record, "step": 7}))
    with pytest.raises(ConfigError, match=r"the base changed since .* \(step: \[2\] -> \[7\]\)"):
        check_same_base(run_dir, load_multiway_base(tmp_path / "base", None))
