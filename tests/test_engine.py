"""The serving engine against its references: transformers' forward, PEFT adapters, PEFT generate."""

from __future__ import annotations

import asyncio
import ctypes
import queue
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from loraplex import cpu_isa
from loraplex.adapters import registry
from loraplex.engine import lora_kernel, quant
from loraplex.engine.engine import Engine
from loraplex.engine.lora import (
    AdapterRequest,
    AdapterWeights,
    DenseLora,
    DenseRows,
    GatheredRows,
    LoraBatch,
    LoraStacks,
    int8_rows,
)
from loraplex.engine.model import DecoderModel, Step, bucket
from loraplex.engine.sampling import SamplingParams
from loraplex.models.load import load_model, load_tokenizer, resolve_base
from tests.conftest import make_adapter

PROMPTS = ["The office opens at", "How many days of leave", "明澜科技的年假", "Expense claims are"]


def _peft(base_dir: Path, adapter_ids: list[str]):  # noqa: ANN202
    from peft import PeftModel

    base = resolve_base(str(base_dir))
    model = PeftModel.from_pretrained(
        load_model(base), str(registry.resolve(adapter_ids[0]).path), adapter_name=adapter_ids[0]
    )
    for a in adapter_ids[1:]:
        model.load_adapter(str(registry.resolve(a).path), adapter_name=a)
    return model.eval()


@pytest.mark.parametrize("layout", ["tiles", "transposed"])
def test_forward_matches_transformers_with_cache(tiny_base: Path, layout: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32 on CPU holds the projections in quant_cpu.c's fp32 tiles (where the kernel is built:
    AVX2 or AVX-512), else transposed in memory for MKL (model.py): both are compared here."""
    base = resolve_base(str(tiny_base))
    hf = load_model(base).eval()
    tok = load_tokenizer(base)
    if layout == "transposed":
        monkeypatch.setattr(quant.lora_kernel, "load_quant", lambda: None)
    elif quant.tile(torch.zeros(16, 16), torch.float32) is None:
        pytest.skip("quant_cpu.c's fp32 tiles are not built here (no C compiler, or no AVX2)")
    model = DecoderModel(hf, torch.float32, "cpu")
    qkv = model.layers[0]["qkv"]
    if layout == "transposed":
        assert isinstance(qkv, torch.Tensor) and qkv.stride() == (1, qkv.shape[0])
        assert isinstance(model.lm_head, torch.Tensor) and model.lm_head.stride()[0] == 1
    else:
        assert isinstance(qkv, quant.Tiles) and isinstance(model.lm_head, quant.Tiles)
    cache = model.new_cache(4, 256)
    ids = tok(PROMPTS[1] + " " + PROMPTS[0], return_tensors="pt")["input_ids"]
    n = ids.shape[1]
    with torch.no_grad():
        ref = hf(ids).logits[0]
    # prefill all but 3 tokens into slot 2, then decode the rest one by one
    got = model.forward(Step(ids[:, : n - 3], torch.tensor([0]), 2, None), cache, all_logits=True)[0]
    torch.testing.assert_close(got, ref[: n - 3], atol=1e-4, rtol=1e-4)
    for t in range(n - 3, n):
        got_t = model.forward(Step(ids[:, t : t + 1], torch.tensor([t]), 2, None), cache)[0, 0]
        torch.testing.assert_close(got_t, ref[t], atol=1e-4, rtol=1e-4)


def test_mixed_adapter_batch_equals_peft(lp_home: Path, tiny_base: Path) -> None:
    """Rows with different adapters (different ranks and targets), the base, and compositions in
    one forward give each row the logits of a PEFT model with just that adapter."""
    a = make_adapter(tiny_base, "alpha", rank=4, seed=1)
    b = make_adapter(tiny_base, "beta", rank=8, targets=["q_proj", "v_proj", "down_proj"], seed=2)
    base = resolve_base(str(tiny_base))
    tok = load_tokenizer(base)
    model = DecoderModel(load_model(base).eval(), torch.float32, "cpu")
    layers = model.n_layers
    stacks = LoraStacks(layers, 5, model.site_shapes, torch.float32, "cpu")
    wa = AdapterWeights.from_dir(registry.resolve(a).path, layers, model.site_shapes, a)
    wb = AdapterWeights.from_dir(registry.resolve(b).path, layers, model.site_shapes, b)
    stacks.put(1, wa)
    stacks.put(2, wb)
    stacks.put(3, AdapterWeights.combine([(wa, 1.0), (wb, 1.0)]))
    stacks.put(4, AdapterWeights.combine([(wa, 0.5), (wa, 0.5)]))
    rows = [1, 2, 0, 3, 4, 1]  # slot 1 twice: rows are grouped per adapter, padded, and scattered back
    ids = tok(PROMPTS[0], return_tensors="pt")["input_ids"].repeat(len(rows), 1)
    cache = model.new_cache(len(rows), 64)
    got = model.forward(
        Step(ids, torch.zeros(len(rows), dtype=torch.long), 0, LoraBatch(stacks, rows)), cache, all_logits=True
    )

    peft = _peft(tiny_base, [a, b])
    with torch.no_grad():
        peft.set_adapter(a)
        ref_a = peft(ids[:1]).logits[0]
        peft.set_adapter(b)
        ref_b = peft(ids[:1]).logits[0]
        peft.base_model.set_adapter([a, b])  # both active: their deltas add, as in "alpha+beta"
        ref_ab = peft(ids[:1]).logits[0]
        with peft.disable_adapter():
            ref_base = peft(ids[:1]).logits[0]
    for i, ref in enumerate([ref_a, ref_b, ref_base, ref_ab, ref_a, ref_a]):
        torch.testing.assert_close(got[i], ref, atol=2e-4, rtol=2e-4, msg=f"row {i} (slot {rows[i]})")
    assert (got[0] - got[2]).abs().max() > 1e-2  # the adapters really change the output


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16])
def test_static_decode_for_cuda_graphs_equals_forward(lp_home: Path, tiny_base: Path, kv_dtype: torch.dtype) -> None:
    """`decode_static`, the step a CUDA graph captures (attention over the whole cache under a mask,
    adapters gathered per row by slot), gives `forward`'s logits and writes the same cache, for rows
    of different lengths on different adapters, the base and weighted rows. Runs on the CPU: what
    differs on CUDA is only the replay (tests/gpu/test_cuda.py)."""
    a = make_adapter(tiny_base, "alpha", rank=4, seed=1)
    b = make_adapter(tiny_base, "beta", rank=8, targets=["q_proj", "v_proj", "down_proj"], seed=2)
    base = resolve_base(str(tiny_base))
    tok = load_tokenizer(base)
    model = DecoderModel(load_model(base).eval(), torch.float32, "cpu", kv_dtype=kv_dtype)
    model.decode_ops = None  # the PyTorch path: decode_cpu.c is CPU-only and has its own test
    stacks = LoraStacks(model.n_layers, 3, model.site_shapes, torch.float32, "cpu")
    for slot, name in ((1, a), (2, b)):
        stacks.put(slot, AdapterWeights.from_dir(registry.resolve(name).path, model.n_layers, model.site_shapes, name))
    rows, scales = [1, 0, 2, 1], [1.0, 1.0, 0.5, -1.5]
    prompts = [tok(p, return_tensors="pt")["input_ids"][0] for p in PROMPTS]
    cache = model.new_cache(len(rows), 64)
    for i, ids in enumerate(prompts):  # each row prefilled alone, so the rows differ in length
        model.forward(Step(ids[None, :-1], torch.tensor([0]), i, LoraBatch(stacks, [rows[i]])), cache)
    starts = torch.tensor([len(p) - 1 for p in prompts])
    last = torch.stack([p[-1] for p in prompts])
    before = (cache.k.clone(), cache.v.clone())
    ref = model.forward(Step(last[:, None], starts, 0, LoraBatch(stacks, rows, scales)), cache)
    ref_cache = (cache.k.clone(), cache.v.clone())
    with torch.inference_mode():  # the cache grew inside forward: inference tensors
        cache.k.copy_(before[0]), cache.v.copy_(before[1])
    weights = torch.zeros(len(rows), stacks.slots)
    weights[torch.arange(len(rows)), torch.tensor(rows)] = torch.tensor(scales)
    dense = DenseLora(stacks)
    for lora in (GatheredRows(stacks, torch.tensor(rows), torch.tensor(scales)), DenseRows(dense, weights)):
        with torch.inference_mode():
            cache.k.copy_(before[0]), cache.v.copy_(before[1])
        got = model.decode_static(last, starts, cache, lora)
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4, msg=type(lora).__name__)
        # the same keys and values, up to the rounding of a delta summed in another order (one fp16 step)
        torch.testing.assert_close((cache.k, cache.v), ref_cache, atol=1e-5, rtol=1e-3)
    assert (got[0] - got[3]).abs().max() > 1e-2  # the adapters and weights really change the output
    bare = model.decode_static(last, starts, cache)  # no adapters: the base for every row
    torch.testing.assert_close(bare[1], got[1], atol=1e-4, rtol=1e-4)
    # a newly loaded adapter reaches the dense copy in place (a captured graph keeps its addresses)
    at = dense.B["qkv"].data_ptr()
    stacks.put(1, AdapterWeights.from_dir(registry.resolve(b).path, model.n_layers, model.site_shapes, b))
    dense.refresh()
    only_b = torch.zeros_like(weights)
    only_b[:, 1] = 1.0
    with torch.inference_mode():
        cache.k.copy_(before[0]), cache.v.copy_(before[1])
    swapped = model.decode_static(last, starts, cache, DenseRows(dense, only_b))
    with torch.inference_mode():
        cache.k.copy_(before[0]), cache.v.copy_(before[1])
    gathered = model.decode_static(last, starts, cache, GatheredRows(stacks, torch.ones(4, dtype=torch.long), None))
    assert dense.B["qkv"].data_ptr() == at
    torch.testing.assert_close(swapped, gathered, atol=1e-4, rtol=1e-4)


# bf16 and int8 stacks: the C kernel's paths
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_a_weighted_adapter_uses_the_plain_slot_scaled_per_row(lp_home: Path, tiny_base: Path, dtype) -> None:  # noqa: ANN001
    """`hr:0.5` is `hr`'s slot with its rows scaled, not a slot of its own (a client cycling
    through weights once pushed other tenants' adapters out): the same logits as the adapter
    loaded with its B pre-scaled, for weights 0.5, -1.5 and 0, next to rows of weight 1 and the base."""
    if dtype != torch.float32 and lora_kernel.load() is None:
        pytest.skip("no C compiler: the kernel path cannot be built")
    a = make_adapter(tiny_base, "alpha", rank=4, seed=1)
    base = resolve_base(str(tiny_base))
    tok = load_tokenizer(base)
    model = DecoderModel(load_model(base).eval(), torch.float32, "cpu")
    stacks = LoraStacks(model.n_layers, 5, model.site_shapes, dtype, "cpu")
    wa = AdapterWeights.from_dir(registry.resolve(a).path, model.n_layers, model.site_shapes, a)
    weights = [0.5, -1.5, 0.0]
    stacks.put(1, wa)
    for slot, w in enumerate(weights, 2):
        stacks.put(slot, AdapterWeights.combine([(wa, w)]))
    ids = tok(PROMPTS[1], return_tensors="pt")["input_ids"].repeat(5, 1)

    def logits(batch: LoraBatch) -> torch.Tensor:
        step = Step(ids, torch.zeros(5, dtype=torch.long), 0, batch)
        return model.forward(step, model.new_cache(5, 64), all_logits=True)

    scaled = logits(LoraBatch(stacks, [1, 1, 0, 1, 1], [0.5, -1.5, 1.0, 1.0, 0.0]))
    prescaled = logits(LoraBatch(stacks, [2, 3, 0, 1, 4]))
    delta = (prescaled - prescaled[2]).abs().max()  # row 2 is the base: the adapters' effect
    # bf16 / int8: B pre-scaled and rounded differs from x scaled in fp32 by rounding only
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert (scaled - prescaled).abs().max() <= tol * delta
    assert (scaled[0] - scaled[3]).abs().max() > 1e-2  # the weight really changes the output
    req = AdapterRequest(((a, 0.5),))
    assert (req.slot_key, req.scale, req.key) == (a, 0.5, f"{a}:0.5")


def lora_build(tmp: Path, isa: str) -> ctypes.CDLL | None:
    """lora_cpu.c built for `isa` ("native", or "avx2": the path of a CPU without AVX-512), or None
    where this CPU cannot run that build"""
    if isa == "native":
        return lora_kernel.load()
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if " avx2" not in flags or " fma" not in flags:
        return None
    target = tmp / "lora-avx2.so"
    lora_kernel._build(lora_kernel._compiler() or "cc", lora_kernel.SOURCE, target, cpu_isa.MARCH["avx2"])
    lib = ctypes.CDLL(str(target))
    lib.lora_site.argtypes = lora_kernel.load().lora_site.argtypes  # type: ignore[union-attr]
    return lib


@pytest.mark.parametrize("weights", [torch.bfloat16, torch.int8])
@pytest.mark.parametrize("act", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("isa", "threads"), [("native", 1), ("native", 2), ("native", 4), ("avx2", 1)])
def test_cpu_kernel_equals_torch_path_and_naive(
    lp_home: Path,
    tiny_base: Path,
    tmp_path: Path,
    act: torch.dtype,
    threads: int,
    weights: torch.dtype,
    isa: str,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """lora_cpu.c against the PyTorch grouped path and lora.py's naive per-row loop, on every site of
    one layer: rows sharing an adapter, base rows, a composition, different ranks and targets (a
    regrow), prefill (several tokens per row) and decode, bf16 and fp32 activations, bf16 and int8
    weights (the naive loop on the weights as stored: rounded to bf16, or int8 times each row's
    scale); on one thread, on 2 (each thread takes whole adapters) and on 4 (more threads than
    adapters: they split each adapter's work); built for this CPU and for AVX2 (the compiler
    vectorises each build's loops its own way)."""
    if lora_kernel._compiler() is None:
        pytest.skip("no C compiler: the engine uses the PyTorch path")
    assert lora_kernel.load() is not None, "a compiler is there but the kernel did not build"
    lib = lora_build(tmp_path, isa)
    if lib is None:
        pytest.skip(f"this CPU cannot run the {isa} build")
    monkeypatch.setattr(lora_kernel, "load", lambda: lib)
    request.addfinalizer(lambda n=torch.get_num_threads(): torch.set_num_threads(n))
    torch.set_num_threads(threads)  # the kernel runs on torch's thread count
    model = DecoderModel(load_model(resolve_base(str(tiny_base))).eval(), torch.float32, "cpu")
    layers, shapes = model.n_layers, model.site_shapes
    mods = {m: (fan_in, fan_out) for fan_in, ms in shapes.values() for m, fan_out in ms}
    g = torch.Generator().manual_seed(0)

    def adapter(rank: int, targets: tuple[str, ...]) -> AdapterWeights:
        found = {
            (layer, m): (torch.randn(rank, mods[m][0], generator=g), torch.randn(mods[m][1], rank, generator=g))
            for layer in range(layers)
            for m in targets
        }
        return AdapterWeights.from_found(found, layers, shapes, f"r{rank}")

    wa = adapter(4, tuple(mods))
    wb = adapter(8, ("q_proj", "v_proj", "down_proj"))
    adapters = [wa, wb, AdapterWeights.combine([(wa, 0.7), (wb, 0.3)])]
    k_stacks = LoraStacks(layers, 4, shapes, weights, "cpu")
    t_stacks = LoraStacks(layers, 4, shapes, torch.float32, "cpu")
    for slot, w in enumerate(adapters, start=1):
        k_stacks.put(slot, w)
        t_stacks.put(slot, w)

    def stored(w: torch.Tensor) -> torch.Tensor:
        """[r, n] as the kernel's stacks hold it, back in fp32"""
        if weights == torch.int8:
            q, scale = int8_rows(w)
            return q.float() * scale[:, None]
        return w.bfloat16().float()

    rows = [2, 0, 1, 3, 1, 2]
    kernel, torch_path = LoraBatch(k_stacks, rows), LoraBatch(t_stacks, rows)
    assert kernel.kernel is not None and torch_path.kernel is None
    for L in (1, 5):
        for site, (fan_in, site_mods) in shapes.items():
            out = sum(o for _, o in site_mods)
            x = torch.randn(len(rows), L, fan_in, generator=g).to(act)
            y0 = torch.randn(len(rows), L, out, generator=g).to(act)
            got = kernel.add_to(y0.clone(), x, 1, site).float()
            ref = torch_path.add_to(y0.clone(), x, 1, site).float()
            naive = y0.float().clone()
            for i, slot in enumerate(rows):  # the docstring's loop, in fp32 from the weights as stored
                if slot:
                    w = adapters[slot - 1]
                    naive[i] += torch.cat(
                        [x[i].float() @ stored(w.A[m][1]).T @ stored(w.B[m][1].T) for m, _ in site_mods], -1
                    )
            scale = naive.abs().max()
            tol = 2e-2 * scale if act == torch.bfloat16 else 1e-4 * scale
            assert (got - naive).abs().max() <= tol, (site, L)
            assert (got - ref).abs().max() <= 2e-2 * scale, (site, L)  # fp32 weights vs stored: rounding only
            torch.testing.assert_close(got[1], y0[1].float())  # the base row is untouched
    with pytest.raises(ValueError, match="do not fit"):  # wrong rows: refused, never read out of bounds
        kernel.add_to(torch.zeros(2, 1, 4, dtype=act), torch.zeros(2, 1, 4, dtype=act), 0, "o")
    fan_in, site_mods = shapes["o"]
    with pytest.raises(ValueError, match="do not fit"):  # fp16 activations: refused, not silently left without LoRA
        kernel.add_to(
            torch.zeros(len(rows), 1, site_mods[0][1], dtype=torch.float16),
            torch.zeros(len(rows), 1, fan_in, dtype=torch.float16),
            0,
            "o",
        )


def test_engine_greedy_text_equals_peft_generate(lp_home: Path, tiny_base: Path) -> None:
    a = make_adapter(tiny_base, "alpha", rank=4, seed=1)
    b = make_adapter(tiny_base, "beta", rank=8, targets=["q_proj", "v_proj"], seed=2)
    engine = Engine(str(tiny_base), dtype="fp32", max_batch=8, max_loaded_adapters=2)
    jobs = [(p, m) for p in PROMPTS[:3] for m in (a, b, None)]

    async def run_all() -> list[str]:
        async def one(prompt: str, model: str | None) -> str:
            parts = []
            async for d in engine.generate(
                [{"role": "user", "content": prompt}], SamplingParams(temperature=0), model, max_tokens=24
            ):
                parts.append(d.text)
            return "".join(parts)

        return await asyncio.gather(*[one(p, m) for p, m in jobs])

    try:
        got = asyncio.run(run_all())
        assert engine.stats.decode_steps < sum(24 for _ in jobs)  # rows really shared decode steps
    finally:
        engine.close()
    peft = _peft(tiny_base, [a, b])
    tok = engine.tokenizer
    for (prompt, model), text in zip(jobs, got, strict=True):
        ids = torch.tensor([engine.encode([{"role": "user", "content": prompt}])])
        kw = dict(max_new_tokens=24, do_sample=False, eos_token_id=list(engine.eos_ids), pad_token_id=tok.pad_token_id)
        with torch.no_grad():
            if model is None:
                with peft.disable_adapter():
                    out = peft.generate(input_ids=ids, **kw)
            else:
                peft.set_adapter(model)
                out = peft.generate(input_ids=ids, **kw)
        assert text == tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True), (prompt, model)


def test_adapter_slots_lru_and_pinning(lp_home: Path, tiny_base: Path) -> None:
    ids = [make_adapter(tiny_base, f"a{i}", rank=2, seed=i) for i in range(3)]
    engine = Engine(str(tiny_base), dtype="fp32", max_loaded_adapters=2)
    try:
        engine.load_adapter("a0", pin=True)

        async def ask(model: str) -> str:
            out = []
            async for d in engine.generate("hello", SamplingParams(temperature=0), model, max_tokens=2):
                out.append(d.text)
            return "".join(out)

        for name in ("a1", "a2", "a1", "a0"):
            asyncio.run(ask(name))
        loaded = {d["key"]: d for d in engine.adapters.describe()}
        assert ids[0] in loaded and loaded[ids[0]]["pinned"]  # pinned survives two others
        assert len(loaded) == 2
        assert engine.unload_adapter("a0") == [ids[0]]
        assert ids[0] not in {d["key"] for d in engine.adapters.describe()}
    finally:
        engine.close()


def test_on_cpu_a_loaded_adapter_has_no_second_copy_in_host_memory(lp_home: Path, tiny_base: Path) -> None:
    """On CPU the slots are host memory: a slotted adapter leaves the host cache, requests for it read
    nothing, an evicted one is read again and answers the same, and one evicted between `prepare`
    and admission is read on the engine thread."""
    ids = [make_adapter(tiny_base, f"a{i}", rank=2, seed=i) for i in range(3)]
    engine = Engine(str(tiny_base), dtype="fp32", max_loaded_adapters=2)
    cache = engine.adapters

    def ask(model: str) -> str:
        async def run() -> str:
            params = SamplingParams(temperature=0, ignore_eos=True)
            return "".join([d.text async for d in engine.generate("hello", params, model, max_tokens=6)])

        return asyncio.run(run())

    try:
        first = ask("a0")
        assert cache.loads == 1 and ids[0] not in cache._host
        assert cache.prepare(cache.resolve("a0")) is None  # loaded: nothing read
        assert ask("a0") == first and cache.loads == 1
        ask("a1"), ask("a2")  # two slots: a0 is evicted
        assert ids[0] not in {d["key"] for d in cache.describe()}
        assert ask("a0") == first and cache.loads == 4  # read again from the store
        req = cache.resolve("a0")
        assert cache.prepare(req) is None
        engine.unload_adapter("a0")  # evicted before admission
        done: queue.SimpleQueue[BaseException | None] = queue.SimpleQueue()
        engine._inbox.put(("load", (req, None, False, done)))
        assert done.get(timeout=60) is None and cache.loads == 5
        assert ids[0] in {d["key"] for d in cache.describe()} and ask("a0") == first
    finally:
        engine.close()


def test_adapter_request_key_is_canonical() -> None:
    assert AdapterRequest().key == ""
    assert AdapterRequest((("legal@v2", 1.0),)).key == "legal@v2"
    assert AdapterRequest((("legal@v2", 0.7), ("formal@v1", 0.3))).key == "legal@v2:0.7+formal@v1:0.3"


@pytest.mark.parametrize("bad", ["../etc/passwd", "a/b", "A", "x:abc", "x@v1:1e999", ""])
def test_bad_model_names_are_refused(lp_home: Path, tiny_base: Path, bad: str) -> None:
    from loraplex.adapters.names import InvalidModelName, ModelNotFound

    engine = Engine(str(tiny_base), dtype="fp32")
    try:
        if bad == "":
            assert engine.adapters.resolve(bad) == AdapterRequest()
        else:
            with pytest.raises((InvalidModelName, ModelNotFound)):
                engine.adapters.resolve(bad)
    finally:
        engine.close()


def test_rows_finish_at_different_steps_after_the_cache_grew(tiny_base: Path) -> None:
    """Regression: a KV cache grown inside the forward pass (past its first 256 positions) must
    still accept row moves when an earlier row finishes; this once killed the engine thread."""
    engine = Engine(str(tiny_base), dtype="fp32", max_batch=4)
    params = SamplingParams(temperature=0, ignore_eos=True)
    user = [{"role": "user", "content": PROMPTS[0]}]

    async def one(n: int) -> int:
        return sum([len(d.token_ids) async for d in engine.generate(user, params, None, max_tokens=n)])

    async def run_all() -> list[int]:
        return await asyncio.gather(one(300), one(290), one(310))

    try:
        assert asyncio.run(run_all()) == [300, 290, 310]
        assert engine.cache.capacity > 256 and engine.stats.failed == 0
        assert asyncio.run(run_all()) == [300, 290, 310]  # and the engine still serves afterwards
    finally:
        engine.close()


def test_the_kv_cache_keeps_its_budget_by_preempting_and_gives_memory_back(lp_home: Path, tiny_base: Path) -> None:
    """One long request once kept ~6 GB for good: the cache grew for every slot and never shrank.
    Now it has a budget. Four rows that outgrow it make the engine send the newest back to wait
    and prefill it again (prompt + answer so far): every answer equals the one an unbounded engine
    gives. The cache shrinks back when the rows are done, and a prompt longer than the budget
    holds for one request is refused, naming the budget."""
    from loraplex.engine.protocol import PromptTooLong

    make_adapter(tiny_base, "legal", rank=4, seed=1)
    params = SamplingParams(temperature=0, ignore_eos=True)
    jobs = [(p, "legal" if i % 2 else None, 280 + 10 * i) for i, p in enumerate(PROMPTS)]

    def answers(engine: Engine) -> list[list[int]]:
        async def one(prompt: str, adapter: str | None, n: int) -> list[int]:
            msgs = [{"role": "user", "content": prompt}]
            return [t async for d in engine.generate(msgs, params, adapter, max_tokens=n) for t in d.token_ids]

        async def all_of() -> list[list[int]]:
            return await asyncio.gather(*[one(*job) for job in jobs])

        return asyncio.run(all_of())

    free = Engine(str(tiny_base), dtype="fp32", max_batch=4)
    tight = Engine(str(tiny_base), dtype="fp32", max_batch=4, kv_cache_bytes=free.cache.bytes_for(4, 256))
    free.cache.shrink_after_s = tight.cache.shrink_after_s = 0.2  # (5 s when serving)
    try:
        expected = answers(free)
        assert free.cache.peak_bytes == free.cache.bytes_for(4, 512)  # unbounded: 4 rows x 512 positions
        assert free.stats.preempted == 0
        got = answers(tight)
        assert tight.stats.preempted > 0 and tight.stats.failed == 0
        assert tight.cache.peak_bytes <= tight.kv_cache_bytes
        assert got == expected  # recompute preemption changes no token
        assert [len(a) for a in got] == [n for _, _, n in jobs]
        # memory follows the rows in use: idle, both give back what they no longer need
        deadline = time.time() + 10
        while time.time() < deadline and any(e.cache.allocated_bytes > e.cache.peak_bytes // 4 for e in (free, tight)):
            time.sleep(0.05)
        for engine in (free, tight):  # (a quarter: the margin that keeps a steady load from reallocating)
            assert engine.cache.allocated_bytes <= engine.cache.peak_bytes // 4
        # one request may hold at most what the budget holds alone: 1,024 positions here
        assert tight.max_model_len == 1024 < free.max_model_len
        with pytest.raises(PromptTooLong, match="KV cache budget"):
            tight.check_length(1100, 10)
    finally:
        free.close()
        tight.close()


def test_a_request_that_fails_in_the_model_or_its_sampling_fails_alone(lp_home: Path, tiny_base: Path) -> None:
    """Faults injected into single rows while others decode and while others are admitted: an
    adapter whose weights overflow (inf -> NaN logits), and top_p below fp32's smallest number
    (once a 500 for every row of the batch). The others finish with the text they give alone."""
    good = make_adapter(tiny_base, "good", rank=4, seed=1)
    broken = make_adapter(tiny_base, "broken", rank=4, seed=2, fill_b=float("inf"))
    engine = Engine(str(tiny_base), dtype="fp32", max_batch=8, max_loaded_adapters=2)
    greedy = SamplingParams(temperature=0, ignore_eos=True)
    tiny_top_p = SamplingParams(temperature=1.0, top_p=5e-324, ignore_eos=True)  # only the top token stays

    async def one(prompt: str, model: str | None, params: SamplingParams, delay: float = 0.0) -> str:
        await asyncio.sleep(delay)
        user = [{"role": "user", "content": prompt}]
        return "".join([d.text async for d in engine.generate(user, params, model, max_tokens=24)])

    async def tolerant(prompt: str, model: str | None, params: SamplingParams, delay: float = 0.0) -> str | Exception:
        try:
            return await one(prompt, model, params, delay)
        except Exception as e:  # noqa: BLE001 - the outcome under test
            return e

    jobs = [(p, m) for p in PROMPTS[:3] for m in (good, None)]
    try:
        alone = [asyncio.run(one(p, m, greedy)) for p, m in jobs]

        async def together() -> list[str | Exception]:
            calls = [tolerant(p, m, greedy) for p, m in jobs]
            calls += [tolerant(PROMPTS[0], broken, greedy), tolerant(PROMPTS[1], broken, greedy, delay=0.05)]
            calls += [tolerant(PROMPTS[2], good, tiny_top_p, delay=0.02)]
            return await asyncio.gather(*calls)

        got = asyncio.run(together())
        assert got[: len(jobs)] == alone
        for e in got[len(jobs) : len(jobs) + 2]:
            assert isinstance(e, RuntimeError) and "non-finite logits" in str(e), e
        assert got[-1] == alone[jobs.index((PROMPTS[2], good))]  # tiny top_p: the greedy text
        assert engine.stats.failed == 2
        assert asyncio.run(one(PROMPTS[0], good, greedy)) == alone[0]  # and it keeps serving
    finally:
        engine.close()


def test_sampling_survives_tiny_legal_penalties_and_temperatures() -> None:
    """repetition_penalty and temperature just above 0 (2e-309 is legal: > 0) divide logits past
    fp32's range; the draw still returns a token (the schemathesis run once got a 500 here)."""
    from loraplex.engine.sampling import RowError, RowState, SamplingParams, sample

    logits = torch.tensor([[3.0, -1.0, 0.5, 2.0], [3.0, -1.0, 0.5, 2.0], [3.0, -1.0, 0.0, 2.0]])
    rows = [
        RowState(SamplingParams(repetition_penalty=2.2250738585072014e-309, seed=1), prompt_ids=[0, 1]),
        RowState(SamplingParams(temperature=1e-308, seed=1), prompt_ids=[1]),
        # a logit of exactly 0 times an overflowing 1/T was NaN (schemathesis again: T = 4.3e-98)
        RowState(SamplingParams(temperature=4.3129089185430436e-98, top_p=0.7, top_k=16762167, seed=1), [1]),
    ]
    tokens, _ = sample(logits, rows)
    assert not any(isinstance(t, RowError) for t in tokens), tokens
    assert tokens[1] == 0 and tokens[2] == 0  # a temperature near 0 is greedy
    assert tokens[0] in (0, 3)  # token 0's 3.0 / 2e-309 and 3's 2.0 / 2e-309 both overflow to the largest float

    # With an output format, forbidden tokens are -inf before the penalties. A penalty under fp32's
    # smallest number (3.6e-66, schemathesis again) was 0 in fp32, and -inf * 0 made the row NaN: a 500.
    # Forbidden tokens stay forbidden, whatever the penalty or temperature.
    from loraplex.engine.sampling import _one

    raw = torch.tensor([3.0, -1.0, 0.5, 2.0, -2.0, 1.0])
    choose = raw.masked_fill(torch.tensor([True, False, True, False, False, True]), float("-inf"))
    for params in (
        SamplingParams(repetition_penalty=3.557468355223367e-66, top_p=0.7, frequency_penalty=0.02, seed=1),
        SamplingParams(repetition_penalty=3.557468355223367e-66, temperature=1e-30, seed=1),
        SamplingParams(repetition_penalty=10.0, presence_penalty=-2.0, temperature=2.0, seed=1),
    ):
        for seed in range(20):
            row = RowState(replace(params, seed=seed), prompt_ids=[0, 1, 2, 4], output_ids=[1, 4])
            token, _ = _one(raw, choose, row, None, True)
            assert token in (1, 3, 4), (params, token)


def test_greedy_pick_and_finite_check_equal_their_torch_reference() -> None:
    """sampling.argmax_rows (NumPy's argmax on CPU) and finite_rows (from row sums) against
    torch.argmax and torch.isfinite(...).all(): ties go to the first index, NaN wins, infinities
    and NaN mark the row, a finite row whose sum overflows does not; random rows of a real
    vocabulary's width too."""
    from loraplex.engine.sampling import argmax_rows, finite_rows

    nan, inf = float("nan"), float("inf")
    edge = torch.tensor(
        [[1.0, 3.0, 3.0, 0.0], [1.0, nan, 5.0, 2.0], [-inf, 0.0, 1.0, 1.0], [inf, 1.0, 2.0, 0.0], [-inf] * 4,
         [3e38, 3e38, 0.0, 1.0]]  # finite, but its sum overflows
    )  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    wide = torch.randn(8, 49152, generator=gen) * 20
    for logits in (edge, wide, wide[:1], edge.double()):
        assert argmax_rows(logits) == logits.argmax(dim=-1).tolist()
        assert finite_rows(logits) == torch.isfinite(logits).all(dim=-1).tolist()


def test_bf16_shapes_come_from_few_buckets_and_padding_changes_no_logit(
    tiny_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On CPU in bf16 every new matmul shape is a new oneDNN kernel kept in a cache (model.bucket):
    prompts of 1-120 tokens decoded for 60 steps use 58 shapes padded, 840 exact,
    and the padded keys and prompt positions change no logit. (The projections on oneDNN, as on a
    CPU without AVX512-BF16; with quant_cpu.c's bf16 tiles only attention's matmuls are oneDNN's.)"""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Shapes(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: set[tuple] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            if func in (torch.ops.aten.linear.default, torch.ops.aten.matmul.default):  # as inference mode sees them
                self.seen.add(tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor)))
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(lora_kernel, "load_quant", lambda: None)
    model = DecoderModel(load_model(resolve_base(str(tiny_base))).eval(), torch.bfloat16, "cpu")
    assert model.buckets and all(isinstance(w, torch.Tensor | None) for w in model.layers[0].values())
    model.decode_ops = None  # the PyTorch path's decode steps (decode_cpu.c's have no per-length matmuls)

    def run(buckets: bool, lengths: range, steps: int) -> tuple[set[tuple], list[torch.Tensor]]:
        model.buckets = buckets
        out: list[torch.Tensor] = []
        with Shapes() as shapes:
            for n in lengths:
                cache = model.new_cache(1, 512)
                ids = torch.randint(3, 200, (1, n), generator=torch.Generator().manual_seed(n))
                width = bucket(n, cache.capacity) if buckets else n  # as Engine._prefill_step pads
                padded = torch.zeros((1, width), dtype=torch.long)
                padded[0, :n] = ids[0]
                step = Step(padded, torch.tensor([0]), 0, None, last=torch.tensor([n - 1]))
                out.append(model.forward(step, cache)[0, 0])
                tok = ids[:, -1:]
                for t in range(n, n + (steps if n == lengths[-1] else 0)):
                    out.append(model.forward(Step(tok, torch.tensor([t]), 0, None), cache)[0, 0])
                    tok = out[-1].argmax()[None, None]
        return shapes.seen, out

    exact, ref = run(False, range(1, 121), 60)
    padded, got = run(True, range(1, 121), 60)
    assert len(exact) > 800 and len(padded) < 80, (len(exact), len(padded))
    for a, b in zip(ref, got, strict=True):
        assert torch.equal(a, b)  # bit for bit: masked keys weigh exactly 0, padded rows are other rows


def test_prompt_logprobs_equal_peft_forward_in_groups_chunks_and_with_no_answer(
    lp_home: Path, tiny_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prompt logprobs (echo, lm-eval's loglikelihood) from prefill equal log_softmax of PEFT's
    forward: short prompts prefilled together, a long one in chunks (prefill_tokens=16), with and
    without an adapter; max_tokens=0 reads the prompt and generates nothing."""
    # fp32 LoRA weights (without the C kernel, whose bf16 weights move a logprob by up to ~0.03)
    monkeypatch.setattr(lora_kernel, "load", lambda: None)
    a = make_adapter(tiny_base, "alpha", rank=4, seed=1)
    engine = Engine(str(tiny_base), dtype="fp32", max_batch=8, max_loaded_adapters=2, prefill_tokens=16)
    long = " ".join(PROMPTS * 3)
    jobs = [(p, m, n) for p in (PROMPTS[0], PROMPTS[2], long) for m, n in ((a, 0), (None, 3))]
    params = SamplingParams(temperature=0, logprobs=1, prompt_logprobs=2)

    async def run_all() -> list[list]:
        async def one(prompt: str, model: str | None, n: int) -> list:
            return [d async for d in engine.generate(prompt, params, model, max_tokens=n)]

        return await asyncio.gather(*[one(*j) for j in jobs])

    try:
        got = asyncio.run(run_all())
        assert engine.stats.failed == 0
    finally:
        engine.close()
    peft = _peft(tiny_base, [a])
    for (prompt, model, n), deltas in zip(jobs, got, strict=True):
        ids = engine.encode(prompt)
        first = deltas[0].prompt_logprobs
        assert first is not None and len(first) == len(ids) and first[0] is None
        assert all(d.prompt_logprobs is None for d in deltas[1:])  # sent once
        assert sum(len(d.token_ids) for d in deltas) == n and deltas[-1].completion_tokens == n
        assert deltas[-1].finish_reason == "length"
        with torch.no_grad():
            if model is None:
                with peft.disable_adapter():
                    logits = peft(input_ids=torch.tensor([ids])).logits[0]
            else:
                peft.set_adapter(model)
                logits = peft(input_ids=torch.tensor([ids])).logits[0]
        ref = torch.log_softmax(logits.float(), dim=-1)
        tol = 1e-4
        for p in range(1, len(ids)):
            item = first[p]
            assert item is not None and item.token_id == ids[p]
            assert item.logprob == pytest.approx(float(ref[p - 1, ids[p]]), abs=tol), (prompt, model, p)
            assert len(item.top) == 2 and item.top[0][1] >= item.top[1][1]
            for t, v in item.top:
                assert v == pytest.approx(float(ref[p - 1, t]), abs=tol)
            assert item.top[0][1] == pytest.approx(float(ref[p - 1].max()), abs=tol)
        if n:  # the answer's first token is the most likely after the whole prompt
            assert deltas[0].token_ids[0] == int(ref[-1].argmax())
