"""loraplex serve vs. serving one request at a time, vs. the bare base, vs. PEFT's set_adapter loop.

    python bench/serve_throughput.py [--tokens 128] [--clients 8] [--reps 3] [--quantize int4] [--json out.json]

Everything runs in one run, side by side, on the default base (SmolLM2-135M-Instruct): eight
random rank-16 all-linear adapters (and eight q,v-only ones) are registered in a temporary store,
`loraplex serve` runs as its own process on loopback (as a user runs it: the clients' Python does
not share its interpreter), and clients are the official `openai` SDK (async, streaming). Every
request is greedy and generates exactly `--tokens` tokens (`ignore_eos`), prompts are the sample
data's questions. Rows:

  1. sequential: one client at a time, each request a different adapter;
  2. 8 clients / 8 adapters at once (the concurrency ratio is 2 over 1, target >= 4x);
  3. 8 clients on the bare base at once (multi-LoRA overhead is 2's time over 3's, target <= 1.15x;
     2 and 3 alternate --reps times and each row is its median run, as are 8's pair);
  4. naive: a PEFT model with the 8 adapters, `set_adapter` + `generate` per request, one by one,
     in the engine's dtype (bf16 or fp32, as `serve --dtype auto` picks: the fair row, target: 2 >= 5x
     its throughput) and, where that is bf16, also in transformers' default fp32;
  5. cold load (an adapter not in memory: store -> first token) vs. warm first token;
  6. time to first token p50/p99 with 16 clients at once;
  7. llama.cpp: llama-cpp-python on the same Q4_1 GGUF, the same 8 adapters exported with
     `loraplex.export.to_gguf`, switched per request (`llama_set_adapters_lora`); it cannot batch
     different adapters, so 8 clients are served one after another;
  8. 8 clients on 8 q,v-only rank-16 adapters (PEFT's default targets) vs. the bare base.
Plus single-stream decode tokens/s against this machine's memory-bandwidth limit (bytes of weights
read per token / measured copy bandwidth).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
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
from loraplex.data.formats import parse_file  # noqa: E402
from loraplex.models.load import resolve_base  # noqa: E402
from loraplex.quickstart import TRAIN_FILE  # noqa: E402

N_ADAPTERS, RANK = 8, 16
DTYPES = {"bf16": "bfloat16", "fp32": "float32"}


def make_adapters(base: Any, prefix: str, targets: str | list[str], knowledge: bool = False) -> list[str]:
    """`N_ADAPTERS` random adapters `prefix0`, `prefix1`...; with `knowledge`, each a version trained
    with retrieval as `loraplex train` registers one (the sample's Q&A as its `knowledge.jsonl`, the
    default retrieval settings in its manifest), so the server searches its Q&A for every question."""
    from peft import LoraConfig, get_peft_model

    from loraplex.assistants import faq
    from loraplex.config import RetrievalConfig
    from loraplex.models.load import load_model

    retrieval: dict[str, Any] = {}
    if knowledge:
        pairs = faq.pairs_of(parse_file(TRAIN_FILE).conversations)
        settings = RetrievalConfig()
        retrieval = {  # what train/parts.py run_facts records
            "enabled": True,
            "top_k": settings.top_k,
            "min_similarity": settings.min_similarity,
            "language": faq.LANGUAGE,
            "offtopic": settings.offtopic_gate,
            "english": settings.english_encoder,
            "spelling": settings.spelling,
            "bilingual": settings.bilingual,
            "english_topic": settings.english_encoder,
            "english_gate": settings.english_encoder,
            "refuse_below": settings.refuse_below,
            "passages": len(pairs),
        }

    model = get_peft_model(
        load_model(base),
        LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=targets, init_lora_weights=False),
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
            if retrieval:
                faq.write(Path(tmp) / faq.FILE, pairs)
            manifest = {"base_model": {"id": base.id, "source": base.source, "fingerprint": base.fingerprint}}
            ref = registry.register(
                f"{prefix}{i}", Path(tmp), {**manifest, **({"retrieval": retrieval} if retrieval else {})}
            )
        names.append(ref.name)
    return names


def copy_bandwidth(threads: int | None = None) -> float:
    """Bytes read + written per second by a 256 MiB copy (on `threads` threads, else torch's)."""
    if threads:
        torch.set_num_threads(threads)
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


def naive_peft(base: Any, names: list[str], prompts: list[str], tokens: int, dtype: torch.dtype) -> dict[str, Any]:
    from peft import PeftModel

    from loraplex.models.load import eos_token_ids, load_model, load_tokenizer

    tok = load_tokenizer(base)
    first = registry.resolve(names[0])
    model = PeftModel.from_pretrained(load_model(base).to(dtype), str(first.path), adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(str(registry.resolve(n).path), adapter_name=n)
    model.eval()
    eos = eos_token_ids(tok, model.generation_config.eos_token_id)
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


def in_child(fn: Any, *args: Any) -> Any:
    """fn(*args) in a spawned process: a native crash (llama.cpp built for instructions this CPU lacks
    dies with SIGILL) ends that row with its signal, not the benchmark."""
    import concurrent.futures
    import multiprocessing
    from concurrent.futures.process import BrokenProcessPool

    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(fn, *args).result()
        except BrokenProcessPool:
            raise SystemExit(f"{fn.__name__} crashed its process (rerun scripts/install.sh on this CPU)") from None


def llama_cpp(
    base: Any,
    names: list[str],
    prompts: list[str],
    tokens: int,
    model_path: Path | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """llama-cpp-python on the base's own GGUF (or `model_path`), each request with its adapter, one
    after another (in a child process: in_child); no adapters: the bare base, one stream at a time."""
    import ctypes

    import llama_cpp as lc
    from transformers import AutoConfig

    from loraplex.export.to_gguf import write_gguf_lora
    from loraplex.models.load import gguf_file, load_tokenizer

    config = AutoConfig.from_pretrained(base.path)
    tmp = Path(tempfile.mkdtemp(prefix="lp-gguf-"))
    paths = []
    for n in names:
        paths.append(tmp / f"{n}.gguf")
        write_gguf_lora(registry.resolve(n).path, config, paths[-1], n)
    llm = lc.Llama(
        model_path=str(model_path or gguf_file(base)),
        n_ctx=1024,
        n_threads=threads or os.cpu_count(),
        n_threads_batch=threads or os.cpu_count(),
        verbose=False,
    )
    loras = {n: lc.llama_adapter_lora_init(llm.model, str(p).encode()) for n, p in zip(names, paths, strict=True)}
    tok = load_tokenizer(base)
    one = (ctypes.c_float * 1)(1.0)
    t = time.perf_counter()
    total = 0
    for i, n in enumerate(names or [None] * len(prompts)):
        if n is not None:
            adapter = (lc.llama_adapter_lora_p_ctypes * 1)(loras[n])
            if lc.llama_set_adapters_lora(llm.ctx, adapter, 1, one):
                raise RuntimeError(f"llama.cpp refused adapter {n}")
        llm.reset()  # no prompt-prefix reuse: the cached keys were computed under another adapter
        text = tok.apply_chat_template(
            [{"role": "user", "content": prompts[i % len(prompts)]}], tokenize=False, add_generation_prompt=True
        )
        ids = tok(text, add_special_tokens=False)["input_ids"]
        for k, _ in enumerate(llm.generate(ids, temp=0.0, top_k=1, reset=True)):
            if k + 1 >= tokens:
                break
        total += tokens
    wall = time.perf_counter() - t
    return {"wall_s": wall, "tokens": total, "tokens_per_s": total / wall}


class ServerProcess:
    """`loraplex serve` in its own process on a free loopback port."""

    def __init__(self, home: Path, adapters: list[str], extra: list[str] | None = None):
        import socket

        import httpx

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        cmd = [
            sys.executable,
            "-m",
            "loraplex.cli",
            "serve",
            "--port",
            str(port),
            "--max-batch",
            "16",
            "--quantize",  # serve's default is int4 on a CPU; these benchmarks race the unquantized base
            "none",
            *(["--max-loaded-adapters", str(len(adapters)), "--adapters", ",".join(adapters)] if adapters else []),
            *(extra or []),  # later options win: extra may override --max-batch
        ]
        self.proc = subprocess.Popen(cmd, env={**os.environ, "LORAPLEX_HOME": str(home)})
        deadline = time.time() + 300
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"loraplex serve exited with {self.proc.returncode}")
            try:
                r = httpx.get(self.url + "/ready", timeout=2)
                if r.status_code == 200:
                    self.base_id = r.json()["model"]
                    return
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError("loraplex serve did not become ready in 300 s")
            time.sleep(0.5)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


def weight_bytes(base: Any, element_size: int) -> int:
    """Bytes of weights one decode step reads (a tied embedding counts once, as the output layer)."""
    from safetensors import safe_open

    n = 0
    for f in base.path.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():  # noqa: SIM118 - safe_open is not a dict
                shape = st.get_slice(k).get_shape()
                n += int(torch.tensor(shape).prod()) if shape else 1
    return n * element_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--clients", type=int, default=N_ADAPTERS)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--reps", type=int, default=3, help="alternated runs of each overhead pair (median)")
    ap.add_argument("--quantize", default="none", help="the server's base weights: none, int8 or int4")
    args = ap.parse_args()

    from loraplex.models.device import bf16_is_faster

    base = resolve_base(None)  # converted into the user's cache before anything is timed
    home = Path(tempfile.mkdtemp(prefix="lp-serve-bench-"))
    (home / "models").symlink_to(base.path.parent)
    os.environ["LORAPLEX_HOME"] = str(home)
    # In a child process, so this process stays free of torch threads while it only runs clients.
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        names = pool.submit(make_adapters, base, "bench", "all-linear").result()
        qv_names = pool.submit(make_adapters, base, "qv", ["q_proj", "v_proj"]).result()
    prompts = [
        [m["content"] for m in c.messages if m["role"] == "user"][-1] for c in parse_file(TRAIN_FILE).conversations
    ]
    k = args.clients
    adapters = [names[i % N_ADAPTERS] for i in range(k)]

    async def paired(clients: Clients, a: list[str], b: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The median-time run of each of two loads, alternated --reps times so drift hits both alike."""
        runs_a, runs_b = [], []
        for _ in range(args.reps):
            runs_a.append(await clients.concurrent(a))
            runs_b.append(await clients.concurrent(b))
        return tuple(sorted(x, key=lambda run: run["wall_s"])[len(x) // 2] for x in (runs_a, runs_b))  # type: ignore[return-value]

    async def run_all(clients: Clients, base_id: str, qv: bool) -> dict[str, Any]:
        r: dict[str, Any] = {}
        if qv:
            await clients.concurrent(qv_names)  # load them, then time
            r["concurrent_qv"], r["concurrent_base_qv"] = await paired(
                clients, [qv_names[i % N_ADAPTERS] for i in range(k)], [base_id] * k
            )
            return r
        # cold load: first use of an adapter reads it from the store; then the same adapter warm
        cold = await clients.one(names[0], 0)
        warm = await clients.one(names[0], 0)
        r["cold_ttft_s"], r["warm_ttft_s"] = cold[0], warm[0]
        await clients.concurrent(names)  # load every adapter before timing throughput
        r["sequential"] = await clients.sequential(adapters)
        r["concurrent_adapters"], r["concurrent_base"] = await paired(clients, adapters, [base_id] * k)
        r["ttft16"] = await clients.concurrent([names[i % N_ADAPTERS] for i in range(16)])
        r["single_stream"] = await clients.sequential([base_id])
        return r

    r: dict[str, Any] = {}
    print("llama.cpp baseline ...", flush=True)
    r["llama_cpp"] = in_child(llama_cpp, base, adapters, prompts, args.tokens)
    dtype = "bf16" if bf16_is_faster("cpu") else "fp32"  # what `serve --dtype auto` picks
    print(f"naive PEFT baseline ({dtype}) ...", flush=True)
    r["naive_peft"] = naive_peft(base, adapters, prompts, args.tokens, getattr(torch, DTYPES[dtype]))
    if dtype != "fp32":
        print("naive PEFT baseline (fp32) ...", flush=True)
        r["naive_peft_fp32"] = naive_peft(base, adapters, prompts, args.tokens, torch.float32)
    for group, qv in ((names, False), (qv_names, True)):
        server = ServerProcess(home, group, ["--quantize", args.quantize])
        try:
            r.update(asyncio.run(run_all(Clients(server.url, prompts, args.tokens), server.base_id, qv)))
        finally:
            server.stop()

    bytes_per_token = weight_bytes(base, 2 if dtype == "bf16" else 4)
    bw = copy_bandwidth()
    limit = (bw / 2) / bytes_per_token  # a copy moves each byte twice (read + write)
    ttft = sorted(r["ttft16"]["ttft"])
    p50, p99 = statistics.median(ttft), ttft[min(len(ttft) - 1, round(0.99 * (len(ttft) - 1)))]
    seq, conc, base_c, naive = r["sequential"], r["concurrent_adapters"], r["concurrent_base"], r["naive_peft"]
    lcpp, qv_c, qv_base = r["llama_cpp"], r["concurrent_qv"], r["concurrent_base_qv"]
    fp32_row = "naive_peft_fp32" in r
    rows = [
        ("1 client at a time, a different adapter each", seq),
        (f"{k} clients, {k} different adapters", conc),
        (f"{k} clients, bare base model", base_c),
        (f"naive PEFT set_adapter + generate, one by one ({dtype}, the engine's dtype)", naive),
        *([("naive PEFT, the same in fp32 (transformers' default)", r["naive_peft_fp32"])] if fp32_row else []),
        (f"llama.cpp Q4_1 + GGUF LoRA per request, {k} requests one by one", lcpp),
        (f"{k} clients, {k} different q,v-only adapters", qv_c),
        (f"{k} clients, bare base model (same server as the row above)", qv_base),
    ]
    print(
        f"\nSmolLM2-135M-Instruct, cpu {dtype}, {args.quantize} base weights, greedy, "
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
        **({"vs_naive_peft_fp32": conc["tokens_per_s"] / r["naive_peft_fp32"]["tokens_per_s"]} if fp32_row else {}),
        "vs_llama_cpp": conc["tokens_per_s"] / lcpp["tokens_per_s"],
        "multi_lora_overhead_qv": qv_c["wall_s"] / qv_base["wall_s"],
    }
    print(
        f"\nconcurrency scaling ({k} clients/{k} adapters vs 1 at a time): {ratios['concurrency_scaling']:.2f}x "
        "(target >= 4x)"
    )
    print(
        f"multi-LoRA overhead ({k} adapters vs bare base, time): {ratios['multi_lora_overhead']:.2f}x (target <= 1.15x)"
    )
    print(f"multi-LoRA overhead, q,v-only adapters: {ratios['multi_lora_overhead_qv']:.2f}x (target <= 1.15x)")
    print(f"vs naive PEFT set_adapter loop, {dtype}: {ratios['vs_naive_peft']:.2f}x (target >= 5x)")
    if "vs_naive_peft_fp32" in ratios:
        print(f"vs naive PEFT set_adapter loop, fp32: {ratios['vs_naive_peft_fp32']:.2f}x")
    print(f"vs llama.cpp, {k} clients / {k} adapters: {ratios['vs_llama_cpp']:.2f}x (aim > 1x)")
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
