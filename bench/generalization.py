"""Does an assistant answer questions asked in other words? Plain LoRA SFT vs. each lever vs. the
default, trained and answered side by side in one run, on the default CPU model.

    python bench/generalization.py [--sets sample,large] [--variants plain,noisy-refusals,paraphrase,k4,default]

Each variant is `loraplex train` (the recipe, in process) on the set's training file with its
settings, registered in a throw-away store, then answered greedily through the built-in engine
the way `loraplex serve` answers a request for it (assistants/faq.py: passages found in the
version's own Q&A, the base model when nothing relevant is found):

  plain      retrieval.enabled=false: plain LoRA SFT, 16 epochs (what loraplex did before)
  noisy-refusals  the default plus "I don't know" examples on half the records (the refusal lever)
  paraphrase the default plus 3 paraphrases per question written by the base model itself (the
             paraphrase lever with the only teacher this CPU has; a bigger teacher is one URL away)
  no-noisy   the default without its noisy copy of each question (typo, dropped word, lower case),
             4 epochs (the same steps): the default before 2026-12-07
  k2, k4, k6 the default with 2, 4 or 6 passages per prompt (more recall, longer prompts)
  epochs8    the default trained 8 epochs instead of 2
  multilingual-only  the default without the English encoder (retrieval.english_encoder=false):
             passages ranked by the multilingual encoder alone, as before it
  no-spelling  the default without typo correction (retrieval.spelling=false): the question
             searched as typed, as before knowledge/spelling.py
  no-bilingual  the default without translating mixed Chinese/English questions
             (retrieval.bilingual=false), as before knowledge/bilingual.py
  default    the default: retrieval-augmented training and serving, 1 passage per prompt, each
             question and one noisy copy of it, 2 epochs,
             "I don't know" to a question whose best passage is only about its organisation
             (retrieval.refuse_below); every variant that refuses is also answered never refusing
             (the same adapter, as versions trained before the setting are served), side by side

Sets (training phrasing never equals a test phrasing; check_no_leak() asserts it):
  sample  the shipped quickstart data (20 facts, en/zh): trained questions, held-out paraphrases
          (samples/company_policies_heldout.jsonl), bench/data/sample_unanswerable.jsonl
  large   bench/data/faq_large/: 100+ facts of fictional organisations (en/zh), one phrasing each
          for training, 3+ unseen phrasings per fact, 30+ unanswerable questions
  check   bench/data/faq_check/: 48 facts of six more organisations (en/zh), two unseen phrasings
          each, 12 unanswerable questions; written after every retrieval setting was chosen on the
          sets above, and never used to choose one: how the defaults do on data they were not
          tuned on (not in the default --sets)
  long    bench/data/faq_long/: 16 facts of two more organisations (en/zh) whose answers run to
          several sentences (50-70 words, 80-110 characters), two unseen phrasings each asking for a
          fact anywhere in the answer, often its last, 6 unanswerable questions; answers may take 192
          new tokens (64 elsewhere); written after every setting was chosen (not in the default --sets)

  single  the same 100 facts as ten FAQs of one organisation each (an assistant per company, the
          usual case), each trained on its own; the unseen phrasings asked as written and with the
          organisation's name taken out ("how much vacation do I get?"), as its own employees or
          customers ask, and answered both with the off-topic gate (assistants/faq.py) and without
          it (as versions trained before it are served). No TTFT for this set.

All sets share bench/data/general.jsonl (50 questions unrelated to any FAQ).

Reported per set and variant: key-fact accuracy on unseen phrasings and on the trained questions
(every keyword of the fact in the answer), refusals on unanswerable questions ("I don't know" or
equivalent), leakage (answers to the general questions naming one of the FAQ's organisations or
one of its facts that the base model's own answer to that question lacks), training wall time,
and time to first token with and without retrieval: up to 60 unseen questions, one request at a
time, each asked bare and then as served, on an engine that has answered the trained questions
first (its prefix cache holds their instructions and passages, as a running server's does), and on
one with the prefix cache off; "retrieval adds" is the median of the per-question differences.
Those engines hold the base weights `loraplex serve` holds by default (`--quantize auto`: int4 on
a CPU; before 2026-12-07 they were unquantized, what `eval` scores with and the answers here still are).
The CPU model and flags are printed with the table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
DATA = HERE / "data"
REFUSED = re.compile(
    r"don'?t know|do not know|not sure|no information|cannot answer|不知道|不清楚|没有.{0,6}(信息|内容|资料)"
)

VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {"retrieval": {"enabled": False}},
    "noisy-refusals": {"retrieval": {"refusals": 0.5}},
    "paraphrase": {"paraphrase": {"count": 3}},
    "k2": {"retrieval": {"top_k": 2}},
    "k4": {"retrieval": {"top_k": 4}},
    "k6": {"retrieval": {"top_k": 6}},
    "no-noisy": {"retrieval": {"noisy_copies": 0}},
    "default": {},
    "epochs8": {"train": {"epochs": 8}},
    "multilingual-only": {"retrieval": {"english_encoder": False}},
    "no-spelling": {"retrieval": {"spelling": False}},
    "no-bilingual": {"retrieval": {"bilingual": False}},
}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_sets(name: str) -> list[dict[str, Any]]:
    """`name`'s set, or for "single" one set per organisation of faq_large (docstring)."""
    if name != "single":
        return [load_set(name)]
    large = load_set("large")
    tmp = Path(tempfile.mkdtemp(prefix="loraplex-bench-single-"))
    out = []
    for org in large["orgs"]:
        full = org_name(org, large["train"])
        train = [r for r in large["train"] if full in r["instruction"]]
        questions = {r["instruction"] for r in train}
        path = tmp / f"{len(out):02d}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in train), encoding="utf-8")
        unseen = [u for u in large["unseen"] if u["trained_question"] in questions]
        out.append(
            {
                **large,
                "name": f"single/{len(out):02d}",
                "train_file": path,
                "train": train,
                "trained": [t for t in large["trained"] if t["instruction"] in questions],
                "unseen": unseen,
                "unseen_noname": [{**u, "instruction": without_org(u["instruction"], full)} for u in unseen],
                "unanswerable": [q for q in large["unanswerable"] if org in q["instruction"]],
                "orgs": [org],
            }
        )
    return out


def org_name(prefix: str, train: list[dict[str, Any]]) -> str:
    """The whole name an organisation's training questions use ("Northwind" -> "Northwind Robotics")."""
    tail = r"(?:\s[A-Z][a-z]+)*" if prefix.isascii() else r"[\u4e00-\u9fff]{2}"
    for r in train:
        m = re.search(re.escape(prefix) + tail, r["instruction"])
        if m:
            return m.group(0)
    raise ValueError(f"no training question names {prefix}")


def without_org(question: str, name: str) -> str:
    """The question as its organisation's own people ask it: without the organisation's name (and
    the preposition or possessive that attached it)."""
    q = re.sub(r"(?:\s(?:at|in|of|with|for|from|by|to))?\s*" + re.escape(name) + r"(?:'s|’s)?(?:\s*的)?", " ", question)
    return re.sub(r"\s+([?？!,.])", r"\1", re.sub(r"\s+", " ", q)).strip(" ,")


# new tokens an answer may take: the long set's answers run to ~100 tokens, its facts to their end
ANSWER_TOKENS = {"long": 192}


def load_set(name: str) -> dict[str, Any]:
    from loraplex.quickstart import HELDOUT_FILE, TRAIN_FILE

    if name == "sample":
        train = read_jsonl(TRAIN_FILE)
        unseen = read_jsonl(HELDOUT_FILE)
        unanswerable = read_jsonl(DATA / "sample_unanswerable.jsonl")
        train_file = TRAIN_FILE
        orgs = ["Brightwave", "明澜"]
    else:
        root = DATA / f"faq_{name}"
        train_file = root / "train.jsonl"
        train = read_jsonl(train_file)
        unseen = read_jsonl(root / "unseen.jsonl")
        unanswerable = read_jsonl(root / "unanswerable.jsonl")
        orgs = json.loads((root / "organisations.json").read_text(encoding="utf-8"))
    keywords_of = {}
    for u in unseen:
        keywords_of.setdefault(u["trained_question"], u["keywords"])
    trained = [{"instruction": r["instruction"], "keywords": keywords_of[r["instruction"]]} for r in train]
    return {
        "name": name,
        "train_file": train_file,
        "train": train,
        "trained": trained,
        "unseen": unseen,
        "unanswerable": unanswerable,
        "general": read_jsonl(DATA / "general.jsonl"),
        "orgs": orgs,
        "answer_tokens": ANSWER_TOKENS.get(name, 64),
    }


def check_no_leak(s: dict[str, Any]) -> None:
    """No test phrasing is a training phrasing (the held-out questions never reach training)."""
    trained = {r["instruction"].strip().lower() for r in s["train"]}
    for group in ("unseen", "unseen_noname", "unanswerable", "general"):
        same = [q["instruction"] for q in s.get(group, []) if q["instruction"].strip().lower() in trained]
        assert not same, f"{s['name']}: {group} questions also in training: {same[:3]}"
    missing = [
        u["trained_question"]
        for u in s["unseen"]
        if u["trained_question"] not in {r["instruction"] for r in s["train"]}
    ]
    assert not missing, f"{s['name']}: unseen questions point at facts not in training: {missing[:3]}"


def hit(answer: str, keywords: list[str]) -> bool:
    a = answer.lower()
    return all(k.lower() in a for k in keywords)


def answer(engine: Any, model: str, questions: list[str], max_tokens: int = 64) -> list[dict[str, Any]]:
    """Greedy answers, batched, with the prompts `loraplex serve` builds for `model` (eval/run.py)."""
    from loraplex.eval.run import EvalExample, answer_all, served_prompts

    examples = [EvalExample("", [{"role": "user", "content": q}], "", ()) for q in questions]
    t = time.perf_counter()
    jobs = served_prompts(model, examples)
    took = (time.perf_counter() - t) / max(len(questions), 1)  # retrieval per question (search, render)
    (got,) = asyncio.run(answer_all(engine, [jobs], max_tokens))
    return [
        {
            "text": a["text"],
            "passages": bool(model) and job.model == model and job.refusal is None and job.messages != ex.prompt,
            "refused": job.refusal is not None,
            "retrieval_s": took,
        }
        for a, job, ex in zip(got, jobs, examples, strict=True)
    ]


async def ttft(engine: Any, model: str, questions: list[str], retrieve: bool) -> list[tuple[float, float | None]]:
    """Seconds to the first token per question, one request at a time: the adapter on the bare
    question, then (`retrieve`) the request as served, search and passages included. Paired, so
    that the machine's drift between requests (2x on this VM) falls on both alike."""
    from loraplex.assistants import faq, retrieval
    from loraplex.engine.sampling import SamplingParams

    helper = faq.assistant(model) if retrieve else None
    searcher = retrieval.Searcher()

    async def first_token(messages: list[dict[str, str]], target: str, t: float) -> float:
        async for _ in engine.generate(messages, SamplingParams(temperature=0.0), target, max_tokens=1):
            break
        return time.perf_counter() - t

    out: list[tuple[float, float | None]] = []
    for q in questions:
        bare = await first_token([{"role": "user", "content": q}], model, time.perf_counter())
        served = None
        if helper is not None:
            t = time.perf_counter()
            p = retrieval.prepare(helper, [{"role": "user", "content": q}], searcher)
            served = await first_token(p.messages, "" if p.base_only else model, t)
        out.append((bare, served))
    searcher.close()
    return out


def train(s: dict[str, Any], variant: str, seed: int) -> tuple[str, float, dict[str, Any]]:
    from rich.console import Console

    from loraplex.config import load_config
    from loraplex.train.sft_lora import run

    extra: dict[str, Any] = {
        "name": f"{s['name'].replace('/', '-')}-{variant}-s{seed}",
        "data": {"path": str(s["train_file"])},
        "train": {"seed": seed, **VARIANTS[variant].get("train", {})},
        **{k: v for k, v in VARIANTS[variant].items() if k != "train"},
    }
    cfg = load_config(extra=extra)
    t = time.perf_counter()
    result = run(cfg, resume="never", console=Console(stderr=True))
    assert result.adapter is not None
    return result.adapter.id, time.perf_counter() - t, result.adapter.manifest().get("retrieval", {})


def score(s: dict[str, Any], answers: dict[str, list[dict[str, Any]]], base_general: list[str]) -> dict[str, Any]:
    """Each measure as a share, and as (count, out of) under "counts" (the single set adds its
    organisations' counts up)."""
    facts = {k.lower() for u in s["unseen"] for k in u["keywords"] if len(k) >= 3}
    orgs = [o.lower() for o in s["orgs"]]

    def leaked(text: str, base_text: str) -> bool:
        t, b = text.lower(), base_text.lower()
        return any(o in t for o in orgs) or any(f in t and f not in b for f in facts)

    def right(group: str, asked: str) -> tuple[int, int]:
        return sum(hit(a["text"], q["keywords"]) for a, q in zip(answers[group], s[asked], strict=True)), len(s[asked])

    def leaks(group: str) -> tuple[int, int]:
        return sum(leaked(a["text"], b) for a, b in zip(answers[group], base_general, strict=True)), len(base_general)

    counts = {
        "trained": right("trained", "trained"),
        "unseen": right("unseen", "unseen"),
        "refused": (sum(bool(REFUSED.search(a["text"])) for a in answers["unanswerable"]), len(s["unanswerable"])),
        "leakage": leaks("general"),
        "general_with_passages": (sum(a["passages"] for a in answers["general"]), len(s["general"])),
    }
    if "unseen_noname" in answers:
        counts["unseen_noname"] = right("unseen_noname", "unseen_noname")
    if "unseen_refusal_off" in answers:
        counts["unseen_refusal_off"] = right("unseen_refusal_off", "unseen")
        counts["refused_refusal_off"] = (
            sum(bool(REFUSED.search(a["text"])) for a in answers["unanswerable_refusal_off"]),
            len(s["unanswerable"]),
        )
    if "unseen_noname_refusal_off" in answers:
        counts["unseen_noname_refusal_off"] = right("unseen_noname_refusal_off", "unseen_noname")
    if "unseen_noname_gate_off" in answers:
        counts["unseen_noname_gate_off"] = right("unseen_noname_gate_off", "unseen_noname")
        counts["leakage_gate_off"] = leaks("general_gate_off")
    return {**{k: a / max(b, 1) for k, (a, b) in counts.items()}, "counts": counts}


@contextlib.contextmanager
def gate_off() -> Iterator[None]:
    """Serve without the off-topic gate, as versions trained before it are (faq.Index)."""
    from loraplex.assistants import faq

    init = faq.Index.__init__

    def without_gate(self: Any, pairs: list[Any], offtopic: bool = False, **kwargs: Any) -> None:
        init(self, pairs, offtopic=False, **kwargs)

    faq.Index.__init__ = without_gate  # type: ignore[method-assign]
    try:
        yield
    finally:
        faq.Index.__init__ = init  # type: ignore[method-assign]


@contextlib.contextmanager
def refusal_off() -> Iterator[None]:
    """Serve without `retrieval.refuse_below`, as versions trained before it are (faq.assistant)."""
    from loraplex.assistants import faq

    original = faq.assistant

    def never_refusing(model: str) -> Any:
        a = original(model)
        if a is None or a.knowledge is None:
            return a
        return a.model_copy(update={"knowledge": a.knowledge.model_copy(update={"min_topic": None})})

    faq.assistant = never_refusing  # type: ignore[assignment]
    try:
        yield
    finally:
        faq.assistant = original


def time_first_tokens(engines: dict[str, Any], s: dict[str, Any], ref: str, retrieval: bool) -> dict[str, Any]:
    """TTFT medians per engine (prefix cache on / off), each warmed with the trained questions."""
    probe = [q["instruction"] for q in s["unseen"][:60]]
    ms: dict[str, float | None] = {}
    for kind, eng in engines.items():
        answer(eng, ref, [q["instruction"] for q in s["trained"]])
        pairs = asyncio.run(ttft(eng, ref, probe, retrieval))
        ms[f"ttft_{kind}"] = round(statistics.median(b for b, _ in pairs) * 1e3, 1)
        served = [(b, w) for b, w in pairs if w is not None]
        ms[f"ttft_retrieval_{kind}"] = round(statistics.median(w for _, w in served) * 1e3, 1) if served else None
        # what retrieval adds: the median of the per-question differences
        ms[f"adds_{kind}"] = round(statistics.median(w - b for b, w in served) * 1e3, 1) if served else None
    return ms


def timing_engines(quantize: str) -> dict[str, Any]:
    """As a server that has answered the FAQ's own questions (its prefix cache holds their
    instructions and passages) meets questions worded anew; and with the prefix cache off. Base
    weights as `serve --quantize` (auto, what `loraplex serve` runs: int4 on a CPU)."""
    from loraplex.engine import quant
    from loraplex.engine.engine import Engine

    q = quant.mode(quantize)
    return {
        "cache": Engine(max_batch=16, max_loaded_adapters=4, quantize=q),
        "off": Engine(max_batch=16, max_loaded_adapters=4, prefix_cache_bytes=0, quantize=q),
    }


def timing_only(sets: list[str], variants: list[str], seeds: int, quantize: str) -> None:
    from loraplex.adapters import registry

    rows = []
    for set_name in sets:
        s = load_set(set_name)
        engines = timing_engines(quantize)
        try:
            for variant in variants:
                for seed in range(42, 42 + seeds):
                    ref = registry.resolve(f"{s['name']}-{variant}-s{seed}")
                    info = ref.manifest().get("retrieval", {})
                    ms = time_first_tokens(engines, s, ref.id, bool(info.get("enabled")))
                    rows.append({"set": set_name, "variant": variant, "seed": seed, **ms})
                    print(json.dumps(rows[-1]), flush=True)
        finally:
            for eng in engines.values():
                eng.close()
    print(f"\nCPU: {cpu()}; torch threads {__import__('torch').get_num_threads()}; TTFT base weights {quantize}")
    print("| set | variant | TTFT ms | with retrieval | retrieval adds | prefix cache off: TTFT / with retrieval |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['set']} | {r['variant']} | {r['ttft_cache']} | {r['ttft_retrieval_cache'] or '-'} | "
            f"{adds(r['adds_cache'])} | {r['ttft_off']} / {r['ttft_retrieval_off'] or '-'} ({adds(r['adds_off'])}) |"
        )


def run_set(s: dict[str, Any], variants: list[str], seeds: int, quantize: str) -> list[dict[str, Any]]:
    """Train every variant on one set, answer its questions, time first tokens: its rows."""
    from loraplex.engine.engine import Engine

    check_no_leak(s)
    trained_models = []
    for variant in variants:
        for seed in range(42, 42 + seeds):
            ref, wall, info = train(s, variant, seed)
            trained_models.append((variant, seed, ref, wall, info))
    single = s["name"].startswith("single/")
    tokens = s["answer_tokens"]
    engine = Engine(max_batch=16, max_loaded_adapters=4)
    timing = {} if single else timing_engines(quantize)  # TTFT on engines of their own
    rows = []
    try:
        base_general = [a["text"] for a in answer(engine, "", [q["instruction"] for q in s["general"]], tokens)]
        for variant, seed, ref, wall, info in trained_models:
            groups = ["trained", "unseen", "unanswerable", "general"] + (["unseen_noname"] if single else [])
            answers = {g: answer(engine, ref, [q["instruction"] for q in s[g]], tokens) for g in groups}
            if info.get("refuse_below") is not None:  # the same adapter and answers, never refusing
                with refusal_off():
                    for g in ("unseen", "unanswerable") + (("unseen_noname",) if single else ()):
                        answers[f"{g}_refusal_off"] = answer(engine, ref, [q["instruction"] for q in s[g]], tokens)
            if single and info.get("enabled"):
                with gate_off():
                    for g in ("unseen_noname", "general"):
                        answers[f"{g}_gate_off"] = answer(engine, ref, [q["instruction"] for q in s[g]], tokens)
            sc = score(s, answers, base_general)
            ms = time_first_tokens(timing, s, ref, bool(info.get("enabled"))) if timing else {}
            retrieval_ms = [a["retrieval_s"] * 1e3 for a in answers["unseen"] if a["retrieval_s"]]
            row = {
                "set": s["name"],
                "variant": variant,
                "seed": seed,
                "adapter": ref,
                **sc,
                "train_s": round(wall, 1),
                **ms,
                "retrieval_step_ms": round(statistics.median(retrieval_ms), 2) if retrieval_ms else None,
                "examples": info,
                "answers": {
                    g: [{"q": q["instruction"], "a": a["text"]} for q, a in zip(s[g], answers[g], strict=True)]
                    for g in groups
                },
            }
            rows.append(row)
            print(json.dumps(row, ensure_ascii=False), flush=True)
    finally:
        engine.close()
        for eng in timing.values():
            eng.close()
    return rows


def combined(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per set and variant: the single set's organisations added up (counts summed,
    training time summed), other sets' rows as they are."""
    out: dict[tuple[str, str, int], dict[str, Any]] = {}
    for r in rows:
        key = (r["set"].split("/")[0], r["variant"], r["seed"])
        if key not in out:
            out[key] = {**r, "set": key[0], "counts": {k: list(v) for k, v in r["counts"].items()}}
            continue
        acc = out[key]
        acc["train_s"] += r["train_s"]
        for k, (a, b) in r["counts"].items():
            acc["counts"][k][0] += a
            acc["counts"][k][1] += b
        acc.update({k: a / max(b, 1) for k, (a, b) in acc["counts"].items()})
    return list(out.values())


def pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def print_table(head: list[str], rows: list[list[str]]) -> None:
    print("\n| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for cells in rows:
        print("| " + " | ".join(cells) + " |")


def adds(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:+.0f} ms"


def cpu() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    isa = [f for f in flags if f.startswith(("avx", "amx", "fma"))]
    line = f"{fields.get('Model name', '?').strip()}, {os.cpu_count()} cores; {' '.join(isa)}"
    held = os.environ.get("LORAPLEX_CPU_ISA", "native")
    if held != "native":  # loraplex and PyTorch run as on a CPU with fewer instructions (cpu_isa.py)
        import torch

        capability = torch.backends.cpu.get_cpu_capability()
        line += f"; HELD TO {held.upper()} (LORAPLEX_CPU_ISA; PyTorch's kernels: {capability})"
    return line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="sample,large")
    ap.add_argument("--variants", default="plain,noisy-refusals,paraphrase,k4,default")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument(
        "--quantize",
        default="auto",
        help="base weights of the engines that time the first token, as `serve --quantize` (default auto, "
        "what `loraplex serve` runs: int4 on a CPU); answers are scored unquantized, as `eval` scores them",
    )
    ap.add_argument(
        "--timing-only",
        metavar="HOME",
        help="only time the first token again, for the adapters an earlier run trained into this LORAPLEX_HOME",
    )
    args = ap.parse_args()
    if args.timing_only:
        os.environ["LORAPLEX_HOME"] = args.timing_only
        return timing_only(args.sets.split(","), args.variants.split(","), args.seeds, args.quantize)
    os.environ.setdefault("LORAPLEX_HOME", tempfile.mkdtemp(prefix="loraplex-bench-gen-"))
    rows = []
    for set_name in args.sets.split(","):
        for s in load_sets(set_name):
            rows += run_set(s, args.variants.split(","), args.seeds, args.quantize)

    print(f"\nCPU: {cpu()}; torch threads {__import__('torch').get_num_threads()}; TTFT base weights {args.quantize}")
    head = "set | variant | unseen | trained | refused (unanswerable) | leakage (general) | train s | TTFT ms"
    print(
        f"| {head} | TTFT ms with retrieval | retrieval adds | prefix cache off: TTFT / with retrieval "
        "| retrieval step ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    table = combined(rows)
    plain = {r["set"]: r["train_s"] for r in table if r["variant"] == "plain"}
    for r in table:
        ratio = f" ({r['train_s'] / plain[r['set']]:.2f}x)" if r["set"] in plain and r["variant"] != "plain" else ""
        print(
            f"| {r['set']} | {r['variant']} | {r['unseen']:.0%} | {r['trained']:.0%} | {r['refused']:.0%} | "
            f"{r['leakage']:.0%} | {r['train_s']:.0f}{ratio} | {r.get('ttft_cache') or '-'} | "
            f"{r.get('ttft_retrieval_cache') or '-'} | {adds(r.get('adds_cache'))} | "
            f"{r.get('ttft_off') or '-'} / {r.get('ttft_retrieval_off') or '-'} ({adds(r.get('adds_off'))}) | "
            f"{r.get('retrieval_step_ms') or '-'} |"
        )
    refusing = [r for r in table if "unseen_refusal_off" in r]
    if refusing:
        print_table(
            ["set", "variant", "unseen", "refused (unanswerable)", "never refusing: unseen", "refused"]
            + ["name left out: unseen", "never refusing"],
            [
                [r["set"], r["variant"], pct(r["unseen"]), pct(r["refused"]), pct(r["unseen_refusal_off"])]
                + [pct(r["refused_refusal_off"]), pct(r.get("unseen_noname")), pct(r.get("unseen_noname_refusal_off"))]
                for r in refusing
            ],
        )
    noname = [r for r in table if "unseen_noname" in r]
    if noname:
        print_table(
            ["set", "variant", "unseen, as written", "unseen, name left out", "the same without the off-topic gate"]
            + ["leakage", "leakage without the gate"],
            [
                [
                    r["set"],
                    r["variant"],
                    pct(r["unseen"]),
                    pct(r["unseen_noname"]),
                    pct(r.get("unseen_noname_gate_off")),
                ]
                + [pct(r["leakage"]), pct(r.get("leakage_gate_off"))]
                for r in noname
            ],
        )
    if args.json:
        args.json.write_text(json.dumps(rows, ensure_ascii=False, indent=1))


if __name__ == "__main__":
    main()
