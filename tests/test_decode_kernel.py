"""decode_cpu.c (a decode step's norms and attention, and one row's prompt through them) against
DecoderModel.forward's PyTorch path, its naive reference: same logits and the same KV cache after
prompts and several steps of rows at different positions, on a Llama with grouped-query attention
and a Qwen2 with q/k/v biases."""

from __future__ import annotations

import ctypes
import platform
from pathlib import Path
from typing import Any

import pytest
import torch

from loraplex.engine import lora_kernel
from loraplex.engine.model import DecoderModel, Step

pytestmark = pytest.mark.skipif(lora_kernel.load_decode() is None, reason="no C compiler")


def random_model(kind: str, heads: int = 8, kv: int = 2) -> torch.nn.Module:
    """hidden 64: 8 heads are 8 dimensions each (the kernel's general loops), 2 heads 32 (its blocks of 16)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    shape: dict[str, Any] = dict(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=heads,
        num_key_value_heads=kv, max_position_embeddings=1024, rope_theta=10000.0,
    )  # fmt: skip
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**shape)).eval()
    return LlamaForCausalLM(LlamaConfig(**shape)).eval()


def decode(model: DecoderModel, ops: ctypes.CDLL | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits of three prompts' prefills (one in two chunks) and of 7 decode steps after them (on
    `ops`, or on the PyTorch path with None), and the KV cache they leave."""
    lengths = [5, 37, 300]  # rows at different positions; 300 is past the cache's first 256
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 300, (1, n), generator=gen) for n in lengths]
    model.decode_ops = ops
    cache = model.new_cache(4, 1024)
    logits = []
    for slot, ids in enumerate(prompts):  # prefill: one row's tokens through the kernels (model._prefill_one)
        if slot == 1:  # in two chunks, the second after the 20 positions the first left in the cache
            logits.append(model.forward(Step(ids[:, :20], torch.tensor([0]), slot, None), cache))
            logits.append(model.forward(Step(ids[:, 20:], torch.tensor([20]), slot, None), cache))
        else:
            logits.append(model.forward(Step(ids, torch.tensor([0]), slot, None), cache))
    starts = torch.tensor(lengths)
    for _ in range(6):
        ids = torch.randint(0, 300, (len(lengths), 1), generator=torch.Generator().manual_seed(int(starts[0])))
        logits.append(model.forward(Step(ids, starts, 0, None), cache))
        starts = starts + 1
    logits.append(model.forward(Step(ids[1:2], starts[1:2], 1, None), cache))  # one row, in slot 1
    end = int(starts.max()) + 1
    return torch.cat([x.reshape(-1, 300) for x in logits]), cache.k[:, :3, :, :end], cache.v[:, :3, :, :end]


def assert_fp32_equal(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...]) -> None:
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4)  # logits
    for a, b in zip(got[1:], want[1:], strict=True):  # keys and values (the 2nd layer's input differs by rounding)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("quantize", ["none", "int4"])
@pytest.mark.parametrize("heads", [(8, 2), (2, 1)], ids=["d8-gqa4", "d32-gqa2"])
def test_decode_steps_equal_the_pytorch_path(
    kind: str, dtype: torch.dtype, quantize: str, heads: tuple[int, int]
) -> None:
    model = DecoderModel(random_model(kind, *heads), dtype, "cpu", quantize)  # type: ignore[arg-type]
    assert model.decode_ops is not None
    got, want = decode(model, model.decode_ops), decode(model, None)
    if dtype == torch.float32 and quantize == "none":
        assert_fp32_equal(got, want)
    else:  # bf16: the kernel rounds once where PyTorch rounds after every op; int4 rounds activations
        # to int8 per group of 32, so a last-bit difference in the input can move a value a step
        assert (got[0] - want[0]).abs().max() <= 0.05 * want[0].abs().max()
        assert (got[0].argmax(-1) == want[0].argmax(-1)).float().mean() >= 0.89  # near-ties of a random model
        for a, b in zip(got[1:], want[1:], strict=True):
            assert (a.float() - b.float()).abs().max() <= 0.02 * b.float().abs().max()


def test_a_cache_dtype_the_kernel_cannot_read_is_refused() -> None:
    with pytest.raises(ValueError, match="KV cache"):
        DecoderModel(random_model("llama"), torch.bfloat16, "cpu", kv_dtype=torch.float16)
    with pytest.raises(ValueError, match="KV cache"):
        DecoderModel(random_model("llama"), torch.float32, "cpu", kv_dtype=torch.bfloat16)


def has_avx2() -> bool:
    try:
        return " avx2" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


X86 = platform.machine() in ("x86_64", "AMD64")


def assert_fp16_cache_equal(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...]) -> None:
    """fp32 activations over an fp16 cache: both paths round the same keys and values to fp16, so
    they differ where fp32 arithmetic order puts a value on the other side of an fp16 rounding."""
    torch.testing.assert_close(got[0], want[0], rtol=1e-3, atol=1e-3)
    for a, b in zip(got[1:], want[1:], strict=True):
        assert a.dtype == b.dtype == torch.float16
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-3, atol=1e-4)  # one fp16 step at most


@pytest.mark.skipif(not X86, reason="x86-64 builds")
@pytest.mark.parametrize(
    "arch",
    [
        ("-march=x86-64",),
        ("-march=x86-64", "-U__FLT16_MANT_DIG__"),  # a compiler without _Float16: fp16 by bits
        ("-march=native",),
        *([("-march=haswell",)] if has_avx2() else []),
    ],
    ids=lambda a: " ".join(a),
)
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16])
def test_every_build_and_two_threads_equal_the_pytorch_path(
    tmp_path: Path, arch: tuple[str, ...], kv_dtype: torch.dtype
) -> None:
    """The same source as compiled for a baseline x86-64 (SSE2), an AVX2 CPU and this one, run on
    one thread and on two (rows x kv heads split between them), over an fp32 and an fp16 cache."""
    cc = lora_kernel._compiler()
    assert cc is not None  # the module is skipped without one
    target = tmp_path / "decode.so"
    lora_kernel._build(cc, lora_kernel.DECODE_SOURCE, target, arch=arch)
    ops = lora_kernel.decode_signatures(ctypes.CDLL(str(target)))
    before = torch.get_num_threads()
    for heads in ((8, 2), (2, 1)):
        model = DecoderModel(random_model("llama", *heads), torch.float32, "cpu", kv_dtype=kv_dtype)
        want = decode(model, None)
        try:
            for threads in (1, 2):
                torch.set_num_threads(threads)
                got = decode(model, ops)
                (assert_fp32_equal if kv_dtype == torch.float32 else assert_fp16_cache_equal)(got, want)
        finally:
            torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_equals_torch_over_the_whole_range(dtype: torch.dtype) -> None:
    """The kernel's own e^x (vectorisable, see decode_cpu.c) against torch's SiLU: small, large and
    saturating gates of both signs."""
    ops = lora_kernel.load_decode()
    assert ops is not None
    gate = torch.cat([torch.linspace(-120, 120, 2001), torch.randn(1000) * 4, torch.tensor([0.0, 1e-30, -1e-30])])
    up = torch.randn(gate.numel()) + 2.0
    gu = torch.stack([gate, up]).reshape(1, -1).to(dtype)
    out = torch.empty(1, gate.numel(), dtype=dtype)
    ops.silu_mul(1, gate.numel(), gu.data_ptr(), out.data_ptr(), int(dtype == torch.bfloat16))
    g, u = gu.float().view(2, -1)
    want = torch.nn.functional.silu(g) * u
    if dtype == torch.float32:
        torch.testing.assert_close(out.view(-1), want, rtol=2e-6, atol=1e-30)
    else:  # one rounding to bf16 at the end (torch rounds after silu and after the product)
        torch.testing.assert_close(out.view(-1).float(), want, rtol=2**-7, atol=1e-30)


def test_rms_norm_adds_the_residual_in_place() -> None:
    ops = lora_kernel.load_decode()
    assert ops is not None
    x, res, w = torch.randn(3, 96), torch.randn(3, 96), torch.randn(96)
    want_x = x + res
    want = torch.nn.functional.rms_norm(want_x, (96,), w, 1e-6)
    out = torch.empty_like(x)
    ops.rms_norm(3, 96, x.data_ptr(), res.data_ptr(), w.data_ptr(), out.data_ptr(), 1e-6, 0)
    torch.testing.assert_close(x, want_x, rtol=0, atol=0)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    ops.rms_norm(3, 96, x.data_ptr(), None, w.data_ptr(), out.data_ptr(), 1e-6, 0)  # no residual: x stays
    torch.testing.assert_close(x, want_x, rtol=0, atol=0)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


def attention_both_ways(
    ops: ctypes.CDLL, heads: int, kv: int, d: int, start: int, n: int, kind: str, threads: int
) -> tuple[torch.Tensor, ...]:
    """One row's n new tokens after `start` cached positions (slot 1 of 3), through `prefill_attention`
    and through n one-token rows of `decode_attention` (its reference: the loop a decode step runs),
    from the same cache -> (out, k, v) of each."""
    dtype = torch.bfloat16 if kind == "bf16" else torch.float32
    cache_dtype = torch.float16 if kind == "fp16 cache" else dtype
    gen = torch.Generator().manual_seed(start * 31 + n)
    qkv = torch.randn(n, (heads + 2 * kv) * d, generator=gen).to(dtype)
    angle = torch.rand(n, d, generator=gen) * 6.28
    cos, sin = angle.cos().contiguous(), angle.sin().contiguous()
    k0 = torch.randn(3, kv, start + n + 5, d, generator=gen).to(cache_dtype)  # [slots, kv, positions, d]
    v0 = torch.randn(3, kv, start + n + 5, d, generator=gen).to(cache_dtype)
    bf16, kv16 = int(kind == "bf16"), int(kind == "fp16 cache")
    got_k, got_v, want_k, want_v = k0.clone(), v0.clone(), k0.clone(), v0.clone()
    s_slot, s_head, s_pos = k0.stride()[:3]
    got, want = torch.empty(n, heads * d, dtype=dtype), torch.empty(n, heads * d, dtype=dtype)
    failed = ops.prefill_attention(
        n, heads, kv, d, qkv.data_ptr(), qkv.stride(0), cos.data_ptr(), sin.data_ptr(), got_k.data_ptr(),
        got_v.data_ptr(), 1 * s_slot, s_head, s_pos, start, got.data_ptr(), bf16, kv16, threads,
    )  # fmt: skip
    assert failed == 0
    slots, positions = torch.ones(n, dtype=torch.int64), torch.arange(start, start + n, dtype=torch.int64)
    failed = ops.decode_attention(
        n, heads, kv, d, qkv.data_ptr(), qkv.stride(0), cos.data_ptr(), sin.data_ptr(), want_k.data_ptr(),
        want_v.data_ptr(), s_slot, s_head, s_pos, slots.data_ptr(), positions.data_ptr(), want.data_ptr(), bf16,
        kv16, 1,
    )  # fmt: skip
    assert failed == 0
    return got, got_k, got_v, want, want_k, want_v


@pytest.mark.parametrize("kind", ["fp32", "fp16 cache", "bf16"])
@pytest.mark.parametrize("shape", [(9, 3, 64), (8, 2, 8), (4, 2, 40)], ids=["smollm2", "d8", "d40"])
@pytest.mark.parametrize("start,n", [(0, 1), (0, 23), (110, 20), (5, 70)])
@pytest.mark.parametrize("threads", [1, 2])
def test_prefill_attention_equals_the_decode_loop(
    kind: str, shape: tuple[int, int, int], start: int, n: int, threads: int
) -> None:
    """A prompt's tokens attending together (blocks of 16 keys, 4 queries at a time, split over
    threads) give what n one-token decode rows give: the same cache, bit for bit, and the same
    outputs up to the order of fp32 sums (bf16: one rounding step)."""
    ops = lora_kernel.load_decode()
    assert ops is not None
    got, got_k, got_v, want, want_k, want_v = attention_both_ways(ops, *shape, start, n, kind, threads)
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)  # every slot: the others untouched
    if kind == "bf16":
        torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=2**-7 * want.float().abs().max().item())
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
