"""`loraplex eval --assistant NAME`: what retrieval adds. One question set, answered twice by the
same assistant (same adapters, system prompt and greedy decoding): with its knowledge base and
without. Reported side by side: answer accuracy (eval/metrics.py's per-answer score: keyword recall
where records name keywords, else ROUGE-L) and the retrieval itself.

Retrieval hit rate @k: is the gold passage among the k passages ranked first? A passage is gold
when it contains every keyword of the record (normalised as in the answer metrics); a record
without keywords needs its whole reference answer in the passage. Also reported: the mean
reciprocal rank of the first gold passage, and how often the relevance threshold let at least one
passage through.

Both sides' answers are submitted to the engine at once, so they decode in the same batches.
This module does not print or render (cli.py does).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loraplex.adapters import registry
from loraplex.assistants import retrieval
from loraplex.assistants import store as assistants
from loraplex.engine.quant import Requested
from loraplex.errors import UserError
from loraplex.eval import metrics
from loraplex.eval.run import EvalExample, read_examples


def is_gold(passage: str, ex: EvalExample) -> bool:
    text = metrics.normalise(passage)
    needles = ex.keywords or (ex.reference,)
    return all(metrics.normalise(k) in text for k in needles)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _summary(answers: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        key: _mean([a["scores"][key] for a in answers if a["scores"][key] is not None])
        for key in ("score", "keywords", "rouge_l", "normalised")
    } | {"refused": sum(a["refused"] for a in answers)}


async def _answer(engine: Any, prepared: list[retrieval.Prepared], adapter: Any, max_tokens: int, progress: Any) -> Any:
    from loraplex.engine.protocol import collect
    from loraplex.engine.sampling import GREEDY

    done = [0]

    async def one(p: retrieval.Prepared) -> dict[str, Any]:
        text: str
        finish: str | None
        if p.refusal is not None:
            text, finish = p.refusal, "stop"
        else:
            a = await collect(engine.generate(p.messages, GREEDY, adapter, max_tokens=max_tokens))
            text, finish = a.text.strip(), a.finish_reason
        done[0] += 1
        if progress is not None:
            progress(done[0], len(prepared))
        return {"text": text, "finish_reason": finish, "refused": p.refusal is not None}

    return await asyncio.gather(*[one(p) for p in prepared])


def evaluate_assistant(
    name: str,
    data: Path,
    k: int | None = None,
    max_tokens: int = 128,
    max_batch: int = 16,
    engine: Any = None,
    progress: Callable[[int, int], None] | None = None,
    quantize: Requested = "none",
) -> dict[str, Any]:
    """Answer `data` with assistant `name` with and without retrieval; score both; hit rate @k
    (k: the assistant's top_k by default)."""
    t0 = time.perf_counter()
    a = assistants.get(name)
    if a.knowledge is None:
        raise UserError(f"assistant {name!r} has no knowledge base: there is no retrieval to evaluate")
    assistants.check(a)
    kn = a.knowledge
    k = k or kn.top_k
    examples = read_examples(Path(data))
    searcher = retrieval.Searcher()

    retrieval_rows: list[dict[str, Any]] = []
    ranks: list[int | None] = []
    for ex in examples:
        ranked = searcher.search(kn.base, ex.question, k, 0.0)  # the ranking alone, before the threshold
        rank = next((i for i, h in enumerate(ranked, 1) if is_gold(h.text, ex)), None)
        ranks.append(rank)
        retrieval_rows.append(
            {
                "rank": rank,
                "passed_threshold": sum(h.relevance >= kn.min_relevance for h in ranked),
                "top": [{"document": Path(h.source).name, "chunk": h.ord, "relevance": h.relevance} for h in ranked],
            }
        )

    from loraplex.engine.engine import Engine
    from loraplex.models.load import resolve_base

    base_id = None
    if a.adapters:
        base_id = registry.resolve(a.adapters[0].ref).manifest().get("base_model", {}).get("id")
    own_engine = engine is None
    engine = engine or Engine(resolve_base(base_id), max_batch=max_batch, max_loaded_adapters=2, quantize=quantize)
    try:
        room = engine.max_model_len - max_tokens

        def fits(msgs: list[dict[str, str]]) -> bool:
            return len(engine.encode(msgs)) <= room

        with_kb = [retrieval.prepare(a, ex.prompt, searcher, True, fits) for ex in examples]
        without = [retrieval.prepare(a, ex.prompt, searcher, False) for ex in examples]

        adapter = engine.adapters.resolve(a.spec)

        async def both() -> Any:
            total = 2 * len(examples)
            count = [0]

            def tick(_: int, __: int) -> None:
                count[0] += 1
                if progress is not None:
                    progress(count[0], total)

            return await asyncio.gather(
                _answer(engine, with_kb, adapter, max_tokens, tick), _answer(engine, without, adapter, max_tokens, tick)
            )

        on, off = asyncio.run(both())
    finally:
        searcher.close()
        if own_engine:
            engine.close()

    rows = []
    for ex, r, p, x, y in zip(examples, retrieval_rows, with_kb, on, off, strict=True):
        for ans in (x, y):
            sc = metrics.score(ans["text"], ex.reference, list(ex.keywords), ans["finish_reason"] == "stop")
            ans["scores"] = {**asdict(sc), "score": sc.score}
        rows.append(
            {
                "source": ex.source,
                "question": ex.question,
                "reference": ex.reference,
                "keywords": list(ex.keywords),
                "retrieval": r | {"used": [s.json() for s in p.sources]},
                "with_retrieval": x,
                "without_retrieval": y,
            }
        )
    n = len(examples)
    return {
        "assistant": name,
        "knowledge": kn.base,
        "adapters": a.model or "(base model)",
        "data": {"path": str(Path(data).resolve()), "examples": n},
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "k": k,
        "min_relevance": kn.min_relevance,
        "retrieval": {
            "hit_rate": sum(r is not None for r in ranks) / n,
            "mrr": sum(1 / r for r in ranks if r) / n,
            "answered_with_passages": sum(bool(p.sources) for p in with_kb) / n,
        },
        "summary": {"with_retrieval": _summary(on), "without_retrieval": _summary(off)},
        "timing": {"total_s": round(time.perf_counter() - t0, 2)},
        "examples": rows,
    }
