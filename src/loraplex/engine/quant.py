"""Weight-only int8 / int4 base weights for the serving model on CPU.

    int8: w[n, k] ~= scale[n] * q[n, k]                         q in -127..127, one scale per output row
    int4: w[n, k] ~= scale[n, g] * (q[n, k] - 8) + zero[n, g]   q in 0..15, g = k // 32 (GGUF Q4_1's scheme)

A single decode stream reads every weight once per token, so on CPU its speed is the bytes read:
SmolLM2-135M's projections and output head are 269 MB in bf16, 135 MB in int8 and ~75 MB in int4
(one thread streams ~8 GB/s here, measured per matmul). The matmuls are PyTorch's own packed
weight-only kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`), which ATen dispatches
at run time to the machine's instruction set (AVX2, AVX-512, ...), so nothing here is compiled for
one CPU. They are fast with bf16 activations only (fp32 or fp16 inputs measured 10-30x slower), so
`QuantWeight.linear` feeds them bf16 and returns the model's dtype: an fp32 model on an AVX2 CPU
keeps fp32 everywhere else (norms, attention, the KV cache, LoRA).

For a base that arrived as GGUF Q4_1 (the embedded SmolLM2), int4 is that file's own weights again:
Q4_1 stores each block of 32 as min + d * q with q = 0 at the block's minimum and 15 at its maximum,
so the min/max quantization below finds the same d, min and q from the dequantized weights
(`tests/test_quant.py` checks this on the embedded model; only the scales round to bf16).

Not here: activations stay in floating point, the KV cache is not quantized, and LoRA deltas stay
in their own precision on top of the quantized base (as QLoRA serving does), so every adapter
works unchanged. CUDA is not supported (a clear error; use vLLM's quantized models there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from loraplex.errors import UserError

Quantize = Literal["none", "int8", "int4"]
MODES: tuple[str, ...] = ("none", "int8", "int4")
GROUP = 32  # int4 group size along the input: GGUF's block size, and the smallest the kernel takes
_INT8_MM = torch.ops.aten._weight_int8pack_mm.default  # the overload itself: no per-call overload lookup
_INT4_MM = torch.ops.aten._weight_int4pack_mm_for_cpu.default


@dataclass(frozen=True)
class QuantWeight:
    """One projection's weight, quantized; `linear(x)` = x @ W.T with W = `dequantize()`."""

    mode: Literal["int8", "int4"]
    data: torch.Tensor  # int8 [out, in], or int4 packed by torch [out, in / 2] uint8
    scales: torch.Tensor  # int8: [out] bf16; int4: [in / GROUP, out, 2] bf16 (scale, zero)
    out_features: int
    in_features: int

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.scales.nbytes

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        # Every tensor op costs 1-3 us of dispatch, about what a decode step's small matmuls cost
        # themselves, so casts and reshapes that would change nothing are skipped, not called.
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        if x2.dtype != torch.bfloat16:
            x2 = x2.to(torch.bfloat16)
        int8 = self.mode == "int8"
        y = _INT8_MM(x2, self.data, self.scales) if int8 else _INT4_MM(x2, self.data, GROUP, self.scales)
        if x.dtype != torch.bfloat16:
            y = y.to(x.dtype)
        if x.dim() != 2:
            y = y.view(*x.shape[:-1], self.out_features)
        return y if bias is None else y + bias

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight this stands for: the naive reference that `linear` must equal."""
        if self.mode == "int8":
            return self.data.float() * self.scales.float()[:, None]
        eye = torch.eye(self.in_features, dtype=torch.bfloat16)
        # The packed layout is private to the kernel, so read it back through the kernel itself:
        # identity rows in, each output column is one input's weights; exact (products with 1.0).
        w = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.data, GROUP, self.scales)
        return w.float().T.contiguous()

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of the fp32 weight (an embedding lookup on a tied, int8 output head)."""
        if self.mode != "int8":
            raise ValueError("row lookup needs the int8 layout")
        return self.data[ids].float() * self.scales[ids].float()[..., None]


def fits_int4(out_features: int, in_features: int) -> bool:
    """Shapes the packed int4 kernel takes (it refuses others; those fall back to int8)."""
    return out_features % 16 == 0 and in_features % GROUP == 0


def quantize(w: torch.Tensor, mode: Literal["int8", "int4"]) -> QuantWeight:
    """`w` [out, in] (any float dtype) -> its int8 or int4 form; int4 falls back to int8 where
    the kernel does not take the shape (see `fits_int4`)."""
    w = w.detach().float()
    n, k = w.shape
    if mode == "int4" and fits_int4(n, k):
        g = w.view(n, k // GROUP, GROUP)
        lo, hi = g.amin(-1), g.amax(-1)
        scale = (hi - lo) / 15
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round((g - lo[..., None]) / safe[..., None]).clamp_(0, 15).to(torch.int32).view(n, k)
        zero = lo + 8 * scale  # the kernel computes (q - 8) * scale + zero
        scales = torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        return QuantWeight("int4", packed, scales, n, k)
    scale = w.abs().amax(1) / 127
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q8 = torch.round(w / safe[:, None]).clamp_(-127, 127).to(torch.int8)
    return QuantWeight("int8", q8.contiguous(), scale.to(torch.bfloat16), n, k)


def mode(value: str) -> Quantize:
    """A `--quantize` value, parsed (a clear error for anything else)."""
    if value not in MODES:
        raise UserError(f"--quantize {value!r}: use {', '.join(MODES)}")
    return value  # type: ignore[return-value]


def check(mode: Quantize, device: str) -> None:
    """A clear error for a mode this device cannot serve."""
    if mode != "none" and device != "cpu":
        raise UserError(
            f"quantize {mode}: weight-only int8/int4 runs on CPU only; on {device} serve unquantized "
            "(--quantize none) or use --engine vllm with a quantized model"
        )


def linear(x: torch.Tensor, w: torch.Tensor | QuantWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T (+ bias) for a dense or a quantized weight."""
    return F.linear(x, w, bias) if isinstance(w, torch.Tensor) else w.linear(x, bias)
