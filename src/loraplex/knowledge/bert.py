"""A BERT encoder's forward pass (all-MiniLM-L6-v2, bge-small-zh, ...) over its safetensors weights,
without transformers' model classes: the last hidden states of a batch of token ids.

Why: importing transformers' BertModel imports its modelling stack with it (torch._dynamo, SciPy,
sympy, accelerate: ~120 MB resident) into every server whose adapters search English passages with
the English encoder (embedder.english), for six layers that are a screen of code here. The same
ops in the same order as transformers' BertModel with sdpa attention; tests/test_knowledge.py
checks the hidden states against it.

`load` returns None for what this does not cover (the embedder then loads transformers' model):
another model type, relative position embeddings, an activation other than exact GELU. Token type
ids are always 0 (one text per input, as the embedder encodes). This module does not tokenize or pool.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from loraplex.engine.quant import Tiles, tile


def load(
    path: Path, dtype: torch.dtype, rows: Callable[[str], Any] | None = None, half_weights: bool = False
) -> Bert | None:
    """The BERT in `path` (config.json + one .safetensors file) in `dtype`; None where the module
    docstring says. `rows(name)`, when given, returns the token embedding table as an object whose
    `[ids]` reads those rows (embedder.FileRows), or None to hold the table in memory.
    `half_weights` (fp32 only): the projections' weights held in fp16 and multiplied in fp32 on
    quant_cpu.c (`_half_tiles`), where that kernel is built; exact fp32 elsewhere."""
    cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    files = list(path.glob("*.safetensors"))
    if (
        cfg.get("model_type") != "bert"
        or cfg.get("position_embedding_type", "absolute") != "absolute"
        or cfg.get("hidden_act") != "gelu"
        or len(files) != 1
    ):
        return None
    from safetensors import safe_open

    with safe_open(str(files[0]), framework="pt") as f:
        names = set(f.keys())
        prefix = "bert." if "bert.embeddings.word_embeddings.weight" in names else ""
        if prefix + "embeddings.word_embeddings.weight" not in names:
            return None
        wanted = [
            n for n in names if n.startswith((prefix + "embeddings.", prefix + "encoder.")) and "position_ids" not in n
        ]
        tensors = {n[len(prefix) :]: f.get_tensor(n).to(dtype) for n in wanted}
    table = rows(prefix + "embeddings.word_embeddings.weight") if rows is not None else None
    if table is not None and tuple(table.shape) == tuple(tensors["embeddings.word_embeddings.weight"].shape):
        del tensors["embeddings.word_embeddings.weight"]
    else:
        table = None
    return Bert(tensors, cfg, dtype, table, half_weights)


class Bert(torch.nn.Module):
    """`forward(input_ids, attention_mask)` -> last hidden states [batch, tokens, hidden] in `dtype`."""

    def __init__(
        self, tensors: dict[str, torch.Tensor], cfg: dict[str, Any], dtype: torch.dtype, table: Any, half_weights: bool
    ):
        super().__init__()
        self.t, self.dtype, self.table = tensors, dtype, table
        self.heads = int(cfg["num_attention_heads"])
        self.layers = int(cfg["num_hidden_layers"])
        self.eps = float(cfg.get("layer_norm_eps", 1e-12))
        self.hidden_size = int(cfg["hidden_size"])
        self.packed = _prepack(tensors) if dtype == torch.bfloat16 else set()
        self.tiles = _half_tiles(tensors) if dtype == torch.float32 and half_weights else {}
        self.transposed = _transpose(tensors) if dtype == torch.float32 and not self.tiles else set()

    def words(self, ids: torch.Tensor) -> torch.Tensor:
        if self.table is None:
            return F.embedding(ids, self.t["embeddings.word_embeddings.weight"])
        found = torch.from_numpy(np.ascontiguousarray(self.table[ids.reshape(-1).numpy()])).to(self.dtype)
        return found.reshape(*ids.shape, -1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        t, n, length = self.t, self.hidden_size, input_ids.shape[1]

        def linear(x: torch.Tensor, name: str) -> torch.Tensor:
            tiled = self.tiles.get(name)
            if tiled is not None:
                return tiled.linear(x, t[name + ".bias"])
            if name in self.packed:
                return torch.ops.mkldnn._linear_pointwise(x, t[name + ".weight"], t[name + ".bias"], "none", [], "")
            if name in self.transposed:
                return _addmm(x, t[name + ".weight"], t[name + ".bias"])
            return F.linear(x, t[name + ".weight"], t[name + ".bias"])

        def norm(x: torch.Tensor, name: str) -> torch.Tensor:
            return F.layer_norm(x, (n,), t[name + ".weight"], t[name + ".bias"], self.eps)

        x = self.words(input_ids) + t["embeddings.token_type_embeddings.weight"][0]
        x = norm(x + t["embeddings.position_embeddings.weight"][:length], "embeddings.LayerNorm")
        # True where a key may be attended: padding is masked for every query (bidirectional)
        mask = attention_mask.bool()[:, None, None, :]
        split = (input_ids.shape[0], length, self.heads, n // self.heads)
        for i in range(self.layers):
            p = f"encoder.layer.{i}."
            q, k, v = (
                linear(x, p + "attention.self." + w).view(split).transpose(1, 2) for w in ("query", "key", "value")
            )
            att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(x.shape)
            x = norm(linear(att, p + "attention.output.dense") + x, p + "attention.output.LayerNorm")
            h = F.gelu(linear(x, p + "intermediate.dense"))
            x = norm(linear(h, p + "output.dense") + x, p + "output.LayerNorm")
        return x


def _projections(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The encoder layers' projections (`name.weight` 2-D, `name.bias`)."""
    return [
        n.removesuffix(".weight")
        for n, w in tensors.items()
        if n.startswith("encoder.") and n.endswith(".weight") and w.dim() == 2
    ]


def _half_tiles(tensors: dict[str, torch.Tensor]) -> dict[str, Tiles]:
    """Every fp32 projection's weight as fp16 tiles for quant_cpu.c (engine/quant.py `Tiles`: products
    and sums in fp32, each weight rounded once to 11 significant bits), the fp32 copies dropped; {}
    (nothing changed) where the kernel is not built or a shape does not fit.

    Why: on a CPU without bf16 the encoder runs in fp32, and at a question's 10-40 rows MKL ran its
    products at about half its speed on one core of a 2-core AMD EPYC (Zen 3, AVX2 only):
    all-MiniLM-L6-v2's vector of a question took 12.5-15.0 ms, 7.8-8.3 ms so (warm, alternated processes).
    The vectors stay within a cosine of 0.9999999 of fp32's (bf16 weights, what a CPU with bf16
    arithmetic runs: 0.99997); over the 706 questions of bench/data's sets and the sample, the same
    passage and the same refusal, `topic` within 9e-5 (docs/generalization.md)."""
    names = _projections(tensors)
    tiles = {name: tile(tensors[name + ".weight"], torch.float16) for name in names}
    done = {name: t for name, t in tiles.items() if t is not None}
    if not done or len(done) < len(names):
        return {}
    for name in names:
        del tensors[name + ".weight"]
    return done


def _transpose(tensors: dict[str, torch.Tensor]) -> set[str]:
    """Store each fp32 projection's weight transposed ([in, out], contiguous) where `addmm` with it
    equals F.linear bit for bit on a probe; returns the names of the projections stored so.

    Why: F.linear hands MKL the [out, in] weight as a transposed operand, and at a question's 10-40
    rows MKL multiplies that layout slower than a plain one: all-MiniLM-L6-v2's vectors of a
    question and of it without the organisation's names (the English search's longest step on a
    CPU without bf16) took 27.2 ms against 21.8 ms so, held to AVX2 on one core of a 2-core Xeon
    (medians of 8 alternated runs). The probe keeps the vectors identical where a BLAS rounds otherwise."""
    return _probed(tensors, lambda w: w.t().contiguous(), _addmm)


def _addmm(x: torch.Tensor, wt: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x @ wt + b for a weight stored [in, out] (`_transpose`), over x's last dimension."""
    return torch.addmm(b, x.reshape(-1, wt.shape[0]), wt).view(*x.shape[:-1], wt.shape[1])


def _prepack(tensors: dict[str, torch.Tensor]) -> set[str]:
    """Replace each bf16 projection's weight by oneDNN's packed copy of it, where the packed product
    equals F.linear's bit for bit on a probe; returns the names of the projections packed.

    Why: F.linear packs a bf16 weight for oneDNN on every call. Packed once, a question's vector
    costs ~30% less warm, and much less when a decode step of the server's model has just pushed
    the encoder's 45 MB out of the CPU caches (the packing reads and writes every weight again).
    The probe keeps the vectors identical to BertModel's on CPUs whose packed kernels round otherwise."""
    try:
        reorder, product = torch.ops.mkldnn._reorder_linear_weight, torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):  # a PyTorch built without oneDNN
        return set()
    return _probed(tensors, lambda w: reorder(w, None), lambda x, p, b: product(x, p, b, "none", [], ""))


def _probed(
    tensors: dict[str, torch.Tensor],
    relayout: Callable[[torch.Tensor], torch.Tensor],
    product: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
) -> set[str]:
    """Each encoder projection's weight w replaced by `relayout(w)` where `product(x, relayout(w), b)`
    equals F.linear(x, w, b) bit for bit on a random probe; the names of those replaced. A
    RuntimeError from either (a backend without that path) stops there."""
    done: set[str] = set()
    probe = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for name in _projections(tensors):
            w, b = tensors[name + ".weight"], tensors[name + ".bias"]
            x = torch.randn((1, 16, w.shape[1]), generator=probe).to(w.dtype)
            try:
                new = relayout(w)
                same = torch.equal(product(x, new, b), F.linear(x, w, b))
            except RuntimeError:
                return done
            if same:
                tensors[name + ".weight"] = new
                done.add(name)
    return done
