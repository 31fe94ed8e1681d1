"""Which device and which precision: CUDA, then MPS, then CPU; bf16 only where it is measurably faster.

Shared by training and serving. It does not move models; callers do.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import torch

from loraplex import cpu_isa
from loraplex.errors import UserError


def pick_device(choice: str) -> str:
    if choice != "auto":
        if choice == "cuda" and not torch.cuda.is_available():
            raise UserError("train.device is cuda but no CUDA device is available")
        if choice == "mps" and not torch.backends.mps.is_available():
            raise UserError("train.device is mps but MPS is not available")
        return choice
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def bf16_is_faster(device: str) -> bool:
    """Measure instead of guessing: CPUs without AVX512-BF16/AMX run bf16 matmuls slower than fp32."""
    if device == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device != "cpu":
        return False
    if cpu_isa.held() == "avx2":  # no bf16 instructions: oneDNN would convert every element
        return False
    try:  # the CPU says so: AVX512-BF16 or AMX-BF16 instructions
        flags = Path("/proc/cpuinfo").read_text().split()
        if "avx512_bf16" in flags or "amx_bf16" in flags:
            return True
    except OSError:
        pass
    return _bf16_measured_faster()


@functools.cache  # the CPU does not change while a process runs; training, serving and the encoder all ask
def _bf16_measured_faster() -> bool:
    """bf16 against fp32 on this CPU's matmuls: interleaved and best-of-5, so a busy machine does not
    skew the choice, after a one-product probe that settles a CPU emulating bf16. Such a CPU (AVX2
    only: oneDNN converts every element) takes ~30 times as long in bf16, and the best-of-5 cost
    11 s there, at each training run, server start and encoder load."""
    a32, b32 = torch.randn(256, 576), torch.randn(576, 1536)

    def once(dtype: torch.dtype, rows: int, times: int) -> float:
        a, b = a32[:rows].to(dtype), b32.to(dtype)
        a @ b  # warm up
        t = time.perf_counter()
        for _ in range(times):
            a @ b
        return time.perf_counter() - t

    if once(torch.bfloat16, 32, 1) > 3 * once(torch.float32, 32, 1):
        return False  # far slower, not near the 0.75x line that the measurement below draws
    best = {torch.float32: float("inf"), torch.bfloat16: float("inf")}
    for _ in range(5):
        for dtype in best:
            best[dtype] = min(best[dtype], once(dtype, 256, 5))
    return best[torch.bfloat16] < 0.75 * best[torch.float32]


def pick_precision(choice: str, device: str) -> torch.dtype:
    if choice == "fp32":
        return torch.float32
    if choice == "fp16":
        if device == "cpu":
            raise UserError("train.precision fp16 is for GPUs; use bf16 or auto on CPU")
        return torch.float16
    if choice == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if bf16_is_faster(device) else torch.float32


def peak_memory(device: str) -> tuple[int, str]:
    """The run's peak memory so far: what PyTorch allocated on the GPU, else the process's peak RSS."""
    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated(device)), "GPU"
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "RSS"  # Linux reports KiB
