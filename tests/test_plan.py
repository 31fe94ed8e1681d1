"""`plan` trainable counts equal what PEFT reports for the same model and LoRA config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from loraplex.train.plan import make_plan, shipped_names


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize(("targets", "dora"), [("all-linear", False), ("q_proj,v_proj", False), ("all-linear", True)])
def test_plan_matches_peft(tmp_path: Path, arch: str, targets: str, dora: bool) -> None:
    cls = LlamaConfig if arch == "llama" else Qwen2Config
    cfg = cls(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=arch == "qwen2",
    )
    cfg.save_pretrained(tmp_path)
    plan = make_plan(str(tmp_path / "config.json"), rank=8, targets=targets, use_dora=dora)
    torch.manual_seed(0)
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_config(cfg),
        LoraConfig(r=8, target_modules="all-linear" if targets == "all-linear" else targets.split(","), use_dora=dora),
    )
    trainable, total = peft_model.get_nb_trainable_parameters()
    assert plan["trainable_params"] == trainable
    assert plan["base_params"] + plan["trainable_params"] == total


def test_shipped_configs_plan_without_weights() -> None:
    assert {
        "llama-2-7b",
        "llama-3-8b",
        "qwen2.5-1.5b",
        "qwen2.5-7b",
        "deepseek-r1-distill-qwen-1.5b",
        "deepseek-r1-distill-qwen-7b",
    } <= set(shipped_names())
    p = make_plan("llama-3-8b", rank=16)
    assert p["base_params"] == 8_030_261_248
    assert p["trainable_params"] == 41_943_040  # the figure PEFT prints for Llama-3-8B, r=16, all-linear
    mem = p["peak_memory_bytes"]
    assert mem["qlora-4bit"] < mem["bf16"] < mem["fp32"]
    json.dumps(p)
