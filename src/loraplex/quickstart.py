"""`loraplex quickstart`: train on the shipped sample data, then show base vs. adapter answers.

The sample is a small bilingual (English and Chinese) Q&A set about two fictional companies'
policies, facts the base model cannot know; the held-out file asks the same facts in other words.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from rich.console import Console

from loraplex.config import load_config
from loraplex.engine.compare import compare_answers, print_comparison
from loraplex.train.sft_lora import run

SAMPLES = Path(str(files("loraplex") / "samples"))
TRAIN_FILE = SAMPLES / "company_policies.jsonl"
HELDOUT_FILE = SAMPLES / "company_policies_heldout.jsonl"


def keyword_hit(answer: str, keywords: list[str]) -> bool:
    return all(k.lower() in answer.lower() for k in keywords)


def run_quickstart(base: str | None, name: str, console: Console) -> dict[str, float]:
    import json

    extra: dict[str, object] = {
        "name": name,
        "data": {"path": str(TRAIN_FILE)},
        "description": "quickstart: fictional company policies (en/zh)",
    }
    if base:
        extra["base"] = base
    cfg = load_config(extra=extra)
    result = run(cfg)
    if result.adapter is None:
        return {}
    rows = compare_answers(result.adapter.id, [], HELDOUT_FILE)
    print_comparison(rows, console)
    keywords = [json.loads(line)["keywords"] for line in HELDOUT_FILE.read_text(encoding="utf-8").splitlines()]
    base_hits = sum(keyword_hit(r["base"], k) for r, k in zip(rows, keywords, strict=True))
    adapter_hits = sum(keyword_hit(r["adapter"], k) for r, k in zip(rows, keywords, strict=True))
    console.print(
        f"held-out questions answered with the right facts: base {base_hits}/{len(rows)}, "
        f"{result.adapter.id} {adapter_hits}/{len(rows)}"
    )
    console.print(f"chat with it: loraplex chat --adapter {result.adapter.id}")
    return {"base": base_hits / len(rows), "adapter": adapter_hits / len(rows)}
