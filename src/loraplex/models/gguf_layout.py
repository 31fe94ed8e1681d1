"""How a llama-architecture GGUF lays out a Hugging Face model's weights, and its tensors read back
in Hugging Face names.

llama.cpp's converter (convert_hf_to_gguf.py) renames every tensor (`model.layers.3.self_attn.q_proj`
-> `blk.3.attn_q`) and stores the rows of q and k with each head's two rotary halves interleaved
(`LlamaModel.permute`); export/to_gguf.py applies the same to adapters, and `read_llama` undoes it
to load a GGUF base.

Why `read_llama` and not transformers' GGUF loader for the weights and config: on the embedded
SmolLM2-135M that loader took 25 s (it builds a model, maps each parameter through gguf's name
tables and parses the metadata twice); gguf's reader and dequantiser, used directly, take about 5 s,
and the first `loraplex` command converts the embedded model in 15 s instead of 33 s (2-core Xeon).
The tokenizer still comes from transformers' GGUF support (models/load.py), and other architectures
still go through its loader. This module does not quantise or write GGUF files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

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
_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn"}
_BLOCK = {
    **{gguf: f"{_PARENT.get(hf, 'mlp')}.{hf}" for hf, gguf in GGUF_NAMES.items()},
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of q/k from Hugging Face's rotate-half order to GGUF llama's interleaved order (per head)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of `permute`."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_llama(gguf_path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
    """A llama-architecture GGUF as (LlamaConfig arguments, every tensor dequantised to fp32 in
    Hugging Face names and layout: q and k rows back in rotate-half order); None for another
    architecture. No `lm_head.weight` when the file has no `output` tensor: the embedding is tied."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(gguf_path))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read GGUF file {gguf_path}: {e}") from None
    arch = reader.fields.get("general.architecture")
    if arch is None or arch.contents() != "llama":
        return None
    config = _llama_config(reader)
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    out: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        stem, _, suffix = t.name.rpartition(".")
        parts = stem.split(".")
        if stem in _TOP:
            name = f"{_TOP[stem]}.{suffix}"
        elif len(parts) == 3 and parts[0] == "blk" and parts[2] in _BLOCK:
            name = f"model.layers.{int(parts[1])}.{_BLOCK[parts[2]]}.{suffix}"
        else:
            raise UserError(f"GGUF file {gguf_path}: tensor {t.name!r} is not part of a llama model")
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        if stem.endswith("attn_q"):
            w = unpermute(w, n_head)
        elif stem.endswith("attn_k"):
            w = unpermute(w, n_kv)
        out[name] = w
    config["tie_word_embeddings"] = "lm_head.weight" not in out
    return config, out


def _llama_config(reader: Any) -> dict[str, Any]:
    """LlamaConfig arguments from the file's metadata (the keys llama.cpp writes; as transformers'
    GGUF config reader maps them, checked equal by tests/test_gguf_layout.py)."""

    def get(key: str, default: Any = None) -> Any:
        field = reader.fields.get(key)
        return field.contents() if field is not None else default

    n_head = int(get("llama.attention.head_count"))
    hidden = int(get("llama.embedding_length"))
    vocab = get("llama.vocab_size")
    config = {
        "vocab_size": int(vocab) if vocab is not None else len(reader.fields["tokenizer.ggml.tokens"].data),
        "hidden_size": hidden,
        "intermediate_size": int(get("llama.feed_forward_length")),
        "num_hidden_layers": int(get("llama.block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(get("llama.attention.head_count_kv", n_head)),
        "max_position_embeddings": int(get("llama.context_length")),
        "rms_norm_eps": float(get("llama.attention.layer_norm_rms_epsilon")),
        "rope_parameters": {"rope_theta": float(get("llama.rope.freq_base", 10000.0)), "rope_type": "default"},
        "head_dim": int(get("llama.rope.dimension_count", hidden // n_head)),
        "dtype": "float32",
    }
    for key, name in (("bos", "bos"), ("eos", "eos"), ("padding", "pad"), ("unknown", "unk")):
        token = get(f"tokenizer.ggml.{key}_token_id")
        if token is not None:
            config[f"{name}_token_id"] = int(token)
    return config
