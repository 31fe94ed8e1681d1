"""Automatic prefix caching: a hit starts prefill after the stored prefix and changes no answer."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from loraplex.engine import lora_kernel
from loraplex.engine.engine import Engine
from loraplex.engine.lora import AdapterRequest
from loraplex.engine.prefix_cache import MIN_TOKENS, Entry, PrefixCache
from loraplex.engine.sampling import SamplingParams
from tests.conftest import make_adapter

SYSTEM = (
    "You answer questions about Brightwave's policies. Use the reference passages, cite them like [1], "
    "and say that you don't know when they lack the answer. Reference passages: [1] Annual leave is 17 days."
)


def _kv(n: int, fill: float) -> tuple[torch.Tensor, torch.Tensor]:
    k = torch.full((2, 1, n, 4), fill)
    return k, k + 1


def _filled(cache: PrefixCache, entry: Entry | None, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What a request's slot holds after a hit of n positions."""
    assert entry is not None
    k, v = torch.full((2, 1, 64, 4), -1.0), torch.full((2, 1, 64, 4), -1.0)
    cache.fill(entry, n, k, v)
    return k[:, :, :n], v[:, :, :n]


def test_longest_prefix_lru_and_adapter_isolation() -> None:
    one = 2 * 2 * 1 * 40 * 4 * 4  # bytes of a 40-token entry (k and v, fp32)
    cache = PrefixCache(capacity_bytes=2 * one)
    base, hr = AdapterRequest(), AdapterRequest((("hr@v1", 1.0),))
    a = list(range(100, 140))
    b = list(range(100, 120)) + list(range(500, 520))  # shares 20 tokens with a
    cache.store(base, a, *_kv(40, 1.0))
    entry, n = cache.longest(base, a)
    assert entry is not None and n == 39  # the last token is always computed
    entry, n = cache.longest(base, b + [7])
    assert n == 20 and torch.equal(_filled(cache, entry, n)[0], torch.full((2, 1, 20, 4), 1.0))
    assert cache.longest(hr, a) == (None, 0)  # the same tokens under another adapter
    assert cache.longest(base, a[: MIN_TOKENS - 1] + [1] * 30) == (None, 0)  # too short a match
    cache.store(hr, a, *_kv(40, 2.0))
    cache.longest(base, a)  # base's entry is now the most recently used
    cache.store(base, b, *_kv(40, 3.0))  # its last 20 positions only; over capacity: hr's entry goes
    assert len(cache) == 2 and cache.bytes == one + one // 2
    assert cache.longest(hr, a) == (None, 0)
    entry, n = cache.longest(base, b + [9])
    k, v = _filled(cache, entry, n)
    assert n == 40 and torch.equal(k[:, :, :20], torch.full((2, 1, 20, 4), 1.0))  # a's, shared
    assert torch.equal(k[:, :, 20:], torch.full((2, 1, 20, 4), 3.0)) and torch.equal(v, k + 1)
    cache.forget("hr")  # nothing of hr left; base entries stay
    assert len(cache) == 2
    cache.store(hr, a, *_kv(40, 2.0))
    cache.forget("hr")
    assert cache.longest(hr, a) == (None, 0)


def _prompt_kv(ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys that tell every position apart: position i holds token ids[i]."""
    k = torch.tensor(ids, dtype=torch.float32)[None, None, :, None].expand(2, 1, len(ids), 4).clone()
    return k, -k


def test_a_prompt_is_stored_as_what_its_longest_stored_prefix_lacks() -> None:
    """A knowledge server's prompts: the same instructions, one of a few passages, a question asked
    once. The instructions are kept once and each passage once; every hit rebuilds exactly the
    positions that were stored; only leaves are evicted, least recently used first."""
    token = 2 * 2 * 1 * 4 * 4  # bytes of one position (k and v, fp32)
    cache = PrefixCache(capacity_bytes=10**6)
    base = AdapterRequest()
    rules, p1, p2 = list(range(1000, 1030)), list(range(2000, 2020)), list(range(3000, 3020))
    q = [list(range(4000 + 100 * i, 4010 + 100 * i)) for i in range(6)]
    prompts = [rules + p1 + q[0], rules + p1 + q[1], rules + p2 + q[2]]
    for ids in prompts:
        cache.store(base, ids, *_prompt_kv(ids))
    assert len(cache) == 3 and cache.bytes == (60 + 10 + 30) * token  # 180 positions stored whole

    for ids, want in [
        (rules + p1 + q[3], 50),
        (prompts[1] + [7], 60),
        (rules + p2 + q[2] + [7], 60),
        (rules + q[4], 30),
    ]:
        entry, n = cache.longest(base, ids)
        assert n == want
        k, v = _filled(cache, entry, n)
        assert torch.equal(k, _prompt_kv(ids[:n])[0]) and torch.equal(v, _prompt_kv(ids[:n])[1])

    cache.store(base, rules + p1, *_prompt_kv(rules + p1))  # held already, inside a stored prompt
    assert len(cache) == 3 and cache.bytes == 100 * token

    # full: the new question evicts the least recently used leaf (q[1]'s), never a parent
    cache.capacity_bytes = cache.bytes
    cache.longest(base, prompts[0] + [7])
    cache.longest(base, prompts[2] + [7])
    cache.store(base, rules + p2 + q[5], *_prompt_kv(rules + p2 + q[5]))
    assert len(cache) == 3 and cache.bytes == 100 * token
    assert cache.longest(base, prompts[1] + [7])[1] == 50  # its question is gone, the passage is not
    entry, n = cache.longest(base, rules + p2 + q[5] + [7])
    assert n == 60 and torch.equal(_filled(cache, entry, n)[0], _prompt_kv(rules + p2 + q[5])[0])

    # a prompt that cannot fit beside the parents it reads is not stored, and evicts nothing
    longer = rules + p1 + q[0] + list(range(9000, 9050))
    cache.store(base, longer, *_prompt_kv(longer))
    assert len(cache) == 3 and cache.bytes == 100 * token and cache.longest(base, longer)[1] == 60

    # an unloaded adapter's entries go, parents and children alike; the base model's stay
    hr = AdapterRequest((("hr@v1", 1.0),))
    cache.capacity_bytes = 10**6
    for ids in prompts:
        cache.store(hr, ids, *_prompt_kv(ids))
    assert len(cache) == 6 and cache.bytes == 200 * token
    held = dict(cache._index)
    cache.forget("hr")
    assert len(cache) == 3 and cache.bytes == 100 * token and cache.longest(hr, prompts[0]) == (None, 0)
    assert len(cache._index) < len(held) and all(
        cache._entries[eid].adapter == base for eid, _ in cache._index.values()
    )


def test_a_prefix_hit_changes_no_answer(lp_home: Path, tiny_base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same requests, one at a time, on an engine with the prefix cache and one without: the
    same greedy tokens and logprobs (to 1e-4), for the base and an adapter, while the cached engine
    skips the shared system prompt, the repeated question, and never reuses another adapter's keys."""
    monkeypatch.setattr(lora_kernel, "load", lambda: None)  # fp32 LoRA weights: one arithmetic for both
    a = make_adapter(tiny_base, "alpha", rank=4, seed=1)
    questions = ["How many days of leave?", "When is payday?", "How many days of leave?"]
    jobs = [(q, m) for m in (a, None) for q in questions]
    params = SamplingParams(temperature=0, logprobs=2)

    def run(engine: Engine) -> list[list]:
        async def one(q: str, model: str | None) -> list:
            messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]
            return [d async for d in engine.generate(messages, params, model, max_tokens=12)]

        async def in_order() -> list[list]:
            return [await one(q, m) for q, m in jobs]

        try:
            return asyncio.run(in_order())
        finally:
            engine.close()

    plain = Engine(str(tiny_base), dtype="fp32", prefix_cache_bytes=0)
    cached = Engine(str(tiny_base), dtype="fp32")
    ref, got = run(plain), run(cached)
    assert plain.stats.cached_prompt_tokens == 0
    prompts = [plain.encode([{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]) for q in questions]
    shared = next(i for i, (x, y) in enumerate(zip(prompts[0], prompts[1], strict=False)) if x != y)
    assert shared > MIN_TOKENS
    # per adapter: the second question reuses the shared part, the repeated one all but its last token
    assert cached.stats.cached_prompt_tokens == 2 * (shared + len(prompts[2]) - 1)
    for (q, m), want, have in zip(jobs, ref, got, strict=True):
        assert [t for d in have for t in d.token_ids] == [t for d in want for t in d.token_ids], (q, m)
        for x, y in zip([lp for d in want for lp in d.logprobs], [lp for d in have for lp in d.logprobs], strict=True):
            assert y.logprob == pytest.approx(x.logprob, abs=1e-4)
