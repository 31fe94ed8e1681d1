"""One request's state inside the engine (engine.py's loop owns it: nothing here is thread-safe),
and the engine's counters.

This module does not schedule, sample or touch the KV cache; it holds what the loop needs to know
about a row between steps.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from loraplex.engine.lora import AdapterRequest, AdapterWeights
from loraplex.engine.protocol import Delta
from loraplex.engine.sampling import RowState, TokenLogprob, token_logprobs
from loraplex.engine.text import TextStream


@dataclass
class Request:
    id: int
    prompt_ids: list[int]
    adapter: AdapterRequest
    weights: AdapterWeights | None
    row: RowState
    stream: TextStream
    emit: Callable[[Delta | BaseException], None]
    max_tokens: int
    stop_ids: frozenset[int]
    context: list[int] = field(default_factory=list)  # what prefill puts in the cache: the prompt, or
    # after a preemption the prompt and the answer so far (all but its last token, which decode feeds)
    resumed: bool = False  # prefilling again after a preemption: decode continues, nothing is sampled
    admitted: bool = False
    cached: int = 0
    reused: int = 0  # prompt tokens taken from the prefix cache
    lora_slot: int = -1
    decoding: bool = False
    cancelled: bool = False
    pending_ids: list[int] = field(default_factory=list)
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    # SamplingParams.prompt_logprobs: position p holds the logprob of prompt token p; sent with the first Delta
    prompt_logprobs: list[TokenLogprob | None] | None = None
    t_submit: float = field(default_factory=time.perf_counter)
    t_first: float | None = None

    def positions(self) -> int:
        """The cache positions this request needs for its next step."""
        return self.cached + 1 if self.decoding else len(self.context)

    def send(self, text: str, finish: str | None) -> None:
        """Emit what this row has produced since the last Delta (prompt logprobs go with the first)."""
        prompt_logprobs = None if self.prompt_logprobs is None else tuple(self.prompt_logprobs)
        self.emit(
            Delta(
                text=text,
                token_ids=tuple(self.pending_ids),
                logprobs=tuple(self.pending_logprobs),
                finish_reason=finish,
                prompt_tokens=len(self.prompt_ids),
                completion_tokens=len(self.row.output_ids),
                prompt_logprobs=prompt_logprobs,
                cached_tokens=self.reused,
            )
        )
        self.pending_ids, self.pending_logprobs = [], []
        self.prompt_logprobs = None

    def score_prompt(self, logits: torch.Tensor) -> None:
        """logits [m, vocab] of prompt positions cached .. cached+m-1; each predicts the token after it."""
        assert self.prompt_logprobs is not None
        first = self.cached + 1
        targets = self.prompt_ids[first : first + logits.shape[0]]  # the last position may predict the answer
        if targets:
            k = self.row.params.prompt_logprobs or 0
            self.prompt_logprobs[first : first + len(targets)] = token_logprobs(logits[: len(targets)], targets, k)


@dataclass
class EngineStats:
    requests: int = 0
    finished: int = 0
    failed: int = 0
    cancelled: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    decode_steps: int = 0
    prefill_steps: int = 0
    preempted: int = 0  # rows sent back to wait (and prefilled again) to keep the KV cache in its budget
    cached_prompt_tokens: int = 0  # prompt tokens whose keys/values came from the prefix cache


def size_text(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
