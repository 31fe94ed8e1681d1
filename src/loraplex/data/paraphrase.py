"""Question paraphrases for training: several rewordings of each training question, written by a
"teacher" model, so the adapter sees each fact asked in many ways (answers stay verbatim).

    questions -> teacher (an OpenAI-compatible endpoint: another `loraplex serve`, vLLM, a provider;
                 or the base model itself, locally) -> parse one rewording per line -> clean
              -> $LORAPLEX_HOME/paraphrases/<key>.jsonl (reviewable, editable; reused as it is)

The cache key is the sha256 of the questions and answers sent, the teacher and the prompt, so the
same data and teacher never ask twice, and an edited file is what the next run trains on. Only
the records given are sent: the recipe calls this after the eval split is taken out, so held-out
questions never reach the teacher (tests/test_paraphrase.py).

This module does not train or build examples (train/sft_lora.py, assistants/faq.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraplex.errors import UserError
from loraplex.paths import home

PROMPT = """Rewrite the question below in {n} different ways that real users might ask it: formal, \
casual, very short, with a small typo, mixing Chinese and English, or with the words in another order. \
Keep the exact meaning and the language of the original. Do not answer it. \
Write one rewrite per line, each ending with a question mark, and nothing else.

Question: {question}
(What it asks about, for meaning only: {answer})"""
_BULLET = re.compile(r"^\s*(?:[-*•]|\d+[.)、:]|\(\d+\))\s*")


@dataclass(frozen=True)
class Teacher:
    url: str  # "" : the base model, locally
    model: str | None
    api_key_env: str

    def describe(self) -> str:
        return f"{self.model or 'its first model'} at {self.url}" if self.url else "the base model (local)"


def clean(reply: str, question: str, n: int) -> list[str]:
    """The rewordings in a reply: one per line, bullets and quotes stripped; the original, repeats,
    lines that are not questions (a weak teacher answers or comments instead: SmolLM2-135M wrote
    "The probation period is 4 years." for "How long is the probation period?") and runaway lines
    dropped."""
    out: list[str] = []
    seen = {question.strip().lower()}
    for line in reply.splitlines():
        text = _BULLET.sub("", line).strip().strip("\"'“”‘’「」").strip()
        if not text.endswith(("?", "？")) or text.lower() in seen or len(text) > 3 * len(question) + 20:
            continue
        if text.lower().startswith(("question:", "rewrite", "here are", "以下", "问题：")):
            continue
        seen.add(text.lower())
        out.append(text)
        if len(out) == n:
            break
    return out


def cache_path(pairs: list[tuple[str, str]], teacher: Teacher, n: int, base_id: str) -> Path:
    payload = json.dumps(
        {
            "pairs": pairs,
            "teacher": [teacher.url, teacher.model or "", base_id if not teacher.url else ""],
            "n": n,
            "prompt": PROMPT,
        },
        ensure_ascii=False,
        sort_keys=True,
    )
    return home() / "paraphrases" / f"{hashlib.sha256(payload.encode()).hexdigest()[:16]}.jsonl"


def paraphrases(
    pairs: list[tuple[str, str]],
    teacher: Teacher,
    n: int,
    base: Any,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[list[str]], Path, bool]:
    """Up to `n` rewordings of each (question, answer) pair, the reviewable file they are kept in,
    and whether that file was already there (nothing was asked)."""
    path = cache_path(pairs, teacher, n, base.id)
    if path.is_file():
        return _read(path, pairs), path, True
    prompts = [PROMPT.format(n=n, question=q, answer=a) for q, a in pairs]
    replies = _ask_remote(teacher, prompts, progress) if teacher.url else _ask_local(base, prompts, progress)
    found = [clean(r, q, n) for r, (q, _) in zip(replies, pairs, strict=True)]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".jsonl")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        for (q, a), ps in zip(pairs, found, strict=True):
            f.write(json.dumps({"question": q, "answer": a, "paraphrases": ps}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)  # never half-written: a killed run asks again
    return found, path, False


def _read(path: Path, pairs: list[tuple[str, str]]) -> list[list[str]]:
    by_question: dict[str, list[str]] = {}
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            rec = json.loads(line)
            ps = rec["paraphrases"]
            if not isinstance(ps, list) or not all(isinstance(p, str) for p in ps):
                raise TypeError("paraphrases must be a list of strings")
            by_question[str(rec["question"])] = [p.strip() for p in ps if p.strip()]
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(
                f"{path}:{i}: not a paraphrase record ({e}); fix it or delete the file to ask again"
            ) from None
    return [by_question.get(q, []) for q, _ in pairs]


def _ask_remote(teacher: Teacher, prompts: list[str], progress: Callable[[int, int], None] | None) -> list[str]:
    import httpx

    from loraplex.endpoint import Endpoint

    ep = Endpoint(teacher.url, teacher.model, "the paraphrase teacher", "paraphrase.teacher", (teacher.api_key_env,))
    ep.check()  # an unreachable teacher fails now, before anything else

    async def run() -> list[str]:
        gate = asyncio.Semaphore(8)
        done = [0]
        async with httpx.AsyncClient(headers=ep.headers, timeout=120) as http:

            async def one(prompt: str) -> str:
                async with gate:
                    try:
                        reply = await ep.chat(http, prompt, temperature=0.8, max_tokens=300)
                    except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
                        raise UserError(f"the paraphrase teacher at {ep.url} failed: {e}") from None
                done[0] += 1
                if progress:
                    progress(done[0], len(prompts))
                return reply

            return list(await asyncio.gather(*[one(p) for p in prompts]))

    return asyncio.run(run())


def _ask_local(base: Any, prompts: list[str], progress: Callable[[int, int], None] | None) -> list[str]:
    from loraplex.engine.engine import Engine
    from loraplex.engine.protocol import collect
    from loraplex.engine.sampling import SamplingParams

    engine = Engine(base, max_batch=16, max_loaded_adapters=1)
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=0)
    done = [0]

    async def one(prompt: str) -> str:
        a = await collect(engine.generate([{"role": "user", "content": prompt}], params, "", max_tokens=200))
        done[0] += 1
        if progress:
            progress(done[0], len(prompts))
        return a.text

    async def run() -> list[str]:
        return list(await asyncio.gather(*[one(p) for p in prompts]))

    try:
        return asyncio.run(run())
    finally:
        engine.close()
