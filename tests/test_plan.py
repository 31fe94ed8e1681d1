"""`plan` trainable counts equal what PEFT reports for the same model and LoRA config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from loraplex.errors import UserError
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


def test_plan_per_gpu_for_each_way_of_sharding() -> None:
    """Llama-3-70B (its exact parameter count and PEFT's r=16 figure) on 8 GPUs: sharding the base
    lowers each GPU's share in the order the layouts promise, and ZeRO-3 keeps an eighth."""
    one = make_plan("llama-3-70b", rank=16)
    assert one["base_params"] == 70_553_706_496 and one["trainable_params"] == 207_093_760
    assert one["gpus"] == 1 and one["held_fraction"] == 1.0
    per = {s: make_plan("llama-3-70b", rank=16, gpus=8, shard=s) for s in ("none", "zero2", "fsdp", "zero3")}
    bf16 = {s: p["peak_memory_bytes"]["bf16"] for s, p in per.items()}
    assert bf16["none"] == one["peak_memory_bytes"]["bf16"]  # data parallel: each GPU holds everything
    assert bf16["zero3"] < bf16["fsdp"] < bf16["zero2"] < bf16["none"]
    weights = 70_553_706_496 * 2
    assert bf16["none"] - bf16["zero3"] > 0.8 * weights  # ~7/8 of the bf16 base is gone from each GPU
    assert (
        per["zero3"]["held_fraction"] == 0.125 and 0.15 < per["fsdp"]["held_fraction"] < 0.16
    )  # + the whole embeddings and head (3%)
    assert "qlora-4bit" in per["zero2"]["peak_memory_bytes"] and "qlora-4bit" not in per["zero3"]["peak_memory_bytes"]
    ckpt = make_plan("llama-3-70b", rank=16, gpus=8, shard="zero3", gradient_checkpointing=True)
    assert ckpt["peak_memory_bytes"]["bf16"] < bf16["zero3"] / 2
    for bad, said in (({"shard": "fsdp"}, "give --gpus N"), ({"gpus": 2, "shard": "zero4"}, "--shard must be")):
        with pytest.raises(UserError, match=said):
            make_plan("llama-3-8b", **bad)  # type: ignore[arg-type]
