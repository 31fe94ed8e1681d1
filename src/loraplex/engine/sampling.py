"""Sampling parameters and the per-row choice of the next token.

Each row of a batch carries its own parameters and, when seeded, its own `torch.Generator`, so a
seeded request draws the same tokens whatever else shares its batch. Greedy rows are one argmax
over the batch; sampled rows (at most `max_batch` of them) are processed one by one, which costs
microseconds beside the forward pass.

Order of operations (as in transformers / vLLM): repetition penalty (over prompt and output),
OpenAI presence and frequency penalties (over output), temperature, top-k, top-p, draw.
Logprobs are those of the model's distribution before any of these, as vLLM reports them.
A row with a constraint (structured.py: a JSON schema) first has every token its grammar does not
allow removed, and its grammar then consumes the token drawn.

A row fails alone: its logits not finite (an adapter whose weights overflow), or any error in its
own sampling, makes a RowError for that row; the other rows of the batch get their tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from loraplex.engine.structured import Constraint


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each token. How many tokens is not here: `generate(..., max_tokens)` takes it,
    after the engine has checked it against the context."""

    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None  # None = off; k = the chosen token plus the k most likely
    prompt_logprobs: int | None = None  # the same for every prompt token after the first (echo, lm-eval)
    # the first prompt position whose logprob is wanted: the positions before it may come from the
    # prefix cache, and their logprobs are then None (eval's reference losses: the answer's only)
    prompt_logprobs_from: int = 1
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever (benchmarks)
    response_format: str | None = None  # OpenAI's response_format as JSON text; enforced per row (structured.py)

    def __post_init__(self) -> None:
        checks = [
            (0.0 <= self.temperature <= 2.0, "temperature must be between 0 and 2"),
            (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0.0 < self.repetition_penalty <= 10.0, "repetition_penalty must be in (0, 10]"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty must be between -2 and 2"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty must be between -2 and 2"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "top_logprobs must be between 0 and 20"),
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20, "prompt_logprobs must be in 0..20"),
            (self.prompt_logprobs_from >= 1, "prompt_logprobs_from must be >= 1"),
            (len(self.stop) <= 16 and all(self.stop), "stop takes up to 16 non-empty strings"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


GREEDY = SamplingParams(temperature=0.0)
"""The most likely token every step: what evaluation and comparisons use."""


@dataclass
class RowState:
    """What sampling needs to remember about one request between steps."""

    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    constraint: Constraint | None = None  # the grammar the answer must follow (structured.py)

    def generator_for(self, device: torch.device) -> torch.Generator | None:
        """The request's own generator (seeded requests only), made on the device that samples."""
        if self.generator is None and self.params.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(self.params.seed)
        return self.generator


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]


class RowError(Exception):
    """Why one row of a batch could not be sampled (the engine fails that request alone)."""


def _penalise(logits: torch.Tensor, row: RowState) -> torch.Tensor:
    p = row.params
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(row.prompt_ids) | set(row.output_ids)), dtype=torch.long)
        # in fp64: a legal penalty below fp32's smallest number (3.6e-66 from the fuzzer) is 0 in fp32,
        # and a token the output format forbids (-inf) times 0 is NaN; in fp64 it stays -inf
        vals = logits[seen].double()
        penalised = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        logits[seen] = _finite(penalised, logits.dtype)
    if (p.presence_penalty or p.frequency_penalty) and row.output_ids:
        ids, counts = torch.tensor(row.output_ids, dtype=torch.long).unique(return_counts=True)
        logits[ids] -= p.presence_penalty + p.frequency_penalty * counts.to(logits.dtype)
    return logits


def _finite(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in `dtype`, a positive overflow held at its largest number, not inf: a legal but tiny
    repetition_penalty (2e-309 > 0) divides a logit past fp32's range, and softmax of two infs is
    NaN. -inf stays: it is a token the output format forbids, and softmax gives it 0."""
    return x.clamp(max=torch.finfo(dtype).max).to(dtype)


def _draw(logits: torch.Tensor, row: RowState) -> int:
    p = row.params
    # torch divides by a scalar as a multiplication by its reciprocal: a legal temperature below
    # 1/max-float (4e-98 from the fuzzer) makes that reciprocal inf, and a logit of 0 times inf is NaN.
    # softmax(l / T) tends to the argmax as T -> 0: take it.
    if 1.0 / p.temperature > torch.finfo(logits.dtype).max:
        return int(logits.argmax())
    # the largest first, so every value is <= 0 before the division: nothing overflows to +inf, and
    # a forbidden token's -inf stays -inf (no NaN from -inf - -inf, no forbidden token let back in)
    logits = (logits - logits.max()) / p.temperature
    if p.top_k:
        kth = torch.topk(logits, min(p.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p; the first token always stays, also
        # when top_p is below the dtype's smallest number (5e-324 rounds to 0.0 in fp32)
        drop = sorted_p.cumsum(0) - sorted_p >= p.top_p
        drop[0] = False
        sorted_p[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=row.generator_for(probs.device)))


def finite_rows(logits: torch.Tensor) -> list[bool]:
    """Per row: no NaN or infinity, = torch.isfinite(logits).all(-1). A finite row sum proves it (a
    NaN or an infinity makes the sum NaN or infinite); only rows whose sum is not finite (those, or
    finite values so large that they overflow it) take the elementwise test. 30 us for 8 rows of a
    49,152-word vocabulary on one CPU thread, where the elementwise test took 1.1 ms."""
    finite = torch.isfinite(logits.sum(dim=-1)).tolist()
    for i, ok in enumerate(finite):
        if not ok:
            finite[i] = bool(torch.isfinite(logits[i]).all())
    return finite


def argmax_rows(logits: torch.Tensor) -> list[int]:
    """Per row the first index of the largest value (NaN counts as largest, as in torch): on CPU via
    NumPy's vectorised argmax (8 x 49,152 fp32: 29 us against torch's 675 us on one thread)."""
    if logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.float64):
        return logits.detach().numpy().argmax(-1).tolist()
    return logits.argmax(dim=-1).tolist()


def sample(logits: torch.Tensor, rows: list[RowState]) -> tuple[list[int | RowError], list[TokenLogprob | None]]:
    """logits [n, vocab] (fp32) -> one token per row (or the RowError that row failed with), plus
    its logprobs where the row asked for them."""
    plain = all(
        r.params.repetition_penalty == 1.0 and not r.params.presence_penalty and not r.params.frequency_penalty
        for r in rows
    )
    finite = finite_rows(logits)
    failed: dict[int, RowError] = {}
    choose = logits  # what tokens are drawn from; logprobs stay those of `logits`
    if any(r.constraint is not None for r in rows):
        choose = logits.clone()
        for i, r in enumerate(rows):
            if r.constraint is not None:
                try:
                    allowed = r.constraint.allowed().to(logits.device)
                    if not bool(allowed.any()):
                        raise RowError("the output format allows no next token")
                    choose[i].masked_fill_(~allowed, float("-inf"))
                except Exception as e:  # noqa: BLE001 - this row fails, the batch goes on
                    failed[i] = e if isinstance(e, RowError) else RowError(f"constraint failed ({e})")
    greedy_pick = argmax_rows(choose) if plain else None
    tokens: list[int | RowError] = []
    infos: list[TokenLogprob | None] = []
    for i, row in enumerate(rows):
        try:
            if i in failed:
                raise failed[i]
            pick = greedy_pick[i] if greedy_pick is not None else None
            tok, info = _one(logits[i], choose[i], row, pick, finite[i])
            if row.constraint is not None:
                row.constraint.advance(tok)
            tokens.append(tok)
            infos.append(info)
        except Exception as e:  # noqa: BLE001 - this row fails, the batch goes on
            tokens.append(e if isinstance(e, RowError) else RowError(f"sampling failed ({type(e).__name__}: {e})"))
            infos.append(None)
    return tokens, infos


def _one(
    raw: torch.Tensor, choose: torch.Tensor, row: RowState, greedy_pick: int | None, finite: bool
) -> tuple[int, TokenLogprob | None]:
    """raw: the model's logits (for logprobs); choose: the same with disallowed tokens at -inf."""
    if not finite:
        raise RowError("the model produced non-finite logits (NaN or inf) for this request")
    if row.params.greedy and greedy_pick is not None:
        tok = greedy_pick
    else:
        adjusted = _penalise(choose.clone(), row)
        tok = int(adjusted.argmax()) if row.params.greedy else _draw(adjusted, row)
    if row.params.logprobs is None:
        return tok, None
    return tok, token_logprobs(raw[None], [tok], row.params.logprobs)[0]


def token_logprobs(logits: torch.Tensor, targets: list[int], k: int) -> list[TokenLogprob]:
    """logits [m, vocab] -> for each row, the logprob of its target and the k most likely tokens."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(1, torch.tensor(targets, device=logp.device)[:, None])[:, 0].tolist()
    if not k:
        return [TokenLogprob(t, c, ()) for t, c in zip(targets, chosen, strict=True)]
    values, ids = logp.topk(k, dim=-1)
    return [
        TokenLogprob(t, c, tuple(zip(i, v, strict=True)))
        for t, c, i, v in zip(targets, chosen, ids.tolist(), values.tolist(), strict=True)
    ]
