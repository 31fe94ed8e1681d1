"""The engine trims glibc's heap every 30 s (loraplex/malloc.py) so that freed tensors go back to
the system. Each case runs in a fresh process, whose heap nothing else has touched."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from loraplex.malloc import KERNEL_CACHES, Trim, limit_arenas, limit_kernel_caches
from tests.child import in_child


def _rss_mib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
    raise AssertionError("no VmRSS")


def _kept_after_free(trim: bool) -> int:
    """MiB of RSS still held after 64 freed 4 MiB tensors, each followed by a small tensor that
    stays (as a server's long prompts' activations interleave with what it keeps)."""
    import ctypes

    import torch

    torch.set_num_threads(1)
    # Where glibc's own thresholds end up once blocks of up to 32 MiB have been freed (malloc.py):
    # 4 MiB blocks come from the heap, and freed ones stay in it unless more than the trim
    # threshold is free at its top. Set here, not reached by freeing a 4 MiB block first as before:
    # the state the import left (which small blocks were free, the threshold it had raised) decided
    # whether the small tensors landed between the big ones, and 1 run in 3 kept 7-15 MiB, not ~256.
    libc = ctypes.CDLL("libc.so.6")
    assert libc.mallopt(-3, 32 << 20) == 1  # M_MMAP_THRESHOLD
    assert libc.mallopt(-1, 1 << 30) == 1  # M_TRIM_THRESHOLD: never trimmed on free in this test
    before = _rss_mib()
    kept, big = [], []
    for _ in range(64):
        big.append(torch.ones(1 << 20))
        kept.append(torch.ones(64))
    del big
    if trim:
        t = Trim(every_s=0.0)
        t.maybe()
        assert t.calls == 1
    return _rss_mib() - before


def test_freed_tensors_go_back_to_the_system() -> None:
    if not Path("/proc/self/status").exists() or not Trim().available:
        pytest.skip("glibc on Linux only: malloc.Trim does nothing elsewhere")
    plain = in_child(_kept_after_free, False, what="malloc")
    trimmed = in_child(_kept_after_free, True, what="malloc")
    assert plain > 128, plain  # the bug: glibc's heap holds most of the 256 MiB freed
    assert trimmed < 16, trimmed


def test_trim_waits_its_interval() -> None:
    t = Trim(every_s=3600.0)
    for _ in range(1000):
        t.maybe()
    assert t.calls == 0


def test_trim_once_at_rest_after_work() -> None:
    t = Trim(every_s=3600.0, idle_s=0.0)
    t.maybe(idle=True)
    assert t.calls == 0  # nothing was done since the last trim: nothing to give back
    for _ in range(100):
        t.maybe(idle=False)
    assert t.calls == 0  # never while working
    for _ in range(100):
        t.maybe(idle=True)
    assert t.calls == (1 if t.available else 0)  # once per rest, not every idle turn of the loop
    t.maybe(idle=False)
    t.maybe(idle=True)
    assert t.calls == (2 if t.available else 0)


def test_trim_at_rest_waits_idle_s() -> None:
    t = Trim(every_s=3600.0, idle_s=3600.0)
    t.maybe(idle=False)
    for _ in range(100):
        t.maybe(idle=True)
    assert t.calls == 0  # a request arriving soon after another does not pay for re-faulted pages


def _arenas_used(limit: int | None) -> int:
    """How many glibc arenas (malloc_info's <heap>s) 8 threads end up with, each allocating and
    freeing as a server's threads do."""
    import ctypes
    import re
    import tempfile
    import threading

    if limit is not None:
        assert limit_arenas(limit)
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.fopen.restype = ctypes.c_void_p
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    start = threading.Barrier(8)

    def work() -> None:
        start.wait()  # all at once: contention is what makes glibc hand out new arenas
        for _ in range(2000):
            p = [libc.malloc(4096) for _ in range(8)]
            for q in p:
                libc.free(q)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with tempfile.NamedTemporaryFile(suffix=".xml") as f:
        fp = libc.fopen(f.name.encode(), b"w")
        libc.malloc_info(0, fp)
        libc.fclose(fp)
        return len(re.findall(r"<heap nr=", Path(f.name).read_text()))


def test_serve_limits_glibc_arenas(monkeypatch: pytest.MonkeyPatch) -> None:
    if not Path("/proc/self/status").exists() or not Trim().available:
        pytest.skip("glibc on Linux only")
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    assert in_child(_arenas_used, None, what="malloc") > 2  # glibc's default: one per contending thread
    assert in_child(_arenas_used, 2, what="malloc") <= 2
    monkeypatch.setenv("MALLOC_ARENA_MAX", "3")
    assert not limit_arenas(2)  # an operator's MALLOC_ARENA_MAX is left alone


def _heap_after_shapes(limit: int | None, bf16: bool) -> float:
    """MiB of glibc heap in use after matmuls of 1,200 different shapes (as prompts of every length
    would make without the engine's padding), in bf16 (oneDNN's) or fp32, in a fresh process."""
    import ctypes

    import torch

    dtype = torch.bfloat16 if bf16 else torch.float32

    if limit is not None:
        limit_kernel_caches(limit)
    torch.set_num_threads(1)

    class MallInfo2(ctypes.Structure):
        _fields_ = [(f, ctypes.c_size_t) for f in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks")] + [
            (f, ctypes.c_size_t) for f in ("fsmblks", "uordblks", "fordblks", "keepcost")
        ]

    mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    mallinfo2.restype = MallInfo2
    w = torch.randn(256, 512, dtype=dtype)
    before = mallinfo2().uordblks
    with torch.inference_mode():
        for m in range(1, 1201):
            torch.randn(m, 256, dtype=dtype) @ w
    return (mallinfo2().uordblks - before) / 2**20


def test_serve_bounds_onednn_kernel_caches(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    if not Trim().available or not torch.backends.mkldnn.is_available():
        pytest.skip("glibc and oneDNN only")
    # The precision the engine serves in on this CPU (engine/model.py): bf16 where oneDNN has bf16
    # kernels, else fp32, whose matmuls go to MKL, which caches no kernel per shape.
    bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())  # False on AVX2 only, or held to it
    for var in KERNEL_CACHES:
        monkeypatch.delenv(var, raising=False)
    default = in_child(_heap_after_shapes, None, bf16, what="malloc")
    bounded = in_child(_heap_after_shapes, 16, bf16, what="malloc")
    print(
        f"heap after 1,200 shapes ({'bf16' if bf16 else 'fp32'}): {default:.0f} MiB default, {bounded:.0f} MiB bounded"
    )
    # What one cached kernel weighs depends on the CPU (oneDNN generates different code for each
    # instruction set): 1,200 bf16 shapes grew the heap by 100+ MiB on an AVX512-BF16 CPU, 38 MiB on an
    # AVX-512 one without bf16; bounded, under 1 MiB on the latter. fp32 (an AVX2-only CPU): under
    # 1 MiB either way.
    assert bounded < 40, (bounded, default)
    if bf16:
        assert default > bounded + 25, (bounded, default)  # the bound is what keeps it small
    else:
        assert default < 40, (bounded, default)  # nothing grows with the shapes to bound
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "7")
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "")  # so that teardown restores it
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY")
    limit_kernel_caches(16)
    assert os.environ["LRU_CACHE_CAPACITY"] == "7" and os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "16"
