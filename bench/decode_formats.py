"""Decode speed and answers per base-weight format: loraplex none / int8 / int4 vs. llama.cpp at the same bits.

    python bench/decode_formats.py [--formats none,int8,int4,int4-torch] [--tokens 128] [--threads N] [--json out.json]

One run, side by side, on the default base (SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF). For each
format, in its own child process (so formats share no heap, and RSS is each one's own):
  loraplex   the built-in engine in process (`Engine(quantize=...)`, what `serve --quantize` runs,
             without HTTP), `--threads` threads; `int4-torch`: int4 on PyTorch's packed kernel, what
             a machine without a C compiler runs, instead of loraplex's own (engine/quant_cpu.c);
  llama.cpp  llama-cpp-python on a GGUF of the same bits, the same thread count: the engine's
             unquantized dtype (BF16 where the engine runs bf16, else F32) and Q8_0 made from the
             shipped file by llama.cpp's own quantizer, and the shipped Q4_1 itself; adapters are the
             same 8 exported with `loraplex.export.to_gguf`, set per request.
Rows per format:
  single stream   one request at a time, 4 prompts, exactly `--tokens` new tokens (eos ignored),
                  tokens/s (the median of 3 such runs, for both), and the share of the bandwidth
                  limit: bytes of weights one token reads / copy bandwidth at this thread count;
  8 adapters      8 requests on 8 random rank-16 all-linear adapters: all at once vs. one at a time
                  (loraplex; medians of 3 alternated runs), one by one with the request's LoRA
                  (llama.cpp cannot batch adapters);
  overhead        the 8 adapters at once vs. 8 rows of the bare base at once (3 alternations, medians);
  answers         an adapter trained with the default command on the shipped sample answers its 20
                  held-out and 20 trained questions greedily, as served: answers identical to the
                  unquantized engine's, and key-fact accuracy;
  RSS             the engine process's resident memory after the speed rows (and its peak, which
                  loading the fp32 checkpoint sets), imports (torch, transformers) included.
The CPU model and flags print with the table, and the instruction sets of the llama.cpp build.
As on an AVX2-only CPU, on any x86-64 one: `LORAPLEX_CPU_ISA=avx2` (loraplex's kernels, precision and
PyTorch held to AVX2; cpu_isa.py) and `PYTHONPATH=DIR`, where DIR holds llama-cpp-python built with
AVX2 and no AVX-512 (`pip install --target DIR` of a wheel made with scripts/install.sh's flags for
such a CPU; docs/cpu.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from generalization import cpu, hit  # noqa: E402
from serve_throughput import copy_bandwidth, in_child, llama_cpp, make_adapters  # noqa: E402

# None: the engine's own dtype, BF16 or F32. int4-torch: int4 on PyTorch's kernel instead of quant_cpu.c
GGUF_TYPE = {"none": None, "int8": "Q8_0", "int4": "Q4_1", "int4-torch": "Q4_1"}
REPS = 3


def rss() -> tuple[int, int]:
    """(resident now, peak) bytes of this process."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def loraplex_rows(
    fmt: str, names: list[str], prompts: list[str], tokens: int, threads: int, adapter: str, questions: list[str]
) -> dict[str, Any]:
    """Every loraplex row of one format (in a child process: in_child)."""
    import ctypes

    from loraplex import malloc
    from loraplex._quiet import quiet

    quiet()
    malloc.limit_arenas(2)  # as `loraplex serve` does before its first thread: RSS as served
    if fmt == "int4-torch":  # what a machine without a C compiler runs
        os.environ["LORAPLEX_QUANT_KERNEL"] = "off"
        fmt = "int4"
    from loraplex.engine.engine import Engine
    from loraplex.engine.protocol import collect
    from loraplex.engine.sampling import SamplingParams
    from loraplex.eval.run import EvalExample, answer_all, served_prompts

    engine = Engine(None, quantize=fmt, threads=threads, max_batch=16, max_loaded_adapters=len(names))  # type: ignore[arg-type]
    params = SamplingParams(temperature=0, ignore_eos=True)

    async def one(model: str, i: int) -> int:
        msgs = [{"role": "user", "content": prompts[i % len(prompts)]}]
        return (await collect(engine.generate(msgs, params, model, tokens))).completion_tokens

    async def timed(models: list[str], together: bool) -> dict[str, float]:
        t = time.perf_counter()
        if together:
            n = sum(await asyncio.gather(*[one(m, i) for i, m in enumerate(models)]))
        else:
            n = sum([await one(m, i) for i, m in enumerate(models)])
        wall = time.perf_counter() - t
        return {"wall_s": wall, "tokens": n, "tokens_per_s": n / wall}

    async def run() -> dict[str, Any]:
        r: dict[str, Any] = {}
        await one("", 0)  # warm-up
        # one stream is the row this VM's neighbours move most (45-62 tok/s run to run): the median of REPS
        single = [await timed([""] * 4, together=False) for _ in range(REPS)]
        r["single_stream"] = sorted(single, key=lambda x: x["wall_s"])[REPS // 2]
        await timed(names, together=True)  # load every adapter before timing
        runs: list[tuple[dict[str, float], ...]] = []
        for _ in range(REPS):  # alternated, so the machine's drift falls on all three alike; medians
            runs.append(
                (
                    await timed(names, together=True),
                    await timed([""] * len(names), together=True),
                    await timed(names, together=False),
                )
            )
        for i, key in enumerate(("concurrent_adapters", "concurrent_base", "sequential")):
            r[key] = sorted((run[i] for run in runs), key=lambda x: x["wall_s"])[REPS // 2]
        # resident memory while serving, before the answers load retrieval's sentence encoder
        ctypes.CDLL(None).malloc_trim(0)  # what the engine's loop does every 30 s (malloc.py)
        r["rss_bytes"], r["peak_rss_bytes"] = rss()
        examples = [EvalExample("", [{"role": "user", "content": q}], "", ()) for q in questions]
        (answers,) = await answer_all(engine, [served_prompts(adapter, examples)], 96)
        r["answers"] = [a["text"] for a in answers]
        return r

    try:
        out = asyncio.run(run())
    finally:
        engine.close()
    out["dtype"] = str(engine.dtype).removeprefix("torch.")
    out["weight_bytes"] = weight_bytes(engine.model)
    return out


def weight_bytes(model: Any) -> int:
    """Bytes of weights one decode step reads: every projection, the output head, the norms."""
    import torch

    total = 0
    for t in [model.lm_head, model.final_norm, *(v for layer in model.layers for v in layer.values())]:
        if t is None:
            continue
        total += t.nbytes if isinstance(t, torch.Tensor) else t.nbytes
    return total


def quantized_gguf(src: Path, gguf_type: str, out: Path) -> Path:
    """`src` re-quantized by llama.cpp's own quantizer (its log silenced: in a child process)."""
    import llama_cpp as lc

    fd = os.open(os.devnull, os.O_WRONLY)
    os.dup2(fd, 2)
    os.dup2(fd, 1)
    params = lc.llama_model_quantize_default_params()
    params.ftype = getattr(lc, "LLAMA_FTYPE_ALL_F32" if gguf_type == "F32" else f"LLAMA_FTYPE_MOSTLY_{gguf_type}")
    params.allow_requantize = True
    if lc.llama_model_quantize(str(src).encode(), str(out).encode(), params):
        raise RuntimeError(f"llama.cpp could not make a {gguf_type} GGUF")
    return out


def llama_rows(
    base: Any, names: list[str], prompts: list[str], tokens: int, threads: int, path: Path
) -> dict[str, Any]:
    single = sorted(
        (llama_cpp(base, [], prompts[:4], tokens, path, threads) for _ in range(REPS)), key=lambda x: x["wall_s"]
    )[REPS // 2]  # the median of REPS, as loraplex's
    adapters = llama_cpp(base, names, prompts, tokens, path, threads)
    import llama_cpp as lc

    build = lc.llama_print_system_info().decode().strip()  # which instruction sets this build uses
    return {"single_stream": single, "adapters_one_by_one": adapters, "peak_rss_bytes": rss()[1], "build": build}


def train_adapter() -> str:
    from rich.console import Console

    from loraplex.config import load_config
    from loraplex.quickstart import TRAIN_FILE
    from loraplex.train.sft_lora import run

    cfg = load_config(extra={"name": "policies", "data": {"path": str(TRAIN_FILE)}})
    result = run(cfg, resume="never", console=Console(stderr=True))
    assert result.adapter is not None
    return result.adapter.id


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", default="none,int8,int4")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0, help="threads for both (0: all cores but one, as serve)")
    ap.add_argument("--adapter", help="a trained adapter in $LORAPLEX_HOME to answer with (default: train one)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from loraplex._quiet import quiet

    quiet()
    from loraplex.data.formats import parse_file
    from loraplex.models.device import bf16_is_faster
    from loraplex.models.load import gguf_file, resolve_base
    from loraplex.quickstart import TRAIN_FILE, questions

    threads = args.threads or max(1, (os.cpu_count() or 2) - 1)
    base = resolve_base(None)
    if args.adapter:  # before minutes of timing, not after them
        from loraplex.adapters import registry

        registry.resolve(args.adapter)  # a UserError naming the store and its adapters
    else:
        home = Path(tempfile.mkdtemp(prefix="lp-formats-bench-"))
        (home / "models").symlink_to(base.path.parent)
        os.environ["LORAPLEX_HOME"] = str(home)
    names = in_child(make_adapters, base, "bench", "all-linear")
    adapter = args.adapter or in_child(train_adapter)
    trained, heldout = questions()
    asked = [q for q, _ in heldout] + [q for q, _ in trained]
    prompts = [
        [m["content"] for m in c.messages if m["role"] == "user"][-1] for c in parse_file(TRAIN_FILE).conversations
    ]
    unquantized = "BF16" if bf16_is_faster("cpu") else "F32"
    tmp = Path(tempfile.mkdtemp(prefix="lp-gguf-"))
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    if "none" not in formats:
        formats.insert(0, "none")  # the reference every other format's answers are compared with
    results: dict[str, dict[str, Any]] = {}
    llama: dict[str, Any] = {}
    for fmt in formats:
        gtype = GGUF_TYPE[fmt] or unquantized
        path = gguf_file(base)
        if gtype != "Q4_1":  # the shipped file is Q4_1; other bits are made from it
            path = in_child(quantized_gguf, gguf_file(base), gtype, tmp / f"base-{gtype}.gguf")
        print(f"{fmt}: loraplex ...", flush=True)
        lp = in_child(loraplex_rows, fmt, names, prompts, args.tokens, threads, adapter, asked)
        if gtype not in llama:  # int4 and int4-torch race the same Q4_1 file: run it once
            print(f"{fmt}: llama.cpp {gtype} ...", flush=True)
            llama[gtype] = in_child(llama_rows, base, names, prompts, args.tokens, threads, path)
        results[fmt] = {"loraplex": lp, "llama_cpp": llama[gtype], "gguf": gtype}
    bw = copy_bandwidth(threads)

    print(f"\nCPU: {cpu()}")
    print(f"SmolLM2-135M-Instruct, {threads} thread(s) each, greedy, {args.tokens} new tokens per request;")
    print(f"copy bandwidth on {threads} thread(s): {bw / 1e9:.1f} GB/s read+write; adapter {adapter}")
    print(f"llama.cpp build: {next(iter(llama.values()))['build']}\n")
    head = (
        "format", "loraplex 1 stream", "llama.cpp 1 stream", "ratio", "% of bandwidth limit", "8 adapters at once",
        "vs 1 at a time", "llama.cpp 8 one by one", "ratio", "multi-LoRA overhead", "RSS (peak)",
    )  # fmt: skip
    print("| " + " | ".join(head) + " |")
    print("|---" * len(head) + "|")
    ref = results["none"]["loraplex"]["answers"]
    rows = {}
    for fmt, r in results.items():
        lp, lc = r["loraplex"], r["llama_cpp"]
        one, lc_one = lp["single_stream"]["tokens_per_s"], lc["single_stream"]["tokens_per_s"]
        limit = (bw / 2) / lp["weight_bytes"]
        conc, seq, base8 = lp["concurrent_adapters"], lp["sequential"], lp["concurrent_base"]
        lc8 = lc["adapters_one_by_one"]["tokens_per_s"]
        n_held = len(heldout)
        same = sum(a == b for a, b in zip(lp["answers"][:n_held], ref[:n_held], strict=True))
        acc_h = sum(hit(a, kw) for a, (_, kw) in zip(lp["answers"][:n_held], heldout, strict=True)) / n_held
        acc_t = sum(hit(a, kw) for a, (_, kw) in zip(lp["answers"][n_held:], trained, strict=True)) / len(trained)
        rows[fmt] = {
            "single_stream_tok_s": one,
            "llama_cpp_single_stream_tok_s": lc_one,
            "single_stream_ratio": one / lc_one,
            "bandwidth_share": one / limit,
            "concurrent_adapters_tok_s": conc["tokens_per_s"],
            "concurrency_scaling": conc["tokens_per_s"] / seq["tokens_per_s"],
            "llama_cpp_adapters_tok_s": lc8,
            "vs_llama_cpp_adapters": conc["tokens_per_s"] / lc8,
            "multi_lora_overhead": conc["wall_s"] / base8["wall_s"],
            "rss_bytes": lp["rss_bytes"],
            "peak_rss_bytes": lp["peak_rss_bytes"],
            "weight_bytes": lp["weight_bytes"],
            "heldout_identical": same / n_held,
            "heldout_accuracy": acc_h,
            "trained_accuracy": acc_t,
        }
        x = rows[fmt]
        label = f"{fmt} ({lp['dtype']} compute) vs {r['gguf']}"
        print(
            f"| {label} | {one:.1f} tok/s | {lc_one:.1f} tok/s | **{x['single_stream_ratio']:.2f}x** | "
            f"{100 * x['bandwidth_share']:.0f}% ({lp['weight_bytes'] / 1e6:.0f} MB/token) | "
            f"{conc['tokens_per_s']:.1f} tok/s | {x['concurrency_scaling']:.2f}x | {lc8:.1f} tok/s | "
            f"**{x['vs_llama_cpp_adapters']:.2f}x** | {x['multi_lora_overhead']:.2f}x | "
            f"{lp['rss_bytes'] / 2**20:.0f} MiB ({lp['peak_rss_bytes'] / 2**20:.0f}) |"
        )
    print("\n| format | held-out answers identical to unquantized | held-out key facts | trained key facts |")
    print("|---|---|---|---|")
    for fmt, x in rows.items():
        print(
            f"| {fmt} | {100 * x['heldout_identical']:.0f}% | {100 * x['heldout_accuracy']:.0f}% | "
            f"{100 * x['trained_accuracy']:.0f}% |"
        )
    print(
        "\ntargets: 1 stream >= llama.cpp at the same bits (ratio >= 1) and >= 60% of the bandwidth limit; "
        "8 adapters >= 4x one at a time and >= 2x llama.cpp; overhead <= 1.15x; "
        "held-out identical: int8 >= 95%, int4 >= 85%; RSS int4 <= 40% of none"
    )
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu(), "threads": threads, "rows": rows, "raw": results}, indent=2))


if __name__ == "__main__":
    main()
