"""The `loraplex` command: a table of subcommands whose typed signatures are the options.

Each command parses its arguments and calls one function elsewhere; no logic lives here.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from loraplex.errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help=__doc__.split("\n")[0] if __doc__ else None,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(no_args_is_help=True, help="Inspect training data without training.")
adapters_app = typer.Typer(no_args_is_help=True, help="List and inspect adapters in the local store.")
keys_app = typer.Typer(no_args_is_help=True, help="API keys for `loraplex serve`: who may use which models.")
feedback_app = typer.Typer(no_args_is_help=True, help="Users' ratings of answers, as statistics or training data.")
knowledge_app = typer.Typer(no_args_is_help=True, help="Knowledge bases: documents indexed for retrieval (BM25).")
assistants_app = typer.Typer(
    no_args_is_help=True, help="Assistants: adapters + system prompt + knowledge base, served as models."
)
app.add_typer(data_app, name="data")
app.add_typer(adapters_app, name="adapters")
app.add_typer(keys_app, name="keys")
app.add_typer(feedback_app, name="feedback")
app.add_typer(knowledge_app, name="knowledge")
app.add_typer(assistants_app, name="assistants")
out = Console()
err = Console(stderr=True)


@app.command()
def train(
    config: Annotated[Path | None, typer.Argument(help="YAML config (see examples/).")] = None,
    data: Annotated[Path | None, typer.Option(help="Training data file (shortcut for data.path).")] = None,
    name: Annotated[str | None, typer.Option(help="Adapter name; registered as NAME@vN.")] = None,
    base: Annotated[str | None, typer.Option(help="Base model: smollm2-135m, a HF directory or a .gguf file.")] = None,
    epochs: Annotated[float | None, typer.Option(help="Passes over the data (default 16; 4 with retrieval).")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    rank: Annotated[int | None, typer.Option(help="LoRA rank.")] = None,
    redact: Annotated[bool, typer.Option("--redact", help="Redact personal data before training.")] = False,
    retrieval: Annotated[
        bool | None,
        typer.Option(
            "--retrieval/--no-retrieval",
            help="Answer from the training Q&A retrieved per question (default), or plain LoRA SFT.",
        ),
    ] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override any config key: --set train.seed=7")] = None,
    resume: Annotated[
        bool | None,
        typer.Option(
            "--resume/--no-resume",
            help="Force resuming the latest checkpoint / start from zero. Default: resume a matching interrupted run.",
        ),
    ] = None,
) -> None:
    """Train a LoRA adapter and register it in the local store."""
    from loraplex.config import load_config
    from loraplex.train.sft_lora import run

    extra: dict[str, Any] = {}
    if name:
        extra["name"] = name
    if base:
        extra["base"] = base
    if data:
        extra["data"] = {"path": str(data)}
    if redact:
        extra.setdefault("data", {})["redact"] = True
    tr = {k: v for k, v in {"epochs": epochs, "learning_rate": lr}.items() if v is not None}
    if tr:
        extra["train"] = tr
    if rank is not None:
        extra["lora"] = {"rank": rank, "alpha": 2.0 * rank}
    if retrieval is not None:
        extra["retrieval"] = {"enabled": retrieval}
    if config is None and data is None:
        raise UserError("give a config file (loraplex train CONFIG.yaml) or --data FILE --name NAME")
    cfg = load_config(config, set_, extra)
    result = run(cfg, resume={None: "auto", True: "always", False: "never"}[resume], console=err)
    if result.interrupted:
        raise typer.Exit(130)
    if int(os.environ.get("RANK", "0")) > 0:
        # A helper process of torchrun writes nothing (rank 0 registers and logs), and its
        # interpreter teardown runs the C++ destructors of gloo's / DeepSpeed's threads, which
        # can abort (SIGABRT) and so fail a finished run: leave at once.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


@app.command()
def quickstart(
    base: Annotated[str | None, typer.Option(help="Base model (default: the embedded SmolLM2-135M).")] = None,
    name: Annotated[str, typer.Option(help="Name of the adapter to train.")] = "company-policies",
) -> None:
    """Train on the shipped bilingual sample data and compare base vs. adapter on held-out questions."""
    from loraplex.quickstart import run_quickstart

    run_quickstart(base, name, out)


@data_app.command("check")
def data_check(
    file: Annotated[Path, typer.Argument(help="Data file to check.")],
    base: Annotated[str | None, typer.Option(help="Base model whose tokenizer counts tokens.")] = None,
    format: Annotated[
        str | None, typer.Option(help="Force a format (alpaca, messages, sharegpt, csv, dialogue).")
    ] = None,
    max_seq_length: Annotated[int, typer.Option(help="Report records longer than this.")] = 1024,
    redact: Annotated[
        bool, typer.Option("--redact", help="Write FILE.redacted.jsonl with personal data replaced.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Validate a data file: records, turns, token lengths, truncation, duplicates, personal data."""
    from loraplex.data.check import check_file, print_report

    report = check_file(file, base, format, max_seq_length, redact, err)
    if as_json:
        out.print_json(json.dumps(report.as_dict(), ensure_ascii=False))
    else:
        print_report(report, out)
    if not report.ok:
        raise typer.Exit(1)


@adapters_app.command("list")
def adapters_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Adapters in the store: versions, aliases, base, rank, size, created, eval score."""
    from loraplex.adapters import registry

    rows = registry.catalog()
    if as_json:
        print(json.dumps(rows, ensure_ascii=False, indent=2))  # plain: rich highlighting costs ~0.5 s per 1,000 rows
        return
    if not rows:
        out.print(f"no adapters yet in {registry.store_root()}; train one with `loraplex train`")
        return
    table = Table("name", "versions", "aliases", "base", "rank", "size", "created", "eval", "description")
    for r in rows:
        table.add_row(
            r["name"],
            ", ".join(r["versions"]),
            ", ".join(f"{a}→{v}" for a, v in r["aliases"].items()),
            r["base"] or "-",
            str(r["rank"] or "-"),
            f"{(r['bytes'] or 0) / 1e6:.1f} MB",
            r["created_at"] or "-",
            f"{r['eval_score']:.3f}" if r["eval_score"] is not None else "-",
            r["description"],
        )
    out.print(table)


@adapters_app.command("show")
def adapters_show(ref: Annotated[str, typer.Argument(help="NAME, NAME@vN or NAME@ALIAS")]) -> None:
    """The full manifest of one adapter version, its aliases, and whether its files check out."""
    from loraplex.adapters import registry

    target = registry.resolve(ref)
    manifest = target.manifest()
    manifest["aliases"] = [a for a, v in registry.aliases_of(target.name).items() if v == target.version]
    try:
        registry.verify(target)
        manifest["integrity"] = "ok"
    except UserError as e:
        manifest["integrity"] = str(e)
    out.print_json(json.dumps(manifest, ensure_ascii=False))


@adapters_app.command("versions")
def adapters_versions(name: Annotated[str, typer.Argument(help="adapter name")]) -> None:
    """Every version of one adapter, newest last, with the aliases pointing at each."""
    from loraplex.adapters import registry

    target = registry.resolve(name)
    aliases = registry.aliases_of(target.name)
    table = Table("version", "aliases", "created", "train loss", "eval", "description")
    for v in registry.versions(target.name):
        m = registry.resolve(f"{target.name}@v{v}").manifest()
        loss = m.get("train_loss")
        table.add_row(
            f"{target.name}@v{v}",
            ", ".join(a for a, av in aliases.items() if av == v),
            m.get("created_at", "-"),
            f"{loss:.4f}" if isinstance(loss, int | float) else "-",
            f"{m['eval']['score']:.3f}" if (m.get("eval") or {}).get("score") is not None else "-",
            m.get("description", ""),
        )
    out.print(table)


@adapters_app.command("tag")
def adapters_tag(
    ref: Annotated[str, typer.Argument(help="NAME@vN (or NAME@ALIAS) to point the alias at")],
    alias: Annotated[str, typer.Argument(help="e.g. prod, staging")],
) -> None:
    """Point NAME@ALIAS at a version (moving it if it pointed elsewhere); servers see it at once."""
    from loraplex.adapters import registry

    target = registry.tag(ref, alias)
    out.print(f"{target.name}@{alias} → {target.id}")


@adapters_app.command("rollback")
def adapters_rollback(
    name: Annotated[str, typer.Argument(help="adapter name")],
    alias: Annotated[str, typer.Option(help="the alias to move back")] = "prod",
) -> None:
    """Move an alias back to the version it pointed to before its last move."""
    from loraplex.adapters import registry

    old, new = registry.rollback(name, alias)
    out.print(f"{name}@{alias}: v{old} → v{new}")


@adapters_app.command("describe")
def adapters_describe(
    ref: Annotated[str, typer.Argument(help="NAME@vN")],
    description: Annotated[str | None, typer.Option(help="what the adapter is for")] = None,
    owner: Annotated[str | None, typer.Option(help="who answers for it")] = None,
) -> None:
    """Edit a version's description and owner (its weights never change)."""
    from loraplex.adapters import registry

    if description is None and owner is None:
        raise UserError("give --description and/or --owner")
    out.print(f"updated {registry.describe(ref, description, owner).id}")


@adapters_app.command("rm")
def adapters_rm(
    ref: Annotated[str, typer.Argument(help="NAME@vN")],
    force: Annotated[bool, typer.Option(help="also delete it when an alias points to it")] = False,
) -> None:
    """Delete one version (refused while an alias points to it, unless --force)."""
    from loraplex.adapters import registry

    out.print(f"deleted {registry.remove(ref, force).id}")


@adapters_app.command("export")
def adapters_export(
    ref: Annotated[str, typer.Argument(help="NAME, NAME@vN or NAME@ALIAS")],
    out_file: Annotated[Path, typer.Option("--out", help="the .tar file to write")],
) -> None:
    """Write one version (manifest + weights, checksummed) to a tar file for another store."""
    from loraplex.adapters.archive import export_tar

    target = export_tar(ref, out_file)
    out.print(f"exported {target.id} to {out_file} ({out_file.stat().st_size / 1e6:.1f} MB)")


@adapters_app.command("import")
def adapters_import(path: Annotated[Path, typer.Argument(help="a .tar written by `adapters export`")]) -> None:
    """Add the version in a tar file to this store (checksums verified; re-importing is a no-op)."""
    from loraplex.adapters.archive import import_tar

    target, new = import_tar(path)
    out.print(f"imported {target.id}" if new else f"{target.id} is already in the store (identical)")


@app.command("export")
def export_cmd(
    refs: Annotated[list[str] | None, typer.Argument(help="NAME, NAME@vN or NAME@ALIAS (vllm: several)")] = None,
    fmt: Annotated[str, typer.Option("--format", help="peft, merged, gguf, ollama or vllm")] = "peft",
    out_dir: Annotated[Path, typer.Option("--out", help="a new (or empty) directory")] = Path("export"),
    alias: Annotated[str | None, typer.Option(help="vllm: every adapter that has this alias, e.g. prod")] = None,
    merged: Annotated[bool, typer.Option(help="gguf: also write the base with the adapter merged in (f32)")] = False,
) -> None:
    """Export an adapter for another runtime: PEFT, merged HF model, GGUF LoRA, Ollama or vLLM."""
    from loraplex.adapters import registry
    from loraplex.export.formats import export

    names = list(refs or [])
    if alias:
        registry.check_alias(alias)
        names += [f"{r['name']}@{alias}" for r in registry.catalog() if alias in r["aliases"]]
    if not names:
        raise UserError("name an adapter to export (or --alias for every adapter with that alias)")
    out.print(export(names, fmt, out_dir, merged))


@app.command()
def plan(
    base: Annotated[
        str,
        typer.Option(
            help="A shipped config name (llama-2-7b, qwen2.5-7b, ...), config.json, model directory, or smollm2-135m."
        ),
    ],
    rank: Annotated[int, typer.Option(help="LoRA rank.")] = 16,
    targets: Annotated[str, typer.Option(help="Comma-separated module names, or all-linear.")] = "all-linear",
    seq_len: Annotated[int, typer.Option(help="Tokens per row.")] = 1024,
    batch: Annotated[int, typer.Option(help="Rows per micro-batch.")] = 4,
    use_dora: Annotated[bool, typer.Option("--dora")] = False,
    gpus: Annotated[int, typer.Option(help="Processes / GPUs the run is spread over (memory is then per GPU).")] = 1,
    shard: Annotated[
        str,
        typer.Option(help="With --gpus: none (data parallel), zero2, fsdp (train.fsdp) or zero3 (DeepSpeed ZeRO-3)."),
    ] = "none",
    gradient_checkpointing: Annotated[
        bool, typer.Option("--gradient-checkpointing", help="As train.gradient_checkpointing: less activation memory.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Trainable parameters, adapter size and peak training memory, without loading weights."""
    from loraplex.train.plan import make_plan, print_plan

    p = make_plan(base, rank, targets, seq_len, batch, use_dora, gpus, shard, gradient_checkpointing)
    if as_json:
        out.print_json(json.dumps(p))
    else:
        print_plan(p, out)


@app.command()
def chat(
    adapter: Annotated[str | None, typer.Option(help="NAME or NAME@vN; omit for the base model.")] = None,
    assistant: Annotated[
        str | None, typer.Option(help="Chat with an assistant: its adapter, prompt, defaults and knowledge base.")
    ] = None,
    base: Annotated[str | None, typer.Option(help="Base model (default: the adapter's, else smollm2-135m).")] = None,
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
    temperature: Annotated[float | None, typer.Option(help="0 = greedy (default: the assistant's, else 0).")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Default: the assistant's, else 256.")] = None,
) -> None:
    """Chat in the terminal (streaming, multi-turn). /reset clears the history, /exit quits."""
    from loraplex.assistants import faq, retrieval
    from loraplex.assistants import store as assistants
    from loraplex.engine.local import LocalModel

    a = assistants.get(assistant) if assistant else None
    if a is not None:
        if adapter:
            raise UserError("give --adapter or --assistant, not both")
        if len(a.adapters) > 1 or (a.adapters and a.adapters[0].weight != 1.0):
            raise UserError(
                f"assistant {a.name!r} composes adapters ({a.model}): chat with it through `loraplex serve`"
            )
        adapter = a.adapters[0].ref if a.adapters else None
        temperature = a.sampling.temperature if temperature is None else temperature
        max_new_tokens = a.sampling.max_tokens if max_new_tokens is None else max_new_tokens
    elif adapter:
        a = faq.assistant(adapter)  # trained with retrieval: it answers from its own Q&A
    lm = LocalModel(base, adapter)
    searcher = retrieval.Searcher()
    label = a.name if assistant and a else lm.adapter.id if lm.adapter else lm.base.id
    err.print(f"chatting with [bold]{label}[/]  (/reset clears history, /exit or Ctrl-D quits)")
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
            max_new_tokens=max_new_tokens or 256,
            temperature=temperature or 0.0,
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
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Base vs. adapter answers side by side (greedy)."""
    from loraplex.engine.compare import compare_answers, print_comparison

    rows = compare_answers(adapter, list(questions or []), questions_file, max_new_tokens)
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
    store: Annotated[bool, typer.Option(help="Record the result with the adapter version.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole result as JSON.")] = False,
) -> None:
    """Did it learn? Score an adapter's answers against references, side by side with a baseline
    (or, with --assistant, an assistant's answers with and without retrieval)."""
    from rich.progress import Progress

    if (adapter is None) == (assistant is None):
        raise UserError("give --adapter NAME or --assistant NAME (one of them)")
    if assistant is not None:
        if data is None:
            raise UserError("--assistant needs --data: questions whose answers are in its knowledge base")
        _eval_assistant(assistant, data, k, max_tokens, as_json)
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
    if result.get("stored_as"):
        out.print(f"stored with {result['adapter']}: {result['stored_as']}")
    if page:
        out.print(f"report: {page}")


def _eval_assistant(name: str, data: Path, k: int | None, max_tokens: int, as_json: bool) -> None:
    from rich.progress import Progress

    from loraplex.eval.assistant import evaluate_assistant

    with Progress(console=err, transient=True) as bar:
        task = bar.add_task("answering", total=None)
        result = evaluate_assistant(
            name, data, k, max_tokens, progress=lambda done, total: bar.update(task, completed=done, total=total)
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


@adapters_app.command("promote")
def adapters_promote(
    ref: Annotated[str, typer.Argument(help="NAME@vN to promote")],
    alias: Annotated[str, typer.Option(help="The alias to move, e.g. prod.")] = "prod",
    require_eval: Annotated[
        bool, typer.Option(help="Refuse without an eval (and without one for the current).")
    ] = False,
    min_score: Annotated[float | None, typer.Option(help="Refuse below this eval score (0-1).")] = None,
    force: Annotated[bool, typer.Option(help="Move the alias whatever the gate says (recorded).")] = False,
) -> None:
    """Move an alias to a version only if its eval is at least as good as the current one's."""
    from loraplex.adapters import registry

    p = registry.promote(ref, alias, require_eval, min_score, force)
    was = f" (was v{p.previous})" if p.previous is not None else ""
    out.print(f"{p.target.name}@{alias} → {p.target.id}{was}")
    if p.forced:
        err.print("[yellow]forced[/] past: " + "; ".join(p.problems), highlight=False)


@app.command()
def serve(
    base: Annotated[str | None, typer.Option(help="Base model: smollm2-135m, a HF directory or a .gguf file.")] = None,
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
    adapters: Annotated[
        str | None, typer.Option(help="Comma-separated adapter names to serve (default: every adapter in the store).")
    ] = None,
    max_batch: Annotated[int, typer.Option(min=1, max=256, help="Requests decoded together.")] = 16,
    max_loaded_adapters: Annotated[int, typer.Option(min=1, max=1024, help="Adapter slots kept in memory.")] = 8,
    max_model_len: Annotated[int | None, typer.Option(help="Context length (default: the model's).")] = None,
    kv_cache_gb: Annotated[
        float | None,
        typer.Option(
            min=0.0001,
            help="GiB the KV cache may use; rows that outgrow it wait (default: 1/4 of RAM, 1/2 of free GPU memory).",
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (bf16 where faster), bf16, fp16 or fp32")] = "auto",
    pin: Annotated[str | None, typer.Option(help="Comma-separated adapters to load now and keep loaded.")] = None,
    shutdown_timeout: Annotated[
        float, typer.Option(min=0, help="On SIGINT/SIGTERM, seconds in-flight requests may still run.")
    ] = 10.0,
    threads: Annotated[
        int | None, typer.Option(min=1, help="CPU threads for the model (default: all cores but one).")
    ] = None,
    header_timeout: Annotated[
        float, typer.Option(min=0.1, help="Seconds a client may take to send a request's headers (or body chunk).")
    ] = 10.0,
    max_connections: Annotated[
        int | None,
        typer.Option(min=1, help="Open connections at most; more are closed (default: by the file limit)."),
    ] = None,
    auth: Annotated[
        bool | None,
        typer.Option("--auth/--no-auth", help="Require API keys (default: on when any key exists)."),
    ] = None,
    config: Annotated[Path | None, typer.Option(help="YAML with upstream routes and output filters.")] = None,
    log_text: Annotated[
        bool, typer.Option("--log-text", help="Store prompts and responses in the request log.")
    ] = False,
    max_queue: Annotated[
        int, typer.Option(min=0, help="Requests that may wait beyond the running batch; more get 503.")
    ] = 64,
    engine_kind: Annotated[
        str, typer.Option("--engine", help="builtin (this process) or vllm (a vLLM server behind this one).")
    ] = "builtin",
    engine_url: Annotated[
        str | None,
        typer.Option(help="With --engine vllm: use the vLLM server at this /v1 URL instead of starting one."),
    ] = None,
    engine_port: Annotated[
        int | None, typer.Option(help="With --engine vllm: vLLM's port (default: a free one).")
    ] = None,
    tensor_parallel_size: Annotated[int, typer.Option(min=1, help="With --engine vllm: GPUs per model.")] = 1,
    max_lora_rank: Annotated[
        int | None, typer.Option(help="With --engine vllm: largest adapter rank (default: fits the store's).")
    ] = None,
    vllm_arg: Annotated[
        list[str] | None, typer.Option(help="With --engine vllm: one more vLLM argument (repeatable).")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="With --engine vllm: print the vLLM command and exit.")
    ] = False,
) -> None:
    """Serve the base model and its adapters behind an OpenAI-compatible API."""
    from loraplex.adapters import registry
    from loraplex.api.server import run
    from loraplex.engine.engine import Engine
    from loraplex.gateway.gate import Gateway
    from loraplex.gateway.policy import load_serve_config

    serve_config = load_serve_config(config)  # fail on a bad file before loading the model

    if dtype not in ("auto", "bf16", "fp16", "fp32"):
        raise UserError(f"--dtype {dtype!r}: use auto, bf16, fp16 or fp32")
    names = [a.strip() for a in adapters.split(",") if a.strip()] if adapters else None
    for name in names or []:
        registry.resolve(name)  # fail now, with the store's message, not at the first request
    pins = [p.strip() for p in (pin or "").split(",") if p.strip()]
    served = ", ".join(names) if names else "every adapter in the store"
    if engine_kind not in ("builtin", "vllm"):
        raise UserError(f"--engine {engine_kind!r}: use builtin or vllm")
    engine: Any
    if engine_kind == "vllm" or engine_url:
        engine = _vllm_engine(
            base, names, pins, engine_url, engine_port, max_batch, max_loaded_adapters, max_model_len,
            tensor_parallel_size, max_lora_rank, dtype, vllm_arg or [], dry_run,
        )  # fmt: skip
        if engine is None:
            return
        where = f"vLLM at {engine.url}"
    else:
        engine = Engine(
            base,
            max_batch=max_batch,
            max_loaded_adapters=max_loaded_adapters,
            max_model_len=max_model_len,
            device=device,
            dtype=dtype,
            adapters=names,
            threads=threads,
            kv_cache_bytes=int(kv_cache_gb * 2**30) if kv_cache_gb else None,
        )
        for name in pins:
            engine.load_adapter(name, pin=True)
        where = f"{engine.device} {str(engine.dtype).removeprefix('torch.')}"
    gateway = Gateway(
        auth=auth, config=serve_config, log_text=log_text, max_pending=max_batch + max_queue, engine=engine
    )
    err.print(f"serving [bold]{engine.base.id}[/] ({where}) with {served} at http://{host}:{port}/v1")
    if gateway.auth:
        err.print("API keys required (loraplex keys list)")
    elif host not in ("127.0.0.1", "localhost", "::1"):
        err.print(f"[yellow]warning:[/] no API keys: anyone who reaches {host}:{port} can use every model")
    try:
        run(engine, host, port, shutdown_timeout, gateway, header_timeout, max_connections)
    finally:
        if getattr(engine, "process", None) is not None:
            engine.process.stop()  # also when uvicorn never started (a port in use): no orphaned vLLM


def _vllm_engine(
    base: str | None,
    names: list[str] | None,
    pins: list[str],
    url: str | None,
    port: int | None,
    max_batch: int,
    max_loaded_adapters: int,
    max_model_len: int | None,
    tensor_parallel_size: int,
    max_lora_rank: int | None,
    dtype: str,
    extra: list[str],
    dry_run: bool,
) -> Any:
    """The front door's engine for `--engine vllm`: vLLM started here (or found at `url`) behind a RemoteEngine."""
    import os
    import socket

    from loraplex.engine import vllm_process
    from loraplex.engine.remote import RemoteEngine, pointed_at
    from loraplex.models.load import resolve_base
    from loraplex.paths import home

    base_ref = resolve_base(base)
    api_key = os.environ.get("LORAPLEX_ENGINE_API_KEY")
    if url:
        if dry_run:
            raise UserError("--dry-run prints the vLLM command this would start; with --engine-url none is started")
        return RemoteEngine(
            url, base_ref, adapters=names, pin=pins, max_model_len=max_model_len, max_batch=max_batch, api_key=api_key
        )
    # start with what the registry points at: each served adapter's latest version and alias targets
    refs = []
    for ref in pointed_at({n.partition("@")[0] for n in names} if names is not None else None):
        problems = vllm_process.check_layout(ref)
        if problems and names is not None:
            raise UserError("; ".join(problems))
        if problems:
            err.print(f"[yellow]left out:[/] {'; '.join(problems)}", highlight=False)
            continue
        refs.append(ref)
    if port is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    launch = vllm_process.Launch(
        base=base_ref,
        served_name=base_ref.id,
        adapters=refs,
        port=port,
        max_loras=max_loaded_adapters,
        max_lora_rank=vllm_process.max_lora_rank(refs, max_lora_rank),
        max_num_seqs=max_batch,
        max_model_len=max_model_len,
        tensor_parallel_size=tensor_parallel_size,
        dtype=dtype,
        extra=extra,
    )
    if dry_run:
        out.print(launch.shell(), highlight=False, soft_wrap=True, markup=False)
        return None
    log_path = home() / "logs" / f"vllm-{port}.log"
    err.print(f"starting vLLM on port {port} (log: {log_path}); a large model takes minutes")
    process = vllm_process.VllmProcess(launch, log_path)
    try:
        return RemoteEngine(
            f"{process.url}/v1",
            base_ref,
            adapters=names,
            pin=pins,
            preloaded=[r.id for r in refs],
            max_model_len=max_model_len,
            max_batch=max_batch,
            process=process,
        )
    except BaseException:
        process.stop()
        raise


def _since(value: str | None) -> float | None:
    """`1h`, `7d`, `2w` ago, or a date / date-time."""
    import re
    import time
    from datetime import datetime

    if value is None:
        return None
    m = re.fullmatch(r"(\d+)([mhdw])", value.strip())
    if m:
        return time.time() - int(m.group(1)) * {"m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]
    try:
        return datetime.fromisoformat(value.strip()).timestamp()
    except ValueError:
        raise UserError(f"--since {value!r}: use a duration (30m, 24h, 7d, 2w) or a date (2026-11-01)") from None


def _when(t: float | None) -> str:
    from datetime import datetime

    return "" if t is None else datetime.fromtimestamp(t).isoformat(sep=" ", timespec="minutes")


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option("--name", help="Who the key is for (a-z, 0-9, . _ -).")],
    adapters: Annotated[
        str | None, typer.Option(help="Models the key may use: names or globs, 'legal*,hr' (default: all).")
    ] = None,
    admin: Annotated[bool, typer.Option("--admin", help="May use the admin routes and /metrics.")] = False,
    rpm: Annotated[int | None, typer.Option(min=1, help="Requests per minute.")] = None,
    tpm: Annotated[int | None, typer.Option(min=1, help="Tokens (prompt + completion) per minute.")] = None,
    expires: Annotated[str | None, typer.Option(help="2026-12-31, a date-time, or 30d / 12h / 2w.")] = None,
) -> None:
    """Create an API key. The key is printed once; only a salted hash is stored."""
    from loraplex.gateway import db, keys

    con = db.connect()
    key, token = keys.create(
        con, name, keys.parse_patterns(adapters), admin, rpm, tpm, keys.parse_expiry(expires) if expires else None
    )
    err.print(
        f"created key [bold]{key.name}[/] for {', '.join(key.models)}{' (admin)' if key.admin else ''}; "
        "it is shown only now:"
    )
    print(token)


@keys_app.command("list")
def keys_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Keys with their models, limits, state and use."""
    import time

    from loraplex.gateway import db, keys
    from loraplex.gateway.log import summary

    con = db.connect()
    now = time.time()
    use = {r["name"]: r for r in summary(con, None, "key")}
    rows = [
        {
            "name": k.name,
            "models": ",".join(k.models),
            "admin": k.admin,
            "rpm": k.rpm,
            "tpm": k.tpm,
            "expires": _when(k.expires),
            "state": "revoked" if k.revoked else ("expired" if k.expires and k.expires < now else "active"),
            "requests": (use.get(k.name) or {}).get("requests", 0),
            "last_used": _when((use.get(k.name) or {}).get("last")),
        }
        for k in keys.list_keys(con)
    ]
    if as_json:
        print(json.dumps(rows, ensure_ascii=False))
        return
    table = Table("name", "models", "admin", "rpm", "tpm", "expires", "state", "requests", "last used")
    for r in rows:
        table.add_row(*(str(v) if v not in (None, False) else "" for v in r.values()))
    out.print(table)


@keys_app.command("revoke")
def keys_revoke(name: Annotated[str, typer.Argument(help="The key's name.")]) -> None:
    """Revoke a key: its next request gets 401 (no server restart)."""
    from loraplex.gateway import db, keys

    key = keys.revoke(db.connect(), name)
    err.print(f"revoked key [bold]{key.name}[/]")


@app.command()
def usage(
    since: Annotated[str | None, typer.Option(help="24h, 7d, 2w, or a date.")] = None,
    by: Annotated[str, typer.Option(help="adapter or key")] = "adapter",
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Requests, errors, tokens and latency from the server's request log."""
    from loraplex.gateway import db
    from loraplex.gateway.log import summary

    if by not in ("adapter", "key"):
        raise UserError(f"--by {by!r}: use adapter or key")
    rows = summary(db.connect(), _since(since), by)
    if as_json:
        print(json.dumps(rows, ensure_ascii=False))
        return
    table = Table(
        by, "requests", "errors", "prompt tokens", "completion tokens", "avg TTFT ms", "avg latency ms", "last"
    )
    for r in rows:
        table.add_row(
            str(r["name"]),
            str(r["requests"]),
            str(r["errors"]),
            str(r["prompt_tokens"]),
            str(r["completion_tokens"]),
            f"{r['avg_ttft_ms']:.0f}" if r["avg_ttft_ms"] is not None else "",
            f"{r['avg_latency_ms']:.0f}" if r["avg_latency_ms"] is not None else "",
            _when(r["last"]),
        )
    out.print(table)


@feedback_app.command("export")
def feedback_export(
    adapter: Annotated[str, typer.Option(help="NAME (every version) or NAME@vN.")],
    out_file: Annotated[Path, typer.Option("--out", help="The data file to write (JSONL).")],
    rating: Annotated[str | None, typer.Option(help="up or down (default: both).")] = None,
    fmt: Annotated[str, typer.Option("--format", help="messages or sharegpt")] = "messages",
) -> None:
    """Write rated conversations (corrections where given) as training data for `loraplex train`."""
    from loraplex.gateway import db, feedback

    if rating not in (None, "up", "down"):
        raise UserError(f"--rating {rating!r}: use up or down")
    counts = feedback.export(db.connect(), adapter, out_file, rating, fmt)
    err.print(
        f"wrote {counts['written']} conversations to {out_file}"
        + (f"; skipped {counts['skipped']} down-rated without a correction" if counts["skipped"] else "")
    )


@feedback_app.command("stats")
def feedback_stats(
    adapter: Annotated[str | None, typer.Option(help="NAME or NAME@vN (default: all).")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Ratings per adapter version: up, down, corrected."""
    from loraplex.gateway import db, feedback

    rows = feedback.stats(db.connect(), adapter)
    if as_json:
        print(json.dumps(rows, ensure_ascii=False))
        return
    table = Table("adapter", "ratings", "up", "down", "corrected", "up ratio", "last")
    for r in rows:
        table.add_row(
            r["adapter"],
            str(r["ratings"]),
            str(r["up"]),
            str(r["down"]),
            str(r["corrected"]),
            f"{r['up_ratio']:.0%}",
            _when(r["last"]),
        )
    out.print(table)


@knowledge_app.command("add")
def knowledge_add(
    name: Annotated[str, typer.Argument(help="knowledge base name (created on first use)")],
    paths: Annotated[list[Path] | None, typer.Argument(help="files or directories (md, txt, html, pdf, docx)")] = None,
    chunk_size: Annotated[int, typer.Option(help="characters per chunk, about")] = 500,
    overlap: Annotated[int, typer.Option(help="characters repeated from the previous chunk")] = 100,
    max_file_mb: Annotated[float, typer.Option(help="larger files are refused")] = 50,
    embedder: Annotated[
        str | None,
        typer.Option(
            help="'multilingual' (built in: Chinese, English and 14 more languages) or a local embedding model "
            "directory: adds dense vectors (hybrid search) from now on."
        ),
    ] = None,
    no_embedder: Annotated[bool, typer.Option("--no-embedder", help="Drop the vectors: keywords only.")] = False,
) -> None:
    """Add or update documents: a changed file's chunks are replaced, an unchanged one skipped; a file
    that cannot be read is reported and the rest are added (exit code 1 if any failed)."""
    from rich.progress import Progress

    from loraplex.knowledge.store import KnowledgeBase, expand

    if not chunk_size >= 20 or not 0 <= overlap < chunk_size:
        raise UserError(f"--chunk-size {chunk_size} / --overlap {overlap}: need chunk size >= 20, 0 <= overlap < size")
    if not paths and embedder is None and not no_embedder:
        raise UserError(
            "give files or directories to add (or --embedder multilingual|DIR to add vectors to what is there)"
        )
    files = expand(paths or [])
    kb = KnowledgeBase(name, create=True)
    if embedder is not None or no_embedder:
        if embedder is not None and no_embedder:
            raise UserError("give --embedder or --no-embedder, not both")
        with Progress(console=err, transient=True) as bar:
            task = bar.add_task("embedding existing chunks", total=None)
            done = kb.set_embedder(embedder, lambda n, total: bar.update(task, completed=n, total=total))
        if embedder is not None:
            out.print(f"{name}: vectors from {embedder} ({done} existing chunks embedded)")
    with Progress(console=err, transient=True) as bar:
        task = bar.add_task("indexing", total=len(files))
        results = kb.add(files, chunk_size, overlap, int(max_file_mb * 1e6), lambda _: bar.advance(task))
    table = Table("file", "status", "chunks")
    for r in results:
        table.add_row(r.path, f"[red]error[/]: {r.message}" if r.status == "error" else r.status, str(r.chunks))
    out.print(table)
    st = kb.stats()
    out.print(f"{name}: {st['documents']} documents, {st['chunks']} chunks")
    if any(r.status == "error" for r in results):
        raise typer.Exit(1)


@knowledge_app.command("rm")
def knowledge_rm(
    name: Annotated[str, typer.Argument(help="knowledge base name")],
    paths: Annotated[list[Path] | None, typer.Argument(help="documents to remove; none: the whole base")] = None,
    yes: Annotated[bool, typer.Option("--yes", help="no question before removing a whole base")] = False,
) -> None:
    """Remove documents (their chunks go from the index at once), or the whole knowledge base."""
    from loraplex.knowledge.store import KnowledgeBase

    kb = KnowledgeBase(name)
    if paths:
        for p in kb.remove(paths):
            out.print(f"removed {p}")
        return
    if not yes and not typer.confirm(f"remove knowledge base {name!r} and its index?"):
        raise typer.Exit(1)
    kb.drop()
    out.print(f"removed knowledge base {name}")


@knowledge_app.command("list")
def knowledge_list(
    name: Annotated[str | None, typer.Argument(help="a knowledge base: list its documents")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Knowledge bases with their sizes, or the documents of one."""
    from loraplex.knowledge.store import KnowledgeBase, names

    if name:
        kb = KnowledgeBase(name)
        docs = kb.documents()
        if as_json:
            print(json.dumps(docs, ensure_ascii=False, indent=2))
            return
        table = Table("document", "chunks", "size")
        for d in docs:
            table.add_row(d["path"], str(d["chunks"]), f"{d['bytes'] / 1e3:.1f} kB")
        out.print(table)
        return
    rows = []
    for n in names():
        kb = KnowledgeBase(n)
        rows.append(kb.stats())
        kb.close()
    if as_json:
        print(json.dumps(rows, ensure_ascii=False, indent=2))
        return
    table = Table("knowledge base", "documents", "chunks", "vectors")
    for r in rows:
        vectors = f"{r['vectors']} ({Path(r['embedder']).name})" if r["embedder"] else "-"
        table.add_row(r["name"], str(r["documents"]), str(r["chunks"]), vectors)
    out.print(table if rows else "no knowledge bases yet; add one with `loraplex knowledge add NAME DIR`")


@knowledge_app.command("search")
def knowledge_search(
    name: Annotated[str, typer.Argument(help="knowledge base name")],
    query: Annotated[str, typer.Argument(help="the question or keywords")],
    k: Annotated[int, typer.Option("-k", help="passages to show")] = 5,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """The best passages for a query, ranked by BM25 over jieba-segmented words, with their sources."""
    from dataclasses import asdict

    from loraplex.knowledge.store import KnowledgeBase

    if not 1 <= k <= 100:
        raise UserError(f"-k {k}: use 1 to 100")
    hits = KnowledgeBase(name).search(query, k)
    if as_json:
        print(json.dumps([asdict(h) for h in hits], ensure_ascii=False, indent=2))
        return
    if not hits:
        out.print("no passage matches")
    for i, h in enumerate(hits, 1):
        scores = f"BM25 {h.score:.2f}, relevance {h.relevance:.2f}"
        if h.similarity is not None:
            scores += f", similarity {h.similarity:.2f}"
        out.print(f"[bold]{i}. {h.source}[/] #{h.ord}  ({scores})", highlight=False)
        out.print(h.text, highlight=False, markup=False)


# ---------------------------------------------------------------------------- assistants
# create and edit take the same options; edit changes only those given.
AdapterOpt = Annotated[
    list[str] | None,
    typer.Option("--adapter", help="NAME, NAME@vN or NAME@ALIAS, optionally :WEIGHT; repeat to compose."),
]
SystemOpt = Annotated[str | None, typer.Option("--system", help="The system prompt.")]
SystemFileOpt = Annotated[Path | None, typer.Option("--system-file", help="Read the system prompt from a file.")]
KnowledgeOpt = Annotated[
    list[Path] | None,
    typer.Option("--knowledge", help="Files or directories to index into the assistant's knowledge base."),
]
KnowledgeBaseOpt = Annotated[
    str | None, typer.Option("--knowledge-base", help="Knowledge base to use (default with --knowledge: NAME).")
]
DisplayOpt = Annotated[str | None, typer.Option("--display-name", help="Shown in chat UIs' model pickers.")]
DescriptionOpt = Annotated[str | None, typer.Option("--description")]
TemperatureOpt = Annotated[float | None, typer.Option(help="Default temperature (a request's own wins).")]
TopPOpt = Annotated[float | None, typer.Option("--top-p", help="Default top_p.")]
MaxTokensOpt = Annotated[int | None, typer.Option("--max-tokens", help="Default answer length limit.")]
TopKOpt = Annotated[int | None, typer.Option("--top-k", help="Passages put into the prompt, at most (default 4).")]
MinRelevanceOpt = Annotated[
    float | None,
    typer.Option("--min-relevance", help="0-1: share of the question a passage must cover to be used (default 0.3)."),
]
MinSimilarityOpt = Annotated[
    float | None,
    typer.Option("--min-similarity", help="With vectors: cosine at which a passage is used anyway (default 0.5)."),
]
RefuseOpt = Annotated[
    bool | None,
    typer.Option(
        "--refuse/--answer",
        help="With no relevant passage: say 'I don't know' (refuse) or answer from the model alone (default).",
    ),
]
RefusalOpt = Annotated[str | None, typer.Option("--refusal", help="The 'I don't know' text (default by language).")]


def _assistant_fields(
    adapter: list[str] | None,
    system: str | None,
    system_file: Path | None,
    display_name: str | None,
    description: str | None,
    temperature: float | None,
    top_p: float | None,
    max_tokens: int | None,
) -> dict[str, Any]:
    from loraplex.assistants.store import parse_adapter

    fields: dict[str, Any] = {}
    if adapter is not None:
        fields["adapters"] = [parse_adapter(a).model_dump() for a in adapter]
    if system is not None and system_file is not None:
        raise UserError("give --system or --system-file, not both")
    if system_file is not None:
        try:
            fields["system_prompt"] = system_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--system-file {system_file}: cannot read it as UTF-8 text: {e}") from None
    elif system is not None:
        fields["system_prompt"] = system
    if display_name is not None:
        fields["display_name"] = display_name
    if description is not None:
        fields["description"] = description
    sampling = {"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens}
    if any(v is not None for v in sampling.values()):
        fields["sampling"] = {k: v for k, v in sampling.items() if v is not None}
    return fields


def _knowledge_fields(
    top_k: int | None,
    min_relevance: float | None,
    min_similarity: float | None,
    refuse: bool | None,
    refusal: str | None,
) -> dict[str, Any]:
    values = {
        "top_k": top_k,
        "min_relevance": min_relevance,
        "min_similarity": min_similarity,
        "when_nothing_found": None if refuse is None else ("refuse" if refuse else "answer"),
        "refusal": refusal,
    }
    return {k: v for k, v in values.items() if v is not None}


def _ingest(base: str, paths: list[Path]) -> bool:
    """Index `paths` into knowledge base `base`, printing each file's outcome; False if any failed."""
    from rich.progress import Progress

    from loraplex.knowledge.store import KnowledgeBase, expand

    files = expand(paths)
    kb = KnowledgeBase(base, create=True)
    with Progress(console=err, transient=True) as bar:
        task = bar.add_task("indexing", total=len(files))
        results = kb.add(files, progress=lambda _: bar.advance(task))
    failed = [r for r in results if r.status == "error"]
    for r in failed:
        err.print(f"[red]error[/]: {r.message}", highlight=False)
    st = kb.stats()
    kb.close()
    out.print(f"knowledge base {base}: {st['documents']} documents, {st['chunks']} chunks")
    return not failed


@assistants_app.command("create")
def assistants_create(
    name: Annotated[str, typer.Argument(help="the assistant's name, which clients use as `model`")],
    adapter: AdapterOpt = None,
    system: SystemOpt = None,
    system_file: SystemFileOpt = None,
    knowledge: KnowledgeOpt = None,
    knowledge_base: KnowledgeBaseOpt = None,
    display_name: DisplayOpt = None,
    description: DescriptionOpt = None,
    temperature: TemperatureOpt = None,
    top_p: TopPOpt = None,
    max_tokens: MaxTokensOpt = None,
    top_k: TopKOpt = None,
    min_relevance: MinRelevanceOpt = None,
    min_similarity: MinSimilarityOpt = None,
    refuse: RefuseOpt = None,
    refusal: RefusalOpt = None,
) -> None:
    """Create an assistant: adapters (composed by weight), a system prompt, defaults and a knowledge base."""
    from loraplex.assistants import store

    fields = {
        "name": name,
        **_assistant_fields(adapter, system, system_file, display_name, description, temperature, top_p, max_tokens),
    }
    kn = _knowledge_fields(top_k, min_relevance, min_similarity, refuse, refusal)
    base = knowledge_base or (name if knowledge else None)
    if base is None and kn:
        raise UserError("--top-k, --min-relevance, --min-similarity, --refuse and --refusal need a knowledge base")
    if base is not None:
        fields["knowledge"] = {"base": base, **kn}
    assistant = store.build(fields)
    if store.path_of(name).exists():
        raise UserError(f"assistant {name!r} exists; change it with `loraplex assistants edit {name}`")
    ok = _ingest(base, knowledge) if knowledge and base else True
    path = store.create(assistant)
    out.print(f"created assistant {name} ({path}); clients use model {name!r}")
    if not ok:
        raise typer.Exit(1)


@assistants_app.command("edit")
def assistants_edit(
    name: Annotated[str, typer.Argument(help="the assistant to change")],
    adapter: AdapterOpt = None,
    no_adapters: Annotated[bool, typer.Option("--no-adapters", help="Use the base model alone.")] = False,
    system: SystemOpt = None,
    system_file: SystemFileOpt = None,
    knowledge: KnowledgeOpt = None,
    knowledge_base: KnowledgeBaseOpt = None,
    no_knowledge: Annotated[bool, typer.Option("--no-knowledge", help="Stop using a knowledge base.")] = False,
    display_name: DisplayOpt = None,
    description: DescriptionOpt = None,
    temperature: TemperatureOpt = None,
    top_p: TopPOpt = None,
    max_tokens: MaxTokensOpt = None,
    top_k: TopKOpt = None,
    min_relevance: MinRelevanceOpt = None,
    min_similarity: MinSimilarityOpt = None,
    refuse: RefuseOpt = None,
    refusal: RefusalOpt = None,
) -> None:
    """Change an assistant: the options given replace what it has (--adapter replaces the whole list;
    --knowledge adds files to its knowledge base). A running server uses the change at the next request."""
    from loraplex.assistants import store

    current = store.get(name)
    fields = _assistant_fields(adapter, system, system_file, display_name, description, temperature, top_p, max_tokens)
    if no_adapters:
        if adapter:
            raise UserError("give --adapter or --no-adapters, not both")
        fields["adapters"] = []
    kn = _knowledge_fields(top_k, min_relevance, min_similarity, refuse, refusal)
    base = knowledge_base or (current.knowledge.base if current.knowledge else None) or (name if knowledge else None)
    if no_knowledge:
        if knowledge or knowledge_base or kn:
            raise UserError("--no-knowledge cannot be combined with other knowledge options")
        fields["knowledge"] = None
    elif base is not None and (knowledge or knowledge_base or kn):
        fields["knowledge"] = {"base": base, **kn}
    elif kn:
        raise UserError(f"assistant {name!r} has no knowledge base; add one with --knowledge or --knowledge-base")
    if not fields and not knowledge:
        raise UserError("nothing to change: give the options to change (see --help)")
    ok = _ingest(base, knowledge) if knowledge and base else True
    store.update(name, fields)
    out.print(f"updated assistant {name}")
    if not ok:
        raise typer.Exit(1)


@assistants_app.command("list")
def assistants_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Assistants with what they are made of."""
    from loraplex.assistants import store

    rows = []
    for n in store.names():
        try:
            rows.append(store.get(n).model_dump())
        except UserError as e:
            rows.append({"name": n, "error": str(e)})
    if as_json:
        print(json.dumps(rows, ensure_ascii=False, indent=2))
        return
    if not rows:
        out.print("no assistants yet; create one with `loraplex assistants create NAME --adapter ...`")
        return
    table = Table("assistant", "adapters", "knowledge", "description")
    for r in rows:
        if "error" in r:
            table.add_row(r["name"], f"[red]error[/]: {r['error']}", "", "")
            continue
        adapters = " + ".join(p["ref"] + ("" if p["weight"] == 1 else f":{p['weight']:g}") for p in r["adapters"])
        kb = r["knowledge"]["base"] if r["knowledge"] else "-"
        table.add_row(r["display_name"] or r["name"], adapters or "(base model)", kb, r["description"])
    out.print(table)


@assistants_app.command("show")
def assistants_show(
    name: Annotated[str, typer.Argument(help="assistant name")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """An assistant's whole definition (its YAML file)."""
    from loraplex.assistants import store

    a = store.get(name)
    if as_json:
        print(json.dumps(a.model_dump(), ensure_ascii=False, indent=2))
        return
    print(a.to_yaml(), end="")


@assistants_app.command("rm")
def assistants_rm(
    name: Annotated[str, typer.Argument(help="assistant name")],
    yes: Annotated[bool, typer.Option("--yes", help="no question")] = False,
) -> None:
    """Remove an assistant (its adapters and knowledge base stay)."""
    from loraplex.assistants import store

    try:
        a = store.get(name)
    except UserError:
        if not store.path_of(name).exists():
            raise
        a = None  # a broken definition can still be removed
    if not yes and not typer.confirm(f"remove assistant {name!r}?"):
        raise typer.Exit(1)
    store.remove(name)
    kept = f"; knowledge base {a.knowledge.base!r} kept (loraplex knowledge rm)" if a and a.knowledge else ""
    out.print(f"removed assistant {name}{kept}")


def main() -> None:
    from loraplex._quiet import quiet

    quiet()
    try:
        app()
    except UserError as e:
        err.print(f"[red]error:[/] {e}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
