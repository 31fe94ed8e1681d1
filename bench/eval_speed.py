"""`loraplex eval` vs. the one-at-a-time way: examples per second, side by side in one run.

    python bench/eval_speed.py [--tokens 64] [--json out.json]

The default base (SmolLM2-135M-Instruct) and one random rank-16 all-linear adapter in a temporary
store; the eval set is the shipped sample's 40 questions with references. Both sides answer every
question twice, with the adapter and with the base model, greedy, at most `--tokens` new tokens,
stopping at end of turn:

  1. naive: a PEFT model, `generate` per question and side, one after another (transformers'
     defaults: fp32); only the generation loop is timed (loading and scoring are free for it);
  2. loraplex: `loraplex.eval.run.evaluate` end to end: engine start, all 80 answers in flight at
     once (base and adapter rows mixed in the same batches), metrics, loss/perplexity on the
     references; and its generation phase alone.

The ratio is examples/s of 2 over 1 (target >= 3x on this CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from loraplex._quiet import quiet  # noqa: E402

quiet()

from loraplex.adapters import registry  # noqa: E402
from loraplex.eval.run import evaluate, read_examples  # noqa: E402
from loraplex.models.load import eos_token_ids, load_model, load_tokenizer, resolve_base  # noqa: E402
from loraplex.quickstart import TRAIN_FILE  # noqa: E402
from serve_throughput import make_adapters  # noqa: E402


def naive(base, adapter_id: str, examples, tokens: int) -> tuple[float, int]:  # noqa: ANN001
    from peft import PeftModel

    from loraplex.data.tokenize import render

    tok = load_tokenizer(base)
    model = PeftModel.from_pretrained(load_model(base), str(registry.resolve(adapter_id).path)).eval()
    eos = eos_token_ids(tok, model.generation_config.eos_token_id)
    generated = 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for ex in examples:
            ids = tok(render(tok, ex.prompt, add_generation_prompt=True), add_special_tokens=False, return_tensors="pt")
            for use_adapter in (True, False):
                kw = dict(max_new_tokens=tokens, do_sample=False, eos_token_id=eos, pad_token_id=tok.pad_token_id)
                if use_adapter:
                    out = model.generate(**ids, **kw)
                else:
                    with model.disable_adapter():
                        out = model.generate(**ids, **kw)
                generated += out.shape[1] - ids["input_ids"].shape[1]
    return time.perf_counter() - t0, generated


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    base = resolve_base(None)
    home = Path(tempfile.mkdtemp(prefix="lp-eval-bench-"))
    (home / "models").symlink_to(base.path.parent)
    os.environ["LORAPLEX_HOME"] = str(home)
    adapter = make_adapters(base, "evalbench", "all-linear")[0]
    heldout = TRAIN_FILE.with_name("company_policies_heldout.jsonl")
    data = home / "eval.jsonl"
    data.write_text(TRAIN_FILE.read_text(encoding="utf-8") + heldout.read_text(encoding="utf-8"), encoding="utf-8")
    examples = read_examples(data)
    n = len(examples)

    t_naive, tok_naive = naive(base, f"{adapter}@v1", examples, args.tokens)
    t0 = time.perf_counter()
    result = evaluate(f"{adapter}@v1", data, max_tokens=args.tokens, store=False)
    t_lp = time.perf_counter() - t0
    t_gen = result["timing"]["generation_s"]
    tok_lp = sum(e[s]["tokens"] for e in result["examples"] for s in ("adapter", "baseline"))

    rows = [
        ("naive: PEFT generate, one question and side at a time (generation only)", t_naive, tok_naive),
        ("loraplex eval, end to end (engine start, answers, metrics, loss)", t_lp, tok_lp),
        ("loraplex eval, generation phase", t_gen, tok_lp),
    ]
    print(f"{n} examples x 2 sides (adapter, base), greedy, <= {args.tokens} new tokens\n")
    print("| run | seconds | examples/s | tokens generated | vs naive |\n|---|---|---|---|---|")
    for name, t, toks in rows:
        print(f"| {name} | {t:.1f} | {n / t:.2f} | {toks} | {t_naive / t:.2f}x |")
    print(f"\nratio (end to end vs naive): {t_naive / t_lp:.2f}x (target >= 3x)")
    if args.json:
        args.json.write_text(json.dumps({"examples": n, "naive_s": t_naive, "loraplex_s": t_lp, "generation_s": t_gen}))


if __name__ == "__main__":
    main()
