"""`LORAPLEX_CPU_ISA`: run loraplex as on a CPU with fewer instructions than this one.

`native` (the default) uses what this CPU has. `avx2` runs as on an AVX2-only x86-64 CPU (Haswell
to Zen 3, most small cloud VMs): loraplex's C kernels are built for Haswell (AVX2, FMA, F16C, BMI2;
no AVX-512, no VNNI), the engine and training compute in fp32 (AVX2 has no bf16 instructions), and
PyTorch's own kernels are held to AVX2 by their variables (ATen, oneDNN, MKL). Uses: measuring the
AVX2 paths side by side with a peer built for AVX2 on a machine that also has AVX-512
(docs/cpu.md), and a VM that may be moved to an older host, where an AVX-512 build dies with SIGILL.

This module does not pick kernels or precision (engine/lora_kernel.py and models/device.py ask it);
it imports nothing heavy, because `hold_torch()` must run before torch loads.
"""

from __future__ import annotations

import os

from loraplex.errors import UserError

VARIABLE = "LORAPLEX_CPU_ISA"
# what the C compiler is told for each; tests build other paths with their own -march
MARCH = {"native": ("-march=native",), "avx2": ("-march=haswell",)}
# PyTorch reads these once, when it loads: ATen's vectorised ops, oneDNN (bf16/fp32 matmuls), MKL
TORCH = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}}


def held() -> str:
    """The instruction set loraplex runs as: "native" or a named one (UserError for any other)."""
    value = os.environ.get(VARIABLE, "").strip().lower() or "native"
    if value not in MARCH:
        raise UserError(f"{VARIABLE}={os.environ[VARIABLE]!r}: expected one of {', '.join(MARCH)}")
    return value


def hold_torch() -> None:
    """Set PyTorch's own limits for the held instruction set (never over a value already set).
    Called when loraplex is imported; an unknown value is left for `held()` to report."""
    value = os.environ.get(VARIABLE, "").strip().lower()
    for key, limit in TORCH.get(value, {}).items():
        os.environ.setdefault(key, limit)
