"""The CPU kernels (lora_cpu.c: LoRA deltas; quant_cpu.c: int8/int4 matmuls, and bf16 ones where the CPU
has AVX512-BF16; decode_cpu.c: a decode
step's norms and attention): compiled once per machine with
the system C compiler, loaded with ctypes.

Built with `-fopenmp` where the compiler has it: the library then shares torch's OpenMP runtime
(torch ships libgomp.so.1 and the loader resolves the same soname to it) and runs on as many
threads as torch does. The shared library is cached in `$LORAPLEX_HOME/kernels/`, keyed by the
source, the compiler and the CPU (each is built with `-march=native`, or for the instruction set
`LORAPLEX_CPU_ISA` names: cpu_isa.py), and written under a temporary
name then renamed, so two processes starting together never load half a file. Where no compiler
works (Windows without one, a slim container) `load()` / `load_quant()` return None and the engine
keeps the plain PyTorch path, which gives the same results (quantized: to rounding) more slowly;
`LORAPLEX_LORA_KERNEL=off` / `LORAPLEX_QUANT_KERNEL=off` / `LORAPLEX_DECODE_KERNEL=off` choose that
path on purpose.

This module does not decide the weights' layout or when a batch uses a kernel (lora.py, quant.py do).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path

from loraplex import cpu_isa
from loraplex.paths import home

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("lora_cpu.c")
QUANT_SOURCE = Path(__file__).with_name("quant_cpu.c")
DECODE_SOURCE = Path(__file__).with_name("decode_cpu.c")
# -fassociative-math (with the flags it needs) lets the compiler vectorise the dot products' sums;
# not -ffast-math, which with gcc < 13 links crtfastmath into the library and so flushes denormals
# to zero in the whole process on load.
FLAGS = ["-O3", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math", "-fPIC", "-shared"]


def _compiler() -> str | None:
    cc = os.environ.get("CC") or (sysconfig.get_config_var("CC") or "cc")
    exe = shlex.split(cc)[0] if cc.strip() else "cc"
    return shutil.which(exe) or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def cpu_id() -> str:
    """The CPU's feature flags (/proc/cpuinfo), for cache keys of code built for this machine."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() + platform.machine()


def _build(cc: str, source: Path, target: Path, arch: tuple[str, ...] = ("-march=native",)) -> None:
    """`source` compiled to `target` for `arch` (tests build other instruction sets' paths too)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    errors = []
    try:
        # Apple clang refuses -fopenmp (the kernel then runs on one thread) and on arm64 -march=native
        for extra in ([*arch, "-fopenmp"], ["-fopenmp"], [*arch], []):
            proc = subprocess.run([cc, *FLAGS, *extra, str(source), "-o", tmp], capture_output=True, text=True)
            if proc.returncode == 0:
                os.replace(tmp, target)
                return
            errors.append(proc.stderr.strip()[-400:])
        raise RuntimeError("; ".join(errors))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _library(source: Path, what: str, off_env: str) -> ctypes.CDLL | None:
    """`source` built for this machine and loaded, or None (with one warning saying why)."""
    if os.environ.get(off_env, "").lower() in ("off", "0", "torch", "false"):
        return None
    isa = cpu_isa.held()
    cc = _compiler()
    if cc is None:
        log.warning("no C compiler found: %s uses the slower PyTorch path", what)
        return None
    headers = [h.read_bytes() for h in sorted(source.parent.glob("*.h"))]  # what the sources include
    parts = [source.read_bytes(), *headers, cc.encode(), cpu_id().encode(), " ".join(FLAGS).encode(), isa.encode()]
    key = hashlib.sha256(b"\0".join(parts))
    suffix = sysconfig.get_config_var("SHLIB_SUFFIX") or ".so"
    target = home() / "kernels" / f"{source.stem}-{key.hexdigest()[:16]}{suffix}"
    try:
        if not target.exists():
            log.info("compiling %s with %s (once per machine)", source.name, cc)
            _build(cc, source, target, cpu_isa.MARCH[isa])
        return ctypes.CDLL(str(target))
    except (OSError, RuntimeError) as e:
        log.warning("%s could not be built (%s): %s uses the PyTorch path", source.name, e, what)
        return None


@functools.cache
def load() -> ctypes.CDLL | None:
    """The LoRA kernel library, or None (with one warning saying why) when it cannot be had."""
    lib = _library(SOURCE, "multi-LoRA decoding", "LORAPLEX_LORA_KERNEL")
    if lib is None:
        return None
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p
    lib.lora_site.argtypes = [i64, i64, ptr, ptr, i32, ptr, ptr, ptr, i32]
    lib.lora_site.restype = ctypes.c_int
    return lib


@functools.cache
def load_quant() -> ctypes.CDLL | None:
    """The int4/int8 (and AVX512-BF16 bf16) matmul library (quant_cpu.c), or None (with one warning
    saying why)."""
    lib = _library(QUANT_SOURCE, "int8/int4", "LORAPLEX_QUANT_KERNEL")
    if lib is None:
        return None
    lib = quant_signatures(lib)
    # Without AVX2 (an ARM CPU, an old x86) the library is its plain C path: 7-13x slower than its
    # AVX2 path on the same x86 CPU, where PyTorch's kernels have NEON/SSE code; they serve instead.
    # The C path stays as the readable reference the vector paths are tested against.
    if lib.q_path() == b"c":
        log.info("no AVX2 on this CPU: int8/int4 use PyTorch's kernels")
        return None
    return lib


def quant_signatures(lib: ctypes.CDLL) -> ctypes.CDLL:
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p
    lib.q_matmul.argtypes = [i32, i64, i64, i64, ptr, i32, ptr, ptr, i32]
    lib.q_matmul.restype = ctypes.c_int
    lib.q_path.argtypes = []
    lib.q_path.restype = ctypes.c_char_p
    lib.q_bf16.argtypes = []
    lib.q_bf16.restype = ctypes.c_int
    lib.q_bf16_matmul.argtypes = [i64, i64, i64, ptr, ptr, ptr, i32]
    lib.q_bf16_matmul.restype = ctypes.c_int
    lib.q_f32.argtypes = []
    lib.q_f32.restype = ctypes.c_int
    lib.q_f32_matmul.argtypes = [i64, i64, i64, ptr, ptr, ptr, i32]
    lib.q_f32_matmul.restype = ctypes.c_int
    lib.q_f16_matmul.argtypes = [i64, i64, i64, ptr, ptr, ptr, i32]
    lib.q_f16_matmul.restype = ctypes.c_int
    return lib


@functools.cache
def load_decode() -> ctypes.CDLL | None:
    """decode_cpu.c (a decode step's RMSNorm and attention), or None (with one warning saying why)."""
    lib = _library(DECODE_SOURCE, "decoding's norms and attention", "LORAPLEX_DECODE_KERNEL")
    return None if lib is None else decode_signatures(lib)


def decode_signatures(lib: ctypes.CDLL) -> ctypes.CDLL:
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p
    lib.rms_norm.argtypes = [i64, i64, ptr, ptr, ptr, ptr, ctypes.c_float, i32]
    lib.rms_norm.restype = ctypes.c_int
    # n, heads, kv heads, d, qkv, its row stride, cos, sin, k and v caches, their strides, slots, positions, out
    lib.decode_attention.argtypes = [i64, i64, i64, i64, ptr, i64, ptr, ptr, ptr, ptr, i64, i64, i64, ptr, ptr, ptr]
    lib.decode_attention.argtypes += [i32, i32, i32]  # bf16, kv16 (an fp16 cache), threads
    lib.decode_attention.restype = ctypes.c_int
    # n, heads, kv heads, d, qkv, its row stride, cos, sin, k and v caches, the slot's offset, head and
    # position strides, start, out, bf16, kv16, threads
    lib.prefill_attention.argtypes = [i64, i64, i64, i64, ptr, i64, ptr, ptr, ptr, ptr, i64, i64, i64, i64, ptr]
    lib.prefill_attention.argtypes += [i32, i32, i32]
    lib.prefill_attention.restype = ctypes.c_int
    lib.silu_mul.argtypes = [i64, i64, ptr, ptr, i32]
    lib.silu_mul.restype = ctypes.c_int
    return lib
