"""Adapter files: round trip into a fresh base, only adapter tensors, stacks, errors; heatmaps."""
import json

import pytest
import torch
from torch import nn

import smola
from smola.heatmaps import phi_grams, write_heatmaps


class _Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)  # the same frozen base every time it is built
        self.blocks = nn.ModuleList(nn.ModuleDict({"q": nn.Linear(8, 8), "fc1": nn.Linear(8, 16), "fc2": nn.Linear(16, 8)}) for _ in range(2))
        self.classifier = nn.Linear(8, 3)

    def forward(self, x):
        for b in self.blocks:
            x = x + b["fc2"](torch.relu(b["fc1"](b["q"](x))))
        return self.classifier(x.mean(1))


X = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(3))
VISUAL = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)


def _trained(config):
    model = smola.inject(_Backbone(), config)
    with torch.no_grad():
        for p in smola.adapter_parameters(model).values():
            p.add_(0.3 * torch.randn_like(p))
    return model


def _run(model):
    with torch.no_grad(), smola.token_masks(visual=VISUAL):
        return model(X)


def test_round_trip_into_a_fresh_base(tmp_path):
    model = _trained(smola.SMoLAConfig(num_experts=3, rank=2))
    smola.save_adapter(model, tmp_path / "adapter")
    fresh = _Backbone()
    assert not torch.allclose(_run(fresh), _run(model))
    smola.load_adapter(fresh, tmp_path / "adapter")
    torch.testing.assert_close(_run(fresh), _run(model), rtol=0, atol=0)
    assert smola.adapter_stack(fresh) == smola.adapter_stack(model)
    assert not any(p.requires_grad for n, p in fresh.named_parameters() if ".base." in n or n.startswith("classifier"))


def test_files_follow_peft_layout_and_hold_only_adapter_tensors(tmp_path):
    from safetensors.torch import load_file

    model = _trained(smola.SMoLAConfig(num_experts=3, rank=2, mode="omni"))
    smola.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "SMOLA" and config["stack"] == [
        {"method": "smola", "num_experts": 3, "rank": 2, "mode": "omni", "target_modules": "all-linear", "exclude_modules": []}]
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    per_linear = {f"{b}.{p}" for b in ("mm", "v", "t") for p in ("phi", "alpha", "w_in", "w_out")}
    linears = {f"blocks.{i}.{n}" for i in range(2) for n in ("q", "fc1", "fc2")}
    assert set(tensors) == {f"{lin}.{p}" for lin in linears for p in per_linear}
    assert tensors["blocks.0.fc1.v.w_out"].shape == (3, 16, 2)


def test_lora_specialist_on_smola_generalist_round_trip(tmp_path):
    model = _trained(smola.SMoLAConfig(num_experts=3, rank=2, mode="mm"))
    smola.save_adapter(model, tmp_path / "generalist")
    smola.inject(model, smola.LoRAConfig(rank=4, target_modules=["fc1", "fc2"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_b" in n:
                p.normal_()
    smola.save_adapter(model, tmp_path / "specialist")
    fresh = smola.load_adapter(_Backbone(), tmp_path / "specialist")
    torch.testing.assert_close(_run(fresh), _run(model), rtol=0, atol=0)
    # a base that already carries the generalist takes only the specialist on top
    partial = smola.load_adapter(_Backbone(), tmp_path / "generalist")
    smola.load_adapter(partial, tmp_path / "specialist")
    torch.testing.assert_close(_run(partial), _run(model), rtol=0, atol=0)


def test_full_fine_tuning_saves_the_tensors_it_trains(tmp_path):
    model = _trained(smola.FullConfig(target_modules=["classifier"]))
    smola.save_adapter(model, tmp_path)
    fresh = smola.load_adapter(_Backbone(), tmp_path)
    torch.testing.assert_close(_run(fresh), _run(model), rtol=0, atol=0)
    assert set(smola.adapter_parameters(fresh)) == {"classifier.weight", "classifier.bias"}


def test_load_errors_name_the_problem(tmp_path):
    model = _trained(smola.SMoLAConfig(num_experts=3, rank=2))
    smola.save_adapter(model, tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        smola.load_adapter(_Backbone(), tmp_path / "missing")
    smaller = smola.inject(_Backbone(), smola.SMoLAConfig(num_experts=2, rank=2))
    with pytest.raises(ValueError, match="not a prefix"):
        smola.load_adapter(smaller, tmp_path / "a")
    other = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(ValueError, match="missing"):
        smola.load_adapter(other, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    cfg["stack"][0]["experts"] = 3
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"stack\[0\].*unknown key"):
        smola.load_adapter(_Backbone(), tmp_path / "a")


def test_save_refuses_empty_or_partial_tensors(tmp_path):
    model = _trained(smola.SMoLAConfig(num_experts=3, rank=2))
    with pytest.raises(ValueError, match="no injected adapter"):
        smola.save_adapter(_Backbone(), tmp_path)
    state = smola.adapter_state_dict(model)
    state["blocks.0.q.mm.phi"] = torch.empty(0)  # what an ungathered ZeRO-3 partition looks like
    with pytest.raises(ValueError, match="gather"):
        smola.save_adapter(model, tmp_path, state_dict=state)
    del state["blocks.0.q.mm.phi"]
    with pytest.raises(ValueError, match="missing"):
        smola.save_adapter(model, tmp_path, state_dict=state)


def test_merge_request_is_refused_for_smola():
    with pytest.raises(ValueError, match="depend on the input tokens"):
        smola.merge_adapter(_trained(smola.SMoLAConfig(num_experts=3, rank=2)))


def test_phi_heatmaps_per_layer_and_modality(tmp_path):
    model = _trained(smola.SMoLAConfig(num_experts=3, rank=2, mode="omni"))
    smola.save_adapter(model, tmp_path / "adapter")
    grams = phi_grams(smola.adapter_state_dict(model))
    assert len(grams) == 6 * 3
    gram = grams[("blocks.1.fc2", "t")]
    torch.testing.assert_close(torch.diagonal(gram), torch.ones(3))
    phi = torch.nn.functional.normalize(model.blocks[1]["fc2"].t.phi.detach(), dim=-1)
    torch.testing.assert_close(gram, phi @ phi.T)
    paths = write_heatmaps(tmp_path / "adapter", tmp_path / "maps")
    assert len(paths) == 18 and {p.name for p in paths} >= {"blocks.0.q.mm.png", "blocks.1.fc2.t.png"}
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
    lora_only = smola.inject(_Backbone(), smola.LoRAConfig())
    smola.save_adapter(lora_only, tmp_path / "lora")
    with pytest.raises(ValueError, match="no SMoLA routing matrix"):
        write_heatmaps(tmp_path / "lora", tmp_path / "maps2")
