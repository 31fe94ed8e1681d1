"""What the serving engine reads from a base: its shape, each tensor by Hugging Face name, the rotary
embedding and the end-of-turn ids, either straight from the safetensors files (`read`) or from a
loaded transformers model (`of_model`).

Why read the files: importing a transformers model class imports torch.distributed.tensor, sympy,
SciPy, accelerate and torch._dynamo with it, ~120 MB of a server's resident memory (a SmolLM2 int4
server holds ~660 MB in all), for a model whose weights the engine copies into its own layout and
drops (engine/model.py). Reading tensors one at a time also lets a server whose quantized weights
are stored (engine/quant.py `Store`) never read the projections.

`read` returns None where the engine needs transformers' model after all: a rope type other than
"default" (llama3, yarn, dynamic...: their frequencies come from transformers' ROPE_INIT_FUNCTIONS,
and dynamic ones change with the length), partial rotary dimensions, a model type the engine does not
serve, or a config.json without the fields below (transformers fills in its own defaults). This
module does not load tokenizers (models/load.py) or run anything.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loraplex.errors import UserError

# the model types whose config fields and tensor names below are the same (engine/model.py SUPPORTED)
TYPES = ("llama", "mistral", "qwen2")
_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "rms_norm_eps",
    "max_position_embeddings",
)


@dataclass(frozen=True)
class Shape:
    """The config fields the engine uses (named as in transformers' configs)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int


@dataclass(frozen=True)
class Weights:
    """A base as the engine reads it. `get(name)` is the tensor under its Hugging Face name
    (`model.layers.0.self_attn.q_proj.weight`), None when the base has none (a bias); `tied`: the
    output head is the token embedding."""

    config: Any  # a Shape, or a transformers config (`of_model`): the same field names
    get: Callable[[str], torch.Tensor | None]
    rotary: torch.nn.Module  # (x, positions [n, L]) -> cos, sin [n, L, head_dim] in x's dtype
    tied: bool
    eos_token_id: int | list[int] | None  # the generation config's


class Rotary(torch.nn.Module):
    """Rotary embedding with rope_type "default": transformers' LlamaRotaryEmbedding, op for op, so
    cos and sin are bit-identical to it (tests/test_checkpoint.py)."""

    def __init__(self, theta: float, head_dim: int):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        self.inv_freq = torch.nn.Buffer(inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def of_model(hf_model: Any) -> Weights:
    """A loaded transformers causal LM as `Weights` (its parameters, its own rotary module)."""
    params = dict(hf_model.named_parameters(remove_duplicate=False))  # a tied head under its own name too
    head, table = hf_model.get_output_embeddings().weight, hf_model.get_input_embeddings().weight
    generation = getattr(hf_model, "generation_config", None)
    return Weights(
        config=hf_model.config,
        get=params.get,
        rotary=hf_model.model.rotary_emb,
        tied=head is table,
        eos_token_id=getattr(generation, "eos_token_id", None),
    )


def read(model_dir: Path) -> Weights | None:
    """The base in `model_dir` (config.json, *.safetensors) read without transformers; None where
    the module docstring says. Tensors are read when `get` asks for them, in the file's dtype."""
    try:
        cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {model_dir / 'config.json'}: {e}") from None
    rope = _rope(cfg)
    if cfg.get("model_type") not in TYPES or rope is None or any(cfg.get(k) is None for k in _REQUIRED):
        return None
    if cfg.get("partial_rotary_factor", 1.0) != 1.0:
        return None
    shape = Shape(
        model_type=cfg["model_type"],
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["intermediate_size"]),
        num_hidden_layers=int(cfg["num_hidden_layers"]),
        num_attention_heads=int(cfg["num_attention_heads"]),
        num_key_value_heads=int(cfg["num_key_value_heads"]),
        head_dim=int(cfg.get("head_dim") or int(cfg["hidden_size"]) // int(cfg["num_attention_heads"])),
        rms_norm_eps=float(cfg["rms_norm_eps"]),
        max_position_embeddings=int(cfg["max_position_embeddings"]),
    )
    files = _tensor_files(model_dir)
    if files is None or "model.embed_tokens.weight" not in files:
        return None
    tied = bool(cfg.get("tie_word_embeddings", False)) or "lm_head.weight" not in files
    if tied:
        files = {**files, "lm_head.weight": files["model.embed_tokens.weight"]}
        renamed = {"lm_head.weight": "model.embed_tokens.weight"}
    else:
        renamed = {}
    from safetensors import safe_open

    def get(name: str) -> torch.Tensor | None:
        file = files.get(name)
        if file is None:
            return None
        with safe_open(str(file), framework="pt") as f:  # opening maps the header only
            return f.get_tensor(renamed.get(name, name))

    eos = cfg.get("eos_token_id")
    generation = model_dir / "generation_config.json"
    if generation.is_file():
        try:
            eos = json.loads(generation.read_text(encoding="utf-8")).get("eos_token_id", eos)
        except ValueError as e:
            raise UserError(f"cannot read {generation}: {e}") from None
    return Weights(config=shape, get=get, rotary=Rotary(rope, shape.head_dim), tied=tied, eos_token_id=eos)


def _rope(cfg: dict[str, Any]) -> float | None:
    """rope_theta when the rope type is "default" (transformers v5's `rope_parameters`, or v4's
    `rope_theta` + `rope_scaling`), else None."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        return None
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def _tensor_files(model_dir: Path) -> dict[str, Path] | None:
    """Tensor name -> the safetensors file holding it (one file, or the shards an index names);
    None when the directory holds no safetensors weights."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"cannot read {index}: {e}") from None
        return {name: model_dir / file for name, file in weight_map.items()}
    from safetensors import safe_open

    out: dict[str, Path] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update(dict.fromkeys(f.keys(), file))
    return out or None
