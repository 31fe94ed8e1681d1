"""One decode step of the serving model: 8 rows on 8 distinct rank-16 adapters vs. 8 rows on the bare base.

    python bench/lora_step_overhead.py [--shape smollm2|llama-3-8b|...] [--device cpu|cuda] [--rows 8] [--quantize int4]
                                       [--dtype auto|bf16|fp32] [--layouts]

The in-process view of `bench/serve_throughput.py`'s multi-LoRA overhead row, without HTTP and
sampling, so it also runs where the server's dependencies or the real weights are missing (a GPU
machine): the model is built from a config with random weights (a plan_configs shape, or SmolLM2's
own when its GGUF is installed), the adapters are random all-linear rank-16 LoRAs (and q,v-only
ones, PEFT's default targets). Base and adapter steps alternate, medians are compared in the same
run. On CPU the C kernel (bf16 weights, and int8 as served on an int4 base) and the PyTorch path (fp32
weights) are timed side by side.
Before timing, each batched delta is checked against the naive per-row loop in lora.py's docstring.
Prints one row per target set and path, with the ratio to the base step, and the process's resident
memory with the model built (`--quantize none` vs `int4` on a large shape: the RSS target where
weights, not the libraries, dominate).

`--layouts` (fp32 on CPU): instead, the bare base step at 1-16 rows with the projections stored as
transformers does ([out, in] row-major), transposed in memory (MKL's fast layout) and in
quant_cpu.c's fp32 tiles (what the engine holds where that kernel is built), alternating in one
process: what the fp32 layout in engine/model.py buys on this CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from loraplex.engine import lora_kernel
from loraplex.engine.lora import AdapterWeights, LoraBatch, LoraStacks
from loraplex.engine.model import DecoderModel, Step
from loraplex.engine.quant import Quantize, Tiles, mode, tile
from loraplex.models.device import bf16_is_faster

sys.path.insert(0, str(Path(__file__).parent))
from generalization import cpu  # noqa: E402  (lscpu model and flags: printed with the table)

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_model(shape: str, device: str, dtype: torch.dtype, quantize: Quantize = "none") -> DecoderModel:
    if shape == "smollm2":
        from loraplex.models.load import load_model, resolve_base

        hf = load_model(resolve_base(None))
    else:
        path = Path(shape) if shape.endswith(".json") else resources.files("loraplex.plan_configs") / f"{shape}.json"
        cfg = AutoConfig.for_model(**json.loads(path.read_text()))
        torch.set_default_dtype(dtype)  # random init straight in the serving dtype: an 8B model in fp32 is 32 GB
        with torch.device(device):
            hf = AutoModelForCausalLM.from_config(cfg)
        torch.set_default_dtype(torch.float32)
    return DecoderModel(hf.eval(), dtype, device, quantize)


def resident_mib() -> tuple[float, float]:
    """(resident now, peak) MiB of this process, after returning freed heap to the system."""
    from loraplex.malloc import _malloc_trim

    trim = _malloc_trim()
    if trim is not None:  # glibc: as the engine's loop does
        trim(0)
    status = Path("/proc/self/status")
    if not status.exists():  # not Linux
        return float("nan"), float("nan")
    fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def random_adapter(model: DecoderModel, targets: tuple[str, ...], rank: int, seed: int) -> AdapterWeights:
    g = torch.Generator().manual_seed(seed)
    mods = {m: (fan_in, fan_out) for fan_in, ms in model.site_shapes.values() for m, fan_out in ms}
    found = {
        (layer, m): (torch.randn(rank, fan_in, generator=g) * 0.02, torch.randn(mods[m][1], rank, generator=g) * 0.02)
        for layer in range(model.n_layers)
        for m, (fan_in, _) in mods.items()
        if m in targets
    }
    return AdapterWeights.from_found(found, model.n_layers, model.site_shapes, f"random{seed}")


def check_against_naive(batch: LoraBatch, weights: list[AdapterWeights], model: DecoderModel) -> None:
    """The docstring's per-row loop, on one layer's sites, at the bench's dtype."""
    fan_in, mods = model.site_shapes["gate_up"]
    x = torch.randn(len(weights), 1, fan_in, device=model.device, dtype=model.dtype)
    out = sum(o for _, o in mods)
    got = batch.add_to(torch.zeros(len(weights), 1, out, device=model.device, dtype=model.dtype), x, 0, "gate_up")
    for i, w in enumerate(weights):
        ref = torch.cat([x[i].float() @ w.A[m][0].T.to(x.device) @ w.B[m][0].T.to(x.device) for m, _ in mods], -1)
        torch.testing.assert_close(got[i].float(), ref, atol=2e-2, rtol=2e-2)


def time_steps(model: DecoderModel, lora: LoraBatch | None, rows: int, reps: int) -> list[float]:
    cache = model.new_cache(rows, 512)
    ids = torch.randint(0, 1000, (rows, 1), device=model.device)
    starts = torch.full((rows,), 150, device=model.device)
    out = []
    for _ in range(reps):
        if model.device != "cpu":
            torch.cuda.synchronize()
        t = time.perf_counter()
        model.forward(Step(ids, starts, 0, lora), cache)
        if model.device != "cpu":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return out


def compare_layouts(model: DecoderModel, reps: int) -> None:
    """The bare base's fp32 decode step with the projections and head row-major ([out, in], as
    transformers holds them), transposed in memory (for MKL) and in quant_cpu.c's fp32 tiles (what
    the engine holds where that kernel is built)."""
    sites = ("qkv", "o", "gate_up", "down")

    def dense(w: Any) -> torch.Tensor:
        return w.dense() if isinstance(w, Tiles) else w.contiguous()

    layouts = {
        "row-major": lambda w: dense(w),
        "transposed": lambda w: dense(w).t().contiguous().t(),
        "tiles": lambda w: tile(dense(w), torch.float32),
    }
    if tile(torch.zeros(16, 16), torch.float32) is None:
        del layouts["tiles"]  # no C compiler, or no AVX2
    kept = ([dict(p) for p in model.layers], model.lm_head, model.embed)
    held = {
        name: ([{k: f(v) if k in sites else v for k, v in p.items()} for p in kept[0]], f(kept[1]))
        for name, f in layouts.items()
    }
    print(f"{'rows':>4}  " + "  ".join(f"{n:>10}" for n in held) + "  (ms a step; ratios to row-major)")
    for rows in (1, 2, 3, 4, 8, 16):
        cache = model.new_cache(rows, 512)  # one cache for all: its first touch is not timed
        step = Step(torch.randint(0, 1000, (rows, 1)), torch.full((rows,), 150), 0, None)
        times: dict[str, list[float]] = {n: [] for n in held}
        for i in range(reps + 3):
            for name, (layers, head) in held.items():
                model.layers, model.lm_head, model.embed = layers, head, head
                t = time.perf_counter()
                model.forward(step, cache)
                if i >= 3:  # warm-up
                    times[name].append(time.perf_counter() - t)
        ms = {n: statistics.median(t) * 1e3 for n, t in times.items()}
        ratios = "  ".join(f"{ms['row-major'] / v:.2f}x" for n, v in ms.items() if n != "row-major")
        print(f"{rows:>4}  " + "  ".join(f"{v:7.1f} ms" for v in ms.values()) + f"  {ratios}")
    model.layers, model.lm_head, model.embed = kept


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="smollm2", help="smollm2, a plan_configs name, or a config.json")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: all cores but one, as serve)")
    ap.add_argument("--quantize", default="none", help="base weights: none, int8 or int4 (CPU)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="auto: what serve picks here")
    ap.add_argument("--layouts", action="store_true", help="fp32: row-major, transposed and tiled weights, 1-16 rows")
    args = ap.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads or max(1, torch.get_num_threads() - 1))
    if args.dtype == "auto":  # as Engine does: bf16 where this device runs it faster, else fp32
        dtype = torch.bfloat16 if bf16_is_faster(args.device) else torch.float32
    else:
        dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = build_model(args.shape, args.device, dtype, mode(args.quantize))
    resident = resident_mib()  # the served model's memory: the HF model it was built from is gone
    # as Engine does: bf16 weights for the C kernel on CPU (fp32 for the PyTorch path without it)
    # as Engine does: the C kernel's weights on CPU, int8 with a quantized base (bf16 unquantized;
    # both timed), fp32 for the PyTorch path without it
    paths = [("kernel", torch.bfloat16), ("kernel", torch.int8), ("torch", torch.float32)]
    if args.device != "cpu":
        paths = [("torch", dtype)]
    elif lora_kernel.load() is None:
        paths = paths[2:]
    print(cpu())
    if args.layouts:
        compare_layouts(model, args.reps)
        return
    print(f"{args.shape} on {args.device}: {args.rows} rows, rank {args.rank}, model {dtype}, {args.quantize} weights")
    print(f"  process resident with the model built: {resident[0]:.0f} MiB (peak while building {resident[1]:.0f})")
    for label, targets in (("all-linear", ALL), ("q,v", ("q_proj", "v_proj"))):
        weights = [random_adapter(model, targets, args.rank, seed) for seed in range(args.rows)]
        batches = {}
        for path, lora_dtype in paths:
            stacks = LoraStacks(model.n_layers, args.rows + 1, model.site_shapes, lora_dtype, args.device)
            for slot, w in enumerate(weights, start=1):
                stacks.put(slot, w)
            batches[(path, lora_dtype)] = b = LoraBatch(stacks, list(range(1, args.rows + 1)))
            check_against_naive(b, weights, model)
        times: dict[Any, list[float]] = {"base": [], **{p: [] for p in batches}}
        time_steps(model, None, args.rows, 3)
        for b in batches.values():
            time_steps(model, b, args.rows, 3)  # warm-up
        for _ in range(args.reps):  # alternate, so drift hits all alike
            times["base"] += time_steps(model, None, args.rows, 1)
            for path, b in batches.items():
                times[path] += time_steps(model, b, args.rows, 1)
        base = statistics.median(times["base"]) * 1e3
        for path, lora_dtype in paths:
            a = statistics.median(times[(path, lora_dtype)]) * 1e3
            print(
                f"  {label:10s} {path:6s} (LoRA {str(lora_dtype)[6:]})  base {base:8.2f} ms/step   "
                f"{args.rows} adapters {a:8.2f} ms/step   overhead {a / base:.3f}x"
            )
        del batches, weights


if __name__ == "__main__":
    main()
