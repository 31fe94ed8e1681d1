"""Conversations -> token ids + labels with loss on assistant tokens only; sequence packing.

Rendering uses the tokenizer's own chat template (the same call inference makes), so what the
model is trained on is exactly what it will see when serving. Assistant spans are found by
rendering the conversation up to each assistant turn and comparing character offsets, which works
for any template whose rendering of a prefix is a prefix of the full rendering (ChatML, Llama-2/3,
Qwen, Mistral...). A span covers the answer and the template's end-of-turn token (`<|im_end|>`), so
the model learns to stop. Template text around it (role headers, a default system prompt that the
template injects) is never trained unless `train_on_prompt` is set.

Packing concatenates examples into rows and restarts `position_ids` at every example; with no
attention mask, transformers turns that into a block-diagonal causal mask, so packed examples never
attend to one another. The first token of every example is never a label, so no example learns to
predict across a packing boundary either.

A packed row can also hold its examples as a prefix tree (`shared_row`): the prompt tokens that
examples have in common (the template's system prompt, retrieval instructions) are in the row once,
and each example continues from the shared part with its position ids going on from there. Only
an attention that reads that layout (train/attention.py) may be given such a row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from loraplex.data.hermes import native
from loraplex.errors import UserError

IGNORE = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    source: str = ""

    @property
    def n_labels(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


@dataclass
class Row:
    """One training row: one example, or several packed ones."""

    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    position_ids: list[int] = field(default_factory=list)

    def add(self, ex: Example) -> None:
        self.input_ids += ex.input_ids
        self.labels += ex.labels
        self.position_ids += list(range(len(ex.input_ids)))


@dataclass
class EncodeStats:
    examples: int = 0
    truncated: int = 0
    dropped: list[str] = field(default_factory=list)  # sources with no answer token left
    tokens: int = 0
    label_tokens: int = 0


def render(tok: Any, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False, **extra: Any) -> str:
    """The chat template rendering used by both training and inference. A conversation the template
    refuses (its `raise_exception`: roles out of order, two tool calls in one turn for Llama-3.1)
    is a UserError with the template's own words."""
    from jinja2 import TemplateError

    try:
        text = tok.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt, **extra
        )
    except TemplateError as e:
        raise UserError(f"the model's chat template does not accept this conversation: {e}") from None
    return str(text)


def assistant_spans(
    tok: Any, messages: Sequence[dict[str, Any]], tools: list[dict[str, Any]] | None = None
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character spans of each assistant turn (answer + end-of-turn);
    `tools` (OpenAI function objects) for a template that renders them itself."""
    extra: dict[str, Any] = {"tools": [{"type": "function", "function": f} for f in tools]} if tools else {}
    full = render(tok, messages, **extra)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(tok, messages[:i], add_generation_prompt=True, **extra)
        upto = render(tok, messages[: i + 1], **extra)
        if not (full.startswith(before) and full.startswith(upto) and len(upto) > len(before)):
            raise UserError(
                "the chat template does not render conversations prefix-consistently, so assistant "
                "turns cannot be located; set data.train_on_prompt: true or use another template"
            )
        # Trailing whitespace after the end-of-turn token belongs to the template, not the answer.
        spans.append((len(before), len(upto.rstrip())))
    return full, spans


def encode(
    tok: Any,
    messages: Sequence[dict[str, Any]],
    max_len: int,
    train_on_prompt: bool = False,
    source: str = "",
    tools: list[dict[str, Any]] | None = None,
) -> tuple[Example, bool]:
    """Token ids and labels for one conversation; returns (example, was_truncated)."""
    text, spans = assistant_spans(tok, messages, tools)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    offsets = enc["offset_mapping"]
    labels = []
    for tid, (start, end) in zip(ids, offsets, strict=True):
        inside = train_on_prompt or any(start < e and end > s for s, e in spans)
        labels.append(tid if inside else IGNORE)
    if labels:
        labels[0] = IGNORE  # never predicted from inside its own example (see module docstring)
    truncated = len(ids) > max_len
    return Example(ids[:max_len], labels[:max_len], source), truncated


def encode_all(
    tok: Any, conversations: Sequence[Any], max_len: int, train_on_prompt: bool = False
) -> tuple[list[Example], EncodeStats]:
    """Encode conversations (objects with `.messages`, `.source` and `.tooled`); report truncations
    and drops. A record with tools is rendered as the template renders tools when it can (its
    `tooled` form: the prompts and calls the server gives that base), as Hermes text otherwise."""
    stats = EncodeStats()
    out = []
    for conv in conversations:
        tooled = getattr(conv, "tooled", None) if native(tok) else None
        if tooled is not None:
            ex, truncated = encode(tok, tooled.messages, max_len, train_on_prompt, conv.source, tooled.functions)
        else:
            ex, truncated = encode(tok, conv.messages, max_len, train_on_prompt, conv.source)
        stats.truncated += truncated
        if ex.n_labels == 0:
            stats.dropped.append(conv.source)
            continue
        out.append(ex)
        stats.examples += 1
        stats.tokens += len(ex.input_ids)
        stats.label_tokens += ex.n_labels
    return out, stats


def pack(examples: Sequence[Example], max_len: int) -> list[Row]:
    """First-fit-decreasing packing of examples into rows of at most `max_len` tokens.

    Deterministic for a given input order; examples are never split across rows.
    """
    return [plain_row(group) for group in pack_groups(examples, max_len)]


def plain_row(examples: Sequence[Example]) -> Row:
    """The examples one after the other, each from position 0."""
    row = Row()
    for ex in examples:
        row.add(ex)
    return row


def pack_groups(examples: Sequence[Example], max_len: int) -> list[list[Example]]:
    """The examples of each row `pack` makes, in row order."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    groups: list[list[Example]] = []
    sizes: list[int] = []
    for i in order:
        ex = examples[i]
        for g, size in enumerate(sizes):
            if size + len(ex.input_ids) <= max_len:
                groups[g].append(ex)
                sizes[g] += len(ex.input_ids)
                break
        else:
            groups.append([ex])
            sizes.append(len(ex.input_ids))
    return groups


def shared_row(examples: Sequence[Example]) -> Row:
    """The examples of one row as a prefix tree, laid out depth first: a run of tokens that several
    examples begin with is in the row once, followed by what comes after it in each of them.

    A token is shared only before every sharing example's first label, and each example's own part
    starts with an unlabelled token, so the same labels are scored, each predicted from the same
    tokens (the attention gives every part the shared tokens before it: train/attention.py) and the
    loss and gradients equal those of `pack`'s row. Position ids run on from the shared part, so the
    first branch continues its parent's run and every later branch starts a run of its own at the
    position where it leaves the shared part.
    """
    row = Row()
    shareable = [next((i for i, t in enumerate(ex.labels) if t != IGNORE), len(ex.labels)) - 1 for ex in examples]

    def lay(members: list[int], depth: int) -> None:
        if len(members) == 1:
            ex = examples[members[0]]
            end = len(ex.input_ids)
        else:  # the run all members share from `depth`
            first = examples[members[0]].input_ids
            end = depth
            while all(end < shareable[m] for m in members) and all(
                examples[m].input_ids[end] == first[end] for m in members
            ):
                end += 1
            ex = examples[members[0]]
        row.input_ids += ex.input_ids[depth:end]
        row.labels += ex.labels[depth:end]
        row.position_ids += list(range(depth, end))
        if len(members) == 1:
            return
        branches: dict[object, list[int]] = {}  # by the next token; an example that may share no more alone
        for m in members:
            key = examples[m].input_ids[end] if end < shareable[m] else ("own", m)
            branches.setdefault(key, []).append(m)
        for branch in branches.values():
            lay(branch, end)

    lay(list(range(len(examples))), 0)
    return row


def unpacked(examples: Sequence[Example]) -> list[Row]:
    rows = []
    for ex in examples:
        row = Row()
        row.add(ex)
        rows.append(row)
    return rows


def collate(rows: Sequence[Row], pad_id: int, packed: bool) -> dict[str, Any]:
    """Pad a batch of rows to its longest row.

    Padding tokens get their own position run starting at 0, so in packed mode they form a block
    of their own; in unpacked mode an attention mask hides them.
    """
    import torch

    width = max(len(r.input_ids) for r in rows)
    ids, labels, pos, mask = [], [], [], []
    for r in rows:
        n = width - len(r.input_ids)
        ids.append(r.input_ids + [pad_id] * n)
        labels.append(r.labels + [IGNORE] * n)
        pos.append(r.position_ids + list(range(n)))
        mask.append([1] * len(r.input_ids) + [0] * n)
    batch = {
        "input_ids": torch.tensor(ids),
        "labels": torch.tensor(labels),
        "position_ids": torch.tensor(pos),
    }
    if not packed:
        batch["attention_mask"] = torch.tensor(mask)
    return batch
