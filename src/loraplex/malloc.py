"""How a long-running server's C heap gives memory back (glibc's malloc; elsewhere it does nothing).

glibc serves allocations above `M_MMAP_THRESHOLD` (128 KiB) with their own mmap, returned to
the system on free, but it raises that threshold each time such a block is freed, up to 32 MiB.
After a while a server's tensors (KV cache rows, activations of a long prompt, 1-64 MiB) come
from the heap instead, and a heap only shrinks from its top: RSS rises in steps and stays. Fixing
the threshold keeps every large tensor in its own mapping. Fewer arenas (one per core, not eight)
bound the memory the server's threads (uvicorn, asyncio's workers, torch) can hold in free lists.

This does not cap memory (the KV cache budget does, engine/model.py) or free Python objects.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_MMAP_THRESHOLD = -3  # glibc's malloc.h
_M_ARENA_MAX = -8


def tune_for_serving() -> bool:
    """Fix glibc's mmap threshold at 1 MiB and its arenas at the core count; False if not glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it (musl, macOS do not)
    except (OSError, AttributeError):
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20) == 1
    return bool(libc.mallopt(_M_ARENA_MAX, max(2, len(os.sched_getaffinity(0))))) and ok
