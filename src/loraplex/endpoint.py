"""An OpenAI-compatible chat endpoint that loraplex calls as a client: the eval judge, the
paraphrase teacher. One place for the URL check, the key, the model choice and the error messages.

This module does not decide what to ask (eval/judge.py, data/paraphrase.py).
"""

from __future__ import annotations

import os
import re
from typing import Any

import httpx

from loraplex.errors import UserError


class Endpoint:
    """`url` ends in /v1; `role` names it in errors ("the judge", "the teacher"); the key comes from
    the first of `key_envs` that is set."""

    def __init__(
        self, url: str, model: str | None, role: str, option: str, key_envs: tuple[str, ...], api_key: str | None = None
    ):
        self.url, self.model, self.role, self.option = url.rstrip("/"), model, role, option
        if not re.match(r"^https?://", self.url):
            raise UserError(f"{option} {url!r}: give the endpoint's base URL, e.g. http://127.0.0.1:8000/v1")
        key = api_key or next((os.environ[k] for k in key_envs if os.environ.get(k)), None)
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.key_env = key_envs[0]

    def check(self) -> None:
        """Reach the endpoint now and settle the model (the first one it lists when none was named)."""
        try:
            r = httpx.get(f"{self.url}/models", headers=self.headers, timeout=10)
        except httpx.HTTPError as e:
            raise UserError(f"{self.role} at {self.url} is unreachable: {e}") from None
        if r.status_code in (401, 403):
            raise UserError(f"{self.role} at {self.url} refused the key ({r.status_code}); set {self.key_env}")
        if r.status_code != 200:
            raise UserError(f"{self.role} at {self.url} answered GET /models with {r.status_code}: {r.text[:200]}")
        models = [str(m["id"]) for m in r.json().get("data", []) if isinstance(m, dict) and m.get("id")]
        if self.model is None:
            if not models:
                raise UserError(f"{self.role} at {self.url} lists no models; name one with {self.option}-model")
            self.model = models[0]
        elif models and self.model not in models:
            raise UserError(f"{self.role} at {self.url} has no model {self.model!r}; it has {', '.join(models[:10])}")

    async def chat(self, http: httpx.AsyncClient, content: str, **params: Any) -> str:
        """The reply to one user message (raises httpx.HTTPError, KeyError, ValueError on failure)."""
        body = {"model": self.model, "messages": [{"role": "user", "content": content}], **params}
        r = await http.post(f"{self.url}/chat/completions", json=body)
        r.raise_for_status()
        return str(r.json()["choices"][0]["message"]["content"] or "")
