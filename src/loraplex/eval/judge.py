"""LLM-as-judge: any OpenAI-compatible chat endpoint grades an answer against the reference.

The rubric is fixed (RUBRIC below) and goes into every report, so a score can be read next to the
exact question the judge was asked. The judge replies with JSON {"score": 1-5, "reason": ...};
a reply that is not JSON but names a score ("Score: 4 ...") is accepted, and one without any
score is stored as unparseable with its raw text, never guessed.

A judge that cannot be reached fails the eval before any generation (`check`); a single failed
grading later is recorded on that example and the others go on. This module does not pick which
answers to grade or aggregate the grades (eval/run.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from typing import Any

import httpx

from loraplex.errors import UserError

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
        self.url = url.rstrip("/")
        if not re.match(r"^https?://", self.url):
            raise UserError(f"--judge {url!r}: give the endpoint's base URL, e.g. http://127.0.0.1:8000/v1")
        self.model = model
        key = api_key or os.environ.get("LORAPLEX_JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.concurrency = concurrency

    def describe(self) -> dict[str, Any]:
        # The prompt as the judge reads it: placeholders kept, format-escaped braces undone.
        return {"url": self.url, "model": self.model, "prompt": RUBRIC.replace("{{", "{").replace("}}", "}")}

    def check(self) -> None:
        """Reach the endpoint now and settle the model (the first one it lists when none was named)."""
        try:
            r = httpx.get(f"{self.url}/models", headers=self.headers, timeout=10)
        except httpx.HTTPError as e:
            raise UserError(f"the judge at {self.url} is unreachable: {e}") from None
        if r.status_code in (401, 403):
            raise UserError(f"the judge at {self.url} refused the key ({r.status_code}); set LORAPLEX_JUDGE_API_KEY")
        if r.status_code != 200:
            raise UserError(f"the judge at {self.url} answered GET /models with {r.status_code}: {r.text[:200]}")
        models = [str(m["id"]) for m in r.json().get("data", []) if isinstance(m, dict) and m.get("id")]
        if self.model is None:
            if not models:
                raise UserError(f"the judge at {self.url} lists no models; name one with --judge-model")
            self.model = models[0]
        elif models and self.model not in models:
            raise UserError(f"the judge at {self.url} has no model {self.model!r}; it has {', '.join(models[:10])}")

    async def grade_all(self, items: list[tuple[list[dict[str, str]], str, str]]) -> list[dict[str, Any]]:
        """Grades for (prompt messages, reference, answer) triples, in order."""
        gate = asyncio.Semaphore(self.concurrency)
        async with httpx.AsyncClient(headers=self.headers, timeout=120) as http:

            async def one(prompt: list[dict[str, str]], reference: str, answer: str) -> dict[str, Any]:
                question = "\n".join(f"{m['role']}: {m['content']}" for m in prompt if m["role"] != "system")
                body = {
                    "model": self.model,
                    "messages": [
                        {
                            "role": "user",
                            "content": RUBRIC.format(question=question, reference=reference, answer=answer),
                        }
                    ],
                    "temperature": 0,
                    "max_tokens": 200,
                }
                async with gate:
                    try:
                        r = await http.post(f"{self.url}/chat/completions", json=body)
                        r.raise_for_status()
                        reply = str(r.json()["choices"][0]["message"]["content"] or "")
                    except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
                        return {"score": None, "reason": f"judge request failed: {e}", "raw": None}
                score, reason = parse_grade(reply)
                return {"score": score, "reason": reason, "raw": reply}

            return list(await asyncio.gather(*[one(*item) for item in items]))
