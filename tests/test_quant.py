"""Weight-only int8 / int4 base weights (engine/quant.py) against their unquantized references."""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from loraplex import cpu_isa
from loraplex.adapters import registry
from loraplex.engine import lora_kernel, quant
from loraplex.engine.engine import Engine
from loraplex.engine.lora import AdapterWeights, LoraBatch, LoraStacks
from loraplex.engine.model import DecoderModel, Step
from loraplex.engine.protocol import collect
from loraplex.engine.sampling import SamplingParams
from loraplex.errors import UserError
from loraplex.models.load import load_model, load_tokenizer, resolve_base
from tests.conftest import make_adapter

PROMPTS = ["The office opens at nine and closes", "How many days of leave", "明澜科技的年假", "Expense claims are"]


@pytest.mark.parametrize("mode", ["int8", "int4", "int8-torch", "int4-torch"])
@pytest.mark.parametrize("shape", [(96, 64), (400, 128), (40, 64), (64, 48)])
def test_quantized_linear_equals_its_dequantized_weight_and_rounds_within_half_a_step(
    mode: str, shape: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On loraplex's kernel (quant_cpu.c) and, where it cannot be built, on PyTorch's."""
    if mode.endswith("-torch"):
        monkeypatch.setattr(lora_kernel, "load_quant", lambda: None)
        mode = mode.removesuffix("-torch")
    elif lora_kernel.load_quant() is None:
        pytest.skip("no C compiler: PyTorch's kernels run here (the -torch cases)")
    torch.manual_seed(0)
    w = torch.randn(*shape) * 0.05
    w[0, 0] = 0.6  # an outlier: per-row int8 takes it into its scale, int4 only into its group's
    qw = quant.quantize(w, mode)  # type: ignore[arg-type]
    # shapes the int4 kernels refuse (out % 16, in % 32) fall back to int8
    assert qw.mode == (mode if mode == "int8" or quant.fits_int4(*shape) else "int8")
    ref = qw.dequantize()
    n, k = shape
    if qw.mode == "int8" and qw.kernel is not None:  # quant_cpu.c: GGUF's Q8_0, a scale per group of 32
        step = (w.view(n, k // quant.GROUP, quant.GROUP).abs().amax(-1) / 127).repeat_interleave(quant.GROUP, 1)
    elif qw.mode == "int8":
        step = w.abs().amax(1, keepdim=True) / 127
    else:
        g = w.view(n, k // quant.GROUP, quant.GROUP)
        step = ((g.amax(-1) - g.amin(-1)) / 15).repeat_interleave(quant.GROUP, 1)
    # half a quantization step, plus the rounding of the scales (bf16, or fp16 on quant_cpu.c: 2^-8 relative at most)
    slack = 2**-8 * (w.abs().amax(1, keepdim=True) + 8 * step)
    assert ((ref - w).abs() <= step / 2 + slack).all()
    x = torch.randn(3, 5, k)
    got = qw.linear(x, torch.ones(n))
    want = x.bfloat16().float() @ ref.T + 1
    assert got.dtype == x.dtype and got.shape == (3, 5, n)
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)  # bf16 (or int8) activations, fp32 sums


def kernel_reference(x: torch.Tensor, qw: quant.QuantWeight) -> torch.Tensor:
    """What quant_cpu.c computes, the naive way (float64): each row's activations rounded to int8
    per group of 32 (scale max|x| / 127), times the dequantized weight."""
    xf = x.float().view(x.shape[0], -1, quant.GROUP)
    e = xf.abs().amax(-1, keepdim=True) / 127
    p = torch.round(xf * torch.where(e > 0, 1 / e, torch.zeros_like(e)))
    return (p.double() * e.double()).view(x.shape) @ qw.dequantize().double().T


def on_threads(threads: int, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """fn() with torch, and the kernels, which take torch's thread count, on `threads` threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def kernel_builds(tmp: Path) -> dict[str, ctypes.CDLL]:
    """quant_cpu.c built for each instruction-set path this CPU can run (plain C always)."""
    cc = lora_kernel._compiler()
    if cc is None:
        return {}
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    archs: dict[str, tuple[str, ...]] = {"c": ("-march=x86-64",) if platform.machine() in ("x86_64", "AMD64") else ()}
    if all(f" {f}" in flags for f in ("avx2", "fma", "f16c")):
        archs["avx2"] = ("-march=haswell",)
        if " avx_vnni" in flags:  # AVX-VNNI without AVX-512 (Alder Lake and later): its own path
            archs["avx-vnni"] = ("-march=haswell", "-mavxvnni")
    archs["native"] = ("-march=native",)
    built = {}
    for name, arch in archs.items():
        target = tmp / f"q4-{name}.so"
        lora_kernel._build(cc, lora_kernel.QUANT_SOURCE, target, arch)
        built[name] = lora_kernel.quant_signatures(ctypes.CDLL(str(target)))
    return built


def test_cpu_isa_avx2_runs_loraplex_as_on_an_avx2_only_cpu(tmp_path: Path) -> None:
    """LORAPLEX_CPU_ISA=avx2 (cpu_isa.py), in a fresh process: PyTorch is held to AVX2, the engine's
    kernels are built for Haswell (quant_cpu.c's AVX2 path, no AVX512-BF16 tiles) into a cache entry
    of their own, and the precision is fp32; an unknown value is an error naming the variable."""
    if platform.machine() not in ("x86_64", "AMD64") or lora_kernel._compiler() is None:
        pytest.skip("the AVX2 paths are x86-64's and need a C compiler")
    code = (
        "import loraplex, torch\n"
        "from loraplex.engine import lora_kernel\n"
        "from loraplex.models.device import bf16_is_faster\n"
        "q = lora_kernel.load_quant()\n"
        "print(torch.backends.cpu.get_cpu_capability(), q.q_path().decode(), q.q_bf16(), bf16_is_faster('cpu'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in cpu_isa.TORCH["avx2"]}
    env |= {"LORAPLEX_CPU_ISA": "avx2", "LORAPLEX_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["AVX2", "avx2", "0", "False"]
    native = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "LORAPLEX_CPU_ISA": "native"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert native.returncode == 0, native.stderr[-2000:]
    assert len(list((tmp_path / "kernels").glob("quant_cpu-*"))) == 2  # one build per instruction set
    env["LORAPLEX_CPU_ISA"] = "avx3"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "LORAPLEX_CPU_ISA='avx3': expected one of native, avx2" in bad.stderr


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_kernel_equals_its_naive_reference_on_every_instruction_path(tmp_path: Path, mode: str) -> None:
    """quant_cpu.c against `kernel_reference` (1e-5 relative: only float sums' order differs), on every
    path this machine runs (plain C, AVX2 where present, AVX-VNNI on AVX2 where the CPU has it, and
    what -march=native picks: AVX-512 VNNI, AVX-VNNI or AVX2), 1-16 rows (the 4- or 8-row blocks and their tails), fp32 and bf16
    activations, one and two threads, groups odd and even in number."""
    builds = kernel_builds(tmp_path)
    if not builds:
        pytest.skip("no C compiler: PyTorch's kernels run here")
    paths = {name: lib.q_path().decode() for name, lib in builds.items()}
    assert (
        paths["c"] == "c" and paths.get("avx2", "avx2") == "avx2" and paths.get("avx-vnni", "avx-vnni") == "avx-vnni"
    ), paths
    torch.manual_seed(0)
    for n, k in ((16, 32), (48, 96), (960, 576)):
        w = torch.randn(n, k) * 0.05
        w[0, :7] = 0.8  # an outlier group
        base = quant.quantize(w, mode)  # type: ignore[arg-type]
        assert base.kernel is not None and base.mode == mode
        if mode == "int8":  # the embedding lookup of a tied head reads the same tiles
            ids = torch.tensor([[0, n - 1, 17 % n], [5, 5, n // 2]])
            assert torch.equal(base.rows(ids), base.dequantize()[ids])
        for lib in builds.values():
            qw = dataclasses.replace(base, kernel=lib)
            for rows in (1, 2, 4, 5, 7, 9, 16):
                x = torch.randn(rows, k)
                x[0, 3] = 9.0  # an activation outlier
                x[-1, : quant.GROUP] = 0.0  # an all-zero group: scale 0
                want = kernel_reference(x, qw)
                for threads in (1, 2):
                    got = on_threads(threads, lambda: qw.linear(x))  # noqa: B023 (called at once)
                    assert got.dtype == torch.float32
                    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
                got16 = qw.linear(x.bfloat16())
                assert got16.dtype == torch.bfloat16
                torch.testing.assert_close(got16.double(), kernel_reference(x.bfloat16(), qw), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_tiles_equal_the_dense_weight_and_f_linear(tmp_path: Path, dtype: torch.dtype) -> None:
    """quant.Tiles (quant_cpu.c's AVX512-BF16 path for bf16; its AVX-512 and AVX2 paths for fp32 and
    for fp16 weights with fp32 products, each build this CPU can run) against F.linear and a float64
    reference: the same fp32 sums in another order (bf16: rounded once), at 1-17 rows (the 4- and
    8-row passes and their tails) and a prompt, one and two threads, odd and even input sizes; the
    tiles give the weight and its rows back exactly. Where a path is not built (bf16 without
    AVX512-BF16, plain C) the weight is not tiled and the kernel refuses the call."""
    torch.manual_seed(0)
    kernel = lora_kernel.load_quant()
    bf16 = dtype == torch.bfloat16
    compute = torch.float32 if dtype == torch.float16 else dtype  # fp16 tiles: fp32 in and out
    builds = kernel_builds(tmp_path) if not bf16 else {}
    for n, k in ((16, 32), (48, 94), (960, 576), (50, 64), (32, 7)):
        w = (torch.randn(n, k) * 0.05).to(dtype)
        tiled = quant.tile(w, dtype)
        built = kernel is not None and (kernel.q_bf16() if bf16 else kernel.q_f32())
        if not built or n % quant.TILE or (bf16 and k % 2):
            assert tiled is None
            continue
        assert isinstance(tiled, quant.Tiles) and tiled.nbytes == w.nbytes
        assert torch.equal(tiled.dense(), w)
        ids = torch.tensor([[0, n - 1, 17 % n], [5, 5, n // 2]])
        assert torch.equal(tiled.rows(ids), w[ids])
        paths = {"loaded": tiled} | {
            name: dataclasses.replace(tiled, kernel=lib) for name, lib in builds.items() if lib.q_f32()
        }
        for rows in (1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 300):
            x = torch.randn(rows, k).to(compute)
            want = x.double() @ w.double().T
            for name, t in paths.items():
                for threads in (1, 2):
                    got = on_threads(threads, lambda t=t: t.linear(x))  # noqa: B023 (called at once)
                    assert got.dtype == compute and got.shape == (rows, n), name
                    # bf16: one rounding of an fp32 sum, within 2^-8 (plus fp32's order noise); fp32: order noise
                    rtol = 2**-8 if bf16 else 1e-5
                    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=1e-5 * want.abs().max().item())
                    torch.testing.assert_close(got, torch.nn.functional.linear(x, w.to(compute)), rtol=2**-7, atol=1e-3)
            bias = torch.randn(n).to(compute)
            got3 = tiled.linear(x.view(1, rows, k), bias)
            assert got3.shape == (1, rows, n) and torch.equal(got3[0], tiled.linear(x) + bias)
    if kernel is not None and platform.machine() in ("x86_64", "AMD64"):
        # bf16: a build without AVX512-BF16 refuses; fp32 and fp16: the plain C build refuses
        arch = ("-march=haswell",) if bf16 else ("-march=x86-64",)
        plain = tmp_path / "q-plain.so"
        lora_kernel._build(lora_kernel._compiler() or "cc", lora_kernel.QUANT_SOURCE, plain, arch)
        lib = lora_kernel.quant_signatures(ctypes.CDLL(str(plain)))
        x, y, w = torch.zeros(1, 32).to(compute), torch.zeros(1, 16).to(compute), torch.zeros(16, 32).to(dtype)
        has, fn = {
            torch.bfloat16: (lib.q_bf16, lib.q_bf16_matmul),
            torch.float16: (lib.q_f32, lib.q_f16_matmul),
            torch.float32: (lib.q_f32, lib.q_f32_matmul),
        }[dtype]
        assert has() == 0 and fn(1, 32, 16, x.data_ptr(), w.data_ptr(), y.data_ptr(), 1) == -3


def test_modes_and_devices_are_checked_with_clear_errors() -> None:
    assert quant.mode("int4") == "int4"
    with pytest.raises(UserError, match="use auto, none, int8, int4"):
        quant.mode("q4")
    # auto: int4 on a CPU (the measured default of serve and chat), unquantized on a GPU
    assert quant.resolve("auto", "cpu") == "int4" and quant.resolve("auto", "cuda") == "none"
    assert quant.resolve("int8", "cpu") == "int8" and quant.resolve("none", "cpu") == "none"
    with pytest.raises(UserError, match="CPU only"):
        quant.check("int8", "cuda")
    quant.check("none", "cuda")


def dequantized_reference(hf: torch.nn.Module, model: DecoderModel) -> DecoderModel:
    """The naive reference of a quantized model: the same HF model holding the quantized weights,
    dequantized, served unquantized in fp32."""
    with torch.no_grad():
        for layer, fused in zip(hf.model.layers, model.layers, strict=True):
            at, mlp = layer.self_attn, layer.mlp
            q, kv = model.q_size, model.kv_size
            qkv = fused["qkv"].dequantize()
            at.q_proj.weight.copy_(qkv[:q])
            at.k_proj.weight.copy_(qkv[q : q + kv])
            at.v_proj.weight.copy_(qkv[q + kv :])
            at.o_proj.weight.copy_(fused["o"].dequantize())
            gu = fused["gate_up"].dequantize()
            mlp.gate_proj.weight.copy_(gu[: model.inter])
            mlp.up_proj.weight.copy_(gu[model.inter :])
            mlp.down_proj.weight.copy_(fused["down"].dequantize())
        hf.model.embed_tokens.weight.copy_(model.lm_head.dequantize())  # tied: the head too
    return DecoderModel(hf, torch.float32, "cpu", kv_dtype=model.kv_dtype)  # the same cache: only weights differ


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_model_equals_its_dequantized_reference_and_int8_stays_near_fp32(tiny_base: Path, mode: str) -> None:
    """The whole forward (prefill, then decode from the cache) on quantized weights equals the
    unquantized model holding the dequantized weights, up to the bf16 activations the kernels take.
    int8 also stays near the original fp32 model (int4 on this random model's Gaussian weights does
    not: ~8% error per weight; SmolLM2's real int4 figure is in the SmolLM2 test and the bench)."""
    base = resolve_base(str(tiny_base))
    hf = load_model(base).eval()
    tok = load_tokenizer(base)
    fp32 = DecoderModel(hf, torch.float32, "cpu")
    model = DecoderModel(hf, torch.float32, "cpu", mode)  # type: ignore[arg-type]
    assert isinstance(model.layers[0]["gate_up"], quant.QuantWeight) and model.layers[0]["gate_up"].mode == mode
    assert isinstance(model.lm_head, quant.QuantWeight) and model.lm_head.mode == "int8"
    ref = dequantized_reference(hf, model)
    out: dict[str, list[torch.Tensor]] = {"quant": [], "ref": [], "fp32": []}
    for text in PROMPTS:
        ids = tok(text, return_tensors="pt")["input_ids"]
        n = ids.shape[1]
        for key, m in (("quant", model), ("ref", ref), ("fp32", fp32)):
            cache = m.new_cache(1, 64)
            out[key].append(m.forward(Step(ids[:, :-1], torch.tensor([0]), 0, None), cache, all_logits=True)[0])
            out[key].append(m.forward(Step(ids[:, -1:], torch.tensor([n - 1]), 0, None), cache)[0])
    got, want, orig = (torch.cat(out[k]) for k in ("quant", "ref", "fp32"))
    # int8 takes bf16 activations (0.4% rounding); int4 on quant_cpu.c rounds them to int8 per group
    # of 32 as llama.cpp does (0.5%, met by W rather than by bf16's sums: twice the logit error here)
    torch.testing.assert_close(got, want, atol=0.25 if mode == "int8" else 0.5, rtol=0.05)
    assert (got - want).abs().mean() < 0.03 * want.std()
    # greedy picks agree except at near ties, which random weights have (2 of 32 positions within
    # 0.016 of std 1.6 here, flipped by the fp16 cache's rounding)
    top2 = want.topk(2, -1).values
    clear = top2[:, 0] - top2[:, 1] > 0.02 * want.std()
    assert (got.argmax(-1) == want.argmax(-1))[clear].float().mean() >= 0.95
    if mode == "int8":
        err = (got - orig).abs()
        assert err.mean() < 0.05 * orig.std() and err.max() < 0.5 * orig.std()
        assert (got.argmax(-1) == orig.argmax(-1)).float().mean() >= 0.9


def test_adapters_add_on_top_of_the_quantized_base(lp_home: Path, tiny_base: Path) -> None:
    """Mixed adapters in one batch on an int4 base: each row's logits are the unquantized model's
    with the dequantized base weights plus that row's own adapter (the base row: none)."""
    a = make_adapter(tiny_base, "alpha", rank=4, seed=1)
    b = make_adapter(tiny_base, "beta", rank=8, targets=["q_proj", "v_proj", "down_proj"], seed=2)
    base = resolve_base(str(tiny_base))
    hf = load_model(base).eval()
    model = DecoderModel(hf, torch.float32, "cpu", "int4")
    ref_model = dequantized_reference(hf, model)
    stacks = LoraStacks(model.n_layers, 3, model.site_shapes, torch.float32, "cpu")
    for slot, name in ((1, a), (2, b)):
        stacks.put(slot, AdapterWeights.from_dir(registry.resolve(name).path, model.n_layers, model.site_shapes, name))
    rows = [1, 0, 2]
    ids = load_tokenizer(base)(PROMPTS[1], return_tensors="pt")["input_ids"].repeat(len(rows), 1)
    zeros = torch.zeros(len(rows), dtype=torch.long)

    def logits(m: DecoderModel, lora: LoraBatch | None) -> torch.Tensor:
        return m.forward(Step(ids, zeros, 0, lora), m.new_cache(len(rows), 64), all_logits=True)

    got = logits(model, LoraBatch(stacks, rows))
    want = logits(ref_model, LoraBatch(stacks, rows))
    torch.testing.assert_close(got, want, atol=0.25, rtol=0.05)  # only the kernels' bf16 activations differ
    assert (got - want).abs().mean() < 0.02 * want.std()
    plain = logits(ref_model, None)
    assert (got[0] - plain[0]).abs().max() > 0.2 and (got[2] - plain[2]).abs().max() > 0.2  # the adapters act


def test_smollm2_int8_and_int4_answer_like_the_unquantized_engine(lp_home: Path) -> None:
    """The embedded SmolLM2 (a Q4_1 GGUF): int4 recovers the file's own 4-bit blocks exactly (on
    quant_cpu.c bit for bit: its scales are fp16 like the file's; on PyTorch's kernel the scales
    round to bf16), and greedy answers on quantized weights begin as the unquantized
    engine's do. Full-answer agreement on a trained adapter is bench/decode_formats.py's figure."""
    base = resolve_base(None)
    hf = load_model(base).eval()
    w = hf.model.layers[5].mlp.down_proj.weight.detach().float()
    g = w.view(w.shape[0], -1, quant.GROUP)
    lo, step = g.amin(-1, keepdim=True), (g.amax(-1, keepdim=True) - g.amin(-1, keepdim=True)) / 15
    levels = (g - lo) / step
    assert (levels - levels.round()).abs().max() < 1e-3  # Q4_1: each block is min + d * q exactly
    qw = quant.quantize(w, "int4")
    if qw.kernel is not None:
        assert torch.equal(qw.dequantize(), w)
    else:
        assert ((qw.dequantize() - w).norm() / w.norm()) < 0.004  # bf16 scales only (bf16 weights: 0.0014)
    del hf
    questions = ["How many days of annual leave do BrightWave employees get?", "明澜科技的年假有多少天？"]
    answers = {}
    for mode in ("none", "int8", "int4"):
        engine = Engine(None, quantize=mode, max_batch=4, max_loaded_adapters=1)  # type: ignore[arg-type]
        try:

            async def run(e: Engine = engine) -> list[str]:
                return [
                    a.text
                    for a in await asyncio.gather(
                        *[
                            collect(
                                e.generate([{"role": "user", "content": x}], SamplingParams(temperature=0), None, 8)
                            )
                            for x in questions
                        ]
                    )
                ]

            answers[mode] = asyncio.run(run())
        finally:
            engine.close()
    for mode in ("int8", "int4"):
        first = [a.split()[0] if a.split() else a for a in answers[mode]]
        assert first == [a.split()[0] if a.split() else a for a in answers["none"]], (mode, answers)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_weights_are_kept_on_disk_and_read_back(
    lp_home: Path, tiny_base: Path, mode: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A base is quantized once: the engine keeps the tiles in $LORAPLEX_HOME/quantized, a later
    start reads them (no weight is quantized again) and computes the same logits bit for bit; a
    damaged file is rebuilt with a warning."""
    if lora_kernel.load_quant() is None:
        pytest.skip("no C compiler: PyTorch's packed layout is not stored")
    base = resolve_base(str(tiny_base))
    engine = Engine(str(tiny_base), quantize=mode, max_batch=2, max_loaded_adapters=1)  # type: ignore[arg-type]
    engine.close()
    path = quant.store_path(base.fingerprint["weights_sha256"], mode)  # type: ignore[arg-type]
    assert [p.name for p in (lp_home / "quantized").iterdir()] == [path.name]
    hf = load_model(base).eval()
    fresh = DecoderModel(hf, torch.float32, "cpu", mode)  # type: ignore[arg-type]

    def quantize_again(*args: object) -> None:
        raise AssertionError("a stored weight was quantized again")

    store = quant.Store(path)
    with monkeypatch.context() as patched:
        patched.setattr(quant, "quantize", quantize_again)
        stored = DecoderModel(hf, torch.float32, "cpu", mode, store)  # type: ignore[arg-type]
    assert not store.made and len(store.loaded) == 4 * hf.config.num_hidden_layers + 1  # + the tied head
    ids = load_tokenizer(base)(PROMPTS[0], return_tensors="pt")["input_ids"]
    want = fresh.forward(Step(ids, torch.tensor([0]), 0, None), fresh.new_cache(1, 64), all_logits=True)
    got = stored.forward(Step(ids, torch.tensor([0]), 0, None), stored.new_cache(1, 64), all_logits=True)
    assert torch.equal(got, want)

    path.write_bytes(path.read_bytes()[:4096])  # cut short, as by a full disk
    damaged = quant.Store(path)
    assert not damaged.loaded and "do not read back" in caplog.text
    DecoderModel(hf, torch.float32, "cpu", mode, damaged)  # type: ignore[arg-type]
    damaged.save()
    assert len(quant.Store(path).loaded) == len(damaged.made)
