"""The engine seam (`generate`, `encode`, adapters) answered by vLLM, or any server with its API, over HTTP.

`serve --engine vllm` puts this in place of the built-in Engine, so keys, per-adapter access,
assistants and retrieval, output filters, metering, feedback and the web UI run unchanged in the
front door; only the forward passes move. What goes over the wire:

* `generate` sends the prompt as token ids (rendered here with the base's chat template, exactly
  as training saw it) to `/v1/completions` with `model` = the exact version `name@vN`, streams the
  answer back with `return_tokens_as_token_ids` and `logprobs`, and yields the same `Delta`s as the
  built-in engine (token ids, logprobs, finish reason, usage).
* Adapters are loaded with vLLM's runtime API (`/v1/load_lora_adapter`, `/v1/unload_lora_adapter`;
  vLLM needs VLLM_ALLOW_RUNTIME_LORA_UPDATING=True). A sync thread keeps the engine in step with
  the registry: the latest version and every alias target of each served adapter are loaded, and a
  version nothing points at any more is unloaded once idle. A request for a version the engine
  does not have (a pinned old version, a restarted engine) loads it first, so sync only keeps
  things warm; correctness never waits for it.
* A composition (`a:0.7+b:0.3`) has no vLLM equivalent: it is a 400 that names the built-in engine.

This module does not start vLLM (vllm_process.py does) and does not render OpenAI JSON (api/ does).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import threading
import time
import warnings
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import httpx
from httpx_sse import EventSource, SSEError

from loraplex.adapters import names, registry
from loraplex.adapters.compat import check_compatible
from loraplex.adapters.names import InvalidModelName, ModelNotFound, ModelSpec
from loraplex.engine.adapter_cache import resolve_model
from loraplex.engine.lora import AdapterRequest
from loraplex.engine.protocol import Delta, EngineClosed, check_length, encode_prompt
from loraplex.engine.sampling import SamplingParams, TokenLogprob
from loraplex.engine.vllm_process import VllmProcess, check_layout, pointed_at
from loraplex.errors import UpstreamError, UserError
from loraplex.models.load import BaseRef, load_tokenizer, resolve_base

log = logging.getLogger(__name__)
_TOKEN_ID = re.compile(r"^token_id:(-?\d+)$")


class RemoteAdapters:
    """What the API reads of AdapterCache: `resolve`, `allowed`, `slot_of` (loaded), `describe`."""

    def __init__(self, base_names: tuple[str, ...], allowed: set[str] | None):
        self.base_names, self.allowed = base_names, allowed
        self.slot_of: dict[str, int] = {}  # versions the engine has, in load order
        self.in_use: Counter[str] = Counter()
        self.last_used: dict[str, float] = {}
        self.pinned: set[str] = set()
        self._ids = iter(range(1, 1 << 62))

    def resolve(self, model: str | ModelSpec) -> AdapterRequest:
        req = resolve_model(model, self.base_names, self.allowed)
        if len(req.parts) > 1 or (req.parts and req.parts[0][1] != 1.0):
            raise InvalidModelName(
                f"model {str(model)!r}: vLLM serves one adapter at weight 1 per request; weighted adapters and "
                "compositions need the built-in engine (loraplex serve --engine builtin)"
            )
        return req

    def mark_loaded(self, key: str) -> None:
        self.slot_of.setdefault(key, next(self._ids))

    def describe(self) -> list[dict[str, Any]]:
        return [
            {"key": k, "slot": s, "in_use": self.in_use[k], "pinned": k in self.pinned} for k, s in self.slot_of.items()
        ]


class RemoteEngine:
    threads = 0  # no model on this host's CPU (Engine.threads)

    def __init__(
        self,
        url: str,
        base: str | BaseRef | None = None,
        *,
        adapters: list[str] | None = None,
        pin: list[str] | None = None,
        preloaded: list[str] | None = None,
        max_model_len: int | None = None,
        max_batch: int = 16,
        api_key: str | None = None,
        sync_interval: float = 10.0,
        idle_unload: float = 300.0,
        timeout: float = 600.0,
        process: VllmProcess | None = None,
    ):
        self.url = url.rstrip("/")
        self.base = base if isinstance(base, BaseRef) else resolve_base(base)
        self.tokenizer = load_tokenizer(self.base)
        cfg = json.loads((self.base.path / "config.json").read_text(encoding="utf-8"))
        self.vocab_size = int(cfg["vocab_size"])
        self.device, self.dtype = "remote", None
        self.max_batch = max_batch
        self.process = process
        self.idle_unload = idle_unload
        self.adapters = RemoteAdapters(
            names.base_names(self.base.id), {names.parse_ref(a).name for a in adapters} if adapters else None
        )
        for key in preloaded or ():
            self.adapters.mark_loaded(key)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = httpx.Timeout(timeout, connect=10.0)
        self._headers = headers
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=self._timeout)
        self._aclient: httpx.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()  # loads and unloads, from requests and the sync thread
        self._closing = False
        self._in_flight = 0
        self._reported: set[str] = set()

        served = self._models()
        bases = [m for m in served if not m.get("parent") and m.get("kind") != "embedding"]
        if not bases:
            raise UserError(f"the engine at {self.url} lists no base model in /v1/models")
        self.upstream_base = str(bases[0]["id"])
        limit = int(bases[0].get("max_model_len") or cfg.get("max_position_embeddings") or 4096)
        self.max_model_len = min(max_model_len or limit, limit)
        for model in pin or ():
            self.load_adapter(model, pin=True)
        self.sync()
        self._stop = threading.Event()
        self._sync_thread = threading.Thread(target=self._sync_loop, args=(sync_interval,), daemon=True)
        self._sync_thread.start()

    # ------------------------------------------------------------------ what the API calls

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def closing(self) -> bool:
        return self._closing

    def kv_cache(self) -> tuple[int, int] | None:
        return None  # vLLM's own (its /metrics: vllm:gpu_cache_usage_perc)

    def prefix_cache(self) -> tuple[int, int] | None:
        return None  # vLLM's prefix cache lives in its KV cache blocks (its /metrics: vllm:prefix_cache_*)

    def queue_depth(self) -> int:
        return 0  # the engine's queue is vLLM's own (its /metrics: vllm:num_requests_waiting)

    def running(self) -> int:
        return self._in_flight

    def encode(self, prompt: str | list[dict[str, Any]] | list[int]) -> list[int]:
        return encode_prompt(self.tokenizer, prompt)

    def check_length(self, prompt_len: int, max_tokens: int | None) -> int:
        return check_length(self.max_model_len, prompt_len, max_tokens)

    async def generate(
        self,
        prompt: str | list[dict[str, Any]] | list[int],
        params: SamplingParams,
        adapter: AdapterRequest | str | None = None,
        max_tokens: int | None = None,
    ) -> AsyncIterator[Delta]:
        if self._closing:
            raise EngineClosed("the server is shutting down")
        req = adapter if isinstance(adapter, AdapterRequest) else self.adapters.resolve(adapter or "")
        prompt_ids = self.encode(prompt)
        if not prompt_ids:
            raise UserError("the prompt is empty")
        limit = self.check_length(len(prompt_ids), max_tokens)
        key = req.key
        if key and key not in self.adapters.slot_of:
            await asyncio.to_thread(self._load, registry.resolve(key))
        body = _body(prompt_ids, params, key or self.upstream_base, limit)
        if params.prompt_logprobs is not None:
            # vLLM returns a prompt's logprobs with `echo` in one JSON answer; at least one token is
            # generated (max_tokens 0 is dropped here), the prompt comes back first
            body.update(stream=False, echo=True, max_tokens=max(limit, 1))
            body["logprobs"] = max(params.logprobs or 0, params.prompt_logprobs)
            body.pop("stream_options")
        client = self._async_client()
        self._in_flight += 1
        self.adapters.in_use[key] += 1
        try:
            for attempt in range(2):
                async with client.stream("POST", "/completions", json=body) as resp:
                    if resp.status_code == 404 and key and attempt == 0:
                        # the engine lost this version (restarted, or unloaded elsewhere): load, retry once
                        await resp.aread()
                        self.adapters.slot_of.pop(key, None)
                        await asyncio.to_thread(self._load, registry.resolve(key))
                        continue
                    if resp.status_code != 200:
                        await resp.aread()
                        raise _error(resp, self.url)
                    if body.get("echo"):
                        yield _echoed(json.loads(await resp.aread()), prompt_ids, params, limit, self.url)
                        return
                    async for delta in _deltas(resp, len(prompt_ids), self.url, params.logprobs):
                        yield delta
                    return
        except (httpx.HTTPError, SSEError) as e:
            raise UpstreamError(502, f"engine {self.url} failed: {e}", "engine_unavailable") from None
        finally:
            self._in_flight -= 1
            self.adapters.in_use[key] -= 1
            self.adapters.last_used[key] = time.monotonic()

    def load_adapter(self, model: str, pin: bool = False) -> str:
        req = self.adapters.resolve(model)
        if not req.parts:
            return ""
        key = req.key
        self._load(registry.resolve(key))
        if pin:
            self.adapters.pinned.add(key)
        return key

    def unload_adapter(self, name: str) -> list[str]:
        """Unload every idle version of `name` from the engine (busy ones stay until sync finds them idle)."""
        gone = []
        for key in [k for k in self.adapters.slot_of if names.name_of(k) == name]:
            self.adapters.pinned.discard(key)
            if self.adapters.in_use[key] == 0:
                self._unload(key)
                gone.append(key)
        return gone

    def drain(self, timeout: float) -> None:
        self._closing = True  # new requests get 503; the engine finishes what it has

    def close(self, timeout: float = 10.0) -> None:
        self._closing = True
        deadline = time.monotonic() + timeout
        while self._in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        if hasattr(self, "_stop"):
            self._stop.set()
        if self._aclient is not None and self._loop is not None and self._loop.is_running():
            with contextlib.suppress(Exception):  # closing a connection pool on the way out
                asyncio.run_coroutine_threadsafe(self._aclient.aclose(), self._loop).result(5)
        self._http.close()
        if self.process is not None:
            self.process.stop()

    # ------------------------------------------------------------------ registry sync

    def wanted(self) -> dict[str, registry.AdapterRef]:
        """Versions the engine should have: each served adapter's latest and alias targets, and pins."""
        out = {ref.id: ref for ref in pointed_at(self.adapters.allowed) if self._servable(ref)}
        for key in self.adapters.pinned:
            out.setdefault(key, registry.resolve(key))
        return out

    def sync(self) -> None:
        """Load what the registry points at now; unload idle versions nothing points at."""
        wanted = self.wanted()
        for key, ref in wanted.items():
            if key not in self.adapters.slot_of:
                try:
                    self._load(ref)
                except (UserError, UpstreamError) as e:
                    self._report(key, f"cannot load {key} into the engine: {e}")
        now = time.monotonic()
        for key in list(self.adapters.slot_of):
            idle = now - self.adapters.last_used.get(key, 0.0) >= self.idle_unload
            if key not in wanted and self.adapters.in_use[key] == 0 and idle:
                self._unload(key)

    def _sync_loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.sync()
            except Exception as e:  # noqa: BLE001 - the next round tries again; requests load on demand
                log.warning("registry sync with %s failed: %s", self.url, e)

    def _servable(self, ref: registry.AdapterRef) -> bool:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # same shapes, other weights: served, as by the built-in engine
                check_compatible(ref, self.base)
        except (UserError, OSError, ValueError) as e:
            self._report(ref.id, str(e))
            return False
        problems = check_layout(ref)
        if problems:
            self._report(ref.id, "; ".join(problems))
        return not problems

    def _report(self, key: str, message: str) -> None:
        if key not in self._reported:  # once per version, not every sync round
            self._reported.add(key)
            log.warning("%s", message)

    def _load(self, ref: registry.AdapterRef) -> None:
        problems = check_layout(ref)
        if problems:
            raise UserError("; ".join(problems))
        with self._lock:
            if ref.id in self.adapters.slot_of:
                return
            resp = self._post("/load_lora_adapter", {"lora_name": ref.id, "lora_path": str(ref.path)})
            if resp.status_code != 200 and not (resp.status_code == 400 and "already" in resp.text):
                raise _error(resp, self.url)
            self.adapters.mark_loaded(ref.id)

    def _unload(self, key: str) -> None:
        with self._lock:
            resp = self._post("/unload_lora_adapter", {"lora_name": key})
            if resp.status_code not in (200, 404):
                raise _error(resp, self.url)
            self.adapters.slot_of.pop(key, None)

    def _post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        try:
            return self._http.post(path, json=body)
        except httpx.HTTPError as e:
            raise UpstreamError(502, f"engine {self.url} is unreachable: {e}", "engine_unavailable") from None

    def _models(self) -> list[dict[str, Any]]:
        try:
            resp = self._http.get("/models")
        except httpx.HTTPError as e:
            raise UserError(f"cannot reach the engine at {self.url}: {e}") from None
        if resp.status_code != 200:
            raise UserError(f"the engine at {self.url} answered /models with {resp.status_code}: {resp.text[:300]}")
        return list(resp.json().get("data") or [])

    def _async_client(self) -> httpx.AsyncClient:
        if self._aclient is None:
            self._loop = asyncio.get_running_loop()
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
            self._aclient = httpx.AsyncClient(
                base_url=self.url, headers=self._headers, timeout=self._timeout, limits=limits
            )
        return self._aclient


def _body(prompt_ids: list[int], p: SamplingParams, model: str, max_tokens: int) -> dict[str, Any]:
    """A vLLM /v1/completions body for one prompt; vLLM's extensions carry what OpenAI's fields lack."""
    body: dict[str, Any] = {
        "model": model,
        "prompt": prompt_ids,
        "max_tokens": max_tokens,
        "temperature": p.temperature,
        "top_p": p.top_p,
        "stream": True,
        "stream_options": {"include_usage": True},
        # the sampled token's id (and the top-k the client asked for): exact token counts and logprobs
        "logprobs": p.logprobs or 0,
        "return_tokens_as_token_ids": True,
    }
    optional = {
        "top_k": p.top_k or None,
        "repetition_penalty": p.repetition_penalty if p.repetition_penalty != 1.0 else None,
        "presence_penalty": p.presence_penalty or None,
        "frequency_penalty": p.frequency_penalty or None,
        "seed": p.seed,
        "stop": list(p.stop) or None,
        "stop_token_ids": list(p.stop_token_ids) or None,
        "ignore_eos": p.ignore_eos or None,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    if p.response_format:  # vLLM enforces it
        fmt = json.loads(p.response_format)
        fmt.pop("param", None)  # the field a request named it by, for this server's own errors
        if fmt["type"] in ("lark", "regex"):
            # a grammar (a forced tool call, a client's structured_outputs) goes as vLLM's own
            # extension; its %json needs vLLM's `guidance` structured-output backend (or `auto`,
            # which falls back to it)
            body["structured_outputs"] = {"grammar" if fmt["type"] == "lark" else "regex": fmt[fmt["type"]]}
        else:
            body["response_format"] = fmt
    return body


def _token_id(text: str, url: str) -> int:
    m = _TOKEN_ID.match(text)
    if m is None:
        raise UpstreamError(502, f"engine {url} did not return token ids (return_tokens_as_token_ids)", "engine_error")
    return int(m.group(1))


def _logprobs(
    lp: dict[str, Any] | None, url: str, k: int | None = None
) -> tuple[tuple[int, ...], tuple[TokenLogprob, ...]]:
    """The engine's completions-style logprobs as token ids and TokenLogprobs, each with its `k`
    most likely alternatives at most: vLLM adds the sampled token to `top_logprobs` when it is not
    among the k asked for (k+1 entries), where OpenAI's answer has exactly k."""
    if not lp or not lp.get("tokens"):
        return (), ()
    ids = tuple(_token_id(t, url) for t in lp["tokens"])
    tops = lp.get("top_logprobs") or [None] * len(ids)
    items = []
    for tid, logprob, top in zip(ids, lp.get("token_logprobs") or [0.0] * len(ids), tops, strict=False):
        ranked = sorted((top or {}).items(), key=lambda kv: -kv[1])[:k]
        items.append(TokenLogprob(tid, float(logprob or 0.0), tuple((_token_id(t, url), float(v)) for t, v in ranked)))
    return ids, tuple(items)


def _echoed(data: dict[str, Any], prompt_ids: list[int], p: SamplingParams, limit: int, url: str) -> Delta:
    """A non-streamed echo answer as one Delta: the prompt's logprobs apart, the completion's after."""
    try:
        choice = data["choices"][0]
        ids, lps = _logprobs(choice.get("logprobs"), url)
    except (KeyError, IndexError, TypeError) as e:
        message = f"engine {url} answered an echo request without logprobs ({e})"
        raise UpstreamError(502, message, "engine_error") from None
    n = len(prompt_ids)
    if len(ids) < n:
        raise UpstreamError(502, f"engine {url} echoed {len(ids)} of {n} prompt tokens", "engine_error")
    k = p.prompt_logprobs or 0
    prompt_lps = (None, *(TokenLogprob(x.token_id, x.logprob, x.top[:k]) for x in lps[1:n]))
    out_ids, out_lps = (ids[n:], lps[n:]) if limit else ((), ())
    if p.logprobs is None:
        out_lps = ()
    elif len(out_lps):
        out_lps = tuple(TokenLogprob(x.token_id, x.logprob, x.top[: p.logprobs]) for x in out_lps)
    # vLLM's echoed text is the prompt's, then the answer's
    text = _after_prompt(str(choice.get("text") or ""), choice, n) if limit else ""
    finish = choice.get("finish_reason") if limit else "length"
    usage = data.get("usage") or {}
    prompt_tokens = int(usage.get("prompt_tokens", n))
    return Delta(text, out_ids, out_lps, finish, prompt_tokens, len(out_ids), prompt_lps, _cached(usage))


def _cached(usage: dict[str, Any]) -> int:
    """Prompt tokens the engine's prefix cache held (vLLM reports them with --enable-prompt-tokens-details)."""
    return int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)


def _after_prompt(text: str, choice: dict[str, Any], n_prompt: int) -> str:
    """The completion's part of an echoed text: text_offset gives where the first answer token starts."""
    offsets = (choice.get("logprobs") or {}).get("text_offset") or []
    return text[offsets[n_prompt] :] if len(offsets) > n_prompt else text


async def _deltas(resp: httpx.Response, n_prompt: int, url: str, k: int | None) -> AsyncIterator[Delta]:
    """The engine's SSE stream as Deltas; the last one (with the finish reason) waits for the usage
    chunk that follows it, so it carries the engine's own token counts."""
    last: Delta | None = None
    seen = 0
    usage: dict[str, Any] = {}
    async for event in EventSource(resp).aiter_sse():
        if event.data == "[DONE]":
            break
        chunk = json.loads(event.data)
        if "error" in chunk:
            err = chunk["error"] if isinstance(chunk["error"], dict) else {"message": str(chunk["error"])}
            raise UpstreamError(502, f"engine {url}: {err.get('message')}", str(err.get("code") or "engine_error"))
        usage = chunk.get("usage") or usage
        for choice in chunk.get("choices") or []:
            ids, lps = _logprobs(choice.get("logprobs"), url, k)
            seen += len(ids)
            delta = Delta(choice.get("text") or "", ids, lps, choice.get("finish_reason"), n_prompt, seen)
            if delta.finish_reason is None:
                yield delta
            else:
                last = delta
    if last is None:
        raise UpstreamError(502, f"engine {url} ended the stream without a finish reason", "engine_error")
    yield replace(
        last,
        prompt_tokens=int(usage.get("prompt_tokens", n_prompt)),
        completion_tokens=int(usage.get("completion_tokens", seen)),
        cached_tokens=_cached(usage),
    )


def _error(resp: httpx.Response, url: str) -> Exception:
    try:
        err = resp.json().get("error") or {}
        message = err.get("message") if isinstance(err, dict) else str(err)
    except (ValueError, AttributeError):
        message = None
    message = message or resp.text[:500] or f"HTTP {resp.status_code}"
    if resp.status_code == 404:
        return ModelNotFound(message)
    if resp.status_code in (400, 422):
        return UserError(message)
    status = 503 if resp.status_code == 503 else 502
    return UpstreamError(status, f"engine {url}: {message}", "engine_error")
