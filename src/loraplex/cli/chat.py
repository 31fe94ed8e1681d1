"""Commands that answer from a terminal: `chat`, `compare`, `eval`.

Each command parses its options and calls the package that does the work."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from loraplex.cli.app import (
    app,
    err,
    out,
)
from loraplex.errors import UserError

if TYPE_CHECKING:
    from loraplex.assistants.retrieval import Searcher
    from loraplex.assistants.store import Assistant
    from loraplex.engine.local import EngineChat
    from loraplex.engine.quant import Requested


@app.command()
def chat(
    adapter: Annotated[str | None, typer.Option(help="NAME or NAME@vN; omit for the base model.")] = None,
    assistant: Annotated[
        str | None, typer.Option(help="Chat with an assistant: its adapters, prompt, defaults and knowledge base.")
    ] = None,
    base: Annotated[str | None, typer.Option(help="Base model (default: the adapter's, else smollm2-135m).")] = None,
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
    temperature: Annotated[float | None, typer.Option(help="0 = greedy (default: the assistant's, else 0).")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Default: the assistant's, else 256.")] = None,
    quantize: Annotated[
        str, typer.Option(help="Base weights, as `serve --quantize`: auto (int4 on a CPU), none, int8 or int4.")
    ] = "auto",
) -> None:
    """Chat in the terminal (streaming, multi-turn), answered as `serve` would. /reset clears the
    history, /exit quits."""
    from loraplex.assistants import faq, retrieval
    from loraplex.assistants import store as assistants
    from loraplex.engine import quant
    from loraplex.engine.local import EngineChat

    q = quant.mode(quantize)
    a = assistants.get(assistant) if assistant else None
    model = adapter or ""
    if a is not None:
        if adapter:
            raise UserError("give --adapter or --assistant, not both")
        model = a.model
        temperature = a.sampling.temperature if temperature is None else temperature
        max_new_tokens = a.sampling.max_tokens if max_new_tokens is None else max_new_tokens
    elif adapter:
        a = faq.assistant(adapter)  # trained with retrieval: it answers from its own Q&A
    lm = EngineChat(base, model, q)
    searcher = retrieval.Searcher()
    label = a.name if assistant and a else lm.request.key or lm.base.id
    err.print(f"chatting with [bold]{label}[/]  (/reset clears history, /exit or Ctrl-D quits)")
    try:
        _converse(lm, a, searcher, label, system, max_new_tokens or 256, temperature or 0.0)
    finally:
        lm.close()


def _converse(
    lm: EngineChat,
    a: Assistant | None,
    searcher: Searcher,
    label: str,
    system: str | None,
    max_new_tokens: int,
    temperature: float,
) -> None:
    from loraplex.assistants import retrieval

    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip() == "/reset":
            history = history[:1] if system else []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        sys.stdout.write(f"{label}> ")
        prepared = retrieval.prepare(a, history, searcher) if a else retrieval.Prepared(history, [])
        if prepared.refusal is not None:
            print(prepared.refusal)
            history.append({"role": "assistant", "content": prepared.refusal})
            continue
        parts = []
        for piece in lm.stream(
            prepared.messages,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            use_adapter=not prepared.base_only,
        ):
            sys.stdout.write(piece)
            sys.stdout.flush()
            parts.append(piece)
        sys.stdout.write("\n")
        for src in prepared.sources:
            err.print(f"  [{src.index}] {src.document} #{src.chunk + 1}", style="dim", highlight=False, markup=False)
        history.append({"role": "assistant", "content": "".join(parts).strip()})


@app.command()
def compare(
    adapter: Annotated[str, typer.Option(help="NAME or NAME@vN")],
    questions: Annotated[list[str] | None, typer.Argument(help="Questions to ask both.")] = None,
    questions_file: Annotated[
        Path | None, typer.Option("--questions", help="A data file; its user turns are asked.")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option()] = 128,
    quantize: Annotated[
        str, typer.Option(help="Answer on int8/int4 base weights, as `serve --quantize` (CPU): none, int8, int4, auto.")
    ] = "none",
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Base vs. adapter answers side by side (greedy)."""
    from loraplex.engine import quant
    from loraplex.engine.compare import compare_answers, print_comparison

    q = quant.mode(quantize)
    rows = compare_answers(adapter, list(questions or []), questions_file, max_new_tokens, quantize=q)
    if as_json:
        out.print_json(json.dumps(rows, ensure_ascii=False))
    else:
        print_comparison(rows, out)


@app.command("eval")
def eval_cmd(
    adapter: Annotated[str | None, typer.Option(help="NAME, NAME@vN or NAME@ALIAS to evaluate")] = None,
    assistant: Annotated[
        str | None,
        typer.Option(help="An assistant: its answers with vs. without its knowledge base, and retrieval hit rate."),
    ] = None,
    k: Annotated[int | None, typer.Option("-k", min=1, max=100, help="Hit rate @k (default: its top_k).")] = None,
    data: Annotated[
        Path | None, typer.Option(help="Eval file in any training format; default: the training run's eval split.")
    ] = None,
    baseline: Annotated[str, typer.Option(help="'base' (the base model) or another version, NAME@vM.")] = "base",
    judge: Annotated[
        str | None, typer.Option(help="An OpenAI-compatible endpoint that grades answers, e.g. http://host:8000/v1")
    ] = None,
    judge_model: Annotated[str | None, typer.Option(help="The judge's model (default: the first it lists).")] = None,
    keywords: Annotated[
        str | None, typer.Option(help="Keywords every answer must contain, comma-separated (a record's own win).")
    ] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="New tokens per answer (greedy).")] = 128,
    report: Annotated[Path | None, typer.Option(help="Write a self-contained HTML report into this directory.")] = None,
    general: Annotated[
        str | None,
        typer.Option(help="lm-eval tasks (comma-separated, on disk) to run on both sides: did it forget anything?"),
    ] = None,
    general_include: Annotated[
        Path | None, typer.Option(help="A directory of your own lm-eval task YAML files for --general.")
    ] = None,
    general_limit: Annotated[
        int | None, typer.Option(min=1, help="At most this many examples per --general task.")
    ] = None,
    quantize: Annotated[
        str, typer.Option(help="Answer on int8/int4 base weights, as `serve --quantize` (CPU): none, int8, int4, auto.")
    ] = "none",
    store: Annotated[bool, typer.Option(help="Record the result with the adapter version.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole result as JSON.")] = False,
) -> None:
    """Did it learn? Score an adapter's answers against references, side by side with a baseline
    (or, with --assistant, an assistant's answers with and without retrieval)."""
    from rich.progress import Progress

    from loraplex.engine import quant

    if (adapter is None) == (assistant is None):
        raise UserError("give --adapter NAME or --assistant NAME (one of them)")
    q = quant.mode(quantize)
    if assistant is not None:
        if data is None:
            raise UserError("--assistant needs --data: questions whose answers are in its knowledge base")
        _eval_assistant(assistant, data, k, max_tokens, as_json, q)
        return
    assert adapter is not None

    from loraplex.eval import report as html_report
    from loraplex.eval.judge import Judge
    from loraplex.eval.run import evaluate

    grader = Judge(judge, judge_model) if judge else None
    kw = tuple(k.strip() for k in keywords.split(",") if k.strip()) if keywords else ()
    with Progress(console=err, transient=True) as bar:
        task = bar.add_task("answering", total=None)
        result = evaluate(
            adapter,
            data,
            baseline,
            judge=grader,
            keywords=kw,
            max_tokens=max_tokens,
            store=store,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
            general=[t.strip() for t in general.split(",") if t.strip()] if general else None,
            general_include=general_include,
            general_limit=general_limit,
            quantize=q,
        )
    page = html_report.write(result, report) if report else None
    if as_json:
        print(json.dumps(result, ensure_ascii=False, indent=2))
        return
    a, b = result["summary"]["adapter"], result["summary"]["baseline"]
    table = Table("metric", result["baseline"], result["adapter"], title=f"{result['data']['examples']} examples")
    for key, label, fmt in html_report.METRICS:
        if a.get(key) is None and b.get(key) is None:
            continue
        table.add_row(label, *("-" if v is None else fmt.format(v) for v in (b.get(key), a.get(key))))
    out.print(table)
    c = result["comparison"]
    out.print(f"per example: {c['improved']} improved, {c['regressed']} regressed, {c['unchanged']} unchanged")
    for split, sc in (result.get("splits") or {}).items():
        asked = "questions it was trained on" if split == "trained" else "questions worded unlike its training data"
        out.print(
            f"{split}: {sc['examples']} {asked}: score {sc['baseline']:.3f} -> {sc['adapter']:.3f}"
            + (" (answered with retrieval)" if result.get("retrieval") else "")
        )
    for name, row in ((result.get("general") or {}).get("tasks") or {}).items():
        out.print(
            f"general ability, {name} ({row['metric']}): {row.get('baseline', float('nan')):.3f} -> "
            f"{row.get('adapter', float('nan')):.3f} ({row.get('delta', float('nan')):+.3f})"
        )
    if result.get("stored_as"):
        out.print(f"stored with {result['adapter']}: {result['stored_as']}")
    if page:
        out.print(f"report: {page}")


def _eval_assistant(name: str, data: Path, k: int | None, max_tokens: int, as_json: bool, quantize: Requested) -> None:
    from rich.progress import Progress

    from loraplex.eval.assistant import evaluate_assistant

    with Progress(console=err, transient=True) as bar:
        task = bar.add_task("answering", total=None)
        result = evaluate_assistant(
            name,
            data,
            k,
            max_tokens,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
            quantize=quantize,
        )
    if as_json:
        print(json.dumps(result, ensure_ascii=False, indent=2))
        return
    on, off = result["summary"]["with_retrieval"], result["summary"]["without_retrieval"]
    table = Table("metric", "retrieval off", "retrieval on", title=f"{name}: {result['data']['examples']} questions")
    for key, label in (("score", "accuracy (score)"), ("keywords", "keyword recall"), ("rouge_l", "ROUGE-L")):
        if on[key] is not None or off[key] is not None:
            table.add_row(label, *("-" if v is None else f"{v:.3f}" for v in (off[key], on[key])))
    table.add_row("refused (I don't know)", str(off["refused"]), str(on["refused"]))
    out.print(table)
    r = result["retrieval"]
    out.print(
        f"retrieval: hit rate @{result['k']} {r['hit_rate']:.0%}, MRR {r['mrr']:.3f}, "
        f"passages used for {r['answered_with_passages']:.0%} of questions (min relevance {result['min_relevance']})"
    )
