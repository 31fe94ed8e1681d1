"""The serving forward pass: a Llama-family decoder over a slot KV cache, with per-row LoRA.

Why not `transformers`' own forward: continuous batching needs rows of different lengths that join
and leave between steps, a KV cache that rows can be moved within, and a LoRA delta that differs per
row. So this module re-states the Llama block (RMSNorm, rotary attention with grouped KV heads,
SwiGLU MLP) with the projections fused the way vLLM fuses them (q|k|v in one matmul, gate|up in
one). Its weights, config and rotary embedding come from models/checkpoint.py `Weights`: read from
the safetensors files, or borrowed from a loaded HF model (every `rope_type`; callers may pass the
model itself). `tests/test_engine.py` checks its logits against the HF model's.

Supported: `llama`, `mistral`, `qwen2` (q/k/v biases) model types. Anything else, and biases on other
projections (Llama's `attention_bias` on o_proj, `mlp_bias`), is a clear error.
This module does not schedule, sample or know about HTTP (see engine.py, sampling.py, api/).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from loraplex.engine import lora_kernel, quant
from loraplex.engine.lora import SITES, DenseRows, GatheredRows, LoraBatch
from loraplex.engine.quant import Quantize, Weight
from loraplex.errors import UserError
from loraplex.models import checkpoint
from loraplex.models.checkpoint import Weights

if TYPE_CHECKING:
    from loraplex.engine.cuda_graph import GraphDecoder

SUPPORTED = ("llama", "mistral", "qwen2")


def bucket(n: int, limit: int) -> int:
    """`n` rounded up to one of few sizes, at most `limit`: multiples of 16 up to 64, then four sizes
    per doubling (at most 25% more), e.g. 30 -> 32, 100 -> 112, 300 -> 320, 1500 -> 1536.

    Why: on CPU a bf16 matmul goes to oneDNN, which builds a kernel for each new shape (~0.7 ms) and
    keeps the last 1,024 of them (0.3-1 MiB each; ONEDNN_PRIMITIVE_CACHE_CAPACITY, and PyTorch's own
    LRU_CACHE_CAPACITY beside it). Attention over exactly the cached length was a new shape every
    decode step and every prompt length a new one for each projection: the serving heap grew by
    ~600 MiB until both caches were full (bench/soak.py; tests/test_engine.py counts the shapes).
    """
    step = 16 if n <= 64 else 1 << (n.bit_length() - 3)
    return min(-(-n // step) * step, limit)


class KVCache:
    """Keys and values for up to `slots` rows: `k[layer, slot, kv_head, position, head_dim]`.

    Rows that decode together sit in slots 0..n-1 so the batch reads a view, never a gather; the
    scheduler keeps them packed with `move`. Both the rows and the positions allocated grow by
    doubling (up to `slots` and `max_len`) and shrink again (`fit`) when the rows in use need a
    quarter of them or less, so memory follows what requests use now, not the longest request
    ever served. `bytes_for` is what the engine budgets against (`Engine(kv_cache_bytes=...)`).
    """

    def __init__(
        self,
        layers: int,
        slots: int,
        kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype,
        device: str,
        initial: int = 256,
    ):
        self.slots, self.max_len, self.initial = slots, max_len, min(initial, max_len)
        self.token_bytes = 2 * layers * kv_heads * head_dim * torch.finfo(dtype).bits // 8  # k and v, one position
        self._shape = (layers, kv_heads, head_dim)
        self._dtype, self._device = dtype, device
        self.k = self.v = torch.empty(0)
        self.peak_bytes = 0  # the most it ever held
        self.shrink_after_s = 5.0  # how long the rows must need a quarter or less before it shrinks
        self._small_since: float | None = None
        self._allocate(1, self.initial)

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    @property
    def rows(self) -> int:
        return self.k.shape[1]

    @property
    def allocated_bytes(self) -> int:
        return self.rows * self.capacity * self.token_bytes

    def sizes_for(self, rows: int, length: int) -> tuple[int, int]:
        """The (rows, positions) allocated to hold `rows` rows of `length` positions."""
        if length > self.max_len or rows > self.slots:
            raise ValueError(f"{rows} rows of {length} positions exceed the cache's {self.slots} x {self.max_len}")
        r, n = 1, self.initial
        while r < rows:
            r *= 2
        while n < length:
            n *= 2
        return min(r, self.slots), min(n, self.max_len)

    def bytes_for(self, rows: int, length: int) -> int:
        r, n = self.sizes_for(rows, length)
        return r * n * self.token_bytes

    def longest_context(self, budget: int, max_len: int) -> int:
        """The longest context one request alone fits in `budget` bytes: `max_len`, else the
        largest power of two that fits; a UserError when not even the first allocation does."""
        longest = [max_len, *(1 << i for i in range(max_len.bit_length() - 1, -1, -1))]
        fits = [n for n in longest if self.bytes_for(1, n) <= budget]
        if not fits or fits[0] < self.initial:
            need = self.bytes_for(1, self.initial)
            raise UserError(
                f"a KV cache budget of {budget / 2**20:.1f} MiB is too small: one request needs {need / 2**20:.1f} MiB"
            )
        return fits[0]

    def ensure(self, rows: int, length: int) -> None:
        """Room for `rows` rows of `length` positions (grows; never shrinks)."""
        if rows <= self.rows and length <= self.capacity:
            return
        r, n = self.sizes_for(max(rows, self.rows), max(length, self.capacity))
        self._allocate(r, n)

    def fit(self, rows: int, length: int) -> None:
        """Size the cache for the rows in use, slots 0..`rows`-1, whose longest needs `length`
        positions: exactly that (rounded up) when it needs more in either dimension, and memory
        back when they have needed a quarter of the bytes or less for `shrink_after_s` (margin and
        delay keep a load that only dips from reallocating back and forth). The engine calls it
        before every step, so the cache never holds more than it budgets."""
        r, n = self.sizes_for(max(rows, 1), max(length, 1))
        if r > self.rows or n > self.capacity:
            self._allocate(r, n)
        elif 4 * r * n > self.rows * self.capacity:
            self._small_since = None
        elif self._small_since is None:
            self._small_since = time.monotonic()
        elif time.monotonic() - self._small_since >= self.shrink_after_s:
            self._allocate(r, n)  # a smaller need that lasted: a batch that only dipped keeps its memory

    def _allocate(self, rows: int, length: int) -> None:
        layers, heads, dim = self._shape
        k = torch.zeros((layers, rows, heads, length, dim), dtype=self._dtype, device=self._device)
        v = torch.zeros_like(k)
        if self.k.dim() == 5:  # keep what the first rows and positions hold
            r, n = min(rows, self.rows), min(length, self.capacity)
            k[:, :r, :, :n] = self.k[:, :r, :, :n]
            v[:, :r, :, :n] = self.v[:, :r, :, :n]
        self.k, self.v = k, v  # the old tensors go now: on CPU, glibc unmaps blocks this large
        self._small_since = None
        self.peak_bytes = max(self.peak_bytes, self.allocated_bytes)

    def move(self, src: int, dst: int, length: int) -> None:
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]


@dataclass
class Step:
    """One forward: rows are cache slots `slot0 .. slot0+n-1`, each with `start` tokens cached."""

    input_ids: torch.Tensor  # [n, L]
    starts: torch.Tensor  # [n] tokens already in the cache for each row
    slot0: int
    lora: LoraBatch | None
    last: torch.Tensor | None = None  # [n] position whose logits to return; None = the last one
    longest: int | None = None  # max(starts), where the caller knows it without reading the device


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # transformers' LlamaRMSNorm in one fused op (it was 8 ops, ~1.2 ms of a 135M model's decode
    # step): the same in fp32; in bf16 it scales before rounding, where transformers rounds twice.
    return F.rms_norm(x, weight.shape, weight, eps)


class DecoderModel:
    """Weights of a Llama-family causal LM, fused for serving; `forward(step, cache)` -> last logits.

    `quantize` int8/int4 stores the projections and the output head weight-only quantized (quant.py),
    and the embedding table as int8 rows; norms, biases and everything computed stay in `dtype`.
    The KV cache holds `kv_dtype`, by default `dtype`, except fp16 under fp32 activations on a
    quantized CPU model (llama.cpp's default cache: half the bytes each decode step reads; `none`
    stays exact).
    `store` (quant.Store) keeps the quantized weights on disk between starts.
    `cuda_graphs` replays decode steps on CUDA from captured graphs (cuda_graph.py; vLLM's default,
    its `--enforce-eager` the way out): on CPU it changes nothing.
    """

    def __init__(
        self,
        base: Weights | Any,
        dtype: torch.dtype,
        device: str,
        quantize: Quantize = "none",
        store: quant.Store | None = None,
        kv_dtype: torch.dtype | None = None,
        cuda_graphs: bool = False,
    ):
        src = base if isinstance(base, Weights) else checkpoint.of_model(base)  # or a transformers model
        cfg = src.config
        if cfg.model_type not in SUPPORTED:
            raise UserError(
                f"the serving engine supports {', '.join(SUPPORTED)} models; this base is {cfg.model_type!r}"
            )
        self.config = cfg
        quant.check(quantize, device)
        self.dtype, self.device, self.quantize = dtype, device, quantize
        fp16_cache = device == "cpu" and dtype == torch.float32 and quantize != "none"
        self.kv_dtype = kv_dtype or (torch.float16 if fp16_cache else dtype)
        if self.kv_dtype not in (dtype, torch.float16 if dtype == torch.float32 else dtype):
            # decode_cpu.c reads a cache of the activations' type, or fp16 under fp32 ones
            raise ValueError(f"a {self.kv_dtype} KV cache under {dtype} activations is not supported")
        # Pad attention spans and prompt chunks to `bucket` sizes where a new shape costs a new
        # kernel (oneDNN: CPU bf16/fp16). fp32 goes to MKL, which keeps nothing per shape.
        self.buckets = device == "cpu" and dtype != torch.float32
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        self.n_layers = cfg.num_hidden_layers
        self.rotary = src.rotary.to(device)

        # On CPU every weight kept is a copy: a view would keep the HF model's memory map of the
        # whole safetensors file alive (and resident: 540 MB for SmolLM2 in fp32) once it is dropped.
        copy = device == "cpu"

        def dense(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to(device=device, dtype=dtype, copy=copy).contiguous()

        def w(name: str) -> torch.Tensor | None:
            t = src.get(name)
            return None if t is None else dense(t)

        def read(name: str) -> torch.Tensor:
            t = src.get(name)
            if t is None:
                raise UserError(f"the base has no tensor {name!r}")
            return t

        # On CPU, bf16 and fp32 projections are held in quant_cpu.c's tiles of 16 output rows
        # (quant.Tiles) where that path is built: bf16 needs AVX512-BF16, fp32 AVX2 or AVX-512. At 1-16
        # rows they stream the weights at memory speed where oneDNN and MKL did not (an fp32 SmolLM2
        # decode step on a Zen 4 core, 1 / 8 rows: 23.8 / 58.6 ms with MKL -> 16.5 / 20.7 ms), and
        # prompts run no slower. Without the kernel, fp32 projections are held transposed in memory
        # (the same [out, in] tensor, its storage [in, out]): MKL computes x @ W.T from a row-major W by
        # repacking W on every call, and streams W.T contiguous (4-8 rows 1.28x faster on an AVX-512
        # Xeon); bf16 keeps oneDNN with the usual layout; fp16 and GPUs the usual layout
        # (`bench/lora_step_overhead.py --layouts` compares them).
        transposed = device == "cpu" and dtype == torch.float32

        store = store or quant.Store(None)

        def proj(name: str, *parts: str) -> Weight:
            """The tensors named `parts` stacked (q|k|v, gate|up), stored as this model computes with
            it; a stored quantized weight is never read from the base."""

            def make() -> torch.Tensor:
                return read(parts[0]) if len(parts) == 1 else torch.cat([read(p) for p in parts])

            if quantize != "none":
                return store.get(name, quantize, make)  # a stored weight skips the concatenation too
            t = make()
            tiled = quant.tile(t, dtype) if device == "cpu" and dtype in (torch.bfloat16, torch.float32) else None
            if tiled is not None:
                return tiled
            if transposed:
                return t.detach().to(device=device, dtype=dtype).t().contiguous().t()
            return dense(t)

        # The output head is int8 in both quantized modes: at int4 its error was 9% of the weight (vs
        # 0.25% for the projections), which moved the next-token distribution 5x more than all else.
        self.lm_head: Weight = (
            proj("lm_head", "lm_head.weight")
            if quantize == "none"
            else store.get("lm_head", "int8", lambda: read("lm_head.weight"))
        )
        # A tied embedding is the head's own rows (one copy: 54 MB less for SmolLM2 in bf16); an
        # untied one is int8 rows when quantized. (Transposed fp32 rows are strided: looking up
        # 3,200 prompt tokens costs ~22 ms instead of ~1, next to seconds of matmuls.)
        table = "model.embed_tokens.weight"
        self.embed: Weight = (
            self.lm_head
            if src.tied
            else dense(read(table))
            if quantize == "none"
            else store.get("embed", "int8", lambda: read(table))
        )
        self.final_norm = w("model.norm.weight")
        self.layers: list[dict[str, Any]] = []
        for i in range(self.n_layers):
            a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
            unserved = [
                n
                for n in (a + "o_proj.bias", *(m + f"{p}_proj.bias" for p in ("gate", "up", "down")))
                if src.get(n) is not None
            ]
            if unserved:  # Llama's attention_bias / mlp_bias: the forward passes below add none of these
                raise UserError(f"the serving engine does not support biases on {', '.join(unserved)}")
            biases = [src.get(a + f"{p}_proj.bias") for p in "qkv"]  # Qwen2's; read once
            if any(b is None for b in biases) and any(b is not None for b in biases):
                raise UserError(f"the base has biases on only some of layer {i}'s q, k and v projections")
            qkv_bias = dense(torch.cat(biases)) if biases[0] is not None else None  # type: ignore[arg-type]
            self.layers.append(
                {
                    "in_norm": w(f"model.layers.{i}.input_layernorm.weight"),
                    "post_norm": w(f"model.layers.{i}.post_attention_layernorm.weight"),
                    "qkv": proj(f"{i}.qkv", *(a + f"{p}_proj.weight" for p in "qkv")),
                    "qkv_bias": qkv_bias,
                    "o": proj(f"{i}.o", a + "o_proj.weight"),
                    "gate_up": proj(f"{i}.gate_up", m + "gate_proj.weight", m + "up_proj.weight"),
                    "down": proj(f"{i}.down", m + "down_proj.weight"),
                }
            )
        self.q_size = self.n_heads * self.head_dim
        self.kv_size = self.n_kv * self.head_dim
        self.inter = cfg.intermediate_size
        # in/out features per LoRA site, for the adapter stacks (see lora.py)
        h = cfg.hidden_size
        self.site_shapes = {
            "qkv": (h, [("q_proj", self.q_size), ("k_proj", self.kv_size), ("v_proj", self.kv_size)]),
            "o": (self.q_size, [("o_proj", h)]),
            "gate_up": (h, [("gate_proj", self.inter), ("up_proj", self.inter)]),
            "down": (self.inter, [("down_proj", h)]),
        }
        assert tuple(self.site_shapes) == SITES
        # decode_cpu.c for pure decode steps (`_decode`); None: every step on the PyTorch path
        self.decode_ops = (
            lora_kernel.load_decode() if device == "cpu" and dtype in (torch.float32, torch.bfloat16) else None
        )
        self.graphs: GraphDecoder | None = None
        if cuda_graphs and device.startswith("cuda"):
            from loraplex.engine.cuda_graph import GraphDecoder

            self.graphs = GraphDecoder(self)

    def new_cache(self, slots: int, max_len: int) -> KVCache:
        return KVCache(self.n_layers, slots, self.n_kv, self.head_dim, max_len, self.kv_dtype, self.device)

    def _linear(
        self,
        x: torch.Tensor,
        weight: Weight,
        site: str,
        layer: int,
        lora: LoraBatch | None,
        n: int,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [n*L, in] -> [n*L, out], each row's adapter added (lora.py works on [n, L, features])."""
        y = quant.linear(x, weight, bias)
        if lora is None:
            return y
        return lora.add_to(y.view(n, -1, y.shape[-1]), x.view(n, -1, x.shape[-1]), layer, site).reshape(y.shape)

    @torch.inference_mode()
    def forward(self, step: Step, cache: KVCache, all_logits: bool = False) -> torch.Tensor:
        ids, starts, lora = step.input_ids, step.starts, step.lora
        n, L = ids.shape
        if L == 1 and not all_logits and self.decode_ops is not None:
            return self._decode(step, cache)
        one_prompt = n == 1 and (step.last is None or int(step.last[0]) == L - 1)  # no padding after it
        if one_prompt and not all_logits and self.decode_ops is not None:
            return self._prefill_one(step, cache)
        if L == 1 and not all_logits and self.graphs is not None:
            replayed = self.graphs.step(step, cache)
            if replayed is not None:
                return replayed
        rows = slice(step.slot0, step.slot0 + n)
        offs = torch.arange(L, device=ids.device)
        positions = starts[:, None] + offs[None, :]  # [n, L]
        total = int(starts.max()) + L  # keys to attend over
        cache.ensure(step.slot0 + n, total)
        if self.buckets:  # keys past `total` are masked below (zeros or older keys: finite, weight 0)
            total = bucket(total, cache.capacity)
        # Row i, query t sees keys 0 .. starts[i] + t (its own prefix, causally).
        key_pos = torch.arange(total, device=ids.device)
        mask = key_pos[None, None, :] <= positions[:, :, None]  # [n, L, total]
        # Additive mask [n, 1, 1, L, total], broadcast over kv heads and the query heads of a group.
        bias = torch.zeros(mask.shape, dtype=torch.float32, device=ids.device).masked_fill_(~mask, float("-inf"))
        bias = bias[:, None, None]
        # Scatter targets for the new keys/values: (slot, position) pairs.
        slot_idx = (torch.arange(n, device=ids.device) + step.slot0)[:, None].expand(n, L)

        if isinstance(self.embed, torch.Tensor):
            x = F.embedding(ids, self.embed)
        else:
            x = self.embed.rows(ids).to(self.dtype)
        # activations stay [n*L, features] through the layers: 2-D is what the matmuls take, so no
        # reshape before and after each of them (~240 fewer tensor ops per decode step)
        x = x.view(n * L, -1)
        cos, sin = self.rotary(x, positions)
        cos, sin = cos[:, :, None].to(self.dtype), sin[:, :, None].to(self.dtype)  # [n, L, 1, d]: every head
        # rotate_half(x) * sin == x.roll(d/2) * (sin with its first half negated): one op, not four
        half = self.head_dim // 2
        sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
        heads, qk_size = self.n_heads + self.n_kv, self.q_size + self.kv_size
        k_layers, v_layers = cache.k.unbind(0), cache.v.unbind(0)  # one op for every layer's view
        # One row decoding on CPU in bf16 (a single user): attention in fp32, where MKL's small
        # matmuls cost less than oneDNN's bf16 ones (1 row, 160 keys: 90 vs 131 us a layer; from 4
        # rows on bf16 wins: 238 vs 285 us).
        one_row_bf16 = n * L == 1 and self.device == "cpu" and self.dtype == torch.bfloat16
        for li, p in enumerate(self.layers):
            h = _rms_norm(x, p["in_norm"], self.eps)
            qkv = self._linear(h, p["qkv"], "qkv", li, lora, n, p["qkv_bias"])
            # q and k heads rotate together: one set of ops per layer, not one per projection
            qk = qkv[:, :qk_size].view(n, L, heads, self.head_dim)
            qk = qk * cos + qk.roll(half, -1) * sin
            q = qk[:, :, : self.n_heads].transpose(1, 2)  # [n, heads, L, d]
            # cache[layer, slot, head, pos] <- k[row, t, head]
            k_cache, v_cache = k_layers[li], v_layers[li]
            k_cache[slot_idx, :, positions] = qk[:, :, self.n_heads :].to(k_cache.dtype)
            v_cache[slot_idx, :, positions] = qkv[:, qk_size:].view(n, L, self.n_kv, self.head_dim).to(v_cache.dtype)
            keys, values = k_cache[rows, :, :total], v_cache[rows, :, :total]
            if keys.dtype != self.dtype:  # an fp16 cache under fp32 activations
                att = self._attention(q, keys.to(self.dtype), values.to(self.dtype), bias)
            elif one_row_bf16:  # the copy attention needs anyway, made in fp32
                att = self._attention(q.float(), keys.float(), values.float(), bias).to(self.dtype)
            elif self.dtype == torch.float32:  # strided views: batched fp32 matmuls read them in place
                att = self._attention(q, keys, values, bias)
            else:
                att = self._attention(q, keys.contiguous(), values.contiguous(), bias)
            x = x + self._linear(att, p["o"], "o", li, lora, n)
            h = _rms_norm(x, p["post_norm"], self.eps)
            gu = self._linear(h, p["gate_up"], "gate_up", li, lora, n)
            gate, up = gu.split([self.inter, self.inter], dim=-1)
            x = x + self._linear(F.silu(gate) * up, p["down"], "down", li, lora, n)
        x = x.view(n, L, -1)
        if not all_logits:
            x = x[:, -1:] if step.last is None else x[torch.arange(n, device=x.device), step.last][:, None]
        x = _rms_norm(x, self.final_norm, self.eps)  # type: ignore[arg-type]
        return quant.linear(x, self.lm_head).float()

    def _decode(self, step: Step, cache: KVCache) -> torch.Tensor:
        """`forward` for a decode step on CPU (one new token per row, the last logits), with each
        layer's norms, SiLU(gate) * up, and rotary + cache write + attention in decode_cpu.c: ~20
        PyTorch ops a layer become 4 calls. The residual adds move into the norm after them
        (x += o; h = norm(x)). Embedding, projections and their LoRA deltas and the head are
        `forward`'s. tests/test_decode_kernel.py: logits and cache as `forward`'s PyTorch path."""
        n = step.input_ids.shape[0]
        cache.ensure(step.slot0 + n, int(step.starts.max()) + 1)
        slots = torch.arange(step.slot0, step.slot0 + n, dtype=torch.int64)
        positions = step.starts.to(torch.int64).contiguous()
        threads = torch.get_num_threads()
        return self._kernel_pass(step.input_ids.reshape(n), positions, slots, step.lora, n, threads, cache)

    def _prefill_one(self, step: Step, cache: KVCache) -> torch.Tensor:
        """`forward` for one row's prompt (or a chunk of it; the last position's logits) on CPU, as
        `_decode` does it: its L tokens go through decode_cpu.c's norms and SiLU as L rows, and its
        attention is `prefill_attention` (the L tokens' keys and values into the row's cache slot,
        then their queries together over the cached keys, causally); the LoRA deltas see the L tokens
        as one row's, and only the last token goes through the head. Why: a question's 15-25 new
        tokens took ~36 ms of the eager path's small ops (norms, rotary, cache writes, attention, ~30
        PyTorch ops a layer) on top of ~60 ms of int4 products, on one core of a 2-core Zen 3; and
        with the queries together it is faster than the eager path at every length measured (SmolLM2,
        int4, 1 and 2 threads: 20 new tokens after 110 cached 28 / 18 ms against 39 / 28; 1,000 new
        tokens 1.6 / 0.85 s against 3.7 / 2.0; docs/performance.md). tests/test_decode_kernel.py:
        logits and cache as `forward`'s PyTorch path."""
        L, start = step.input_ids.shape[1], int(step.starts[0])
        cache.ensure(step.slot0 + 1, start + L)
        positions = torch.arange(start, start + L, dtype=torch.int64)
        slots = torch.full((L,), step.slot0, dtype=torch.int64)
        threads = torch.get_num_threads()
        return self._kernel_pass(
            step.input_ids.reshape(L), positions, slots, step.lora, 1, threads, cache, prompt_start=start
        )

    def _kernel_pass(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        lora: LoraBatch | None,
        lora_rows: int,
        threads: int,
        cache: KVCache,
        prompt_start: int | None = None,
    ) -> torch.Tensor:
        """Tokens `ids` [m], each at `positions` [m] of cache slot `slots` [m], through the layers on
        decode_cpu.c -> logits [m, 1, vocab]. The LoRA deltas see them as `lora_rows` rows of m /
        lora_rows tokens; attention on `threads` threads. `prompt_start`: the m tokens are one row's
        prompt at positions prompt_start.. of one slot, attending together (`prefill_attention`),
        and only the last token's logits come back, [1, 1, vocab]."""
        ops = self.decode_ops
        assert ops is not None
        n = ids.shape[0]
        x = F.embedding(ids, self.embed) if isinstance(self.embed, torch.Tensor) else self.embed.rows(ids)
        x = x.to(self.dtype).reshape(n, -1).contiguous()  # a new tensor: the norms add into it in place
        cos, sin = self.rotary(torch.empty(0), positions[:, None])  # fp32 [n, 1, d]: the kernel rotates in fp32
        cos, sin = cos.reshape(n, -1).contiguous(), sin.reshape(n, -1).contiguous()
        bf16, eps, hidden = int(self.dtype == torch.bfloat16), self.eps, x.shape[1]
        kv16 = int(cache.k.dtype == torch.float16 and self.dtype == torch.float32)
        # buffers every layer reuses (each is read by the next call before the layer writes it again)
        h, att, act = (torch.empty(n, f, dtype=self.dtype) for f in (hidden, self.q_size, self.inter))
        # the cache's layers by address: [layers, slots, kv heads, positions, d], no view per layer
        k_at, v_at, layer = cache.k.data_ptr(), cache.v.data_ptr(), cache.k.stride(0) * cache.k.element_size()
        s_slot, s_head, s_pos = cache.k.stride()[1:4]
        slot_off = int(slots[0]) * s_slot  # a prompt's slot (prompt_start)

        def norm(res: torch.Tensor | None, w: torch.Tensor) -> torch.Tensor:  # x += res; h = rms_norm(x) * w
            res_ptr = None if res is None else res.contiguous().data_ptr()
            ops.rms_norm(n, hidden, x.data_ptr(), res_ptr, w.data_ptr(), h.data_ptr(), eps, bf16)
            return h

        res: torch.Tensor | None = None  # the last layer's MLP output, added by the next norm
        for li, p in enumerate(self.layers):
            qkv = self._linear(norm(res, p["in_norm"]), p["qkv"], "qkv", li, lora, lora_rows, p["qkv_bias"])
            qkv = qkv.contiguous()
            if prompt_start is None:
                failed = ops.decode_attention(
                    n, self.n_heads, self.n_kv, self.head_dim, qkv.data_ptr(), qkv.stride(0), cos.data_ptr(),
                    sin.data_ptr(), k_at + li * layer, v_at + li * layer, s_slot, s_head, s_pos,
                    slots.data_ptr(), positions.data_ptr(), att.data_ptr(), bf16, kv16, threads,
                )  # fmt: skip
            else:
                failed = ops.prefill_attention(
                    n, self.n_heads, self.n_kv, self.head_dim, qkv.data_ptr(), qkv.stride(0), cos.data_ptr(),
                    sin.data_ptr(), k_at + li * layer, v_at + li * layer, slot_off, s_head, s_pos,
                    prompt_start, att.data_ptr(), bf16, kv16, threads,
                )  # fmt: skip
            if failed:
                raise MemoryError("decode_cpu.c: out of memory for attention scores")
            h = norm(self._linear(att, p["o"], "o", li, lora, lora_rows), p["post_norm"])
            gu = self._linear(h, p["gate_up"], "gate_up", li, lora, lora_rows).contiguous()
            ops.silu_mul(n, self.inter, gu.data_ptr(), act.data_ptr(), bf16)
            res = self._linear(act, p["down"], "down", li, lora, lora_rows)
        out = norm(res, self.final_norm)  # type: ignore[arg-type]
        out = out[-1:] if prompt_start is not None else out
        return quant.linear(out.view(out.shape[0], 1, -1), self.lm_head).float()

    @torch.inference_mode()
    def decode_static(
        self,
        ids: torch.Tensor,
        starts: torch.Tensor,
        cache: KVCache,
        lora: GatheredRows | DenseRows | None = None,
    ) -> torch.Tensor:
        """`forward` for a decode step of rows in cache slots 0..n-1 (ids [n], starts [n]) -> logits
        [n, 1, vocab], written so that nothing waits on the device and no shape depends on the
        data: what a CUDA graph can capture and replay (cuda_graph.py). Attention spans the cache's
        whole capacity under a mask (forward's spans the longest row), and each row's adapter comes
        by its slot, gathered (`GatheredRows`) or through every slot's weights (`DenseRows`), rather
        than grouped on the host. The cache must already hold the rows and one more position
        (`KVCache.ensure`). tests/test_engine.py: logits and cache equal `forward`'s."""
        n = ids.shape[0]
        x = (
            F.embedding(ids, self.embed)
            if isinstance(self.embed, torch.Tensor)
            else self.embed.rows(ids).to(self.dtype)
        )
        positions = starts[:, None]  # [n, 1]
        cos, sin = self.rotary(x, positions)
        cos, sin = cos[:, :, None].to(self.dtype), sin[:, :, None].to(self.dtype)  # [n, 1, 1, d]
        half = self.head_dim // 2
        sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
        heads, qk_size = self.n_heads + self.n_kv, self.q_size + self.kv_size
        key_pos = torch.arange(cache.capacity, device=ids.device)
        attend = (key_pos[None, :] <= positions)[:, None, None, :]  # [n, 1, 1, T]: its own prefix
        slot_idx = torch.arange(n, device=ids.device)[:, None]
        k_layers, v_layers = cache.k.unbind(0), cache.v.unbind(0)

        def linear(h: torch.Tensor, w: Weight, site: str, li: int, b: torch.Tensor | None = None):  # noqa: ANN202
            y = quant.linear(h, w, b)
            return y if lora is None else lora.add(y, h, li, site)

        for li, p in enumerate(self.layers):
            h = _rms_norm(x, p["in_norm"], self.eps)
            qkv = linear(h, p["qkv"], "qkv", li, p["qkv_bias"])
            qk = qkv[:, :qk_size].view(n, 1, heads, self.head_dim)
            qk = qk * cos + qk.roll(half, -1) * sin
            q = qk[:, :, : self.n_heads].transpose(1, 2)  # [n, heads, 1, d]
            k_cache, v_cache = k_layers[li], v_layers[li]
            k_cache[slot_idx, :, positions] = qk[:, :, self.n_heads :].to(k_cache.dtype)
            v_cache[slot_idx, :, positions] = qkv[:, qk_size:].view(n, 1, self.n_kv, self.head_dim).to(v_cache.dtype)
            keys, values = k_cache[:n], v_cache[:n]
            if keys.dtype != self.dtype:
                keys, values = keys.to(self.dtype), values.to(self.dtype)
            # One fused kernel where `_attention` is ~8 (what a graph step is made of: every kernel
            # costs a few us however small). Each KV head's g query heads are g query positions of
            # one attention over its keys, so no GQA support is needed from the kernel.
            att = F.scaled_dot_product_attention(q.reshape(n, self.n_kv, -1, self.head_dim), keys, values, attend)
            x = x + linear(att.reshape(n, self.q_size), p["o"], "o", li)
            h = _rms_norm(x, p["post_norm"], self.eps)
            gate, up = linear(h, p["gate_up"], "gate_up", li).split([self.inter, self.inter], dim=-1)
            x = x + linear(F.silu(gate) * up, p["down"], "down", li)
        x = _rms_norm(x, self.final_norm, self.eps)  # type: ignore[arg-type]
        return quant.linear(x.view(n, 1, -1), self.lm_head).float()

    def _attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Grouped-query attention as two batched matmuls: q [n, heads, L, d], k/v [n, kv_heads, T, d]
        -> [n*L, heads*d].

        Written out because SDPA's CPU kernel costs ~0.4 ms per call at decode sizes (profiled),
        more than the matmuls themselves; grouping the query heads of each KV head avoids
        materialising repeated keys. Softmax runs in fp32, as in transformers' eager attention.
        """
        n, _, L, d = q.shape
        g = self.n_heads // self.n_kv
        T = k.shape[2]
        # [n, kv, g*L, d] @ [n, kv, d, T]: the query heads of a group share one read of their keys
        scores = torch.matmul(q.reshape(n, self.n_kv, g * L, d), k.transpose(-1, -2))
        scores = scores.view(n, self.n_kv, g, L, T).float() * d**-0.5 + bias
        probs = torch.softmax(scores, dim=-1).to(v.dtype).view(n, self.n_kv, g * L, T)
        out = torch.matmul(probs, v)  # [n, kv, g*L, d]
        return out.view(n, self.n_heads, L, d).transpose(1, 2).reshape(n * L, self.q_size)
