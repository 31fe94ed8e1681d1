"""`knowledge ...` (documents indexed for retrieval) and `assistants ...` (adapters + prompt +
knowledge, served as models).

Each command parses its options and calls the package that does the work."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from loraplex.cli.app import (
    assistants_app,
    err,
    knowledge_app,
    out,
)
from loraplex.errors import UserError


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
