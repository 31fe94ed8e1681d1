"""Give freed C-heap memory back to the system now and then (glibc's `malloc_trim`; elsewhere a no-op).

glibc serves allocations above `M_MMAP_THRESHOLD` (128 KiB) with their own mmap, returned on free,
but raises that threshold each time such a block is freed, up to 32 MiB. After a while a server's
tensors (activations of a long prompt, KV cache blocks: 1-64 MiB) come from the heap instead, and
a heap is only shrunk from its top: one small object allocated after a big one keeps the big one's
pages. tests/test_malloc.py: 64 freed 4 MiB tensors interleaved with small kept ones leave 256 MiB
in RSS; `malloc_trim(0)` gives them back in ~16 ms.

Why trimming and not a fixed threshold (mallopt): fixing it at 1 MiB also gave everything back, but
every large tensor then costs fresh zeroed pages (page faults), and the engine decoded 18-22%
slower (16 requests x 64 tokens: 6.5-7.2 s -> 7.9-8.7 s). A trim every 30 s costs ~16 ms; the engine
also trims once it has been idle for 2 s (`Trim`).

Arenas: glibc gives threads their own heaps ("arenas", up to 8 per core; tests/test_malloc.py:
9 for 8 busy threads), and each fragments on its own. `loraplex serve` calls `limit_arenas(2)`
before any thread starts, unless MALLOC_ARENA_MAX is set. Measured in 10-minute soaks
(bench/soak.py, docs/performance.md): per-minute median RSS rose ~17 MiB/min from minute 3 with
the default arenas and ~5-14 MiB/min with two; decode speed was the same (8 clients x 64 tokens, five
alternating pairs: 90-96 tok/s with two arenas, 84-100 without; mean difference -0.8%).

Kernel caches: on CPU every bf16 matmul shape gets a oneDNN kernel, kept in two LRU caches of
1,024 entries each (oneDNN's and PyTorch's ideep one), 0.3-1 MiB per entry: ~600 MiB of heap for
varied shapes. The engine pads to few shapes (engine/model.py `bucket`); `serve` also calls
`limit_kernel_caches(256)`, which bounds the worst case and keeps a decode step's dozen kernels.

This does not cap memory (the KV cache budget does, engine/model.py) or free Python objects.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import time
from collections.abc import Callable
from typing import Any

M_ARENA_MAX = -8  # glibc's malloc.h


def _libc(symbol: str) -> Callable[..., Any] | None:
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), symbol) if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to do
        return None


def _malloc_trim() -> Callable[[int], int] | None:
    return _libc("malloc_trim")


def limit_arenas(n: int = 2) -> bool:
    """At most `n` glibc arenas from now on (call before threads start); False where it cannot
    (not glibc) or need not (MALLOC_ARENA_MAX is set: the operator's choice wins)."""
    mallopt = _libc("mallopt")
    if mallopt is None or os.environ.get("MALLOC_ARENA_MAX"):
        return False
    return bool(mallopt(M_ARENA_MAX, n))


KERNEL_CACHES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")  # oneDNN's, PyTorch's (ideep)


def limit_kernel_caches(entries: int = 256) -> None:
    """At most `entries` oneDNN kernels in each cache (call before the first bf16 matmul: both
    caches read their size then); an operator's own setting of either variable wins."""
    for var in KERNEL_CACHES:
        os.environ.setdefault(var, str(entries))


class Trim:
    """`maybe()` trims the C heap when `every_s` seconds have passed since the last trim, or once
    the caller has been idle for `idle_s` seconds after working; call it from a loop (the engine's).

    Why also when idle: a burst of requests leaves its freed activations in the heap until the next
    periodic trim, so a server at rest kept ~160 MiB more than it needs for up to 30 s (int4, 16
    rows; docs/performance.md). Why wait `idle_s` first: trimmed pages fault back in (zeroed) when
    the next request needs them, so a request arriving right after another would pay for it."""

    def __init__(self, every_s: float = 30.0, idle_s: float = 2.0):
        self.every_s = every_s
        self.idle_s = idle_s
        self._trim = _malloc_trim()
        self._last = self._busy = time.monotonic()
        self._worked = False  # since the last trim
        self.calls = 0

    @property
    def available(self) -> bool:
        return self._trim is not None

    def maybe(self, idle: bool = False) -> None:
        """`idle`: the caller has nothing to do now (no requests running or waiting)."""
        now = time.monotonic()
        if not idle:
            self._busy, self._worked = now, True
        rested = idle and self._worked and now - self._busy >= self.idle_s
        if self._trim is not None and (rested or now - self._last >= self.every_s):
            self._trim(0)
            self._last = now
            self._worked = False
            self.calls += 1
