"""Prometheus metrics for `GET /metrics`, labelled per model (the served `name@vN`) and key.

Each server gets its own registry (no process-global state, so tests can run several servers).
Queue depth, running batch and loaded adapters are read from the engine when scraped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from loraplex.engine.protocol import EngineClient

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
RETRIEVAL_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
ITL_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self, engine: EngineClient | None = None):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("loraplex_requests", "Requests answered", ["model", "key", "status"], registry=r)
        self.errors = Counter(
            "loraplex_errors", "Requests answered with an error", ["model", "key", "code"], registry=r
        )
        self.tokens = Counter("loraplex_tokens", "Tokens processed", ["model", "key", "kind"], registry=r)
        self.ttft = Histogram(
            "loraplex_time_to_first_token_seconds",
            "Time to first token",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "loraplex_inter_token_latency_seconds", "Time between tokens", ["model"], buckets=ITL_BUCKETS, registry=r
        )
        self.latency = Histogram(
            "loraplex_request_latency_seconds", "Request latency", ["model"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.retrieval = Histogram(
            "loraplex_retrieval_seconds",
            "An assistant's knowledge-base search and prompt building, per request",
            ["model"],
            buckets=RETRIEVAL_BUCKETS,
            registry=r,
        )
        self.rejected = Counter(
            "loraplex_rejected", "Requests refused by overload or rate limits", ["reason"], registry=r
        )
        self.log_dropped = Counter(
            "loraplex_request_log_dropped",
            "Request-log rows dropped because too many waited for an unreachable database",
            registry=r,
        )
        if engine is not None:
            Gauge("loraplex_queue_depth", "Requests waiting for a batch row", registry=r).set_function(
                lambda: engine.queue_depth()
            )
            Gauge("loraplex_running_batch", "Rows in the running batch", registry=r).set_function(
                lambda: engine.running()
            )
            Gauge("loraplex_loaded_adapters", "Adapters in memory slots", registry=r).set_function(
                lambda: len(engine.adapters.slot_of)
            )
            if engine.kv_cache() is not None:  # the built-in engine's (vLLM reports its own)
                Gauge("loraplex_kv_cache_bytes", "KV cache memory allocated now", registry=r).set_function(
                    lambda: (engine.kv_cache() or (0, 0))[0]
                )
                Gauge("loraplex_kv_cache_budget_bytes", "The KV cache's budget", registry=r).set_function(
                    lambda: (engine.kv_cache() or (0, 0))[1]
                )
            if engine.prefix_cache() is not None:  # serve --prefix-cache-mb 0: none
                Gauge(
                    "loraplex_prefix_cache_bytes", "Keys and values of prompt prefixes kept for reuse", registry=r
                ).set_function(lambda: (engine.prefix_cache() or (0, 0))[0])
                Gauge("loraplex_prefix_cache_budget_bytes", "The prefix cache's budget", registry=r).set_function(
                    lambda: (engine.prefix_cache() or (0, 0))[1]
                )

    def render(self) -> bytes:
        return generate_latest(self.registry)
