"""Commands that train: `train`, `quickstart`, `data check`, `plan`.

Each command parses its options and calls the package that does the work."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from loraplex.cli.app import (
    app,
    data_app,
    err,
    out,
)
from loraplex.errors import UserError


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
    from loraplex.train import distributed, sft_lora, sft_lora_distributed

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
        extra["lora"] = {"rank": rank}  # alpha follows: 2 x rank
    if retrieval is not None:
        extra["retrieval"] = {"enabled": retrieval}
    if config is None and data is None:
        raise UserError("give a config file (loraplex train CONFIG.yaml) or --data FILE --name NAME")
    cfg = load_config(config, set_, extra)
    # torchtune's layout: one recipe per launcher (train/sft_lora.py, train/sft_lora_distributed.py)
    run = sft_lora_distributed.run if distributed.launched() else sft_lora.run
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
