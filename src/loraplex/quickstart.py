"""`loraplex quickstart`: train on the shipped sample data, then show how base, plain SFT and the
default (retrieval-augmented) adapter answer the trained questions and questions worded otherwise.

The sample is a small bilingual (English and Chinese) Q&A set about two fictional companies'
policies, facts the base model cannot know; the held-out file asks the same facts in other words,
and neither training nor retrieval ever sees it. Answers come from the serving engine, greedy,
with the prompts `loraplex serve` builds for each model (eval/run.py's served_prompts).
"""

from __future__ import annotations

import asyncio
import json
from importlib.resources import files
from pathlib import Path

from rich.console import Console
from rich.table import Table

from loraplex.config import load_config
from loraplex.eval.run import EvalExample, answer_all, served_prompts
from loraplex.train.sft_lora import run

SAMPLES = Path(str(files("loraplex") / "samples"))
TRAIN_FILE = SAMPLES / "company_policies.jsonl"
HELDOUT_FILE = SAMPLES / "company_policies_heldout.jsonl"


def keyword_hit(answer: str, keywords: list[str]) -> bool:
    return all(k.lower() in answer.lower() for k in keywords)


def questions() -> tuple[list[tuple[str, list[str]]], list[tuple[str, list[str]]]]:
    """(question, keywords) for the trained questions and for the held-out paraphrases."""
    heldout = [json.loads(line) for line in HELDOUT_FILE.read_text(encoding="utf-8").splitlines()]
    keywords = {h["trained_question"]: h["keywords"] for h in heldout}
    trained = [json.loads(line)["instruction"] for line in TRAIN_FILE.read_text(encoding="utf-8").splitlines()]
    return [(q, keywords[q]) for q in trained], [(h["instruction"], h["keywords"]) for h in heldout]


def run_quickstart(base: str | None, name: str, console: Console) -> dict[str, dict[str, float]]:
    from loraplex.engine.engine import Engine
    from loraplex.models.load import resolve_base

    models: dict[str, str] = {"base": ""}
    for label, adapter_name, retrieval in (("plain SFT", f"{name}-plain", False), ("default", name, True)):
        extra: dict[str, object] = {
            "name": adapter_name,
            "data": {"path": str(TRAIN_FILE)},
            "retrieval": {"enabled": retrieval},
            "description": f"quickstart: fictional company policies (en/zh), {label}",
        }
        if base:
            extra["base"] = base
        console.rule(f"training {adapter_name} ({label})")
        result = run(load_config(extra=extra), console=console)
        if result.adapter is None:
            return {}  # interrupted: the run resumes when quickstart is run again
        models[label] = result.adapter.id

    trained, unseen = questions()
    groups = {"trained": trained, "unseen": unseen}
    engine = Engine(resolve_base(base), max_batch=16, max_loaded_adapters=2)
    answers: dict[str, dict[str, list[str]]] = {}
    try:
        for group, asked in groups.items():
            examples = [EvalExample("", [{"role": "user", "content": q}], "", ()) for q, _ in asked]
            jobs = [served_prompts(model, examples) for model in models.values()]
            got = asyncio.run(answer_all(engine, jobs, max_tokens=64))
            for label, side in zip(models, got, strict=True):
                answers.setdefault(label, {})[group] = [a["text"] for a in side]
    finally:
        engine.close()

    table = Table("held-out question", *models, show_lines=True)
    for i, (q, _) in enumerate(unseen):
        table.add_row(q, *(answers[label]["unseen"][i] for label in models))
    console.print(table)
    scores = {
        label: {
            g: sum(keyword_hit(a, k) for a, (_, k) in zip(answers[label][g], groups[g], strict=True)) / len(groups[g])
            for g in groups
        }
        for label in models
    }
    summary = Table(
        "model", "trained questions", "held-out paraphrases (unseen)", title="answered with the right facts"
    )
    for label, model in models.items():
        s = scores[label]
        summary.add_row(
            f"{label} ({model or 'no adapter'})",
            f"{round(s['trained'] * len(trained))}/{len(trained)}",
            f"{round(s['unseen'] * len(unseen))}/{len(unseen)}",
        )
    console.print(summary)
    console.print(f"chat with it: loraplex chat --adapter {models['default']}   (or serve it: loraplex serve)")
    return scores
