"""GGUF files for llama.cpp (and Ollama, llama-cpp-python): a PEFT LoRA adapter as a GGUF LoRA that
is applied to the base GGUF at run time, and a base GGUF rewritten at full precision, with an
adapter merged in or without.

The layout is llama.cpp's own (`convert_lora_to_gguf.py`): `general.type = adapter`,
`adapter.type = lora`, and for every adapted base tensor `blk.N.attn_q.weight` two tensors
`...weight.lora_a` [r, in] and `...weight.lora_b` [out, r]. llama.cpp scales a pair by
`alpha / r` unless alpha is 0, when the scale is 1; we write alpha 0 and fold each module's own
scaling (alpha/r, rslora, alpha_pattern) into B, so per-module ranks and scales survive exactly.

Llama-architecture GGUFs store q and k with the rotary halves interleaved per head
(models/gguf_layout.py), so B's output rows of q_proj and k_proj get the same
permutation; Qwen2 GGUFs keep the Hugging Face order.

A merged model is the base GGUF's own metadata (tokenizer, chat template, hyperparameters) and
tensors, dequantised to f32 with `W + B @ A` added where the adapter has a pair. This module does
not convert Hugging Face checkpoints to GGUF (llama.cpp's converter does) and does not quantise:
f32 keeps answers identical to loraplex's; quantise with llama.cpp's `llama-quantize` if needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from loraplex.adapters.peft_io import read_peft_lora
from loraplex.errors import UserError
from loraplex.models.gguf_layout import GGUF_NAMES, permute

# HF model_type -> GGUF architecture, and whether q/k rows are permuted for rotary
ARCHES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}


def _permute(b: torch.Tensor, n_head: int) -> torch.Tensor:
    return torch.from_numpy(permute(b.numpy(), n_head))


def _lora_tensors(
    adapter_dir: Path, base_config: Any, label: str
) -> tuple[str, list[tuple[str, torch.Tensor, torch.Tensor]]]:
    """(GGUF architecture, [(base tensor name, A [r, in], B [out, r] in GGUF row order)])."""
    model_type = getattr(base_config, "model_type", None)
    if model_type not in ARCHES:
        raise UserError(f"GGUF export supports {', '.join(ARCHES)} bases; this one is {model_type!r}")
    arch, permute = ARCHES[model_type]
    n_head = base_config.num_attention_heads
    n_kv = getattr(base_config, "num_key_value_heads", None) or n_head
    out = []
    for (layer, module), (a, b) in read_peft_lora(adapter_dir, label).items():
        if module not in GGUF_NAMES:
            raise UserError(f"adapter {label}: LoRA on {module!r} has no GGUF equivalent")
        if permute and module == "q_proj":
            b = _permute(b, n_head)
        elif permute and module == "k_proj":
            b = _permute(b, n_kv)
        out.append((f"blk.{layer}.{GGUF_NAMES[module]}.weight", a, b))
    return arch, out


def write_gguf_model(base_gguf: Path, out: Path, base_config: Any, adapter_dir: Path | None, label: str) -> None:
    """`base_gguf` rewritten with f32 tensors, plus the adapter's deltas when `adapter_dir` is given."""
    import gguf

    deltas: dict[str, np.ndarray] = {}
    if adapter_dir is not None:
        _, pairs = _lora_tensors(adapter_dir, base_config, label)
        deltas = {name: (b @ a).numpy() for name, a, b in pairs}
    try:
        reader = gguf.GGUFReader(str(base_gguf))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read base GGUF {base_gguf}: {e}") from None
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(str(out), arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # written by GGUFWriter itself
        kind = field.types[0]
        value = field.contents()
        if field.name == gguf.Keys.General.FILE_TYPE:
            value = int(gguf.LlamaFileType.ALL_F32)
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, kind, sub_type=sub)
    for t in reader.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        delta = deltas.pop(t.name, None)
        if delta is not None:
            if delta.shape != w.shape:
                raise UserError(f"adapter {label}: {t.name} is {w.shape} in the GGUF but the delta is {delta.shape}")
            w = w + delta
        writer.add_tensor(t.name, w)
    if deltas:
        raise UserError(f"adapter {label}: the base GGUF has no tensor {next(iter(deltas))}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_gguf_lora(adapter_dir: Path, base_config: Any, out: Path, label: str) -> int:
    """Write `out` (a .gguf file); returns the number of adapted modules."""
    import gguf  # imported here: only export needs it

    arch, pairs = _lora_tensors(adapter_dir, base_config, label)
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 0.0)  # 0: llama.cpp uses B as is (scale folded in)
    for name, a, b in pairs:
        writer.add_tensor(name + ".lora_a", np.ascontiguousarray(a.numpy(), dtype=np.float32))
        writer.add_tensor(name + ".lora_b", np.ascontiguousarray(b.numpy(), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return len(pairs)
