"""LLM-as-judge: any OpenAI-compatible chat endpoint grades an answer against the reference.

The rubric is fixed (RUBRIC below) and goes into every report, so a score can be read next to the
exact question the judge was asked. The judge replies with JSON {"score": 1-5, "reason": ...},
enforced as structured output (GRADE_FORMAT) where the endpoint supports it; otherwise a reply
that is not JSON but names a score ("Score: 4 ...") is accepted, and one without any score is
stored as unparseable with its raw text, never guessed.

A judge that cannot be reached fails the eval before any generation (`check`); a single failed
grading later is recorded on that example and the others go on. This module does not pick which
answers to grade or aggregate the grades (eval/run.py).
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import httpx

from loraplex.endpoint import Endpoint

RUBRIC = """You are grading an assistant's answer against a reference answer written by an expert.

Question:
{question}

Reference answer:
{reference}

Assistant's answer:
{answer}

Grade how well the assistant's answer agrees with the reference answer:
5 = states the same facts as the reference, nothing wrong added;
4 = the same key facts, minor omissions or extra wording;
3 = partly right: some key facts are missing or unclear;
2 = mostly wrong or missing the key fact, with something relevant;
1 = wrong, unrelated, or no answer.
Judge facts, not style or language. Reply with JSON only: {{"score": <1-5>, "reason": "<one sentence>"}}"""

# The grade as a JSON schema (OpenAI's structured output). A judge that enforces it (vLLM,
# `loraplex serve`, most providers) always replies with a parseable grade and stops when the object
# closes, instead of writing prose up to max_tokens (a 135M judge did both: 45 s of a test went to
# 8 gradings). One that rejects it (400/422: no structured output, or a schema keyword it lacks) is
# asked the same prompt without it, which the parser below reads as before.
GRADE_FORMAT: dict[str, Any] = {
    "type": "json_schema",
    "json_schema": {
        "name": "grade",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {
                "score": {"type": "integer", "enum": [1, 2, 3, 4, 5]},
                "reason": {"type": "string", "maxLength": 200},
            },
            "required": ["score", "reason"],
            "additionalProperties": False,
        },
    },
}

_JSON = re.compile(r"\{.*?\}", re.S)
_SCORE = re.compile(r"(?:score|评分|分数)\D{0,5}([1-5])\b|^\s*([1-5])\b", re.I | re.M)


def parse_grade(reply: str) -> tuple[int | None, str]:
    """(score 1-5 or None, reason) from a judge's reply."""
    for m in _JSON.finditer(reply):
        try:
            obj = json.loads(m.group(0))
        except ValueError:
            continue
        s = obj.get("score") if isinstance(obj, dict) else None
        if isinstance(s, int | float | str) and str(s).strip() in {"1", "2", "3", "4", "5"}:
            return int(str(s).strip()), str(obj.get("reason", "")).strip()
    bare = _SCORE.search(reply)
    if bare:
        return int(bare.group(1) or bare.group(2)), reply.strip()[:500]
    return None, f"unparseable judge reply: {reply.strip()[:300]!r}"


class Judge:
    """An OpenAI-compatible endpoint (`url` ends in /v1) and the model on it that grades."""

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None, concurrency: int = 8):
        keys = ("LORAPLEX_JUDGE_API_KEY", "OPENAI_API_KEY")
        self.endpoint = Endpoint(url, model, "the judge", "--judge", keys, api_key)
        self.concurrency = concurrency
        self.structured = True  # ask for GRADE_FORMAT until the endpoint refuses it once

    @property
    def url(self) -> str:
        return self.endpoint.url

    @property
    def model(self) -> str | None:
        return self.endpoint.model

    def describe(self) -> dict[str, Any]:
        # The prompt as the judge reads it: placeholders kept, format-escaped braces undone.
        return {"url": self.url, "model": self.model, "prompt": RUBRIC.replace("{{", "{").replace("}}", "}")}

    def check(self) -> None:
        """Reach the endpoint now and settle the model (the first one it lists when none was named)."""
        self.endpoint.check()

    async def grade_all(self, items: list[tuple[list[dict[str, str]], str, str]]) -> list[dict[str, Any]]:
        """Grades for (prompt messages, reference, answer) triples, in order."""
        gate = asyncio.Semaphore(self.concurrency)
        async with httpx.AsyncClient(headers=self.endpoint.headers, timeout=120) as http:

            async def one(prompt: list[dict[str, str]], reference: str, answer: str) -> dict[str, Any]:
                question = "\n".join(f"{m['role']}: {m['content']}" for m in prompt if m["role"] != "system")
                content = RUBRIC.format(question=question, reference=reference, answer=answer)
                async with gate:
                    try:
                        reply = await self._ask(http, content)
                    except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
                        return {"score": None, "reason": f"judge request failed: {e}", "raw": None}
                score, reason = parse_grade(reply)
                return {"score": score, "reason": reason, "raw": reply}

            return list(await asyncio.gather(*[one(*item) for item in items]))

    async def _ask(self, http: httpx.AsyncClient, content: str) -> str:
        if self.structured:
            try:
                return await self.endpoint.chat(
                    http, content, temperature=0, max_tokens=200, response_format=GRADE_FORMAT
                )
            except httpx.HTTPStatusError as e:
                if e.response.status_code not in (400, 422):
                    raise
                self.structured = False
        return await self.endpoint.chat(http, content, temperature=0, max_tokens=200)
