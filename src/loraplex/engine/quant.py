"""Weight-only int8 / int4 base weights for the serving model on CPU (and, where the CPU has
AVX512-BF16 or AVX2, its unquantized bf16 or fp32 weights in the same kernel's tiles: `Tiles`).

    int8: w[n, k] ~= d[n, g] * q[n, k]                  q in -127..127, g = k // 32 (GGUF Q8_0's scheme);
                                                        on PyTorch's kernel one scale per output row
    int4: w[n, k] ~= d[n, g] * q[n, k] + m[n, g]        q in 0..15, g = k // 32 (GGUF Q4_1's scheme)

A single decode stream reads every weight once per token, so on CPU its speed is the bytes read:
SmolLM2-135M's projections and output head are 269 MB in bf16, 135 MB in int8 and ~75 MB in int4
(one thread streams ~8 GB/s here, measured per matmul).

Both run on loraplex's own kernel (quant_cpu.c, built for the machine at first use by
lora_kernel.py): activations rounded to int8 per group of 32 (as llama.cpp does for Q4_1 and Q8_0)
and integer dot products on the CPU's own instructions (AVX-512 VNNI, AVX-VNNI or AVX2, chosen
when it is built), 16 output rows at a time. Where it cannot be built (no C compiler), the CPU has
no AVX2 (ARM), or a shape does not fit its tiles (see `fits_int4`), they use PyTorch's packed kernels
(`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`), which ATen dispatches at run time to the
machine's instruction set. Those are fast with bf16 activations only (fp32 or fp16 inputs measured
10-30x slower), so `QuantWeight.linear` feeds them bf16 and returns the model's dtype. Either way
an fp32 model on an AVX2 CPU keeps fp32 everywhere else (norms, attention, the KV cache, LoRA).
On a 2-core AVX-512 Xeon without bf16, one decode step of SmolLM2 (1 thread): the int4
projections 6.3 ms and the int8 output head 1.4 ms on quant_cpu.c, against 4.3 ms for the head
alone on PyTorch's int8 kernel.

For a base that arrived as GGUF Q4_1 (the embedded SmolLM2), int4 is that file's own weights again:
Q4_1 stores each block of 32 as min + d * q with q = 0 at the block's minimum and 15 at its maximum,
so the min/max quantization below finds the same d, min and q from the dequantized weights
(`tests/test_quant.py` checks this on the embedded model; d and min are fp16, as in the file).

Not here: the KV cache is not quantized, and LoRA deltas stay in their own precision on top of the
quantized base (as QLoRA serving does), so every adapter works unchanged. CUDA is not supported (a
clear error; use vLLM's quantized models there).
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from loraplex.engine import lora_kernel
from loraplex.errors import UserError

log = logging.getLogger(__name__)

Quantize = Literal["none", "int8", "int4"]
Requested = Literal["auto", "none", "int8", "int4"]  # what --quantize takes; `resolve` settles "auto"
MODES: tuple[str, ...] = ("auto", "none", "int8", "int4")
GROUP = 32  # group size along the input (int4; int8 on quant_cpu.c): GGUF's block size
TILE, INT4_BLOCK, INT8_BLOCK = 16, 320, 544  # quant_cpu.c: output rows per tile; bytes per (tile, group)
# quant_cpu.c's tile layout and `quantize`'s rounding, as stored by `Store`: change it with either
LAYOUT = "tiles16-q4_1-q8_0-1"
_NONE = torch.empty(0)  # `scales` of weights on quant_cpu.c (theirs are in `data`)
_INT8_MM = torch.ops.aten._weight_int8pack_mm.default  # the overload itself: no per-call overload lookup
_INT4_MM = torch.ops.aten._weight_int4pack_mm_for_cpu.default


@dataclass(frozen=True)
class QuantWeight:
    """One projection's weight, quantized; `linear(x)` = x @ W.T with W = `dequantize()`."""

    mode: Literal["int8", "int4"]
    # On quant_cpu.c (`kernel` set): tiles of 16 output rows, [out / 16, bytes per tile] uint8, per
    # group of 32 inputs int4: 256 bytes of nibbles, 16 d and 16 m fp16; int8: 512 bytes, 16 d fp16
    # (see quant_cpu.c). On PyTorch's kernels: int8 [out, in]; int4 [out, in / 2] uint8 in torch's
    # private packing.
    data: torch.Tensor
    scales: torch.Tensor  # PyTorch's kernels: int8 [out] bf16, int4 [in / GROUP, out, 2] bf16; else empty
    out_features: int
    in_features: int
    kernel: ctypes.CDLL | None = None  # quant_cpu.c, when `data` is in its layout

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.scales.nbytes

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        # Every tensor op costs 1-3 us of dispatch, about what a decode step's small matmuls cost
        # themselves, so casts and reshapes that would change nothing are skipped, not called.
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        if self.kernel is not None:
            y = self._tiled(x2)
        else:
            if x2.dtype != torch.bfloat16:
                x2 = x2.to(torch.bfloat16)
            int8 = self.mode == "int8"
            y = _INT8_MM(x2, self.data, self.scales) if int8 else _INT4_MM(x2, self.data, GROUP, self.scales)
            if x.dtype != torch.bfloat16:
                y = y.to(x.dtype)
        if x.dim() != 2:
            y = y.view(*x.shape[:-1], self.out_features)
        return y if bias is None else y + bias

    def _tiled(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, in] (fp32 or bf16; others computed in fp32) @ W.T on quant_cpu.c, in x's dtype."""
        assert self.kernel is not None
        x = x if x.dtype in (torch.float32, torch.bfloat16) else x.float()
        x = x if x.is_contiguous() else x.contiguous()
        m = x.shape[0]
        y = torch.empty((m, self.out_features), dtype=x.dtype)
        if m:
            rc = self.kernel.q_matmul(
                4 if self.mode == "int4" else 8, m, self.in_features, self.out_features, x.data_ptr(),
                x.dtype == torch.bfloat16, self.data.data_ptr(), y.data_ptr(), torch.get_num_threads(),
            )  # fmt: skip
            if rc:
                raise MemoryError(f"{self.mode} kernel: no memory for {m} x {self.in_features} activations")
        return y

    def _int8_tiles(self) -> tuple[torch.Tensor, torch.Tensor]:
        """int8 on quant_cpu.c: (q [out/16, G, 8, 16, 4] int8 = (tile, g, c, i, b), d [out/16, G, 16])."""
        t, g = self.out_features // TILE, self.in_features // GROUP
        blocks = self.data.view(t, g, INT8_BLOCK)
        q = blocks[..., :512].view(torch.int8).view(t, g, 8, TILE, 4)
        return q, blocks[..., 512:].contiguous().view(torch.float16).float()

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight this stands for: the naive reference that `linear` must equal (to the
        rounding of activations: to bf16 on PyTorch's kernels, to int8 per group of 32 on quant_cpu.c)."""
        n, k = self.out_features, self.in_features
        if self.mode == "int8" and self.kernel is not None:
            q, d = self._int8_tiles()  # (tile, g, c, i, b), (tile, g, i) -> (n, g, 32), (n, g, 1)
            w = q.permute(0, 3, 1, 2, 4).reshape(n, k // GROUP, GROUP).float()
            return (w * d.permute(0, 2, 1).reshape(n, k // GROUP, 1)).view(n, k)
        if self.mode == "int8":
            return self.data.float() * self.scales.float()[:, None]
        if self.kernel is not None:
            blocks = self.data.view(n // TILE, k // GROUP, INT4_BLOCK)
            nib = blocks[..., :256].view(n // TILE, k // GROUP, 4, TILE, 4)  # (tile, g, c, i, b)
            q = torch.cat([nib & 15, nib >> 4], 2).permute(0, 3, 1, 2, 4).reshape(n, k).float()
            d, m = (blocks[..., o : o + 32].contiguous().view(torch.float16).float() for o in (256, 288))
            d, m = (t.permute(0, 2, 1).reshape(n, k // GROUP, 1) for t in (d, m))  # (tile, g, i) -> (n, g)
            return (q.view(n, k // GROUP, GROUP) * d + m).view(n, k)
        eye = torch.eye(self.in_features, dtype=torch.bfloat16)
        # The packed layout is private to the kernel, so read it back through the kernel itself:
        # identity rows in, each output column is one input's weights; exact (products with 1.0).
        w = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.data, GROUP, self.scales)
        return w.float().T.contiguous()

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of the fp32 weight (an embedding lookup on a tied, int8 output head)."""
        if self.mode != "int8":
            raise ValueError("row lookup needs the int8 layout")
        if self.kernel is None:
            return self.data[ids].float() * self.scales[ids].float()[..., None]
        flat = ids.reshape(-1)
        tile, lane, at = flat // TILE, flat % TILE, torch.arange(flat.numel())
        g = self.in_features // GROUP
        # only the rows' tiles are read (converting the whole head's scales cost 1.3 ms a decode step)
        blocks = self.data.view(-1, g, INT8_BLOCK)[tile]  # (row, g, 544)
        q = blocks[..., :512].view(torch.int8).view(-1, g, 8, TILE, 4)[at, :, :, lane]  # (row, g, c, b)
        d = blocks[..., 512:].view(torch.float16)[at, :, lane].float()  # (row, g)
        return (q.reshape(flat.numel(), g, GROUP).float() * d[..., None]).view(*ids.shape, self.in_features)


@dataclass(frozen=True)
class Tiles:
    """An unquantized bf16 or fp32 weight in quant_cpu.c's tiles of 16 output rows; `linear(x)` =
    x @ W.T with W = `dense()`, the same products as F.linear (fp32 sums; bf16 rounded once) in
    another order.

    Why: at 1-8 rows the BLAS libraries F.linear calls read the weights well under memory speed on
    one core: oneDNN's bf16 at ~12 GB/s on a Zen 4, where the bf16 tiles stream ~33 GB/s (gate|up
    3,072 x 576, 1 row: 248 -> 107 us; 8 rows 284 -> 111 us); MKL's fp32 held to AVX2 at ~19 GB/s
    (docs/performance.md has the fp32 tiles' figures). A 300-token prompt runs level with oneDNN on
    the bf16 tiles, so one layout serves both."""

    # [out / 16, in / pair, 16, pair], pair = 2 for bf16 (vdpbf16ps's operand), 1 for fp32:
    # element (t, p, i, b) = W[16 t + i, pair * p + b]
    data: torch.Tensor
    out_features: int
    in_features: int
    kernel: ctypes.CDLL

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        dtype = torch.float32 if self.data.dtype == torch.float16 else self.data.dtype  # fp16 tiles: fp32 sums
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        x2 = x2 if x2.dtype == dtype else x2.to(dtype)
        x2 = x2 if x2.is_contiguous() else x2.contiguous()
        m = x2.shape[0]
        y = torch.empty((m, self.out_features), dtype=dtype)
        if m:
            stored = self.data.dtype  # a per-call dict here would cost more than this on decode's hot path
            fn = (
                self.kernel.q_f32_matmul
                if stored == torch.float32
                else self.kernel.q_bf16_matmul
                if stored == torch.bfloat16
                else self.kernel.q_f16_matmul
            )
            rc = fn(
                m, self.in_features, self.out_features, x2.data_ptr(), self.data.data_ptr(), y.data_ptr(),
                torch.get_num_threads(),
            )  # fmt: skip
            if rc:
                raise RuntimeError(f"{dtype} kernel refused {m} x {self.in_features} -> {self.out_features} ({rc})")
        if x.dim() != 2:
            y = y.view(*x.shape[:-1], self.out_features)
        if x.dtype != dtype:
            y = y.to(x.dtype)
        return y if bias is None else y + bias

    def dense(self) -> torch.Tensor:
        """The [out, in] weight."""
        return self.data.permute(0, 2, 1, 3).reshape(self.out_features, self.in_features)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of the weight (an embedding lookup on a tied output head)."""
        flat = ids.reshape(-1)
        rows = self.data[flat // TILE, :, flat % TILE]  # (row, in / pair, pair)
        return rows.reshape(*ids.shape, self.in_features)


def tile(w: torch.Tensor, dtype: torch.dtype) -> Tiles | None:
    """`w` [out, in] in `dtype` (bf16, fp16 or fp32) as tiles where quant_cpu.c has that path (bf16:
    AVX512-BF16; fp32 and fp16, whose products are fp32: AVX2 or AVX-512) and the shape fits (out a
    multiple of 16; bf16: in even); otherwise None."""
    kernel = lora_kernel.load_quant()
    n, k = w.shape
    pair = 2 if dtype == torch.bfloat16 else 1
    if kernel is None or not (kernel.q_bf16() if pair == 2 else kernel.q_f32()) or n % TILE or k % pair:
        return None
    w = w.detach().to(dtype)
    data = w.reshape(n // TILE, TILE, k // pair, pair).permute(0, 2, 1, 3).contiguous()
    return Tiles(data, n, k, kernel)


def fits_int4(out_features: int, in_features: int) -> bool:
    """Shapes the int4 kernels take (quant_cpu.c's and PyTorch's: tiles of 16 rows, groups of 32);
    others fall back to int8."""
    return out_features % TILE == 0 and in_features % GROUP == 0


def quantize(w: torch.Tensor, mode: Literal["int8", "int4"]) -> QuantWeight:
    """`w` [out, in] (any float dtype) -> its int8 or int4 form: in quant_cpu.c's layout where that
    kernel builds and the shape fits its tiles (`fits_int4`), else PyTorch's; int4 falls back to
    int8 where the shape does not fit."""
    w = w.detach().float()
    n, k = w.shape
    kernel = lora_kernel.load_quant() if fits_int4(n, k) else None
    t, g = n // TILE, k // GROUP
    if mode == "int4" and kernel is not None:
        grp = w.view(n, g, GROUP)
        lo, hi = grp.amin(-1), grp.amax(-1)
        # d and m rounded to fp16 first (as GGUF stores them), q chosen against the rounded values
        d, m = ((hi - lo) / 15).to(torch.float16), lo.to(torch.float16)
        df = d.float()
        safe = torch.where(df > 0, df, torch.ones_like(df))
        q = torch.round((grp - m.float()[..., None]) / safe[..., None]).clamp_(0, 15).to(torch.uint8)
        # (tile, g, c, i, b) = q[16 tile + i, 32 g + 4 c + b]: c < 4 in the low nibble, c + 4 in the high
        q = q.view(t, TILE, g, 8, 4).permute(0, 2, 3, 1, 4)
        nib = (q[:, :, :4] | (q[:, :, 4:] << 4)).reshape(t, g, 256)
        d, m = (v.view(t, TILE, g).transpose(1, 2).contiguous().view(torch.uint8) for v in (d, m))
        return QuantWeight("int4", torch.cat([nib, d, m], -1).reshape(t, -1).contiguous(), _NONE, n, k, kernel)
    if mode == "int4" and fits_int4(n, k):
        grp = w.view(n, g, GROUP)
        lo, hi = grp.amin(-1), grp.amax(-1)
        scale = (hi - lo) / 15
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round((grp - lo[..., None]) / safe[..., None]).clamp_(0, 15).to(torch.int32).view(n, k)
        zero = lo + 8 * scale  # the kernel computes (q - 8) * scale + zero
        scales = torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        return QuantWeight("int4", packed, scales, n, k)
    if kernel is not None:  # Q8_0: a fp16 scale per row and group, q chosen against the rounded scale
        grp = w.view(n, g, GROUP)
        d = (grp.abs().amax(-1) / 127).to(torch.float16)
        df = d.float()
        safe = torch.where(df > 0, df, torch.ones_like(df))
        q8 = torch.round(grp / safe[..., None]).clamp_(-127, 127).to(torch.int8)
        # (tile, g, c, i, b) = q8[16 tile + i, 32 g + 4 c + b], then the 16 rows' d of the group
        tiles = q8.view(t, TILE, g, 8, 4).permute(0, 2, 3, 1, 4).reshape(t, g, 512).view(torch.uint8)
        ds = d.view(t, TILE, g).transpose(1, 2).contiguous().view(torch.uint8)
        return QuantWeight("int8", torch.cat([tiles, ds], -1).reshape(t, -1).contiguous(), _NONE, n, k, kernel)
    scale = w.abs().amax(1) / 127
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q8 = torch.round(w / safe[:, None]).clamp_(-127, 127).to(torch.int8)
    return QuantWeight("int8", q8.contiguous(), scale.to(torch.bfloat16), n, k)


class Store:
    """One base's weights quantized in one mode, kept on disk (one safetensors file under
    `$LORAPLEX_HOME/quantized/`, named by the base's weights hash, the mode and `LAYOUT`), so that
    quantizing happens once per base, as the GGUF conversion does (models/load.py): later starts
    read the tiles. `get(name, mode, make)` returns the stored weight or quantizes `make()`; `save()`
    writes what was made. Only quant_cpu.c's layout is stored (PyTorch's packed int4 layout is private
    to the torch build that made it): without that kernel nothing is read or written. A file that
    does not read back (truncated, another layout) is rebuilt, with a warning. With every weight
    stored, the fp32 checkpoint's projections are never read (models/checkpoint.py reads tensors
    one at a time; norms, biases and the config still come from it): SmolLM2's int4 engine starts in
    3.5 s instead of 4.7-6.1 s, with a peak RSS of 460 MiB instead of 1,080-1,130 (2-core Xeon)."""

    def __init__(self, path: Path | None):
        self.path = path if path is not None and lora_kernel.load_quant() is not None else None
        self.loaded: dict[str, QuantWeight] = {}
        self.made: dict[str, QuantWeight] = {}
        if self.path is not None and self.path.is_file():
            try:
                self.loaded = _read(self.path)
            except Exception as e:  # noqa: BLE001 - any unreadable file is rebuilt
                log.warning("quantized weights in %s do not read back (%s): quantizing again", self.path, e)

    def get(self, name: str, mode: Literal["int8", "int4"], make: Callable[[], torch.Tensor]) -> QuantWeight:
        hit = self.loaded.get(name)
        if hit is not None and hit.mode == mode:
            return hit
        w = quantize(make(), mode)
        self.made[name] = w
        return w

    def save(self) -> None:
        """Writes the stored and newly made weights (atomically), if anything was made."""
        every = {**self.loaded, **self.made}
        if self.path is None or not self.made or any(w.kernel is None for w in every.values()):
            return
        from safetensors.torch import save_file

        shapes = {k: [w.mode, w.out_features, w.in_features] for k, w in every.items()}
        meta = {"layout": LAYOUT, "weights": json.dumps(shapes)}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".tmp", dir=self.path.parent)
            os.close(fd)
            try:
                save_file({k: w.data for k, w in every.items()}, tmp, meta)
                os.chmod(tmp, 0o644)  # mkstemp's 0600 would keep other users' servers quantizing
                os.replace(tmp, self.path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        except OSError as e:  # a read-only home: quantize again next start
            log.warning("could not keep the quantized weights in %s: %s", self.path, e)


def _read(path: Path) -> dict[str, QuantWeight]:
    """A `Store` file's weights, each checked against the layout its metadata names."""
    from safetensors import safe_open

    kernel = lora_kernel.load_quant()
    out: dict[str, QuantWeight] = {}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("layout") != LAYOUT:
            raise ValueError(f"layout {meta.get('layout')!r}, expected {LAYOUT!r}")
        for name, (m, n, k) in json.loads(meta["weights"]).items():
            data = f.get_tensor(name)
            block = INT4_BLOCK if m == "int4" else INT8_BLOCK
            fits = data.dtype == torch.uint8 and tuple(data.shape) == (n // TILE, k // GROUP * block)
            if m not in ("int8", "int4") or not fits:
                raise ValueError(f"{name}: {m} {tuple(data.shape)} {data.dtype} does not fit {n} x {k}")
            out[name] = QuantWeight(m, data, _NONE, n, k, kernel)
    return out


def store_path(weights_sha256: str, mode: Quantize) -> Path:
    """Where `Store` keeps a base's weights in `mode`."""
    from loraplex.paths import home

    return home() / "quantized" / f"{weights_sha256[:24]}-{mode}-{LAYOUT}.safetensors"


def mode(value: str) -> Requested:
    """A `--quantize` value, parsed (a clear error for anything else)."""
    if value not in MODES:
        raise UserError(f"--quantize {value!r}: use {', '.join(MODES)}")
    return value  # type: ignore[return-value]


def resolve(requested: Requested, device: str) -> Quantize:
    """`auto` -> int4 on a CPU, unquantized elsewhere: the fastest mode within the quality targets
    (docs/performance.md "Quantized base weights": SmolLM2 one stream 3.2x fp32's tokens/s, 8
    adapters 2.4x; held-out answers 20/20 identical to fp32's, next-token agreement 97.2%)."""
    if requested == "auto":
        return "int4" if device == "cpu" else "none"
    return requested


def check(mode: Quantize, device: str) -> None:
    """A clear error for a mode this device cannot serve."""
    if mode != "none" and device != "cpu":
        raise UserError(
            f"quantize {mode}: weight-only int8/int4 runs on CPU only; on {device} serve unquantized "
            "(--quantize none) or use --engine vllm with a quantized model"
        )


Weight = torch.Tensor | QuantWeight | Tiles  # what the serving model holds per projection


def linear(x: torch.Tensor, w: Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T (+ bias) for a dense, a quantized or a tiled bf16 weight."""
    return F.linear(x, w, bias) if isinstance(w, torch.Tensor) else w.linear(x, bias)
