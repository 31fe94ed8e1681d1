"""What constrained decoding (response_format json_schema) costs per decode step at 8 rows.

    python bench/structured_output.py [--rows 8] [--tokens 48] [--rounds 3]

The same engine (SmolLM2, the serving dtype) decodes `--rows` concurrent requests twice per
round, alternating: free text (ignore_eos) and a JSON schema whose string field is longer than
`--tokens` (so every row runs its full length in both). The mean decode step (wall time of the
engine's `_decode_step`, forward + sampling + grammar masks) is compared; the grammar's own share
(llguidance's mask and advance per row) is timed apart. The baseline is the same engine without a
format: the cost a user pays for JSON output, nothing else. Prints the CPU (lscpu model and flags).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from generalization import cpu  # noqa: E402
from loraplex.engine import structured  # noqa: E402
from loraplex.engine.engine import Engine  # noqa: E402
from loraplex.engine.sampling import SamplingParams  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string", "minLength": 400}, "days": {"type": "integer"}},
    "required": ["answer", "days"],
    "additionalProperties": False,
}
QUESTIONS = ["年假有几天？", "How do I file an expense claim?", "报销需要哪些材料？", "When does the office open?"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    engine = Engine(None, max_batch=args.rows)
    grammar_s = [0.0]
    for name in ("allowed", "advance"):  # time the grammar's own work
        original = getattr(structured.Constraint, name)

        def timed(self, *a, _f=original):  # noqa: ANN001, ANN002, ANN202
            t = time.perf_counter()
            try:
                return _f(self, *a)
            finally:
                grammar_s[0] += time.perf_counter() - t

        setattr(structured.Constraint, name, timed)
    step_s: list[float] = []
    decode = engine._decode_step

    def timed_step() -> None:
        t = time.perf_counter()
        decode()
        step_s.append(time.perf_counter() - t)

    engine._decode_step = timed_step  # type: ignore[method-assign]
    fmt = json.dumps({"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA, "strict": True}})

    def run(constrained: bool) -> tuple[float, float, int]:
        params = SamplingParams(temperature=0, ignore_eos=not constrained, response_format=fmt if constrained else None)

        async def one(i: int) -> int:
            msgs = [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)] + " Answer in JSON."}]
            return sum([len(d.token_ids) async for d in engine.generate(msgs, params, None, args.tokens)])

        async def all_rows() -> list[int]:
            return await asyncio.gather(*[one(i) for i in range(args.rows)])

        step_s.clear()
        grammar_s[0] = 0.0
        tokens = sum(asyncio.run(all_rows()))
        full = list(step_s)  # every step; all rows run the whole length in both modes
        return statistics.mean(full), grammar_s[0] / max(len(full), 1), tokens

    run(False)
    run(True)  # warm-up: kernels, the llguidance tokenizer
    free, json_rows = [], []
    for _ in range(args.rounds):
        free.append(run(False))
        json_rows.append(run(True))
    engine.close()
    f_step = statistics.median(r[0] for r in free)
    j_step = statistics.median(r[0] for r in json_rows)
    g_step = statistics.median(r[1] for r in json_rows)
    print(cpu())
    print(f"engine {engine.dtype}, {engine.threads} thread(s), {args.rows} rows x {args.tokens} tokens")
    print("| decode step, 8 rows | ms | vs free text |")
    print("|---|---|---|")
    print(f"| free text | {f_step * 1e3:.2f} | 1.00x |")
    print(f"| json_schema (every row) | {j_step * 1e3:.2f} | {j_step / f_step:.3f}x |")
    print(f"| of which grammar masks | {g_step * 1e3:.2f} | {g_step / f_step:.3f} of a free step |")
    tokens = {"free": [r[2] for r in free], "json": [r[2] for r in json_rows]}
    print(f"tokens per run: {tokens}")
    if args.json:
        rows = {"free_ms": f_step * 1e3, "json_ms": j_step * 1e3, "grammar_ms": g_step * 1e3, "cpu": cpu()}
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
