"""The GPU path on a real CUDA device: CUDA-graph decode against eager decode, the engine on CUDA
against the engine on the CPU, and training on CUDA (bf16 and QLoRA).

Marked `gpu`: deselected where torch sees no CUDA device (conftest.py), so CI, which has none,
runs none of them; scripts/gpu_check.sh runs them on a lent GPU machine.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loraplex.adapters import registry
from loraplex.engine import cuda_graph
from loraplex.engine.engine import Engine
from loraplex.engine.lora import AdapterWeights, LoraBatch, LoraStacks
from loraplex.engine.model import DecoderModel, Step
from loraplex.engine.sampling import SamplingParams
from loraplex.models.load import load_model, load_tokenizer, resolve_base
from tests.conftest import make_adapter

pytestmark = pytest.mark.gpu

PROMPTS = ["The office opens at", "How many days of leave", "明澜科技的年假", "Expense claims are"]


@pytest.mark.parametrize("dense", [True, False])  # every slot's weights at once, or gathered per row
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_replay_equals_eager_decode_and_a_new_adapter_mix_is_not_recaptured(
    lp_home: Path, tiny_base: Path, dtype: torch.dtype, dense: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replayed decode steps give eager `forward`'s logits while the rows' adapters change, an
    adapter is loaded into a slot a graph already reads, and the rows go back to the base."""
    monkeypatch.setattr(cuda_graph, "DENSE_SLOTS", 64 if dense else 0)
    a = make_adapter(tiny_base, "alpha", rank=4, seed=1)
    b = make_adapter(tiny_base, "beta", rank=8, targets=["q_proj", "v_proj", "down_proj"], seed=2)
    base = resolve_base(str(tiny_base))
    tok = load_tokenizer(base)
    model = DecoderModel(load_model(base, dtype, "cuda").eval(), dtype, "cuda", cuda_graphs=True)
    graphs = model.graphs
    assert graphs is not None
    stacks = LoraStacks(model.n_layers, 3, model.site_shapes, dtype, "cuda")
    for slot, name in ((1, a), (2, b)):
        stacks.put(slot, AdapterWeights.from_dir(registry.resolve(name).path, model.n_layers, model.site_shapes, name))
    prompts = [tok(p, return_tensors="pt")["input_ids"][0].cuda() for p in PROMPTS]
    caches = [model.new_cache(4, 64) for _ in range(2)]  # graphs decode into one, eager into the other
    for cache in caches:
        for i, ids in enumerate(prompts):
            model.forward(Step(ids[None], torch.tensor([0], device="cuda"), i, None), cache)
    starts = torch.tensor([len(p) for p in prompts], device="cuda")
    last = torch.stack([p[-1] for p in prompts])[:, None]
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    for t, rows in enumerate([[1, 0, 2, 1]] * 3 + [[2, 2, 0, 1]] * 3 + [[0, 0, 0, 0]] * 2):
        if t == 4:  # beta into alpha's slot, under a captured graph
            stacks.put(1, AdapterWeights.from_dir(registry.resolve(b).path, model.n_layers, model.site_shapes, b))
        lora = None if not any(rows) else LoraBatch(stacks, rows, [1.0, 1.0, 0.5, 1.0])
        step = Step(last, starts + t, 0, lora)
        got = model.forward(step, caches[0])
        model.graphs = None
        ref = model.forward(step, caches[1])
        model.graphs = graphs
        scale = ref.abs().max()
        assert (got - ref).abs().max() <= tol * scale, f"step {t}, rows {rows}"
        last = ref[:, 0].argmax(-1, keepdim=True)
    # one graph with adapters (two mixes) and one without; every step a replay
    assert (graphs.captures, graphs.replays, graphs.failed) == (2, 8, False)


def test_engine_on_cuda_answers_as_on_the_cpu_with_and_without_graphs(lp_home: Path, tiny_base: Path) -> None:
    a = make_adapter(tiny_base, "alpha", rank=4, seed=1)
    b = make_adapter(tiny_base, "beta", rank=8, seed=2)
    params = SamplingParams(temperature=0.0, ignore_eos=True)
    jobs = [(PROMPTS[i % 4], m) for i, m in enumerate([a, b, None, a, b, None])]

    def texts(engine: Engine) -> list[list[int]]:
        async def one(prompt: str, model: str | None) -> list[int]:
            ids: list[int] = []
            async for d in engine.generate([{"role": "user", "content": prompt}], params, model, 24):
                ids += d.token_ids
            return ids

        async def every() -> list[list[int]]:
            return await asyncio.gather(*[one(p, m) for p, m in jobs])

        try:
            return asyncio.run(every())
        finally:
            engine.close()

    cpu = texts(Engine(str(tiny_base), device="cpu", dtype="fp32", quantize="none"))
    graphed = Engine(str(tiny_base), device="cuda", dtype="fp32")
    got = texts(graphed)
    eager = texts(Engine(str(tiny_base), device="cuda", dtype="fp32", cuda_graphs=False))
    assert graphed.model.graphs is not None and graphed.model.graphs.replays > 0
    assert got == eager == cpu
    assert all(len(ids) == 24 for ids in got)


@pytest.mark.parametrize("mode", ["bf16", "qlora"])
def test_training_on_cuda_learns_and_records_gpu_memory(
    lp_home: Path, tiny_base: Path, records_file: Path, mode: str
) -> None:
    if mode == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes is not installed")
    cmd = [sys.executable, "-m", "loraplex.cli", "train", "--name", f"cuda-{mode}", "--base", str(tiny_base)]
    cmd += ["--data", str(records_file), "--set", "train.device=cuda", "--set", "train.precision=bf16"]
    cmd += ["--set", "train.epochs=4", "--set", "data.eval_ratio=0", "--set", "retrieval.enabled=false"]
    if mode == "qlora":
        cmd += ["--set", "train.quantization_bit=4"]
    r = subprocess.run(cmd, env={**os.environ, "LORAPLEX_HOME": str(lp_home)}, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = registry.resolve(f"cuda-{mode}").manifest()
    assert manifest["device"].startswith("cuda") and manifest["peak_memory"]["kind"] == "GPU", manifest
    assert manifest["peak_memory"]["bytes"] > 0 and manifest["steps"] > 0
    assert 0 < manifest["train_loss"] < 20, json.dumps(manifest)[:2000]  # finite: no NaN, no overflow
