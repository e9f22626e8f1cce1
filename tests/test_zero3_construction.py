"""Models built partitioned under ZeRO-3 (deepspeed.zero.Init) on 2 real ranks equal models built whole."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from conftest import free_port, launch_env

RANKS = Path(__file__).resolve().parent / "_zero3_ranks.py"


def test_partitioned_construction_gives_the_whole_models_weights(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    vit_dir = tmp_path / "vit"
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, num_labels=3)
    torch.manual_seed(0)
    ViTForImageClassification(config).save_pretrained(str(vit_dir))
    from vlmoe.data.text_tokenizer import TextTokenizer  # an exported model carries its tokenizer
    TextTokenizer.train([f"caption number {i} of a small corpus" for i in range(200)], 32,
                        tmp_path / "text_tokenizer.model")
    out = tmp_path / "report"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(RANKS), "construct", str(vit_dir), str(out)]
    proc = subprocess.run(cmd, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    for rank in range(2):
        r = json.loads(Path(f"{out}.{rank}").read_text())
        assert r["partitioned"]
        # each rank holds about half: partitioned as built, never whole
        assert r["local_fraction"] < 0.6 and r["vit3_local_fraction"] < 0.6 and r["vit_config_local_fraction"] < 0.6
        # our init (embeddings, BEiT depth rescale, routers, experts, heads) and tied MLM weights survive
        assert r["vlmoe_init_differs"] == [] and r["tied"]
        assert r["loaded_differs"] == [] and r["experts_saved_whole"]
        # the export of the partitioned model: its whole weights, experts as whole pools
        assert r["export_differs"] == []
        # fine-tuning's bf16 base (from that export) and a bf16 HF model: the fp32 files' values, partitioned
        assert r["bf16_loaded_differs"] == [] and r["vit_bf16_differs"] == [] and r["bf16_local_fraction"] < 0.6
        assert "bad.pt" in r["shape_error"] and "norm.weight" in r["shape_error"]
        assert "partial.pt" in r["missing_error"] and "mim_head" in r["missing_error"]
        # HF: pretrained weights exactly as from_pretrained loads them; a new head initialised alike on all ranks
        assert r["vit3_differs"] == [] and r["vit5_differs"] == []
        assert r["vit3_same_on_ranks"] and r["vit5_same_on_ranks"]
        assert 0.01 < r["vit5_head_std"] < 0.03  # initializer_range 0.02, not zeros or garbage
        # from a config: initialised (LayerNorm 1, dense std 0.02), the same on all ranks
        assert r["vit_config_same_on_ranks"] and r["vit_config_layernorm_ones"]
        assert 0.015 < r["vit_config_dense_std"] < 0.025
