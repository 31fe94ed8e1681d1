"""Decode steps on CUDA replayed from captured CUDA graphs: one launch a step instead of ~30 a layer.

Why: a decode step of a Llama-shaped model is hundreds of small kernels (per layer: norms, three
fused projections, rotary, cache write, attention, and with adapters a gather and two matmuls per
site). On an H100 the built-in engine spent its 16 ms steps of a 135M model launching them, and
8 adapters' extra launches cost 1.46x the bare step (issue 28). A graph replays the whole step's
kernels with no Python in between, as vLLM does (its default; `--enforce-eager` turns it off).

One graph per (rows, adapters or not, KV cache tensors, LoRA stack tensors): a graph bakes in
addresses and shapes, so what it reads lives in static buffers (token ids, positions, per-row slots
and scales) that each step copies into before replaying. `DecoderModel.decode_static` is the step
it captures: attention over the whole cache capacity under a mask, and each row's adapter found by
its slot inside the graph, so a new mix of adapters captures nothing new. Where at most DENSE_SLOTS
slots are loaded, every row meets every slot's weights and keeps its own (lora.DenseRows: 3 kernels
a site); beyond, each row's are gathered (lora.GatheredRows: a gather and two matmuls per run of a
site). When the cache or the
stacks are reallocated (they grow by doubling) the next step captures again; graphs of an older
cache are dropped then. Rows are not padded to buckets (vLLM pads): a padded row would write its
key into a cache slot that a prefilling request owns.

Not here: prefill (prompt chunks vary in length and stay eager), CPU (decode_cpu.c), sampling.
A capture that fails (an op that syncs, say a rotary type that reads the position on the host)
turns graphs off for the model with one warning: every step then runs eagerly, as before.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from loraplex.engine.lora import DenseLora, DenseRows, GatheredRows, LoraStacks

if TYPE_CHECKING:
    from loraplex.engine.model import DecoderModel, KVCache, Step

log = logging.getLogger("loraplex.engine")

MAX_ROWS = 64  # more rows than this decode eagerly: at that size a step is matmul work, not launches
# Up to this many adapter slots (max_loaded_adapters + 1) a step reads every slot's LoRA weights:
# ~2.6 MB a layer and slot for Llama-3-8B at rank 16, so 17 slots read ~1.4 GB a step (0.3 ms at
# an H200's 4.3 TB/s) to save ~600 kernel launches
DENSE_SLOTS = 17


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    ids: torch.Tensor
    starts: torch.Tensor
    slots: torch.Tensor | None  # GatheredRows: each row's slot and weight
    scale: torch.Tensor | None
    weights: torch.Tensor | None  # DenseRows: [rows, slots], each row's weight at its slot
    dense: DenseLora | None
    logits: torch.Tensor = field(default_factory=lambda: torch.empty(0))


class GraphDecoder:
    """Captures and replays `model.decode_static` per batch shape; `step` -> logits, or None to
    run the step eagerly (too many rows, or capture failed once)."""

    def __init__(self, model: DecoderModel, max_rows: int = MAX_ROWS):
        self.model, self.max_rows = model, max_rows
        self.graphs: dict[tuple[object, ...], _Graph] = {}
        self.pool = torch.cuda.graph_pool_handle()  # every graph's intermediates in one pool
        self.failed = False
        self.captures = self.replays = 0
        self.dense: DenseLora | None = None  # one dense copy of the stacks, shared by every graph

    def _dense(self, stacks: LoraStacks) -> DenseLora:
        if self.dense is None or self.dense.stacks is not stacks or self.dense.regrows != stacks.regrows:
            self.dense = DenseLora(stacks)
        self.dense.refresh()
        return self.dense

    def step(self, step: Step, cache: KVCache) -> torch.Tensor | None:
        n = step.input_ids.shape[0]
        if self.failed or n > self.max_rows or step.slot0 != 0 or step.last is not None:
            return None
        longest = step.longest if step.longest is not None else int(step.starts.max())  # the latter waits
        cache.ensure(n, longest + 1)
        lora = step.lora
        stacks = None if lora is None else lora.stacks
        at = (cache.k.data_ptr(), cache.v.data_ptr(), tuple(cache.k.shape))
        key = (n, at, None if stacks is None else (id(stacks), stacks.regrows))
        g = self.graphs.get(key)
        if g is None:
            # graphs of an older cache, or of stacks since regrown, are never replayed again
            self.graphs = {k: v for k, v in self.graphs.items() if k[1] == at and k[2] in (None, key[2])}
            if not self.graphs:  # a handle whose graphs are all gone is dead (capturing into it asserts)
                torch.cuda.empty_cache()  # and the dead pool's memory goes back only this way
                self.pool = torch.cuda.graph_pool_handle()
            try:
                g = self._capture(step, cache)
            except Exception as e:  # noqa: BLE001 - any capture failure leaves the eager path, which works
                self.failed = True
                log.warning("CUDA graphs off for this model: capturing a decode step failed (%s)", e)
                return None
            self.graphs[key] = g
        g.ids.copy_(step.input_ids.view(-1), non_blocking=True)
        g.starts.copy_(step.starts, non_blocking=True)
        if lora is not None:
            if g.dense is not None and g.weights is not None:
                g.dense.refresh()  # an adapter loaded since: copied into the same tensors
                g.weights.copy_(_weights(lora.slots, lora.scales, g.weights.shape[1]), non_blocking=True)
            elif g.slots is not None and g.scale is not None:
                g.slots.copy_(torch.tensor(lora.slots, dtype=torch.int64), non_blocking=True)
                g.scale.copy_(torch.tensor(lora.scales or [1.0] * n, dtype=torch.float32), non_blocking=True)
        g.graph.replay()
        self.replays += 1
        return g.logits.clone()  # the next replay overwrites the graph's own output

    def _capture(self, step: Step, cache: KVCache) -> _Graph:
        dev = step.input_ids.device
        n, lora = step.input_ids.shape[0], step.lora
        g = _Graph(torch.cuda.CUDAGraph(), step.input_ids.view(-1).clone(), step.starts.clone(), None, None, None, None)
        rows: GatheredRows | DenseRows | None = None
        if lora is not None and lora.stacks.slots <= DENSE_SLOTS:
            g.dense = self._dense(lora.stacks)
            # in the stacks' dtype: a cast per site would be 128 more kernels a step on 32 layers
            g.weights = _weights(lora.slots, lora.scales, lora.stacks.slots).to(dev, lora.stacks.dtype)
            rows = DenseRows(g.dense, g.weights)
        elif lora is not None:
            g.slots = torch.tensor(lora.slots, dtype=torch.int64, device=dev)
            g.scale = torch.tensor(lora.scales or [1.0] * n, dtype=torch.float32, device=dev)
            rows = GatheredRows(lora.stacks, g.slots, g.scale)

        def run() -> torch.Tensor:
            return self.model.decode_static(g.ids, g.starts, cache, rows)

        # Warm up on a side stream (cuBLAS handles and workspaces are made outside the capture, as
        # PyTorch's docs require). It writes this step's keys and values into the cache: the same
        # ones the replay writes again, so running it twice changes nothing.
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream(dev).wait_stream(side)
        # thread_local: the engine captures in its own thread while server threads may read CUDA
        # memory stats; "global" mode would fail the capture on their calls
        with torch.cuda.graph(g.graph, pool=self.pool, capture_error_mode="thread_local"):
            g.logits = run()
        self.captures += 1
        return g


def _weights(slots: list[int], scales: list[float] | None, n_slots: int) -> torch.Tensor:
    """[rows, n_slots]: each row's weight (1 unless weighted) at its slot, 0 elsewhere; the base's
    slot 0 holds zeros, so a base row adds nothing whatever its weight."""
    w = torch.zeros(len(slots), n_slots)
    w[torch.arange(len(slots)), torch.tensor(slots)] = torch.tensor(scales or [1.0] * len(slots))
    return w
