"""A plain LoRA is saved in PEFT's LoRA format: peft.PeftModel loads it onto the same base (a Hugging Face
model, our multiway backbone) and computes what our wrappers compute; smola loads it back; an edited
or mismatched config is refused by name; every other adapter stays in SMoLA's own format; the
fine-tuning export of a Hugging Face model goes through the PEFT format, and `vlmoe eval` loads it."""
from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertModel

import smola
from smola.adapter_io import SMOLA_CONFIG_NAME


def _bert() -> BertModel:
    """The same tiny, randomly initialised BERT every time (offline: built from a config)."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16)
    return BertModel(config).eval()


IDS = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
MASK = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])


def _hidden(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK).last_hidden_state


def _with_lora(model: torch.nn.Module, config: smola.LoRAConfig) -> torch.nn.Module:
    """``model`` with ``config`` injected and lora_b random, so that the adapter changes the outputs."""
    smola.inject(model, config)
    with torch.no_grad():
        for name, p in smola.adapter_parameters(model).items():
            if name.endswith("lora_b"):
                p.normal_(0, 0.5)
    return model


def _peft_load(base: torch.nn.Module, directory) -> peft.PeftModel:
    """PeftModel.from_pretrained, which must load the files without a warning about them (PEFT warns of
    unknown config keys and of missing or unexpected tensors; a library's deprecation notices are not ours)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = peft.PeftModel.from_pretrained(base, str(directory))
    assert [str(w.message) for w in caught if not issubclass(w.category, (DeprecationWarning, FutureWarning))] == []
    return loaded.eval()


@pytest.mark.parametrize("rank,scale", [(4, 0.5), (3, 0.7)])  # lora_alpha 2 (an int) and 2.0999... (a float)
def test_peft_loads_a_lora_of_a_hugging_face_model_and_computes_the_same(tmp_path, rank, scale):
    model = _with_lora(_bert(), smola.LoRAConfig(rank=rank, scale=scale, exclude_modules=["pooler.dense"]))
    smola.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    wrapped = sorted(n for n, m in model.named_modules() if isinstance(m, smola.LoRALinear))
    assert len(wrapped) == 12 and "pooler.dense" not in wrapped
    assert {k: config[k] for k in ("peft_type", "r", "target_modules", "bias", "base_model_name_or_path", "task_type",
                                   "fan_in_fan_out", "lora_dropout", "modules_to_save", "inference_mode")} == {
        "peft_type": "LORA", "r": rank, "target_modules": wrapped, "bias": "none", "base_model_name_or_path": None,
        "task_type": None, "fan_in_fan_out": False, "lora_dropout": 0.0, "modules_to_save": None,
        "inference_mode": True}
    assert config["lora_alpha"] / config["r"] == pytest.approx(scale, rel=1e-15)  # PEFT's scaling is our scale
    assert json.loads((tmp_path / SMOLA_CONFIG_NAME).read_text())["stack"] == smola.adapter_stack(model)

    # the tensors are named and shaped as PEFT names them for a PeftModel of this base
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    reference = peft.get_peft_model(_bert(), peft.LoraConfig.from_pretrained(str(tmp_path)))
    assert {n: tuple(t.shape) for n, t in tensors.items()} == {
        n: tuple(t.shape) for n, t in peft.get_peft_model_state_dict(reference).items()}
    query = model.encoder.layer[0].attention.self.query
    assert torch.equal(tensors["base_model.model.encoder.layer.0.attention.self.query.lora_A.weight"], query.lora_a)
    assert torch.equal(tensors["base_model.model.encoder.layer.0.attention.self.query.lora_B.weight"], query.lora_b)

    ours, frozen = _hidden(model), _hidden(_bert())
    theirs = _hidden(_peft_load(_bert(), tmp_path))
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)
    assert (ours - frozen).abs().max() > 1e-2  # the adapter matters: the comparison means something

    # and back into our wrappers: the same model, exactly
    fresh = smola.load_adapter(_bert(), tmp_path)
    torch.testing.assert_close(_hidden(fresh), ours, rtol=0, atol=0)
    assert smola.adapter_stack(fresh) == smola.adapter_stack(model)
    assert all(isinstance(fresh.get_submodule(n), smola.LoRALinear) for n in wrapped)


def test_the_base_is_named_where_known(tmp_path):
    model = _with_lora(_bert(), smola.LoRAConfig(rank=2))
    smola.save_adapter(model, tmp_path / "given", base_model_name_or_path="/models/bert")
    given = json.loads((tmp_path / "given" / "adapter_config.json").read_text())
    assert given["base_model_name_or_path"] == "/models/bert"
    model.name_or_path = "/models/from-pretrained"  # what transformers' from_pretrained sets
    smola.save_adapter(model, tmp_path / "own")
    assert json.loads((tmp_path / "own" / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == "/models/from-pretrained"


def test_a_lora_of_our_multiway_backbone_is_in_peft_format_too(tmp_path):
    from vlmoe.model.config import model_config
    from vlmoe.model.multiway import MultiwayTransformer

    cfg = model_config("tiny", depth=2, vl_ffn_start=1)

    def base() -> MultiwayTransformer:
        torch.manual_seed(0)
        return MultiwayTransformer(cfg).eval()

    g = torch.Generator().manual_seed(1)
    args = (torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=g),
            torch.randint(0, cfg.vocab_size, (2, 6), generator=g), torch.tensor([[True] * 6, [True] * 3 + [False] * 3]))
    model = _with_lora(base(), smola.LoRAConfig(rank=2, scale=2.0))
    with torch.no_grad():
        ours, frozen = model(*args).hidden, base()(*args).hidden
    smola.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "LORA"
    with torch.no_grad():
        theirs = _peft_load(base(), tmp_path)(*args).hidden
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert (ours - frozen).abs().max() > 1e-2


def test_smola_and_stacked_adapters_stay_in_smolas_format(tmp_path):
    model = _with_lora(_bert(), smola.LoRAConfig(rank=2))
    smola.save_adapter(model, tmp_path)
    assert (tmp_path / SMOLA_CONFIG_NAME).is_file()
    generalist = smola.inject(_bert(), smola.SMoLAConfig(num_experts=2, rank=2, mode="mm"))
    specialist = _with_lora(generalist, smola.LoRAConfig(rank=2, target_modules=["query"]))
    smola.save_adapter(specialist, tmp_path)  # over the LoRA's files: its smola_config.json goes
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "SMOLA" and [c["method"] for c in config["stack"]] == ["smola", "lora"]
    assert not (tmp_path / SMOLA_CONFIG_NAME).exists()
    assert "encoder.layer.0.attention.self.query.base.lora_a" in load_file(str(tmp_path / "adapter_model.safetensors"))
    fresh = smola.load_adapter(_bert(), tmp_path)
    torch.testing.assert_close(_hidden(fresh), _hidden(specialist), rtol=0, atol=0)


def test_a_specialist_stacks_on_a_generalist_loaded_from_the_peft_format(tmp_path):
    # finetune.generalist loads the generalist's adapter first; here a LoRA one, in PEFT's format
    smola.save_adapter(_with_lora(_bert(), smola.LoRAConfig(rank=2)), tmp_path / "generalist")
    specialist = smola.load_adapter(_bert(), tmp_path / "generalist")
    _with_lora(specialist, smola.LoRAConfig(rank=3, target_modules=["key"]))
    smola.save_adapter(specialist, tmp_path / "specialist")
    assert json.loads((tmp_path / "specialist" / "adapter_config.json").read_text())["peft_type"] == "SMOLA"
    partial = smola.load_adapter(_bert(), tmp_path / "generalist")  # a base that carries the generalist already
    smola.load_adapter(partial, tmp_path / "specialist")
    torch.testing.assert_close(_hidden(partial), _hidden(specialist), rtol=0, atol=0)


def _edit(path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_mismatched_configs_and_bases_are_refused_by_name(tmp_path):
    model = _with_lora(_bert(), smola.LoRAConfig(rank=2, target_modules=["query", "value"]))
    saved = tmp_path / "saved"
    smola.save_adapter(model, saved)

    def copy(name: str):
        directory = tmp_path / name
        directory.mkdir()
        for file in saved.iterdir():
            (directory / file.name).write_bytes(file.read_bytes())
        return directory

    edited = copy("r")
    _edit(edited / "adapter_config.json", r=4)
    with pytest.raises(ValueError, match=r"adapter_config.json key 'r' is 4; the LoRA in smola_config.json makes it 2"):
        smola.load_adapter(_bert(), edited)
    edited = copy("targets")
    config = json.loads((edited / "adapter_config.json").read_text())
    _edit(edited / "adapter_config.json", target_modules=config["target_modules"][1:])
    with pytest.raises(ValueError, match=r"key 'target_modules' .* lacks \['encoder.layer.0.attention.self.query'\]"):
        smola.load_adapter(_bert(), edited)
    edited = copy("dora")
    _edit(edited / "adapter_config.json", use_dora=True)
    with pytest.raises(ValueError, match="key 'use_dora' is True"):
        smola.load_adapter(_bert(), edited)
    edited = copy("stack")
    _edit(edited / SMOLA_CONFIG_NAME, stack=[{"method": "smola"}, {"method": "lora"}])
    with pytest.raises(ValueError, match=r"smola_config.json: beside a PEFT LoRA config, 'stack' must be exactly one"):
        smola.load_adapter(_bert(), edited)
    edited = copy("peft-only")
    (edited / SMOLA_CONFIG_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="PEFT LoRA adapter without smola_config.json"):
        smola.load_adapter(_bert(), edited)

    wider = BertModel(BertConfig(vocab_size=50, hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=32, max_position_embeddings=16))
    with pytest.raises(ValueError, match=r"'base_model.model.encoder.layer.0.attention.self.query.lora_A.weight' "
                                         r"has shape \(2, 16\) in .*saved, the model expects \(2, 24\)"):
        smola.load_adapter(wider, saved)
    deeper = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16))
    with pytest.raises(ValueError, match=r"does not fit this model: missing \['base_model.model.encoder.layer.2"):
        smola.load_adapter(deeper, saved)


def test_the_fine_tuning_export_of_a_hugging_face_lora_loads_in_peft_and_in_vlmoe_eval(tmp_path):
    """`vlmoe finetune finetune.method=lora finetune.hf_model=...`'s RUN_DIR/adapter, written in one
    process (export_adapter gathers nothing here, and hands save_adapter the state dict it gathered)."""
    from transformers import ViTConfig, ViTForImageClassification

    from vlmoe.config import load_config
    from vlmoe.tasks import get_task
    from vlmoe.train.adapters import add_method
    from vlmoe.train.base_model import load_hf_image_classifier
    from vlmoe.train.export import export_adapter, load_adapter_export

    vit_dir = tmp_path / "vit"
    torch.manual_seed(0)
    ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, intermediate_size=64, num_labels=3)
                              ).save_pretrained(str(vit_dir))
    cfg = load_config("finetune_tiny_image_classification",
                      [f"finetune.hf_model={vit_dir}", "finetune.base_run=null", "finetune.method=lora"])
    task = get_task("image_classification")

    def build():
        base = load_hf_image_classifier(str(vit_dir), num_classes=3)  # the pretrained head fits: loaded as is
        return base, task.wrap_hf_model(base.module).eval()

    base, model = build()
    add_method(cfg, model)
    with torch.no_grad():
        for name, p in smola.adapter_parameters(model.backbone).items():
            if name.endswith("lora_b"):
                p.normal_(0, 0.5)
        model.backbone.classifier.weight.add_(1.0)  # a trained head travels in task_head.safetensors
    export_adapter(model, tmp_path / "adapter", {"task": task.name, "base": base.record}, is_main=True)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == str(vit_dir.resolve())
    assert len(config["target_modules"]) == 6 and "classifier" not in config["target_modules"]  # "all-linear"

    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model.backbone(pixel_values=pixels).logits
        _, fresh = build()  # the head as README shows it: from task_head.safetensors ("0.weight", "0.bias")
        head = load_file(str(tmp_path / "adapter" / "task_head.safetensors"))
        fresh.backbone.classifier.load_state_dict({k.split(".", 1)[1]: v for k, v in head.items()})
        theirs = _peft_load(fresh.backbone, tmp_path / "adapter")(pixel_values=pixels).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)

    _, evaluated = build()  # what `vlmoe eval` and a specialist's finetune.generalist do
    load_adapter_export(evaluated, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(evaluated.backbone(pixel_values=pixels).logits, ours, rtol=0, atol=0)
