"""Adapter store figures: size on disk, load time from store to ready, and `list` on 1,000 adapters.

    python bench/registry_ops.py [--adapters 1000]

Side by side in one run, on the default base (SmolLM2-135M-Instruct):
  1. a rank-16 all-linear adapter's size on disk;
  2. store -> ready to serve: loraplex (resolve, sha256 check, base check, per-site layout, copy
     into the serving slots) vs. PEFT's `load_adapter` onto an already loaded PeftModel;
     target < 100 ms;
  3. `adapters list` on a store with `--adapters` adapters (small ones: listing never reads
     weights): the SQLite index vs. reading every adapter's manifest, in process, and the CLI
     end to end (`loraplex adapters list --json`, which includes starting Python); target < 1 s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from loraplex._quiet import quiet

quiet()

from loraplex.adapters import registry  # noqa: E402
from loraplex.models.load import load_model, resolve_base  # noqa: E402


def median_ms(fn: object, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=int, default=1000)
    args = ap.parse_args()
    from peft import LoraConfig, PeftModel, get_peft_model

    from loraplex.engine.adapter_cache import AdapterCache
    from loraplex.engine.lora import LoraStacks
    from loraplex.engine.model import DecoderModel

    base = resolve_base(None)
    home = Path(tempfile.mkdtemp(prefix="lp-registry-bench-"))
    (home / "models").symlink_to(base.path.parent)
    os.environ["LORAPLEX_HOME"] = str(home)

    # 1. a rank-16 all-linear adapter, registered the way training registers it
    hf = load_model(base)
    peft_model = get_peft_model(
        hf, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    )
    tmp = Path(tempfile.mkdtemp())
    peft_model.save_pretrained(tmp, safe_serialization=True)
    meta = {"base_model": {"id": base.id, "source": base.source, "fingerprint": base.fingerprint}}
    refs = [registry.register("r16", tmp, meta) for _ in range(12)]
    size = sum((refs[0].path / f).stat().st_size for f in registry.ADAPTER_FILES)

    # 2. store -> ready. loraplex: a fresh cache each time, so nothing is already in memory.
    model = DecoderModel(load_model(base), torch.bfloat16, "cpu")
    stacks = LoraStacks(model.n_layers, 2, model.site_shapes, torch.bfloat16, "cpu")
    versions = iter(range(1, 13))

    def loraplex_load() -> None:
        cache = AdapterCache(base, stacks, model.n_layers, model.site_shapes, base_names=(base.id,))
        req = cache.resolve(f"r16@v{next(versions)}")
        slot = cache.acquire(req, cache.prepare(req))
        assert slot is not None

    lp_ms = median_ms(loraplex_load, 12)
    pm = PeftModel.from_pretrained(load_model(base), str(refs[0].path), adapter_name="a0")
    names = iter(range(1, 13))

    def peft_load() -> None:
        pm.load_adapter(str(refs[0].path), adapter_name=f"a{next(names)}")

    peft_ms = median_ms(peft_load, 12)

    # 3. list on a store of N small adapters
    small = Path(tempfile.mkdtemp())
    tiny = get_peft_model(
        load_model(base), LoraConfig(r=1, lora_alpha=2, target_modules=["q_proj"], init_lora_weights=False)
    )
    tiny.save_pretrained(small, safe_serialization=True)
    t = time.perf_counter()
    for i in range(args.adapters):
        registry.register(f"team{i:04d}", small, {**meta, "description": f"assistant {i}"})
    fill_s = time.perf_counter() - t

    def scan_manifests() -> None:  # what listing costs without an index
        for name, vs in registry.list_names():
            registry.resolve(f"{name}@v{vs[-1]}").manifest()

    index_ms = median_ms(registry.catalog, 5)
    scan_ms = median_ms(scan_manifests, 5)
    cli = [sys.executable, "-m", "loraplex.cli", "adapters", "list", "--json"]
    t = time.perf_counter()
    out = subprocess.run(cli, capture_output=True, text=True, check=True, env=os.environ)
    cli_s = time.perf_counter() - t
    assert len(json.loads(out.stdout)) == args.adapters + 1
    t = time.perf_counter()
    subprocess.run(cli[:-1], capture_output=True, text=True, check=True, env={**os.environ, "COLUMNS": "200"})
    table_s = time.perf_counter() - t

    print("\nSmolLM2-135M-Instruct on cpu\n")
    print("| figure | loraplex | baseline | ratio |")
    print("|---|---|---|---|")
    print(f"| rank-16 all-linear adapter on disk | {size / 1e6:.1f} MB | | |")
    print(
        f"| store -> ready to serve (median of 12) | {lp_ms:.0f} ms | PEFT load_adapter {peft_ms:.0f} ms | "
        f"{lp_ms / peft_ms:.2f}x |"
    )
    print(
        f"| list {args.adapters} adapters, in process (median of 5) | {index_ms:.0f} ms (index) | "
        f"{scan_ms:.0f} ms (read every manifest) | {index_ms / scan_ms:.2f}x |"
    )
    print(f"| `loraplex adapters list --json`, {args.adapters} adapters, end to end | {cli_s * 1000:.0f} ms | | |")
    print(f"| `loraplex adapters list` (table), {args.adapters} adapters, end to end | {table_s * 1000:.0f} ms | | |")
    print(f"\n(registering {args.adapters} adapters took {fill_s:.1f} s, {fill_s / args.adapters * 1000:.1f} ms each)")
    print(
        f"targets: store -> ready < 100 ms: {'met' if lp_ms < 100 else 'NOT met'}; "
        f"list < 1 s: {'met' if cli_s < 1 else 'NOT met'} (CLI end to end)"
    )


if __name__ == "__main__":
    main()
