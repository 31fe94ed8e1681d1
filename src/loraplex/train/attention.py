"""Attention per packed example for CPU training: each example of a packed row attends over its own
tokens only, one `scaled_dot_product_attention` call per example, computed in fp32.

A packed row of 4 examples x 80 tokens under eager attention is one 320 x 320 score matrix per
head with a block-diagonal mask: 4x the work of the examples' own 80 x 80 blocks, and the masked
softmax over all of it. Splitting the row at its examples removes that work; fp32 because the bf16
batched matmuls of eager attention were slower on CPU than fp32 SDPA at these lengths, and fp32 is
the more exact of the two. Measured on the shipped sample (SmolLM2-135M, packed 4-example steps,
1 thread, 8 paired steps, process time): a training step 1.10x faster in bf16 and 1.12x in fp32
(medians; single pairs 1.00-1.28x on this shared host); gradients equal eager's to rel 3e-6 in
fp32, and in bf16 both are as far from an fp32 reference (rel 0.05).

Where examples start is read off the position ids (each example's run starts at 0; collate gives
padding a run of its own, so padding attends only to padding). A run that starts at position p > 0
is an example's own part after a prompt prefix it shares with others (data/tokenize.py
`shared_row`): it attends to positions 0..p-1 of the run it branched from (and that run's own
ancestors), then causally to itself; sharing the system prompt and instructions of a step's examples
cut a step's tokens by a quarter to a third on the benchmark data. The recipe computes the spans once
per forward and passes them as `segments`; any call without them (generation, with or without a
KV cache) is eager attention with its usual mask, so the same model object generates normally.

Only for architectures whose attention is the plain kind (`supports`): the fallback is Llama's
eager function, which knows nothing of Gemma's soft-capping, attention sinks or sliding windows;
other bases keep their own eager attention. Not here: GPU kernels (on a GPU the recipe keeps SDPA)
or dropout inside attention (LoRA training uses none).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.models.llama.modeling_llama import eager_attention_forward

NAME = "loraplex_packed"


class Span(NamedTuple):
    """One run of a batch row: positions `start:end` of `row`. `keys`: the row positions it attends
    to (the shared tokens before it, then itself) and `mask` which of them each query sees; both None
    for a run that starts at position 0 and attends causally to itself only."""

    row: int
    start: int
    end: int
    keys: torch.Tensor | None = None
    mask: torch.Tensor | None = None


Segments = list[Span]

# Architectures whose attention is softmax(q k^T * scaling + causal mask) v, grouped-query at most.
PLAIN = frozenset({"llama", "qwen2", "qwen3", "mistral", "phi3"})


def supports(config: Any) -> bool:
    """Whether a base with this config can attend per packed example (plain attention, no active
    sliding window, no dropout)."""
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    return (
        getattr(config, "model_type", None) in PLAIN
        and window is None
        and not getattr(config, "attention_dropout", 0.0)
    )


def segments(position_ids: torch.Tensor) -> Segments:
    """The runs of a batch of rows: a run starts where the position id does not follow on from the
    previous token's. A run starting at position p > 0 continues the nearest earlier run of its row
    that holds position p - 1 (the run it branched from, laid out depth first), and so on back to 0."""
    spans: Segments = []
    for row, pos in enumerate(position_ids.tolist()):
        runs: list[tuple[int, int, int]] = []  # (start, end, first position)
        for t, p in enumerate(pos):
            if t == 0 or p != pos[t - 1] + 1:
                runs.append((t, t + 1, p))
            else:
                runs[-1] = (runs[-1][0], t + 1, runs[-1][2])
        for i, (start, end, first) in enumerate(runs):
            if first == 0:
                spans.append(Span(row, start, end))
                continue
            context: list[range] = []
            need = first  # positions 0..need-1 still to find
            for s, e, p in reversed(runs[:i]):
                if p < need <= p + (e - s):
                    context.insert(0, range(s, s + need - p))
                    need = p
                    if need == 0:
                        break
            if need:
                raise ValueError(f"row {row}: the run at {start} starts at position {first}, continuing no earlier run")
            keys = [k for r in context for k in r] + list(range(start, end))
            n, own = len(keys), end - start
            mask = torch.ones(own, n, dtype=torch.bool, device=position_ids.device).tril(n - own)
            spans.append(Span(row, start, end, torch.tensor(keys, device=position_ids.device), mask))
    return spans


def attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    segments: Segments | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Transformers' attention-function signature: q [B, H, L, D], k and v [B, KV heads, L, D] ->
    [B, L, H, D]. With `segments`, each span attends to the shared tokens before it and causally
    within itself; without, eager."""
    if segments is None or query.shape[2] != key.shape[2]:  # no spans, or a KV cache: eager
        return eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    dtype = query.dtype
    with torch.autocast(query.device.type, enabled=False):
        q, k, v = query.float(), key.float(), value.float()
        parts = [
            F.scaled_dot_product_attention(
                q[r : r + 1, :, s:e],
                k[r : r + 1, :, s:e],
                v[r : r + 1, :, s:e],
                is_causal=True,
                scale=scaling,
                enable_gqa=True,
            )
            if keys is None
            else F.scaled_dot_product_attention(
                q[r : r + 1, :, s:e],
                k[r : r + 1].index_select(2, keys),
                v[r : r + 1].index_select(2, keys),
                attn_mask=mask,
                scale=scaling,
                enable_gqa=True,
            )
            for r, s, e, keys, mask in segments
        ]
        # the spans tile every row end to end, in order: joined, they are the batch's B * L positions
        out = torch.cat(parts, 2)[0].transpose(0, 1).reshape(q.shape[0], q.shape[2], q.shape[1], q.shape[3])
    return out.to(dtype), None


AttentionInterface.register(NAME, attention)
AttentionMaskInterface.register(NAME, eager_mask)  # calls without spans need eager's mask
