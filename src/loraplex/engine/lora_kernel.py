"""The CPU LoRA kernel (lora_cpu.c): compiled once per machine with the system C compiler, loaded with ctypes.

Built with `-fopenmp` where the compiler has it: the library then shares torch's OpenMP runtime
(torch ships libgomp.so.1 and the loader resolves the same soname to it) and runs on as many
threads as torch does. The shared library is cached in `$LORAPLEX_HOME/kernels/`, keyed by the
source, the compiler and the CPU (it is built with `-march=native`), and written under a temporary
name then renamed, so two processes starting together never load half a file. Where no compiler
works (Windows without one, a slim container) `load()` returns None and the engine keeps the plain
PyTorch path, which gives the same results more slowly; `LORAPLEX_LORA_KERNEL=off` chooses that path on purpose.

This module does not decide the weights' layout or when a batch uses the kernel (lora.py does).
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

from loraplex.paths import home

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("lora_cpu.c")
# -fassociative-math (with the flags it needs) lets the compiler vectorise the dot products' sums;
# not -ffast-math, which with gcc < 13 links crtfastmath into the library and so flushes denormals
# to zero in the whole process on load.
FLAGS = ["-O3", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math", "-fPIC", "-shared"]


def _compiler() -> str | None:
    cc = os.environ.get("CC") or (sysconfig.get_config_var("CC") or "cc")
    exe = shlex.split(cc)[0] if cc.strip() else "cc"
    return shutil.which(exe) or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _cpu_id() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() + platform.machine()


def _build(cc: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    errors = []
    try:
        # Apple clang refuses -fopenmp (the kernel then runs on one thread) and on arm64 -march=native
        for extra in (["-march=native", "-fopenmp"], ["-fopenmp"], ["-march=native"], []):
            proc = subprocess.run([cc, *FLAGS, *extra, str(SOURCE), "-o", tmp], capture_output=True, text=True)
            if proc.returncode == 0:
                os.replace(tmp, target)
                return
            errors.append(proc.stderr.strip()[-400:])
        raise RuntimeError("; ".join(errors))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def load() -> ctypes.CDLL | None:
    """The kernel library, or None (with one warning saying why) when it cannot be had."""
    if os.environ.get("LORAPLEX_LORA_KERNEL", "").lower() in ("off", "0", "torch", "false"):
        return None
    cc = _compiler()
    if cc is None:
        log.warning("no C compiler found: multi-LoRA decoding uses the slower PyTorch path")
        return None
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), cc.encode(), _cpu_id().encode(), " ".join(FLAGS).encode()]))
    target = home() / "kernels" / f"lora_cpu-{key.hexdigest()[:16]}{sysconfig.get_config_var('SHLIB_SUFFIX') or '.so'}"
    try:
        if not target.exists():
            log.info("compiling the CPU LoRA kernel with %s (once per machine)", cc)
            _build(cc, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, RuntimeError) as e:
        log.warning("the CPU LoRA kernel could not be built (%s): multi-LoRA decoding uses the PyTorch path", e)
        return None
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p
    lib.lora_site.argtypes = [i64, i64, ptr, ptr, i32, ptr, ptr, ptr, i32]
    lib.lora_site.restype = ctypes.c_int
    return lib
