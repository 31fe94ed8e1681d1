"""loraplex serve vs. serving one request at a time, vs. the bare base, vs. PEFT's set_adapter loop.

    python bench/serve_throughput.py [--tokens 128] [--clients 8] [--json out.json]

Everything runs in one process, side by side, on the default base (SmolLM2-135M-Instruct):
eight random rank-16 all-linear adapters are registered in a temporary store, a real loraplex
server listens on loopback, and clients are the official `openai` SDK (async, streaming). Every
request is greedy and generates exactly `--tokens` tokens (`ignore_eos`), prompts are the sample
data's questions. Rows:

  1. sequential: one client at a time, each request a different adapter;
  2. 8 clients / 8 adapters at once (the concurrency ratio is 2 over 1, target >= 4x);
  3. 8 clients on the bare base at once (multi-LoRA overhead is 2's time over 3's, target <= 1.15x);
  4. naive: a PEFT model with the 8 adapters, `set_adapter` + `generate` per request, one by one
     (transformers' defaults: fp32), target: 2 >= 5x its throughput;
  5. cold load (an adapter not in memory: store -> first token) vs. warm first token;
  6. time to first token p50/p99 with 16 clients at once.
Plus single-stream decode tokens/s against this machine's memory-bandwidth limit (bytes of weights
read per token / measured copy bandwidth).

llama.cpp is not measured here: llama-cpp-python needs adapters converted to GGUF LoRA with
llama.cpp's `convert_lora_to_gguf.py`, which its PyPI package does not ship.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from loraplex._quiet import quiet

quiet()

from loraplex.adapters import registry  # noqa: E402
from loraplex.data.formats import parse_file  # noqa: E402
from loraplex.models.load import resolve_base  # noqa: E402
from loraplex.quickstart import TRAIN_FILE  # noqa: E402

N_ADAPTERS, RANK = 8, 16


def make_adapters(base: Any) -> list[str]:
    from peft import LoraConfig, get_peft_model

    from loraplex.models.load import load_model

    model = get_peft_model(
        load_model(base),
        LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules="all-linear", init_lora_weights=False),
    )
    names = []
    for i in range(N_ADAPTERS):
        torch.manual_seed(i)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.normal_(0, 0.02)
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            ref = registry.register(
                f"bench{i}",
                Path(tmp),
                {"base_model": {"id": base.id, "source": base.source, "fingerprint": base.fingerprint}},
            )
        names.append(ref.name)
    return names


def copy_bandwidth() -> float:
    a = torch.empty(256 * 1024 * 1024 // 4)
    b = torch.empty_like(a)
    b.copy_(a)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t)
    return 2 * a.numel() * 4 / best  # bytes read + written per second


class Clients:
    def __init__(self, url: str, prompts: list[str], tokens: int):
        import openai

        self.client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=600)
        self.prompts, self.tokens = prompts, tokens

    async def one(self, model: str, i: int) -> tuple[float, int]:
        """(time to first token, tokens) of one streamed request."""
        t = time.perf_counter()
        ttft, n = None, 0
        stream = await self.client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": self.prompts[i % len(self.prompts)]}],
            temperature=0,
            max_tokens=self.tokens,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        async for ch in stream:
            if ttft is None and ch.choices and ch.choices[0].delta.content:
                ttft = time.perf_counter() - t
            if ch.usage is not None:
                n = ch.usage.completion_tokens
        return (ttft if ttft is not None else time.perf_counter() - t), n

    async def concurrent(self, models: list[str]) -> dict[str, Any]:
        t = time.perf_counter()
        res = await asyncio.gather(*[self.one(m, i) for i, m in enumerate(models)])
        wall = time.perf_counter() - t
        toks = sum(n for _, n in res)
        return {"wall_s": wall, "tokens": toks, "tokens_per_s": toks / wall, "ttft": [r[0] for r in res]}

    async def sequential(self, models: list[str]) -> dict[str, Any]:
        t = time.perf_counter()
        res = [await self.one(m, i) for i, m in enumerate(models)]
        wall = time.perf_counter() - t
        toks = sum(n for _, n in res)
        return {"wall_s": wall, "tokens": toks, "tokens_per_s": toks / wall, "ttft": [r[0] for r in res]}


def naive_peft(base: Any, names: list[str], prompts: list[str], tokens: int) -> dict[str, Any]:
    from peft import PeftModel

    from loraplex.models.load import eos_token_ids, load_model, load_tokenizer

    tok = load_tokenizer(base)
    first = registry.resolve(names[0])
    model = PeftModel.from_pretrained(load_model(base), str(first.path), adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(str(registry.resolve(n).path), adapter_name=n)
    model.eval()
    eos = eos_token_ids(tok, model)
    t = time.perf_counter()
    total = 0
    for i, n in enumerate(names):
        model.set_adapter(n)
        text = tok.apply_chat_template(
            [{"role": "user", "content": prompts[i % len(prompts)]}], tokenize=False, add_generation_prompt=True
        )
        ids = tok(text, return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(
                **ids,
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=tok.pad_token_id,
            )
        total += out.shape[1] - ids["input_ids"].shape[1]
    wall = time.perf_counter() - t
    return {"wall_s": wall, "tokens": total, "tokens_per_s": total / wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--clients", type=int, default=N_ADAPTERS)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import uvicorn

    from loraplex.api.server import create_app
    from loraplex.engine.engine import Engine

    base = resolve_base(None)  # converted into the user's cache before anything is timed
    home = Path(tempfile.mkdtemp(prefix="lp-serve-bench-"))
    (home / "models").symlink_to(base.path.parent)
    os.environ["LORAPLEX_HOME"] = str(home)
    # In a child process: torch work on this thread before the engine starts would slow the
    # engine's own thread (see Engine.__init__).
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        names = pool.submit(make_adapters, base).result()
    prompts = [
        [m["content"] for m in c.messages if m["role"] == "user"][-1] for c in parse_file(TRAIN_FILE).conversations
    ]

    engine = Engine(None, max_batch=16, max_loaded_adapters=N_ADAPTERS)
    server = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=0, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    clients = Clients(url, prompts, args.tokens)
    k = args.clients
    adapters = [names[i % N_ADAPTERS] for i in range(k)]

    async def run_all() -> dict[str, Any]:
        r: dict[str, Any] = {}
        # cold load: first use of an adapter reads it from the store; then the same adapter warm
        cold = await clients.one(names[0], 0)
        warm = await clients.one(names[0], 0)
        r["cold_ttft_s"], r["warm_ttft_s"] = cold[0], warm[0]
        await clients.concurrent(names)  # load every adapter before timing throughput
        r["sequential"] = await clients.sequential(adapters)
        r["concurrent_adapters"] = await clients.concurrent(adapters)
        r["concurrent_base"] = await clients.concurrent([engine.base.id] * k)
        r["ttft16"] = await clients.concurrent([names[i % N_ADAPTERS] for i in range(16)])
        r["single_stream"] = await clients.sequential([engine.base.id])
        return r

    r = asyncio.run(run_all())
    server.should_exit = True
    engine.close()
    print("naive PEFT baseline ...", flush=True)
    r["naive_peft"] = naive_peft(base, adapters, prompts, args.tokens)

    params = sum(t.numel() for t in [engine.model.lm_head, engine.model.final_norm])  # type: ignore[misc]
    params += sum(t.numel() for layer in engine.model.layers for t in layer.values() if t is not None)
    bytes_per_token = params * engine.model.lm_head.element_size()  # type: ignore[union-attr]
    bw = copy_bandwidth()
    limit = (bw / 2) / bytes_per_token  # a copy moves each byte twice (read + write)
    ttft = sorted(r["ttft16"]["ttft"])
    p50, p99 = statistics.median(ttft), ttft[min(len(ttft) - 1, round(0.99 * (len(ttft) - 1)))]
    seq, conc, base_c, naive = r["sequential"], r["concurrent_adapters"], r["concurrent_base"], r["naive_peft"]
    rows = [
        ("1 client at a time, a different adapter each", seq),
        (f"{k} clients, {k} different adapters", conc),
        (f"{k} clients, bare base model", base_c),
        ("naive PEFT set_adapter + generate, one by one (fp32)", naive),
    ]
    print(
        f"\nSmolLM2-135M-Instruct, {engine.device} {str(engine.dtype).removeprefix('torch.')}, greedy, "
        f"{args.tokens} new tokens per request, rank-{RANK} all-linear adapters\n"
    )
    print("| run | requests | wall | tokens/s |")
    print("|---|---|---|---|")
    for name, x in rows:
        print(
            f"| {name} | {len(x['ttft']) if 'ttft' in x else len(adapters)} | {x['wall_s']:.1f} s | "
            f"{x['tokens_per_s']:.1f} |"
        )
    ratios = {
        "concurrency_scaling": conc["tokens_per_s"] / seq["tokens_per_s"],
        "multi_lora_overhead": conc["wall_s"] / base_c["wall_s"],
        "vs_naive_peft": conc["tokens_per_s"] / naive["tokens_per_s"],
    }
    print(
        f"\nconcurrency scaling ({k} clients/{k} adapters vs 1 at a time): {ratios['concurrency_scaling']:.2f}x "
        "(target >= 4x)"
    )
    print(
        f"multi-LoRA overhead ({k} adapters vs bare base, time): {ratios['multi_lora_overhead']:.2f}x (target <= 1.15x)"
    )
    print(f"vs naive PEFT set_adapter loop: {ratios['vs_naive_peft']:.2f}x (target >= 5x)")
    print(
        f"adapter cold load, store -> first token: {r['cold_ttft_s'] * 1000:.0f} ms "
        f"(warm first token {r['warm_ttft_s'] * 1000:.0f} ms)"
    )
    print(f"time to first token, 16 clients at once: p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms")
    single = r["single_stream"]["tokens_per_s"]
    print(
        f"single-stream decode: {single:.1f} tok/s; memory-bandwidth limit {limit:.0f} tok/s "
        f"({bytes_per_token / 1e6:.0f} MB of weights per token, copy bandwidth {bw / 1e9:.1f} GB/s "
        f"read+write) = {100 * single / limit:.0f}% of the limit"
    )
    if args.json:
        out = {
            "ratios": ratios,
            "p50_ttft_s": p50,
            "p99_ttft_s": p99,
            "single_stream_tok_s": single,
            "bandwidth_limit_tok_s": limit,
            **{k2: {kk: v for kk, v in x.items() if kk != "ttft"} for k2, x in r.items() if isinstance(x, dict)},
        }
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
