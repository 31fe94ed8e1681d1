"""The serving engine: continuous batching of requests for many adapters over one base model.

The one seam the API uses is `Engine.generate(prompt_or_messages, params, adapter)`, an async
iterator of `Delta`s (text, token ids, logprobs, finish reason, usage).

One thread owns the model and runs the loop; each turn of it:
  1. takes new requests and cancellations from the inbox (thread-safe), drops cancelled rows;
  2. admits waiting requests while KV-cache rows and adapter slots are free;
  3. prefills at most `prefill_tokens` prompt tokens (several short prompts in one padded forward,
     a long prompt in chunks), so a burst of new prompts never stalls running decodes for long;
  4. decodes one token for every running row, whatever adapter each row uses (lora.py).
Rows join and leave between steps. Running rows sit in KV slots 0..n-1 (prefilling rows after
them), so a decode step reads a view of the cache; a finished row is removed by moving the rows
after it down (model.KVCache.move).

A request fails alone: an exception in a step fails the requests of that step, and the loop goes
on. This module does not parse HTTP, check API keys or render OpenAI JSON (see api/).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

import torch

from loraplex.adapters import names
from loraplex.engine import lora_kernel, quant, structured
from loraplex.engine.adapter_cache import AdapterCache
from loraplex.engine.lora import KERNEL_ACTIVATIONS, AdapterRequest, LoraBatch, LoraStacks
from loraplex.engine.model import DecoderModel, Step, bucket
from loraplex.engine.prefix_cache import PrefixCache
from loraplex.engine.protocol import Delta, EngineClosed, PromptTooLong, check_length, encode_prompt
from loraplex.engine.quant import Requested
from loraplex.engine.request import EngineStats, Request, size_text
from loraplex.engine.sampling import RowError, RowState, SamplingParams, sample
from loraplex.engine.text import TextStream
from loraplex.errors import UserError
from loraplex.malloc import Trim
from loraplex.models import checkpoint
from loraplex.models.device import bf16_is_faster, pick_device
from loraplex.models.load import BaseRef, eos_token_ids, load_model, load_tokenizer, resolve_base
from loraplex.threads import budget, cores

log = logging.getLogger(__name__)


class Engine:
    def __init__(
        self,
        base: str | BaseRef | None = None,
        *,
        max_batch: int = 16,
        max_loaded_adapters: int = 8,
        max_model_len: int | None = None,
        device: str = "auto",
        dtype: str = "auto",
        quantize: Requested = "none",
        prefill_tokens: int = 512,
        adapters: list[str] | None = None,
        threads: int | None = None,
        kv_cache_bytes: int | None = None,
        prefix_cache_bytes: int | None = None,
        cuda_graphs: bool = True,
    ):
        self.stats = EngineStats()
        self._trim = Trim()
        self.threads = 0  # CPU threads the model uses (0 on a GPU); web jobs get the other cores
        self._ids = itertools.count(1)
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._waiting: deque[Request] = deque()
        self._rows: list[Request] = []  # KV slot i holds _rows[i]; decoding rows first
        self._lora_batch: LoraBatch | None = None
        self._closing = False
        self._stopped = threading.Event()
        # The engine thread loads the model itself: torch ops run ~1.5x slower on CPU in a thread
        # other than the one that first used the OpenMP pool (measured), so load and compute share one.
        ready = threading.Event()
        failed: list[BaseException] = []

        def start() -> None:
            try:
                if pick_device(device) == "cpu":
                    # One core fewer than this process may use: the event loop, tokenizer
                    # and (often) clients need a core, and an OpenMP thread that gets preempted
                    # stalls every op's barrier. Measured on 2 cores, 8 clients: 1 thread 74.7
                    # tok/s vs 2 threads 63.3 (bench/serve_throughput.py).
                    torch.set_num_threads(threads or budget() or max(1, cores() - 1))
                    self.threads = torch.get_num_threads()
                self._setup(
                    base, max_batch, max_loaded_adapters, max_model_len, device, dtype, quantize, prefill_tokens,
                    adapters, cuda_graphs,
                )  # fmt: skip
                self._budget_kv_cache(kv_cache_bytes)
                # default: an eighth of the KV cache budget, at most 256 MiB; 0 turns it off
                default = min(self.kv_cache_bytes // 8, 256 * 2**20)
                self.prefix = PrefixCache(default if prefix_cache_bytes is None else prefix_cache_bytes)
            except BaseException as e:  # noqa: BLE001 - re-raised in the constructor's thread
                failed.append(e)
                return
            finally:
                ready.set()
            self._loop()

        self._thread = threading.Thread(target=start, name="loraplex-engine", daemon=True)
        self._thread.start()
        ready.wait()
        if failed:
            raise failed[0]

    def _setup(
        self,
        base: str | BaseRef | None,
        max_batch: int,
        max_loaded_adapters: int,
        max_model_len: int | None,
        device: str,
        dtype: str,
        quantize: Requested,
        prefill_tokens: int,
        adapters: list[str] | None,
        cuda_graphs: bool,
    ) -> None:
        self.base = base if isinstance(base, BaseRef) else resolve_base(base)
        self.device = pick_device(device)
        if dtype == "auto":
            self.dtype = torch.bfloat16 if bf16_is_faster(self.device) else torch.float32
        else:
            self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        quantize = quant.resolve(quantize, self.device)
        quant.check(quantize, self.device)  # before the model loads: a wrong flag fails at once
        self.quantize = quantize
        self.tokenizer = load_tokenizer(self.base)
        # The weights straight from the safetensors files, one tensor at a time (models/checkpoint.py:
        # no transformers model, ~120 MB less resident); transformers' model where that cannot serve.
        # On a GPU that model loads in the serving dtype (an 8B base in fp32 would be 32 GB of host memory).
        weights = checkpoint.read(self.base.path) or checkpoint.of_model(
            load_model(self.base, None if self.device == "cpu" else self.dtype)
        )
        self.eos_ids = tuple(eos_token_ids(self.tokenizer, weights.eos_token_id))
        sha = self.base.fingerprint.get("weights_sha256")
        store = quant.Store(quant.store_path(sha, quantize) if sha and quantize != "none" else None)
        self.model = DecoderModel(weights, self.dtype, self.device, quantize, store, cuda_graphs=cuda_graphs)
        store.save()  # the next start reads these instead of quantizing again
        del weights
        cfg = self.model.config
        self.vocab_size = int(cfg.vocab_size)
        limit = int(getattr(cfg, "max_position_embeddings", 4096) or 4096)
        self.max_model_len = min(max_model_len or limit, limit)
        self.max_batch = max_batch
        self.prefill_tokens = max(prefill_tokens, 16)
        self.cache = self.model.new_cache(max_batch, self.max_model_len)
        # On CPU the LoRA weights are bf16 for the C kernel (half the bytes to stream per step); on an
        # int4 base int8 with a scale per row, still finer than the base they sit on (half the bytes
        # again: 8 adapters at once stream 78 MB of bf16 LoRA weights a step next to a 97 MB int4 base);
        # fp32 for the PyTorch path without the kernel: its small batched matmuls cost ~7 us in fp32
        # (MKL) and ~35 us in bf16 (oneDNN's per-call overhead), measured at decode sizes. On CUDA they
        # follow the model.
        if self.device == "cpu":
            kernel = self.dtype in KERNEL_ACTIVATIONS and lora_kernel.load() is not None
            lora_dtype = (torch.int8 if quantize == "int4" else torch.bfloat16) if kernel else torch.float32
        else:
            lora_dtype = self.dtype
        self.stacks = LoraStacks(
            cfg.num_hidden_layers, max_loaded_adapters + 1, self.model.site_shapes, lora_dtype, self.device
        )
        self.adapters = AdapterCache(
            self.base,
            self.stacks,
            cfg.num_hidden_layers,
            self.model.site_shapes,
            base_names=names.base_names(self.base.id),
            allowed={names.parse_ref(a).name for a in adapters} if adapters else None,
        )

    def _budget_kv_cache(self, budget: int | None) -> None:
        """The KV cache may use `budget` bytes (default: a quarter of the RAM, half the free GPU
        memory); the context one request may use shrinks to what fits that alone."""
        if budget is None:
            if self.device.startswith("cuda"):
                budget = int(torch.cuda.mem_get_info()[0] * 0.5)
            else:
                budget = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.25)
        self.kv_cache_bytes = budget
        self.model_max_len = self.max_model_len
        fits = self.cache.longest_context(budget, self.max_model_len)
        if fits < self.max_model_len:
            log.warning(
                "context limited to %d tokens (the model has %d): the KV cache budget, %s, holds no more",
                fits, self.max_model_len, size_text(budget),
            )  # fmt: skip
            self.max_model_len = fits

    # ------------------------------------------------------------------ public (any thread)

    @property
    def in_flight(self) -> int:
        return len(self._rows) + len(self._waiting)

    @property
    def closing(self) -> bool:
        return self._closing

    def kv_cache(self) -> tuple[int, int] | None:
        return self.cache.allocated_bytes, self.kv_cache_bytes

    def prefix_cache(self) -> tuple[int, int] | None:
        return (self.prefix.bytes, self.prefix.capacity_bytes) if self.prefix.capacity_bytes else None

    def queue_depth(self) -> int:
        """Requests waiting for a batch row (read from any thread: a length, not a lock)."""
        return len(self._waiting)

    def running(self) -> int:
        return len(self._rows)

    def encode(self, prompt: str | list[dict[str, Any]] | list[int]) -> list[int]:
        return encode_prompt(self.tokenizer, prompt)

    def check_length(self, prompt_len: int, max_tokens: int | None) -> int:
        try:
            return check_length(self.max_model_len, prompt_len, max_tokens)
        except PromptTooLong as e:
            if self.max_model_len < self.model_max_len:
                raise PromptTooLong(
                    f"{e} (This server's KV cache budget, {size_text(self.kv_cache_bytes)}, limits one "
                    f"request to {self.max_model_len} of the model's {self.model_max_len} tokens.)"
                ) from None
            raise

    async def generate(
        self,
        prompt: str | list[dict[str, Any]] | list[int],
        params: SamplingParams,
        adapter: AdapterRequest | str | None = None,
        max_tokens: int | None = None,
    ) -> AsyncIterator[Delta]:
        """Stream the answer to one prompt. `max_tokens=None` means: up to the end of the context."""
        if self._closing:
            raise EngineClosed("the server is shutting down")
        req_adapter = adapter if isinstance(adapter, AdapterRequest) else self.adapters.resolve(adapter or "")
        prompt_ids = self.encode(prompt)
        if not prompt_ids:
            raise UserError("the prompt is empty")
        limit = self.check_length(len(prompt_ids), max_tokens)
        constraint = None
        if params.response_format:
            constraint = await asyncio.to_thread(
                structured.constraint_for, params.response_format, self.tokenizer, self.vocab_size
            )
        weights = await asyncio.to_thread(self.adapters.prepare, req_adapter) if req_adapter.parts else None
        loop = asyncio.get_running_loop()
        out: asyncio.Queue[Delta | BaseException] = asyncio.Queue()

        def emit(item: Delta | BaseException) -> None:
            loop.call_soon_threadsafe(out.put_nowait, item)

        req = Request(
            id=next(self._ids),
            prompt_ids=prompt_ids,
            adapter=req_adapter,
            weights=weights,
            row=RowState(params, prompt_ids, constraint=constraint),
            stream=TextStream(self.tokenizer, params.stop),
            emit=emit,
            max_tokens=limit,
            stop_ids=frozenset(() if params.ignore_eos else self.eos_ids) | frozenset(params.stop_token_ids),
            context=prompt_ids,
            prompt_logprobs=None if params.prompt_logprobs is None else [None] * len(prompt_ids),
        )
        self._inbox.put(("add", req))
        finished = False
        try:
            while True:
                item = await out.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
                if item.finish_reason is not None:
                    finished = True
                    return
        finally:
            if not finished:  # the consumer went away (client disconnect): free the row now
                self._inbox.put(("cancel", req))

    def load_adapter(self, model: str, pin: bool = False) -> str:
        """Load (and optionally pin) an adapter now instead of on first use; returns what was loaded."""
        req = self.adapters.resolve(model)
        weights = self.adapters.prepare(req)
        done: queue.SimpleQueue[BaseException | None] = queue.SimpleQueue()
        self._inbox.put(("load", (req, weights, pin, done)))
        error = done.get(timeout=60)
        if error is not None:
            raise error
        return req.key

    def unload_adapter(self, name: str) -> list[str]:
        """Unload every loaded version of `name` (in-flight requests finish on what they started with)."""
        self.adapters.forget(name)
        done: queue.SimpleQueue[list[str]] = queue.SimpleQueue()
        self._inbox.put(("unload", (name, done)))
        return done.get(timeout=60)

    def drain(self, timeout: float) -> None:
        """Stop taking requests now; the ones in flight may finish for `timeout` s, then fail with
        EngineClosed (the API turns that into a 503 or a stream error event). Idempotent."""
        if self._closing:
            return
        self._closing = True
        timer = threading.Timer(timeout, self._inbox.put, args=(("abort", None),))
        timer.daemon = True
        timer.start()

    def close(self, timeout: float = 10.0) -> None:
        """Stop taking requests, let in-flight ones finish for up to `timeout` s, abort the rest."""
        self._closing = True
        deadline = time.monotonic() + timeout
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        self._inbox.put(("stop", None))
        self._stopped.wait(timeout=30)

    # ------------------------------------------------------------------ the loop (engine thread)

    def _loop(self) -> None:
        # Everything the engine thread does is inference: tensors it creates (a KV cache grown
        # inside forward, say) are inference tensors, and in-place updates to them are only
        # allowed under inference mode, so the whole loop runs in it.
        with torch.inference_mode():
            self._run()

    def _run(self) -> None:
        while True:
            idle = not self._rows and not self._waiting
            try:
                kind, item = self._inbox.get(timeout=0.5) if idle else self._inbox.get_nowait()
            except queue.Empty:
                kind, item = "", None
            while kind:
                if kind == "stop":
                    self._abort_all()
                    self._stopped.set()
                    return
                self._command(kind, item)
                try:
                    kind, item = self._inbox.get_nowait()
                except queue.Empty:
                    kind = ""
            self._admit()
            self._keep_kv_budget()
            # freed tensors back to the system every 30 s, and once idle for 2 s (malloc.py)
            self._trim.maybe(idle=not self._rows and not self._waiting)
            if any(not r.decoding for r in self._rows):
                self._guarded(self._prefill_step, [r for r in self._rows if not r.decoding])
            if any(r.decoding for r in self._rows):
                self._guarded(self._decode_step, [r for r in self._rows if r.decoding])

    def _command(self, kind: str, item: Any) -> None:
        if kind == "abort":  # the drain deadline passed
            for req in [*self._rows, *self._waiting]:
                req.emit(EngineClosed("the server shut down before this request finished"))
                self.stats.cancelled += 1
            for req in list(self._rows):
                self._remove(req)
            self._waiting.clear()
        elif kind == "add":
            self.stats.requests += 1
            self._waiting.append(item)
        elif kind == "cancel":
            gone: Request = item
            if gone in self._waiting:
                self._waiting.remove(gone)
                if gone.lora_slot != -1:  # preempted: it still holds its adapter slot
                    self.adapters.release(gone.adapter)
                self.stats.cancelled += 1
            elif gone in self._rows:
                self._remove(gone)
                self.stats.cancelled += 1
        elif kind == "load":
            areq, weights, pin, done = item
            try:
                slot = self.adapters.acquire(areq, weights)
                if slot is None:
                    raise UserError(f"no free adapter slot for {areq.key}: all are in use or pinned")
                if pin:
                    self.adapters.pinned.add(areq.slot_key)
                self.adapters.release(areq)
                done.put(None)
            except BaseException as e:  # noqa: BLE001 - handed back to the caller's thread
                done.put(e)
        elif kind == "unload":
            name, done = item
            self.prefix.forget(name)
            done.put(self.adapters.unload(name))

    def _guarded(self, step: Callable[[], None], involved: list[Request]) -> None:
        try:
            step()
        except Exception as e:  # noqa: BLE001 - fail these requests, keep serving the others
            error = RuntimeError(f"generation failed ({type(e).__name__}: {e})")
            try:
                for req in involved:
                    if req in self._rows:
                        self._remove(req)
                        self.stats.failed += 1
                        req.emit(error)
            except Exception:  # noqa: BLE001 - the batch itself is broken: fail every row, keep the thread
                log.exception("engine state could not be repaired; failing every running request")
                for req in self._rows:
                    self.adapters.release(req.adapter)
                    req.emit(error)
                    self.stats.failed += 1
                self._rows.clear()

    def _admit(self) -> None:
        while self._waiting and len(self._rows) < self.max_batch:
            req = self._waiting[0]
            need = max([r.positions() for r in self._rows] + [len(req.context) + 1])
            if self._rows and self.cache.bytes_for(len(self._rows) + 1, need) > self.kv_cache_bytes:
                return  # the KV cache budget is full: wait for a row to finish
            if req.lora_slot == -1:  # a preempted request kept its adapter slot
                slot = self.adapters.acquire(req.adapter, req.weights)
                if slot is None:
                    return  # every adapter slot is busy: wait for a row to finish
                req.lora_slot = slot
                req.weights = None  # the stack has them now
            self._waiting.popleft()
            self._rows.append(req)
            if not req.admitted:
                req.admitted = True
                self.stats.prompt_tokens += len(req.prompt_ids)
                self._reuse_prefix(req, len(self._rows) - 1)

    def _reuse_prefix(self, req: Request, slot: int) -> None:
        """Start `req`'s prefill after the longest prefix of its prompt the prefix cache holds; with
        prompt logprobs, at most up to the position before the first one wanted (its logits give
        that one's logprob)."""
        if not self.prefix.capacity_bytes:
            return
        ids = req.context
        if req.prompt_logprobs is not None:
            ids = ids[: req.row.params.prompt_logprobs_from]  # longest() matches ids[:-1]
        entry, n = self.prefix.longest(req.adapter, ids)
        if entry is None:
            return
        self.cache.ensure(slot + 1, n)
        self.prefix.fill(entry, n, self.cache.k[:, slot], self.cache.v[:, slot])
        req.cached = req.reused = n
        self.stats.cached_prompt_tokens += n

    def _keep_kv_budget(self) -> None:
        """Send the newest rows back to wait while the cache the rows need exceeds the budget (they
        are prefilled again, prompt and answer so far, when there is room: vLLM's recompute
        preemption), then let the cache give back what the rows no longer need."""
        while len(self._rows) > 1:
            need = max(r.positions() for r in self._rows)
            if self.cache.bytes_for(len(self._rows), need) <= self.kv_cache_bytes:
                break
            r = self._rows.pop()  # the newest row is the last slot: nothing moves
            if r.decoding:
                r.context = r.prompt_ids + r.row.output_ids[:-1]
                r.resumed = True
            r.cached, r.decoding = 0, False
            self._waiting.appendleft(r)
            self.stats.preempted += 1
        self.cache.fit(len(self._rows), max((r.positions() for r in self._rows), default=1))

    def _lora_for(self, rows: list[Request], cacheable: bool) -> LoraBatch | None:
        slots = [r.lora_slot for r in rows]
        if not any(slots):
            return None
        scales = [r.adapter.scale for r in rows]
        if cacheable:
            if self._lora_batch is None or not self._lora_batch.matches(self.stacks, slots, scales):
                self._lora_batch = LoraBatch(self.stacks, slots, scales)
            return self._lora_batch
        return LoraBatch(self.stacks, slots, scales)

    def _prefill_step(self) -> None:
        first = next(i for i, r in enumerate(self._rows) if not r.decoding)
        head = self._rows[first]
        remaining = len(head.context) - head.cached
        if head.cached or remaining > self.prefill_tokens:
            group = [head]  # a long prompt goes alone, in chunks
            L = min(remaining, self.prefill_tokens)
        else:
            group, budget = [], self.prefill_tokens
            for r in self._rows[first:]:
                if r.decoding or r.cached or len(r.context) > budget:
                    break
                group.append(r)
                budget -= len(r.context)
            L = max(len(r.context) for r in group)
        pad = self.tokenizer.pad_token_id or 0
        width = L
        if self.model.buckets:  # few shapes, each a cached kernel (model.bucket); padding is never read
            start = max(r.cached for r in group)  # within the positions the cache allocates anyway
            width = bucket(L, self.cache.sizes_for(1, start + L)[1] - start)
        ids = torch.full((len(group), width), pad, dtype=torch.long)
        last = []
        for i, r in enumerate(group):
            chunk = r.context[r.cached : r.cached + L]
            ids[i, : len(chunk)] = torch.tensor(chunk)
            last.append(len(chunk) - 1)
        step = Step(
            input_ids=ids.to(self.device),
            starts=torch.tensor([r.cached for r in group], device=self.device),
            slot0=first,
            lora=self._lora_for(group, cacheable=False),
            last=torch.tensor(last, device=self.device),
        )
        scored = [i for i, r in enumerate(group) if r.prompt_logprobs is not None and not r.resumed]
        if scored:  # every position's logits, for the prompt's own logprobs
            every = self.model.forward(step, self.cache, all_logits=True)
            logits = every[torch.arange(len(group), device=every.device), step.last]
            for i in scored:
                group[i].score_prompt(every[i, : last[i] + 1])
            del every
        else:
            logits = self.model.forward(step, self.cache)[:, 0]
        self.stats.prefill_steps += 1
        done_rows, done_logits = [], []
        for i, r in enumerate(group):
            r.cached += last[i] + 1
            if r.cached == len(r.context):
                r.decoding = True
                if not r.resumed and self.prefix.capacity_bytes:
                    slot, n = first + i, r.cached
                    self.prefix.store(r.adapter, r.context, self.cache.k[:, slot, :, :n], self.cache.v[:, slot, :, :n])
                if r.resumed:  # its next token was sampled before the preemption: decode feeds it
                    r.resumed = False
                    continue
                if r.max_tokens == 0:  # the prompt was only to be read (its logprobs)
                    r.send("", "length")
                    self.stats.finished += 1
                    self._remove(r)
                    continue
                done_rows.append(r)
                done_logits.append(logits[i])
        if done_rows:
            self._after_sample(done_rows, torch.stack(done_logits))

    def _decode_step(self) -> None:
        rows = [r for r in self._rows if r.decoding]
        assert rows == self._rows[: len(rows)], "decoding rows must fill the first KV slots"
        ids = torch.tensor([[r.row.output_ids[-1]] for r in rows], device=self.device)
        step = Step(
            input_ids=ids,
            starts=torch.tensor([r.cached for r in rows], device=self.device),
            slot0=0,
            lora=self._lora_for(rows, cacheable=True),
            longest=max(r.cached for r in rows),
        )
        logits = self.model.forward(step, self.cache)[:, 0]
        self.stats.decode_steps += 1
        for r in rows:
            r.cached += 1
        self._after_sample(rows, logits)

    def _after_sample(self, rows: list[Request], logits: torch.Tensor) -> None:
        tokens, infos = sample(logits, [r.row for r in rows])
        now = time.perf_counter()
        for r, tok, info in zip(rows, tokens, infos, strict=True):
            if isinstance(tok, RowError):  # this request fails alone; the others take their tokens
                self._remove(r)
                self.stats.failed += 1
                r.emit(RuntimeError(f"generation failed ({tok})"))
                continue
            if r.t_first is None:
                r.t_first = now
            r.row.output_ids.append(tok)
            self.stats.generated_tokens += 1
            r.pending_ids.append(tok)
            if info is not None:
                r.pending_logprobs.append(info)
            finish: str | None = None
            if tok in r.stop_ids:
                finish = "stop"
                text_ids = r.row.output_ids[:-1]
            else:
                text_ids = r.row.output_ids
                if r.row.constraint is not None and r.row.constraint.finished:
                    finish = "stop"  # the JSON is complete
                elif len(r.row.output_ids) >= r.max_tokens or r.cached + 1 >= self.max_model_len:
                    finish = "length"
            text, hit = r.stream.push(text_ids, final=finish is not None)
            if hit:
                finish = "stop"
            if finish is None and not text:
                continue  # nothing printable yet (a split character or a possible stop string)
            r.send(text, finish)
            if finish is not None:
                self.stats.finished += 1
                self._remove(r)

    def _remove(self, req: Request) -> None:
        i = self._rows.index(req)
        for j in range(i + 1, len(self._rows)):  # keep rows packed into the first slots
            self.cache.move(j, j - 1, self._rows[j].cached)
        del self._rows[i]
        self.adapters.release(req.adapter)

    def _abort_all(self) -> None:
        for req in [*self._rows, *self._waiting]:
            req.send("", "abort")
        self._rows.clear()
        self._waiting.clear()
