"""The gateway: what a company deployment puts between an HTTP request and the engine.

One `Gateway` per server holds the key store, rate limiter, request log, metrics, recent
responses (for feedback), the serve config (upstreams, filters) and the overload bound. Each
request gets a `Call` that collects what the log row needs and is closed exactly once, whatever
happens (answered, refused, failed, or the client went away).

This module does not parse OpenAI bodies or run the model (see api/ and engine/).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from prometheus_client import Gauge

from loraplex.gateway import db, keys
from loraplex.gateway.feedback import Answered, RecentResponses
from loraplex.gateway.keys import Key
from loraplex.gateway.limits import RateLimiter, SharedRateLimiter, Usage
from loraplex.gateway.log import RequestLog, RequestRow
from loraplex.gateway.metrics import Metrics
from loraplex.gateway.policy import OutputFilter, ServeConfig

if TYPE_CHECKING:
    from loraplex.engine.protocol import EngineClient


class Overloaded(Exception):
    """More requests in flight than the server queues (a 503 with Retry-After)."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.message, self.retry_after = message, retry_after


@dataclass
class Call:
    """One request's record, from arrival to the log row."""

    gateway: Gateway
    endpoint: str
    id: str
    key: Key | None = None
    model: str | None = None
    served: str | None = None
    t0: float = field(default_factory=time.perf_counter)
    t_first: float | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0  # of the prompt tokens, those the engine's prefix cache held
    completion_tokens: int = 0
    finish_reason: str | None = None
    usage: Usage | None = None
    slots: int = 0  # requests this call holds against the overload bound
    prompt: Any = None
    answers: list[str] | None = None
    closed: bool = False

    def first_token(self) -> None:
        if self.t_first is None:
            self.t_first = time.perf_counter()

    def close(self, status: int, error: str | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        g = self.gateway
        g.inflight -= self.slots
        if self.usage is not None:
            self.usage.add(self.completion_tokens)
        key = self.key.name if self.key else None
        label_model, label_key = self.served or self.model or "-", key or "-"
        now = time.perf_counter()
        latency = now - self.t0
        m = g.metrics
        m.requests.labels(label_model, label_key, str(status)).inc()
        if status >= 400:
            m.errors.labels(label_model, label_key, error or str(status)).inc()
        else:
            m.tokens.labels(label_model, label_key, "prompt").inc(self.prompt_tokens)
            m.tokens.labels(label_model, label_key, "cached_prompt").inc(self.cached_tokens)
            m.tokens.labels(label_model, label_key, "completion").inc(self.completion_tokens)
            m.latency.labels(label_model).observe(latency)
            if self.t_first is not None:
                m.ttft.labels(label_model).observe(self.t_first - self.t0)
        text = g.log_text and status < 400
        g.log.write(
            RequestRow(
                id=self.id,
                time=time.time(),
                key=key,
                model=self.model,
                served=self.served,
                endpoint=self.endpoint,
                status=status,
                error=error,
                prompt_tokens=self.prompt_tokens,
                completion_tokens=self.completion_tokens,
                ttft_ms=None if self.t_first is None else (self.t_first - self.t0) * 1000,
                latency_ms=latency * 1000,
                finish_reason=self.finish_reason,
                prompt=json.dumps(self.prompt, ensure_ascii=False) if text and self.prompt is not None else None,
                response=json.dumps(self.answers, ensure_ascii=False) if text and self.answers is not None else None,
            )
        )
        if status < 400 and self.answers is not None and self.served:
            messages = self.prompt if isinstance(self.prompt, list) else [{"role": "user", "content": str(self.prompt)}]
            g.recent.put(self.id, Answered(key, self.served, messages, tuple(self.answers)))


class Gateway:
    def __init__(
        self,
        *,
        auth: bool | None = None,
        config: ServeConfig | None = None,
        database: Path | str | None = None,
        log_text: bool = False,
        max_pending: int = 64,
        engine: EngineClient | None = None,
    ):
        self.db = db.connect(database)
        self.auth = keys.any_active(self.db) if auth is None else auth
        self.config = config or ServeConfig()
        self.metrics = Metrics(engine)
        self.log = RequestLog(self.db, dropped=self.metrics.log_dropped)
        Gauge(
            "loraplex_request_log_pending", "Request-log rows waiting for the database", registry=self.metrics.registry
        ).set_function(lambda: self.log.pending)
        self.log_text = log_text
        # one front door per database on SQLite; on PostgreSQL, limits hold across all of them
        self.limiter = SharedRateLimiter(self.db) if self.db.dialect == "postgresql" else RateLimiter()
        self.recent = RecentResponses()
        self.max_pending = max_pending
        self.inflight = 0
        self._filters: dict[tuple[int, ...], OutputFilter] = {}
        self._http: httpx.AsyncClient | None = None

    @property
    def http(self) -> httpx.AsyncClient:
        """The client for upstream endpoints, made in the event loop on first use."""
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=None)
        return self._http

    def call(self, endpoint: str, prefix: str) -> Call:
        return Call(self, endpoint, f"{prefix}-{uuid.uuid4().hex[:24]}")

    def authenticate(self, authorization: str | None) -> Key | None:
        """The request's key (None when auth is off); raises keys.AuthError."""
        if not self.auth:
            return None
        return keys.authenticate(self.db, authorization)

    def reserve(self, call: Call, n: int) -> None:
        """Hold `n` places against the overload bound, or raise Overloaded."""
        if self.inflight + n > self.max_pending:
            self.metrics.rejected.labels("overload").inc()
            raise Overloaded(
                f"the server is at capacity ({self.inflight} requests in flight, at most {self.max_pending}); "
                "retry shortly",
                retry_after=2,
            )
        self.inflight += n
        call.slots += n

    def set_config(self, config: ServeConfig) -> None:
        """Swap upstream routes and filters (requests already running keep what they started with)."""
        self.config, self._filters = config, {}

    def output_filter(self, model: str) -> OutputFilter:
        # cached by which filters apply, not by the model name a client sent: names are client
        # input, and a cache keyed by them grows with every new one
        chosen = self.config.filters_for(model)
        key = tuple(id(f) for f in chosen)
        if key not in self._filters:
            self._filters[key] = OutputFilter(chosen)
        return self._filters[key]

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
        self.log.close()
        self.limiter.close()
        self.db.close()
