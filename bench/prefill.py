"""One row's prompt on a CPU: time to its last position's logits, loraplex vs. llama.cpp at the same bits.

    python bench/prefill.py [--quantize int4|int8|none] [--threads N] [--reps 5] [--json out.json]

A server on a CPU prefills a request's prompt alone (one row), often after a cached prefix (the
chat template, a retrieved passage, the conversation so far): what a user waits for before the
first token. On the default base (SmolLM2-135M-Instruct), for prompts of L new tokens after P
cached positions (P, L = 0/25, 110/20, 300/40, 0/300, 600/200, 0/1000), side by side in one run:
  kernel     `DecoderModel.forward` as the engine calls it: decode_cpu.c's norms and
             `prefill_attention` (the new tokens' queries together over the cached keys) around the
             quantized products (`--quantize`, default int4 as `serve` runs on a CPU);
  pytorch    the same model on its PyTorch path (decode_cpu.c off), the reference the kernel is
             tested against (tests/test_decode_kernel.py), which prefills several rows at once;
  llama.cpp  llama-cpp-python on a GGUF of the same bits (the shipped Q4_1 for int4, Q8_0 from it for
             int8, F32/BF16 for none as the engine's dtype), the same thread count, in a child
             process: the P positions evaluated, then the timed L. For int4 also Q4_0 (made from
             the shipped file by llama.cpp's quantizer): llama.cpp's fastest 4-bit prompt path
             (its repacked and llamafile matmuls take Q4_0, not Q4_1), the strongest 4-bit baseline.
Random token ids (the same for every engine); medians of --reps runs, the kernel and PyTorch paths
alternated. The CPU model and flags print with the table, and llama.cpp's build.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from decode_formats import GGUF_TYPE, quantized_gguf  # noqa: E402
from generalization import cpu  # noqa: E402
from serve_throughput import in_child  # noqa: E402

SHAPES = [(0, 25), (110, 20), (300, 40), (0, 300), (600, 200), (0, 1000)]  # (cached, new)
VOCAB = (100, 40_000)


def prompt(cached: int, new: int) -> list[int]:
    import random

    rng = random.Random(cached * 7919 + new)
    return [rng.randrange(*VOCAB) for _ in range(cached + new)]


def loraplex_rows(quantize: str, threads: int, reps: int) -> dict[str, Any]:
    import torch

    from lora_step_overhead import build_model
    from loraplex.engine.model import Step
    from loraplex.models.device import bf16_is_faster

    torch.set_num_threads(threads)
    dtype = torch.bfloat16 if bf16_is_faster("cpu") else torch.float32
    model = build_model("smollm2", "cpu", dtype, quantize)  # type: ignore[arg-type]
    ops = model.decode_ops
    if ops is None:
        raise SystemExit("decode_cpu.c is not built here (no C compiler): nothing to compare")
    cache = model.new_cache(1, 2048)

    def once(ids: list[int], cached: int, kernel: bool) -> float:
        t = torch.tensor([ids])
        model.decode_ops = ops
        if cached:
            model.forward(Step(t[:, :cached], torch.tensor([0]), 0, None), cache)
        model.decode_ops = ops if kernel else None
        start = time.perf_counter()
        model.forward(Step(t[:, cached:], torch.tensor([cached]), 0, None), cache)
        wall = time.perf_counter() - start
        model.decode_ops = ops
        return wall

    rows = {}
    for cached, new in SHAPES:
        ids = prompt(cached, new)
        once(ids, cached, True)  # warm-up: buffers, oneDNN's kernels for these shapes
        times: dict[str, list[float]] = {"kernel": [], "pytorch": []}
        for _ in range(reps):
            for path in times:
                times[path].append(once(ids, cached, path == "kernel"))
        rows[f"{cached}/{new}"] = {p: statistics.median(v) for p, v in times.items()}
    return {"dtype": str(dtype).removeprefix("torch."), "rows": rows}


def llama_rows(gguf: str, threads: int, reps: int) -> dict[str, Any]:
    """llama.cpp on `gguf` (in a child: in_child), each shape's L new tokens timed after its P."""
    import llama_cpp as lc

    llm = lc.Llama(model_path=gguf, n_ctx=2048, n_batch=1024, n_threads=threads, n_threads_batch=threads, verbose=False)
    rows = {}
    for cached, new in SHAPES:
        ids = prompt(cached, new)
        times = []
        for _ in range(reps + 1):  # the first is a warm-up
            llm.reset()
            if cached:
                llm.eval(ids[:cached])
            start = time.perf_counter()
            llm.eval(ids[cached:])
            times.append(time.perf_counter() - start)
        rows[f"{cached}/{new}"] = statistics.median(times[1:])
    return {"rows": rows, "build": lc.llama_print_system_info().decode().strip()}


def ggufs_for(quantize: str, dtype: str) -> list[str]:
    """The GGUFs llama.cpp races at the engine's bits (made in a child: llama.cpp's quantizer logs)."""
    from loraplex.models.load import gguf_file, resolve_base

    shipped = gguf_file(resolve_base(None))
    gtypes = [GGUF_TYPE[quantize] or ("BF16" if dtype == "bfloat16" else "F32")] + (
        ["Q4_0"] if quantize == "int4" else []
    )
    out = []
    for gtype in gtypes:
        if gtype == "Q4_1":  # the shipped file's own type
            out.append(str(shipped))
            continue
        made = Path(tempfile.mkdtemp(prefix="lp-prefill-")) / f"smollm2-{gtype}.gguf"
        out.append(str(in_child(quantized_gguf, shipped, gtype, made)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quantize", default="int4", choices=["int4", "int8", "none"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    os.environ.setdefault("LORAPLEX_HOME", tempfile.mkdtemp(prefix="loraplex-bench-prefill-"))
    lp = loraplex_rows(args.quantize, args.threads, args.reps)
    ggufs = ggufs_for(args.quantize, lp["dtype"])
    names = [Path(g).stem.rsplit(".", 1)[-1].rsplit("-", 1)[-1] for g in ggufs]  # Q4_1, Q4_0, ...
    lcs = [in_child(llama_rows, g, args.threads, args.reps) for g in ggufs]
    print(f"\nCPU: {cpu()}; {args.threads} thread(s); loraplex {args.quantize} ({lp['dtype']} activations)")
    print(f"llama.cpp: {', '.join(Path(g).name for g in ggufs)}; {lcs[0]['build']}")
    theirs_head = " | ".join(f"llama.cpp {n}" for n in names)
    ratio_head = " | ".join(f"vs {n}" for n in names)
    print(
        f"| cached / new tokens | loraplex kernel | PyTorch path | {theirs_head} | kernel vs PyTorch | {ratio_head} |"
    )
    print("|---" * (4 + 2 * len(names)) + "|")
    out = []
    for key, r in lp["rows"].items():
        theirs = [lc["rows"][key] for lc in lcs]
        out.append(
            {"shape": key, "kernel_s": r["kernel"], "pytorch_s": r["pytorch"], **dict(zip(names, theirs, strict=True))}
        )
        cells = " | ".join(f"{t * 1e3:.1f} ms" for t in theirs)
        ratios = " | ".join(f"**{t / r['kernel']:.2f}x**" for t in theirs)
        print(
            f"| {key} | {r['kernel'] * 1e3:.1f} ms | {r['pytorch'] * 1e3:.1f} ms | {cells} | "
            f"{r['pytorch'] / r['kernel']:.2f}x | {ratios} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu(), "threads": args.threads, "rows": out}, indent=1))


if __name__ == "__main__":
    main()
