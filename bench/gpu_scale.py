"""A Llama-3-8B-shaped base on a GPU: training memory measured next to `loraplex plan`, and the
built-in engine's multi-LoRA decode overhead.

    python bench/gpu_scale.py [--shape llama-3-8b] [--steps 8] [--seq-len 1024] [--batch 4] [--rank 16]
    python bench/gpu_scale.py --shape smollm2-135m --device cpu --steps 2 --seq-len 256 --tokens 8   # smoke

1. A base with the shape's config (plan's shipped config.json) and random bf16 weights is written to
   a temporary directory with SmolLM2's tokenizer and chat template (its ids fit any larger vocab).
2. `loraplex train`, in its own process as a user runs it, trains a rank --rank all-linear adapter
   for --steps steps on synthetic Q&A packed into rows of --seq-len: in bf16, then as QLoRA (4-bit
   NF4, double quantisation; CUDA only). Each run's tokens/s and peak memory (the GPU memory PyTorch
   allocated, from the adapter's manifest) are printed beside `plan`'s estimate for the same
   settings, with their ratio (target: the estimate within 20% of the measured peak).
3. The engine decodes --clients requests at once, each on its own random rank-16 all-linear adapter,
   and the same requests on the bare base, alternated --reps times; overhead = base tok/s over
   adapters tok/s (target <= 1.10x).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from loraplex._quiet import quiet

quiet()

from loraplex.adapters import registry  # noqa: E402
from loraplex.models.load import load_tokenizer, resolve_base  # noqa: E402
from loraplex.train.plan import load_arch_config, lora_targets, make_plan  # noqa: E402

WORDS = [
    "policy",
    "office",
    "leave",
    "expense",
    "claim",
    "approve",
    "team",
    "lead",
    "contract",
    "invoice",
    "holiday",
    "salary",
    "report",
]


def random_base(shape: str, out: Path, device: str, tokenizer: Path | None) -> Path:
    from transformers import AutoModelForCausalLM

    cfg = load_arch_config(shape)
    cfg.torch_dtype = torch.bfloat16
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model = model.to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:  # a saved tokenizer directory (a machine without the SmolLM2 package)
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(tokenizer)).save_pretrained(out)
    else:
        load_tokenizer(resolve_base(None)).save_pretrained(out)
    return out


def synthetic_data(path: Path, records: int, seq_len: int) -> Path:
    """Records that each fill a row of seq_len tokens (cut there by max_seq_length): `plan` sizes
    activations for batch x seq_len tokens. The first GPU run (2026-12-04) used 120-word answers,
    ~160 tokens each: a step of 4 examples held ~650 tokens, a sixth of what `plan` was asked about."""
    import random

    rnd = random.Random(0)
    with path.open("w") as f:
        for i in range(records):
            answer = " ".join(rnd.choice(WORDS) for _ in range(seq_len))  # a word is a token or more
            f.write(json.dumps({"instruction": f"Question {i}: what does the handbook say?", "output": answer}) + "\n")
    return path


def train(home: Path, base: Path, data: Path, name: str, args: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
    sets = {
        "train.max_steps": args.steps,
        "train.batch_size": args.batch,
        "train.precision": "bf16",
        "train.device": args.device,
        "train.save_steps": 100_000,
        "train.warmup_ratio": 0.0,
        "data.max_seq_length": args.seq_len,
        "data.eval_ratio": 0,
        "retrieval.enabled": "false",  # plain SFT: the synthetic records are no FAQ to retrieve from
        "lora.rank": args.rank,
        "lora.alpha": 2 * args.rank,
    }
    cmd = [sys.executable, "-m", "loraplex.cli", "train", "--name", name, "--base", str(base), "--data", str(data)]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    cmd += extra
    r = subprocess.run(cmd, env={**os.environ, "LORAPLEX_HOME": str(home)}, capture_output=True, text=True)
    if r.returncode != 0:
        return {"error": r.stderr[-1500:]}
    os.environ["LORAPLEX_HOME"] = str(home)
    m = registry.resolve(name).manifest()
    return {"tokens_per_s": m["tokens_per_s"], "peak": m["peak_memory"]["bytes"], "kind": m["peak_memory"]["kind"]}


def random_adapters(base: Path, n: int, rank: int) -> list[str]:
    """n random PEFT adapters written straight from the shapes (no model in memory)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    ref = resolve_base(str(base))
    cfg = load_arch_config(str(base))
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(cfg)
    layers = lora_targets(meta, "all-linear")
    names = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        tensors = {}
        for module, fan_in, fan_out in layers:
            tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g) * 0.02
            tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(fan_out, rank, generator=g) * 0.02
        with tempfile.TemporaryDirectory() as tmp:
            save_file(tensors, str(Path(tmp) / "adapter_model.safetensors"))
            targets = sorted({m.rsplit(".", 1)[-1] for m, _, _ in layers})
            config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": targets}
            config |= {"task_type": "CAUSAL_LM", "bias": "none", "lora_dropout": 0.0, "base_model_name_or_path": ref.id}
            (Path(tmp) / "adapter_config.json").write_text(json.dumps(config))
            manifest = {"base_model": {"id": ref.id, "source": ref.source, "fingerprint": ref.fingerprint}}
            names.append(registry.register(f"gpu{i}", Path(tmp), manifest).name)
    return names


def decode_overhead(base: Path, names: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """tok/s of --clients requests at once on distinct adapters and on the bare base, and of one
    request alone, with the decode step replayed from CUDA graphs and run eagerly (the same engine,
    its graphs switched off and on between batches), alternated --reps times; medians."""
    from loraplex.engine.engine import Engine
    from loraplex.engine.sampling import SamplingParams

    engine = Engine(str(base), device=args.device, dtype="bf16", max_batch=len(names), max_loaded_adapters=len(names))
    graphs = engine.model.graphs
    params = SamplingParams(temperature=0.0, ignore_eos=True)
    prompt = [{"role": "user", "content": "What does the handbook say about leave?"}]

    async def batch(models: list[str]) -> float:
        async def one(model: str) -> int:
            n = 0
            async for d in engine.generate(prompt, params, model, args.tokens):
                n = d.completion_tokens
            return n

        t = time.perf_counter()
        tokens = sum(await asyncio.gather(*[one(m) for m in models]))
        return tokens / (time.perf_counter() - t)

    loads = {"adapters": names, "base": ["base"] * len(names), "one": names[:1]}
    modes = ["graphs", "eager"] if graphs is not None else ["eager"]

    async def run() -> dict[str, Any]:
        got: dict[str, list[float]] = {f"{m}/{k}": [] for m in modes for k in loads}
        for rep in range(args.reps + 1):  # the first round loads every adapter, captures, warms up
            for mode in modes:
                engine.model.graphs = graphs if mode == "graphs" else None
                for k, models in loads.items():
                    tps = await batch(models)
                    if rep:
                        got[f"{mode}/{k}"].append(tps)
        if args.profile and args.device.startswith("cuda"):
            # where a step's time goes: kernels by their own device time. CUPTI records every thread's
            # kernels; the engine thread's CPU ops are not recorded (so there is nothing to show on a CPU)
            from torch.profiler import ProfilerActivity, profile

            for mode in modes:
                engine.model.graphs = graphs if mode == "graphs" else None
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    await batch(loads["adapters"])
                print(f"\n{mode}: one batch of {len(names)} clients on distinct adapters", flush=True)
                averages = prof.key_averages()
                print(averages.table(sort_by="self_cuda_time_total", row_limit=14, max_name_column_width=48))
        engine.model.graphs = graphs
        out: dict[str, Any] = {k: sorted(v)[len(v) // 2] for k, v in got.items()}
        if graphs is not None:
            out["captures"], out["replays"], out["graphs_failed"] = graphs.captures, graphs.replays, graphs.failed
        return out

    try:
        return asyncio.run(run())
    finally:
        engine.close()


def gpu_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(device)
        return f"{p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}"
    return "no GPU (CPU smoke run)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3-8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None, help="write the results here (after each part)")
    ap.add_argument("--tokenizer", type=Path, default=None, help="tokenizer directory (default: SmolLM2's)")
    ap.add_argument("--parts", default="decode,bf16,qlora", help="which parts to run, in this order")
    ap.add_argument("--profile", action="store_true", help="print the costliest kernels of a decode batch (CUDA)")
    args = ap.parse_args()
    parts = args.parts.split(",")

    work = Path(tempfile.mkdtemp(prefix="lp-gpu-bench-"))
    home = work / "home"
    home.mkdir()
    os.environ["LORAPLEX_HOME"] = str(home)
    print(f"{time.strftime('%Y-%m-%d')}, {gpu_name(args.device)}", flush=True)
    t = time.perf_counter()
    base = random_base(args.shape, work / "base", args.device, args.tokenizer)
    print(f"random {args.shape} base written in {time.perf_counter() - t:.0f} s", flush=True)
    data = synthetic_data(work / "data.jsonl", args.steps * args.batch + 8, args.seq_len)
    plan = make_plan(str(base), args.rank, "all-linear", args.seq_len, args.batch)["peak_memory_bytes"]

    results: dict[str, Any] = {"gpu": gpu_name(args.device), "shape": args.shape, "args": vars(args) | {"json": None}}
    runs = {"bf16": ([], "bf16"), "qlora": (["--set", "train.quantization_bit=4"], "qlora-4bit")}

    def save() -> None:
        if args.json:
            args.json.write_text(json.dumps(results, indent=2, default=str))

    for part in parts:
        t = time.perf_counter()
        if part == "decode":
            names = random_adapters(base, args.clients, args.rank)
            results["decode"] = decode_overhead(base, names, args)
        elif part in runs and (part != "qlora" or args.device.startswith("cuda")):
            extra, plan_key = runs[part]
            got = train(home, base, data, f"scale-{part}", args, extra)
            got["plan"] = plan[plan_key]
            results[part] = got
        else:
            continue
        print(f"{part} done in {time.perf_counter() - t:.0f} s", flush=True)
        save()

    print(
        f"\n{results['gpu']}\n{args.shape}: rank {args.rank} all-linear, "
        f"{args.batch} x {args.seq_len} tokens, {args.steps} steps"
    )
    for name in runs:
        if name not in results:
            continue
        r = results[name]
        if "error" in r:
            print(f"  {name}: failed\n{r['error']}")
            continue
        ratio = r["plan"] / r["peak"]
        verdict = "within" if abs(ratio - 1) <= 0.2 else "outside"
        print(
            f"  {name:<6} {r['tokens_per_s']:>9,.0f} tok/s  peak {r['kind']} {r['peak'] / 2**30:6.2f} GiB  "
            f"plan {r['plan'] / 2**30:6.2f} GiB  plan/measured {ratio:.2f} ({verdict} 20%)"
        )
    d = results.get("decode")
    if d:
        print(
            f"  decode tok/s: {args.clients} clients on distinct rank-{args.rank} adapters | "
            "the same on the base | 1 client"
        )
        for mode in ("graphs", "eager"):
            if f"{mode}/base" in d:
                a, b, one = d[f"{mode}/adapters"], d[f"{mode}/base"], d[f"{mode}/one"]
                print(
                    f"    {mode:<6} {a:8,.1f} | {b:8,.1f} | {one:7,.1f}   "
                    f"multi-LoRA overhead {b / a:.3f}x (target <= 1.10x)"
                )
        if "graphs/base" in d:
            print(
                f"    graphs vs eager: adapters {d['graphs/adapters'] / d['eager/adapters']:.2f}x, "
                f"base {d['graphs/base'] / d['eager/base']:.2f}x; {d['captures']} captures, {d['replays']} replays"
            )
    save()


if __name__ == "__main__":
    main()
