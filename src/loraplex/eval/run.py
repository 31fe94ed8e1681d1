"""`loraplex eval`: answer an eval set with an adapter and a baseline, score, compare, store.

One run, top to bottom:
  1. read the eval file (any training format; every record needs a reference answer);
  2. generate both sides' answers through the serving engine, with the prompts `loraplex serve`
     builds (a version trained with retrieval answers from passages of its own Q&A, and the base
     model answers when nothing relevant is found: assistants/faq.py): every question for the
     adapter and for the baseline is submitted at once, so base and adapter rows decode together;
  3. score each answer (eval/metrics.py), and optionally have a judge grade it (eval/judge.py);
  4. teacher-forced loss and perplexity on the reference answers (assistant tokens only): the
     engine reads each reference right after generating its answer, so the prompt comes from its
     prefix cache; on quantized weights, a PEFT model on the unquantized base (`reference_losses`,
     also the independent reference the engine's numbers are tested against);
  5. per example, improved / regressed / unchanged on the per-answer score; scores apart for the
     questions the adapter was trained on and the unseen ones, when its training questions are known;
  6. store the result with the adapter version (registry.record_eval) and return it.

This module does not render HTML (eval/report.py) or print tables (cli.py).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from loraplex.adapters import registry
from loraplex.data.formats import parse_file
from loraplex.data.tokenize import IGNORE, Example, collate, encode_all, unpacked
from loraplex.engine.quant import Requested
from loraplex.errors import UserError
from loraplex.eval import metrics
from loraplex.eval.judge import Judge
from loraplex.files import sha256_file

CHANGE_MARGIN = 0.05  # per-answer score difference below which an example counts as unchanged


@dataclass(frozen=True)
class EvalExample:
    source: str  # file:line
    prompt: list[dict[str, str]]  # the conversation up to the reference answer
    reference: str
    keywords: tuple[str, ...]

    @property
    def question(self) -> str:
        """The last user message: what is asked (and, for an assistant, what is searched)."""
        return next((m["content"] for m in reversed(self.prompt) if m["role"] == "user"), "")


def read_examples(path: Path, keywords: tuple[str, ...] = ()) -> list[EvalExample]:
    """Every record as (prompt, reference); any record without a usable reference is an error."""
    result = parse_file(path)
    for e in result.errors:
        if e.reason.startswith(("no assistant message", "the last message must be")):
            e.reason = f"no reference answer ({e.reason})"
    if result.errors:
        listed = "\n  ".join(str(e) for e in result.errors[:30])
        more = f"\n  ... and {len(result.errors) - 30} more" if len(result.errors) > 30 else ""
        raise UserError(
            f"{len(result.errors)} record(s) in {path} cannot be evaluated (each needs a question and a "
            f"non-empty reference answer as its last assistant turn):\n  {listed}{more}"
        )
    return [
        EvalExample(c.source, c.messages[:-1], c.messages[-1]["content"], c.keywords or keywords)
        for c in result.conversations
    ]


def default_data(adapter: registry.AdapterRef) -> Path:
    """The eval split the training run held out (written next to the run's metrics)."""
    split = adapter.manifest().get("data", {}).get("eval_file")
    if split and Path(split).is_file():
        return Path(split)
    raise UserError(
        f"{adapter.id} has no held-out eval split on this machine"
        + (f" ({split} is gone)" if split else " (trained with data.eval_ratio 0?)")
        + "; pass --data FILE"
    )


# ----------------------------------------------------------------------------- generation


@dataclass(frozen=True)
class Job:
    """One question as `loraplex serve` answers it: the messages and the model that runs them, or
    the fixed answer it gives instead of running one (`refusal`: retrieval.prepare)."""

    messages: list[dict[str, str]]
    model: str
    refusal: str | None = None


def served_prompts(model: str, examples: list[EvalExample], fits: Any = None) -> list[Job]:
    """Each example as `loraplex serve` answers a chat request for `model`: with passages from the
    version's own Q&A when it was trained with retrieval (or its refusal, or the base model alone)."""
    from loraplex.assistants import faq, retrieval

    helper = faq.assistant(model) if model else None
    if helper is None:
        return [Job(ex.prompt, model) for ex in examples]
    searcher = retrieval.Searcher()
    try:
        prepared = [retrieval.prepare(helper, ex.prompt, searcher, True, fits) for ex in examples]
    finally:
        searcher.close()
    return [Job(p.messages, "" if p.base_only else model, p.refusal) for p in prepared]


def trained_questions(ref: registry.AdapterRef) -> set[str] | None:
    """The questions `ref` was trained on (normalised), when they are known on this machine."""
    from loraplex.assistants import faq

    if (ref.path / registry.KNOWLEDGE).is_file():
        return {metrics.normalise(p.question) for p in faq.read(ref.path / registry.KNOWLEDGE)}
    path = ref.manifest().get("data", {}).get("path")
    if not path or not Path(path).is_file():
        return None
    result = parse_file(Path(path))
    return {
        metrics.normalise(next((m["content"] for m in reversed(c.messages) if m["role"] == "user"), ""))
        for c in result.conversations
    }


async def answer_all(
    engine: Any,
    jobs: list[list[Job]],
    max_tokens: int,
    progress: Callable[[int, int], None] | None = None,
    scoring: list[tuple[str, list[Example]]] | None = None,
) -> list[list[dict]]:
    """Answers for every side's (prompt, model) jobs, all in flight together so the engine batches them.

    With `scoring` (per side: the model to score with, and each job's reference conversation encoded
    as training encodes it), each answer also gets `nll`: (summed NLL, answer tokens) of its
    reference, read by the engine right after the answer, while the prompt's keys and values are
    in its prefix cache (only the reference's tokens are computed). `reference_losses` is the
    independent reference for these numbers (tests/test_eval.py)."""
    from loraplex.engine.protocol import collect
    from loraplex.engine.sampling import GREEDY

    async def one(side: int, i: int, job: Job) -> dict[str, Any]:
        out: dict[str, Any] = {"text": job.refusal, "finish_reason": "stop", "tokens": 0, "refused": True}
        if job.refusal is None:
            a = await collect(engine.generate(job.messages, GREEDY, job.model, max_tokens=max_tokens))
            out = {"text": a.text.strip(), "finish_reason": a.finish_reason, "tokens": a.completion_tokens}
            out["refused"] = False
        if scoring is not None:
            scorer, encoded = scoring[side]
            out["nll"] = await _nll(engine, scorer, encoded[i])
        done[0] += 1
        if progress is not None:
            progress(done[0], total)
        return out

    done, total = [0], sum(len(side) for side in jobs)
    flat = await asyncio.gather(*[one(s, i, job) for s, side in enumerate(jobs) for i, job in enumerate(side)])
    out, at = [], 0
    for side in jobs:
        out.append(list(flat[at : at + len(side)]))
        at += len(side)
    return out


# ----------------------------------------------------------------------------- loss


async def _nll(engine: Any, model: str, ex: Example) -> tuple[float, int]:
    """(summed NLL, labelled tokens) of one encoded conversation under `model`, from the engine's
    prompt logprobs (max_tokens 0: the sequence is only read). Logprobs are asked from the first
    labelled position on, so everything before it may come from the prefix cache."""
    from loraplex.engine.protocol import collect
    from loraplex.engine.sampling import SamplingParams

    scored = [p for p, label in enumerate(ex.labels) if label != IGNORE]
    params = SamplingParams(temperature=0.0, prompt_logprobs=0, prompt_logprobs_from=scored[0])
    answer = await collect(engine.generate(ex.input_ids, params, model, max_tokens=0))
    wanted = set(scored)
    read = [lp for p, lp in enumerate(answer.prompt_logprobs or ()) if p in wanted and lp is not None]
    assert len(read) == len(scored), "the engine left a scored position without its logprob"
    return -math.fsum(lp.logprob for lp in read), len(scored)


def encode_references(
    tok: Any, examples: list[EvalExample], prompts: list[list[dict[str, str]]], max_len: int
) -> list[Example]:
    """Each example's prompt and reference answer, encoded as training encodes them (assistant
    tokens labelled), truncated to `max_len`; a UserError when a reference has no token left."""
    from loraplex.data.formats import Conversation

    convs = [
        Conversation([*prompt, {"role": "assistant", "content": ex.reference}], ex.source)
        for prompt, ex in zip(prompts, examples, strict=True)
    ]
    encoded, _ = encode_all(tok, convs, max_len=max_len)
    if len(encoded) != len(examples):
        raise UserError(f"some reference answers have no tokens left to score after truncation to {max_len} tokens")
    return encoded


@torch.inference_mode()
def reference_losses(
    base: Any, examples: list[EvalExample], sides: list[str | None], prompts: list[list[list[dict[str, str]]]]
) -> list[list[tuple[float, int]]]:
    """(summed NLL, answer tokens) of every reference answer under each side (None = the base),
    after that side's prompt for it (`prompts[side][example]`).

    Assistant tokens only, exactly as training labels them (data/tokenize.py)."""
    from peft import PeftModel

    from loraplex.models.load import load_model, load_tokenizer

    tok = load_tokenizer(base)
    per_side = [encode_references(tok, examples, side_prompts, 4096) for side_prompts in prompts]
    model: Any = load_model(base)
    adapters = [s for s in sides if s]
    for i, ref_id in enumerate(adapters):
        path = str(registry.resolve(ref_id).path)
        if i == 0:
            model = PeftModel.from_pretrained(model, path, adapter_name=f"a{i}")
        else:
            model.load_adapter(path, adapter_name=f"a{i}")
    model.eval()
    inner = model.get_base_model() if adapters else model  # PEFT's LoRA layers live inside it
    out: list[list[tuple[float, int]]] = []
    for side, encoded in zip(sides, per_side, strict=True):
        if side:
            model.set_adapter(f"a{adapters.index(side)}")
        # Batches of similar lengths, so that padding (computed like any token) stays small: a
        # retrieval prompt's length varies with its passage.
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
        found: dict[int, tuple[float, int]] = {}
        with model.disable_adapter() if side is None and adapters else nullcontext():
            for k in range(0, len(order), 8):
                batch_ids = order[k : k + 8]
                batch = collate(unpacked([encoded[i] for i in batch_ids]), tok.pad_token_id, packed=False)
                hidden = inner.get_decoder()(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
                ).last_hidden_state
                # The head only where an answer token is scored (as training's loss_sum): a retrieval
                # prompt is most of each row, and full-row logits are rows x length x 49k floats.
                targets = batch["labels"][:, 1:]
                keep = targets != IGNORE
                logits = inner.get_output_embeddings()(hidden[:, :-1][keep])
                nll = F.cross_entropy(logits.float(), targets[keep], reduction="none")
                per_row = torch.zeros(targets.shape[0], dtype=torch.float64)
                per_row.index_add_(0, keep.nonzero()[:, 0], nll.double())
                for r, i in enumerate(batch_ids):
                    found[i] = (float(per_row[r]), int(keep[r].sum()))
        out.append([found[i] for i in range(len(encoded))])
    return out


# ----------------------------------------------------------------------------- the run


def _summary(answers: list[dict[str, Any]], examples: list[EvalExample], losses: list[tuple[float, int]]) -> dict:
    scores = [a["scores"] for a in answers]

    def mean(key: str) -> float | None:
        vals = [s[key] for s in scores if s[key] is not None]
        return sum(vals) / len(vals) if vals else None

    nll, n_tok = sum(x for x, _ in losses), sum(n for _, n in losses)
    loss = nll / max(n_tok, 1)
    judged = [a["judge"]["score"] for a in answers if a.get("judge") and a["judge"].get("score") is not None]
    refused = sum(bool(a.get("refused")) for a in answers)  # the version's "I don't know", no model run
    return {
        "score": mean("score"),
        "exact": mean("exact"),
        "normalised": mean("normalised"),
        "keywords": mean("keywords"),
        "rouge_l": mean("rouge_l"),
        "bleu": metrics.corpus_bleu([a["text"] for a in answers], [e.reference for e in examples]),
        "length": mean("length"),
        "stopped": mean("stopped"),
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "judge": sum(judged) / len(judged) if judged else None,
        "judged": len(judged),
        "refused": refused / len(answers) if refused else None,
    }


def evaluate(
    adapter: str,
    data: Path | None = None,
    baseline: str = "base",
    judge: Judge | None = None,
    keywords: tuple[str, ...] = (),
    max_tokens: int = 128,
    max_batch: int = 16,
    store: bool = True,
    engine: Any = None,
    progress: Callable[[int, int], None] | None = None,
    general: list[str] | None = None,
    general_include: Path | None = None,
    general_limit: int | None = None,
    quantize: Requested = "none",
) -> dict[str, Any]:
    """Evaluate `adapter` (NAME, NAME@vN, NAME@alias) against `baseline` ("base" or another version);
    with `general`, also those lm-eval tasks on both sides (eval/general.py). `quantize` answers on
    int8/int4 base weights, as `serve --quantize` would (reference losses stay unquantized)."""
    t0 = time.perf_counter()
    ref = registry.resolve(adapter)
    registry.verify(ref)
    base_ref = None if baseline in ("base", "") else registry.resolve(baseline)
    path = Path(data) if data else default_data(ref)
    examples = read_examples(path, keywords)
    if judge is not None:
        judge.check()  # an unreachable judge fails now, not after minutes of generation
    if general:
        from loraplex.eval.general import check_tasks

        check_tasks(general, general_include)  # so does an unknown lm-eval task
    from loraplex.engine.engine import Engine
    from loraplex.models.load import resolve_base

    base = resolve_base(ref.manifest().get("base_model", {}).get("id"))
    own_engine = engine is None
    engine = engine or Engine(base, max_batch=max_batch, max_loaded_adapters=2, quantize=quantize)
    try:
        sides = [ref.id, base_ref.id if base_ref else ""]
        room = engine.max_model_len - max_tokens

        def fits(msgs: list[dict[str, str]]) -> bool:
            return len(engine.encode(msgs)) <= room

        jobs = [served_prompts(side, examples, fits) for side in sides]
        # The losses from the engine when its weights are the reference's (quantized weights
        # would change them: a PEFT model then computes them, after the engine is closed).
        scoring = None
        if getattr(engine, "quantize", "none") == "none":
            scoring = [
                (
                    side,
                    encode_references(
                        engine.tokenizer, examples, [j.messages for j in side_jobs], engine.max_model_len
                    ),
                )
                for side, side_jobs in zip(sides, jobs, strict=True)
            ]
        answers = asyncio.run(answer_all(engine, jobs, max_tokens, progress, scoring))
        general_result = None
        if general:
            from loraplex.eval.general import general_ability

            models = {"adapter": ref.id, "baseline": base_ref.id if base_ref else "base"}
            general_result = general_ability(engine, models, general, general_include, general_limit)
    finally:
        if own_engine:
            engine.close()
    t_gen = time.perf_counter() - t0
    if scoring is not None:
        losses = [[a.pop("nll") for a in side] for side in answers]
    else:
        losses = reference_losses(
            base, examples, [ref.id, base_ref.id if base_ref else None], [[j.messages for j in side] for side in jobs]
        )
    for side in answers:
        for a, ex in zip(side, examples, strict=True):
            sc = metrics.score(a["text"], ex.reference, list(ex.keywords), a["finish_reason"] == "stop")
            a["scores"] = {**asdict(sc), "score": sc.score}
    if judge is not None:
        for side in answers:
            grades = asyncio.run(
                judge.grade_all([(ex.prompt, ex.reference, a["text"]) for a, ex in zip(side, examples, strict=True)])
            )
            for a, g in zip(side, grades, strict=True):
                a["judge"] = g
    rows = []
    counts = {"improved": 0, "regressed": 0, "unchanged": 0}
    for i, ex in enumerate(examples):
        a, b = answers[0][i], answers[1][i]
        for side_answer, side_loss in ((a, losses[0][i]), (b, losses[1][i])):
            side_answer["loss"] = side_loss[0] / max(side_loss[1], 1)
        diff = a["scores"]["score"] - b["scores"]["score"]
        change = "improved" if diff > CHANGE_MARGIN else "regressed" if diff < -CHANGE_MARGIN else "unchanged"
        counts[change] += 1
        rows.append(
            {
                "source": ex.source,
                "question": ex.question,
                "reference": ex.reference,
                "keywords": list(ex.keywords),
                "adapter": a,
                "baseline": b,
                "change": change,
            }
        )
    summary = {
        "adapter": _summary(answers[0], examples, losses[0]),
        "baseline": _summary(answers[1], examples, losses[1]),
    }
    # trained vs. unseen: does the adapter answer questions worded other than its training data?
    known = trained_questions(ref)
    splits = None
    if known is not None:
        splits = {}
        for split in ("trained", "unseen"):
            idx = [
                i for i, ex in enumerate(examples) if (metrics.normalise(ex.question) in known) == (split == "trained")
            ]
            for i in idx:
                rows[i]["split"] = split
            if idx:
                splits[split] = {
                    "examples": len(idx),
                    "adapter": sum(answers[0][i]["scores"]["score"] for i in idx) / len(idx),
                    "baseline": sum(answers[1][i]["scores"]["score"] for i in idx) / len(idx),
                }
    result = {
        "adapter": ref.id,
        "baseline": base_ref.id if base_ref else "base",
        "base_model": base.id,
        "data": {"path": str(path.resolve()), "sha256": sha256_file(path), "examples": len(examples)},
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "max_tokens": max_tokens,
        "quantize": getattr(engine, "quantize", "none"),
        "score": summary["adapter"]["score"],
        "summary": summary,
        "comparison": counts,
        "splits": splits,
        "retrieval": bool(ref.manifest().get("retrieval", {}).get("enabled")),
        "judge": judge.describe() if judge else None,
        "timing": {"generation_s": round(t_gen, 2), "total_s": round(time.perf_counter() - t0, 2)},
        "general": general_result,
        "examples": rows,
    }
    if store:
        result["stored_as"] = str(registry.record_eval(ref, result))
    return result
