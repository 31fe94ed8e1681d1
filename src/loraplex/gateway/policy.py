"""What `serve --config FILE` adds to the built-in engine: upstream routes and output filters.

    # loraplex serve --config serve.yaml
    upstreams:
      - models: ["gpt-4o*", "deepseek-chat"]   # names or glob patterns sent to this endpoint
        base_url: https://api.deepseek.com/v1
        api_key_env: DEEPSEEK_API_KEY          # the upstream's key, read from the environment
    filters:
      - models: ["hr*"]                        # which models' completions it applies to
        block: ["(?i)internal use only"]       # regexes replaced by `replacement`
        redact: [phone, email, id_card, bank_card]
        replacement: "[blocked]"

Filters also work on streams: `StreamFilter` holds back only the tail that could still become a
match (a regex's partial match at the end, via the `regex` package's `partial=True`; a run of
characters personal data is written with), so nothing is split across chunks and the rest flows.
This module does not do HTTP (see upstream.py and api/server.py).
"""

from __future__ import annotations

import os
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Literal

import regex
from pydantic import Field, ValidationError, field_validator

from loraplex.adapters import names
from loraplex.config import Strict, explain, load_yaml
from loraplex.data.validate import PLACEHOLDERS, find_personal_data
from loraplex.errors import UserError

PII = Literal["phone", "email", "id_card", "bank_card", "all"]
# Characters that personal data is written with (see data/validate.py): a trailing run of them may
# still grow into a phone number, card, ID or e-mail, so a stream holds it back.
_EMAIL_RUN = regex.compile(r"[A-Za-z0-9._%+@-]+$")
_DIGIT_RUN = regex.compile(r"[0-9Xx+()\- ]*[0-9][0-9Xx+()\- ]*$")
MAX_HOLD = 256  # a longer run cannot be one match of ours: release it


class Upstream(Strict):
    models: list[str] = Field(min_length=1)
    """Model names or glob patterns routed to this endpoint."""
    base_url: str
    """The endpoint's OpenAI-compatible base URL, ending in /v1."""
    api_key_env: str | None = None
    """Environment variable holding the upstream's API key (keys are never written in the file)."""
    model: str | None = None
    """Model name to send upstream instead of the one the client asked for."""
    timeout: float = Field(300.0, gt=0)
    """Seconds to wait for the upstream."""

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v.rstrip("/")

    def api_key(self) -> str | None:
        if self.api_key_env is None:
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            raise UserError(f"upstream {self.base_url}: environment variable {self.api_key_env} is not set")
        return key


class Filter(Strict):
    models: list[str] = Field(["*"], min_length=1)
    """Model names or glob patterns whose completions this filter rewrites."""
    block: list[str] = []
    """Regular expressions (Python `regex` syntax) replaced by `replacement`."""
    redact: list[PII] = []
    """Personal data to replace with placeholders such as [PHONE]: phone, email, id_card, bank_card, all."""
    replacement: str = "[blocked]"
    """Text that replaces a blocked match."""

    @field_validator("block")
    @classmethod
    def _compile(cls, v: list[str]) -> list[str]:
        for pattern in v:
            try:
                regex.compile(pattern)
            except regex.error as e:
                raise ValueError(f"{pattern!r} is not a valid regular expression: {e}") from None
        return v


class ServeConfig(Strict):
    upstreams: list[Upstream] = []
    """OpenAI-compatible endpoints that answer some model names instead of the built-in engine."""
    filters: list[Filter] = []
    """Output filters on completions, per model."""

    def upstream_for(self, model: str) -> Upstream | None:
        name = names.name_of(model)  # an upstream's own name may hold ':' (`llama3:8b`)
        return next((u for u in self.upstreams if any(fnmatchcase(name, p) for p in u.models)), None)

    def filters_for(self, model: str) -> list[Filter]:
        name = names.loose_names(model)[0]
        return [f for f in self.filters if any(fnmatchcase(name, p) for p in f.models)]


def load_serve_config(path: str | Path | None) -> ServeConfig:
    if path is None:
        return ServeConfig()
    path = Path(path)
    raw, node = load_yaml(path)
    if not isinstance(raw, dict):
        raise UserError(f"{path}:1: the config must be a mapping (upstreams:, filters:)")
    try:
        return ServeConfig.model_validate(raw)
    except ValidationError as e:
        raise UserError(explain(e, str(path), node, ServeConfig)) from None


class OutputFilter:
    """The filters that apply to one model, compiled; `apply(text)` for whole texts, `stream()` for deltas."""

    def __init__(self, filters: list[Filter]):
        self.block = [(regex.compile(p), f.replacement) for f in filters for p in f.block]
        kinds = {k for f in filters for k in f.redact}
        self.redact = set(PLACEHOLDERS) if "all" in kinds else kinds

    def __bool__(self) -> bool:
        return bool(self.block or self.redact)

    def _spans(self, text: str, partial: bool) -> tuple[list[tuple[int, int, str]], int]:
        """Replacements (start, end, new text) fully inside the safe prefix, and that prefix's length."""
        cut = len(text)
        if partial and self.redact:
            for run in (_EMAIL_RUN, _DIGIT_RUN):
                m = run.search(text, max(0, len(text) - MAX_HOLD))
                if m:
                    cut = min(cut, m.start())
        found: list[tuple[int, int, str]] = []
        if self.redact:
            found += [(s, e, PLACEHOLDERS[k]) for s, e, k in find_personal_data(text) if k in self.redact]
        for pattern, replacement in self.block:
            for m in pattern.finditer(text, partial=partial):
                if partial and (m.partial or m.end() == len(text)):
                    cut = min(cut, m.start())  # may still grow: wait for more text
                elif m.end() > m.start():
                    found.append((m.start(), m.end(), replacement))
        spans: list[tuple[int, int, str]] = []
        for s, e, new in sorted(found):
            if spans and s < spans[-1][1]:
                continue  # overlaps an earlier replacement
            spans.append((s, e, new))
        # a replacement that crosses the cut moves the cut to its start
        for s, e, _ in spans:
            if s < cut < e:
                cut = s
        return [sp for sp in spans if sp[1] <= cut], cut

    @staticmethod
    def _replace(text: str, spans: list[tuple[int, int, str]]) -> str:
        out, last = [], 0
        for s, e, new in spans:
            out += [text[last:s], new]
            last = e
        out.append(text[last:])
        return "".join(out)

    def apply(self, text: str) -> str:
        spans, _ = self._spans(text, partial=False)
        return self._replace(text, spans)

    def stream(self) -> StreamFilter:
        return StreamFilter(self)


class StreamFilter:
    """Feed deltas in, get filtered deltas out; `finish()` releases what was held back."""

    def __init__(self, f: OutputFilter):
        self.f = f
        self.pending = ""

    def feed(self, delta: str) -> str:
        self.pending += delta
        spans, cut = self.f._spans(self.pending, partial=True)
        out = self.f._replace(self.pending[:cut], spans)
        self.pending = self.pending[cut:]
        return out

    def finish(self) -> str:
        out, self.pending = self.f.apply(self.pending), ""
        return out
