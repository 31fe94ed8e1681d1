"""A PEFT LoRA adapter as a GGUF LoRA file that llama.cpp (and Ollama, llama-cpp-python) applies to
the base GGUF at run time.

The layout is llama.cpp's own (`convert_lora_to_gguf.py`): `general.type = adapter`,
`adapter.type = lora`, and for every adapted base tensor `blk.N.attn_q.weight` two tensors
`...weight.lora_a` [r, in] and `...weight.lora_b` [out, r]. llama.cpp scales a pair by
`alpha / r` unless alpha is 0, when the scale is 1; we write alpha 0 and fold each module's own
scaling (alpha/r, rslora, alpha_pattern) into B, so per-module ranks and scales survive exactly.

Llama-architecture GGUFs store q and k with the rotary halves interleaved per head (see
convert_hf_to_gguf's `LlamaModel.permute`), so B's output rows of q_proj and k_proj get the same
permutation; Qwen2 GGUFs keep the Hugging Face order.

This module does not convert base models (llama.cpp's converter, or the GGUF a base came from,
does that) and does not quantise adapters: they are small, and f32 keeps answers identical.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from loraplex.engine.lora import read_peft_lora
from loraplex.errors import UserError

# Hugging Face module name -> GGUF tensor name inside block N
GGUF_NAMES = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
}
# HF model_type -> GGUF architecture, and whether q/k rows are permuted for rotary
ARCHES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}


def _permute(b: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of q/k from HF's rotate-half order to GGUF llama's interleaved order (per head)."""
    return b.reshape(n_head, 2, b.shape[0] // n_head // 2, *b.shape[1:]).swapaxes(1, 2).reshape(b.shape)


def write_gguf_lora(adapter_dir: Path, base_config: Any, out: Path, label: str) -> int:
    """Write `out` (a .gguf file); returns the number of adapted modules."""
    import gguf  # imported here: only export needs it

    model_type = getattr(base_config, "model_type", None)
    if model_type not in ARCHES:
        raise UserError(f"GGUF LoRA export supports {', '.join(ARCHES)} bases; this one is {model_type!r}")
    arch, permute = ARCHES[model_type]
    n_head = base_config.num_attention_heads
    n_kv = getattr(base_config, "num_key_value_heads", None) or n_head
    pairs = read_peft_lora(adapter_dir, label)
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 0.0)  # 0: llama.cpp uses B as is (scale folded in)
    for (layer, module), (a, b) in pairs.items():
        if module not in GGUF_NAMES:
            raise UserError(f"adapter {label}: LoRA on {module!r} has no GGUF equivalent")
        if permute and module == "q_proj":
            b = _permute(b, n_head)
        elif permute and module == "k_proj":
            b = _permute(b, n_kv)
        name = f"blk.{layer}.{GGUF_NAMES[module]}.weight"
        writer.add_tensor(name + ".lora_a", np.ascontiguousarray(a.numpy(), dtype=np.float32))
        writer.add_tensor(name + ".lora_b", np.ascontiguousarray(b.numpy(), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return len(pairs)
