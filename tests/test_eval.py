"""`loraplex eval`: metrics checked against public implementations, bad input, and on the real
SmolLM2 an adapter that learned, its report rendered in Chromium, a judge on loopback, and the
promotion gate."""

from __future__ import annotations

import json
import os
import shutil
from contextlib import nullcontext
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loraplex.cli import app
from loraplex.errors import UserError
from loraplex.eval import metrics
from loraplex.eval.judge import Judge, parse_grade
from loraplex.eval.run import read_examples

from .conftest import FACTS, Server, make_adapter, write_jsonl

runner = CliRunner()
KEYWORDS = ["QX-4417", "15天", "team lead", "nine"]


# ----------------------------------------------------------------------------- metrics


def test_rouge_and_bleu_agree_with_rouge_score_and_sacrebleu() -> None:
    import sacrebleu
    from rouge_score.rouge_scorer import RougeScorer

    english = [
        ("the office opens at nine", "the office opens at nine every day"),
        ("expense claims are approved by the team lead", "claims are approved by the finance director"),
        ("nothing in common", "completely different words"),
    ]
    public = RougeScorer(["rougeL"])
    for answer, ref in english:
        assert metrics.rouge_l(answer, ref) == pytest.approx(public.score(ref, answer)["rougeL"].fmeasure)
        assert metrics.bleu(answer, ref) == pytest.approx(sacrebleu.sentence_bleu(answer, [ref]).score)
    answers, refs = zip(*english, strict=True)
    assert metrics.corpus_bleu(list(answers), list(refs)) == pytest.approx(
        sacrebleu.corpus_bleu(list(answers), [list(refs)]).score
    )

    # Chinese: rouge-score's own tokeniser keeps only [a-z0-9], so these two differ yet score 1.0;
    # character tokens give the LCS answer: 9 of the reference's 12 tokens, all 9 of the answer's.
    ref, answer = "员工每年有15天带薪年假。", "员工每年有15天年假"
    assert public.score(ref, answer)["rougeL"].fmeasure == 1.0
    p, r = 9 / 9, 9 / 12
    assert metrics.rouge_l(answer, ref) == pytest.approx(2 * p * r / (p + r))
    # Pure Chinese: sacrebleu's per-character tokeniser must agree with the zh one used here.
    for answer, ref in [("员工每年有带薪年假", "员工每年有带薪年假吗"), ("合同到期前通知", "合同期满前一个月书面通知")]:
        assert metrics.bleu(answer, ref) == pytest.approx(sacrebleu.sentence_bleu(answer, [ref], tokenize="char").score)


def test_normalised_and_keyword_match() -> None:
    assert metrics.normalise("15 天。") == metrics.normalise("15天")
    assert metrics.normalise("ＱＸ－４４１７") == "qx4417"
    s = metrics.score("The code is qx-4417.", "The Zubrowka office code is QX-4417.", ["QX 4417", "Zubrowka"], True)
    assert s.exact == 0 and s.normalised == 0 and s.keywords == 0.5 and s.score == 0.5 and s.stopped
    assert metrics.score("a", "a", [], False).score == 1.0  # no keywords: the score is ROUGE-L


def test_judge_replies_are_parsed_or_marked_unparseable() -> None:
    assert parse_grade('{"score": 4, "reason": "same facts"}') == (4, "same facts")
    assert parse_grade('Sure! ```json\n{"score": "5", "reason": "ok"}\n```') == (5, "ok")
    assert parse_grade("Score: 2. The answer misses the number.")[0] == 2
    assert parse_grade("评分：3")[0] == 3
    score, reason = parse_grade("I think the answer is fine.")
    assert score is None and reason.startswith("unparseable judge reply")


def test_reference_losses_equal_the_full_logits_reference(lp_home: Path, tiny_base: Path) -> None:
    """The fast path (the head only at scored positions, as training does) against the naive one:
    every position's logits through the model's own forward, then masked cross-entropy."""
    import torch
    import torch.nn.functional as F
    from peft import PeftModel

    from loraplex.adapters import registry
    from loraplex.data.formats import Conversation
    from loraplex.data.tokenize import IGNORE, collate, encode_all, unpacked
    from loraplex.eval.run import EvalExample, reference_losses
    from loraplex.models.load import load_model, load_tokenizer, resolve_base

    from .conftest import make_adapter

    adapter = make_adapter(tiny_base, "hr", seed=3)
    base = resolve_base(str(tiny_base))
    examples = [
        EvalExample(f"t:{i}", [{"role": "user", "content": q * (i + 1)}], a, ()) for i, (q, a) in enumerate(FACTS)
    ]
    prompts = [[ex.prompt for ex in examples]] * 2
    fast = reference_losses(base, examples, [adapter, None], prompts)

    tok = load_tokenizer(base)
    model = PeftModel.from_pretrained(load_model(base), str(registry.resolve(adapter).path)).eval()
    convs = [Conversation([*ex.prompt, {"role": "assistant", "content": ex.reference}], ex.source) for ex in examples]
    batch = collate(unpacked(encode_all(tok, convs, max_len=4096)[0]), tok.pad_token_id, packed=False)
    for side, got in zip((adapter, None), fast, strict=True):
        with torch.no_grad(), model.disable_adapter() if side is None else nullcontext():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = batch["labels"][:, 1:]
        nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")
        naive = [(float(nll[r].sum()), int((targets[r] != IGNORE).sum())) for r in range(len(examples))]
        assert [n for _, n in got] == [n for _, n in naive]
        assert [v for v, _ in got] == pytest.approx([v for v, _ in naive], rel=1e-5)


@pytest.mark.parametrize("kernel", ["off", "on"])
def test_the_engines_losses_equal_the_peft_reference_and_reuse_the_answers_prompt(
    lp_home: Path, tiny_base: Path, kernel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`loraplex eval` reads each reference with the serving engine right after its answer: the
    same (NLL, tokens) as `reference_losses` (a PEFT model, independent of the engine), for the
    adapter and the base, with the prompts' keys and values taken from the prefix cache. Exact with
    fp32 LoRA weights; with the C kernel the served LoRA weights are bf16 (engine.py), within 2e-3."""
    import asyncio

    from loraplex.engine import lora_kernel
    from loraplex.engine.engine import Engine
    from loraplex.eval.run import EvalExample, Job, answer_all, encode_references, reference_losses
    from loraplex.models.load import resolve_base

    from .conftest import make_adapter

    if kernel == "on" and lora_kernel.load() is None:
        pytest.skip("no C compiler: the engine has no bf16 LoRA path here")
    monkeypatch.setenv("LORAPLEX_LORA_KERNEL", kernel)
    lora_kernel.load.cache_clear()  # read again with this setting (and cleared again after)
    adapter = make_adapter(tiny_base, "hr", seed=3)
    base = resolve_base(str(tiny_base))
    # prompts long enough for the prefix cache (16+ tokens), of different lengths
    examples = [
        EvalExample(f"t:{i}", [{"role": "user", "content": (q + " ") * (i + 3)}], a, ())
        for i, (q, a) in enumerate(FACTS)
    ]
    prompts = [ex.prompt for ex in examples]
    engine = Engine(str(tiny_base), dtype="fp32", max_batch=4, max_loaded_adapters=1)
    try:
        sides = [adapter, ""]
        scoring = [
            (side, encode_references(engine.tokenizer, examples, prompts, engine.max_model_len)) for side in sides
        ]
        jobs = [[Job(p, side) for p in prompts] for side in sides]
        answers = asyncio.run(answer_all(engine, jobs, 8, scoring=scoring))
        reused = engine.stats.cached_prompt_tokens
        prompt_tokens = sum(len(engine.encode(p)) for p in prompts)
    finally:
        engine.close()
        lora_kernel.load.cache_clear()
    fast = [[a["nll"] for a in side] for side in answers]
    slow = reference_losses(base, examples, [adapter, None], [prompts, prompts])
    for side, got, want in zip(sides, fast, slow, strict=True):
        assert [n for _, n in got] == [n for _, n in want]
        rel = 2e-3 if side and kernel == "on" else 1e-5
        assert [v for v, _ in got] == pytest.approx([v for v, _ in want], rel=rel)
    # every reference read after its own prompt: the prompts' tokens came from the cache
    assert reused >= 2 * (prompt_tokens - 2 * len(prompts)), (reused, prompt_tokens)


# ----------------------------------------------------------------------------- bad input


def test_bad_eval_files_name_the_record(tmp_path: Path) -> None:
    no_ref = write_jsonl(tmp_path / "noref.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(UserError, match=r"noref.jsonl:1 \[messages\]: no reference answer"):
        read_examples(no_ref)
    empty = write_jsonl(
        tmp_path / "empty.jsonl",
        [{"instruction": "q1", "output": "a1"}, {"instruction": "q2", "output": "  "}],
    )
    with pytest.raises(UserError, match=r"empty.jsonl:2 \[output\]: field 'output' is empty"):
        read_examples(empty)
    mixed = write_jsonl(
        tmp_path / "mixed.jsonl",
        [{"instruction": "q", "output": "a"}, {"messages": [{"role": "user", "content": "q"}]}],
    )
    with pytest.raises(UserError, match=r"mixed.jsonl:2 \[instruction\]: missing field 'instruction'"):
        read_examples(mixed)
    with pytest.raises(UserError, match="base URL"):
        Judge("localhost:8000")


def test_unreachable_judge_and_missing_split_fail_before_generating(
    lp_home: Path, tiny_base: Path, facts_file: Path
) -> None:
    ref = make_adapter(tiny_base, "tiny")
    r = runner.invoke(app, ["eval", "--adapter", ref])
    assert r.exit_code != 0 and "no held-out eval split" in str(r.exception)
    r = runner.invoke(app, ["eval", "--adapter", ref, "--data", str(facts_file), "--judge", "http://127.0.0.1:9/v1"])
    assert r.exit_code != 0 and "judge at http://127.0.0.1:9/v1 is unreachable" in str(r.exception)
    assert not list((lp_home / "adapters" / "tiny" / "v1").glob("evals/*"))  # nothing half-stored


def test_general_ability_check_runs_lm_eval_on_both_sides_and_gates_promotion(
    lp_home: Path, tiny_base: Path, facts_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`eval --general TASK --general-include DIR` runs a local lm-eval task on the adapter and the
    base through the loopback API and stores both scores; `promote --max-general-drop` refuses a
    version that lost more than the margin, allows one within it, and refuses one never checked."""
    from tests.test_clients import MC, TASK

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in MC), encoding="utf-8")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "loraplex_mc.yaml").write_text(TASK.format(data=data), encoding="utf-8")
    ref = make_adapter(tiny_base, "tiny", rank=4, seed=1)
    args = ["eval", "--adapter", ref, "--data", str(facts_file), "--max-tokens", "4", "--json"]
    r = runner.invoke(app, [*args, "--general", "loraplex_mc", "--general-include", str(tasks)])
    assert r.exit_code == 0, r.output
    general = json.loads(r.stdout[r.stdout.index("{") :])["general"]
    row = general["tasks"]["loraplex_mc"]
    assert row["metric"] in ("acc", "acc_norm") and 0 <= row["adapter"] <= 1 and 0 <= row["baseline"] <= 1
    assert row["delta"] == pytest.approx(row["adapter"] - row["baseline"])
    drop = max(-row["delta"], 0.0)
    strict = runner.invoke(app, ["adapters", "promote", ref, "--alias", "prod", "--max-general-drop", str(drop - 0.01)])
    if drop > 0:  # this adapter lost something: a margin below that loss refuses it
        assert strict.exit_code != 0 and "more than --max-general-drop" in str(strict.exception)
    ok = runner.invoke(app, ["adapters", "promote", ref, "--alias", "prod", "--max-general-drop", str(drop + 0.01)])
    assert ok.exit_code == 0, ok.output
    unchecked = make_adapter(tiny_base, "other", rank=4, seed=2)
    r = runner.invoke(app, ["adapters", "promote", unchecked, "--max-general-drop", "0.05"])
    assert r.exit_code != 0 and "no general-ability check" in str(r.exception)
    bad = runner.invoke(app, [*args, "--general", "no_such_task", "--store"])
    assert bad.exit_code != 0 and "no task 'no_such_task'" in str(bad.exception)


# ----------------------------------------------------------------------------- the real thing


def _screenshot_dir(tmp_path: Path) -> Path:
    d = Path(os.environ.get("LORAPLEX_SCREENSHOTS") or tmp_path / "shots")
    d.mkdir(parents=True, exist_ok=True)
    return d


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")


def _render(page_path: Path, shot: Path) -> dict:
    """Open the report in headless Chromium (Debian's package, no browser download)."""
    from playwright.sync_api import sync_playwright

    assert CHROMIUM is not None
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("request", lambda req: errors.append(f"fetched {req.url}") if not req.url.startswith("file:") else None)
        page.goto(page_path.resolve().as_uri())
        page.screenshot(path=str(shot), full_page=True)
        facts = {
            "errors": errors,
            "summary_rows": page.locator("#summary tr").count(),
            "examples": page.locator("section.example").count(),
            "bars": page.locator("#bars svg").bounding_box(),
            "curves": page.locator("#curves svg").bounding_box(),
            "first_adapter_answer": page.locator("#ex-1 .adapter").inner_text(),
            "judge_prompt": page.locator("#judge-prompt").inner_text() if page.locator("#judge-prompt").count() else "",
        }
        browser.close()
    return facts


@pytest.mark.slow(180)
@needs_chromium
def test_eval_proves_learning_reports_judges_and_gates_promotion(lp_home: Path, tmp_path: Path) -> None:
    from loraplex.adapters import registry
    from loraplex.config import load_config
    from loraplex.engine.engine import Engine
    from loraplex.eval import report
    from loraplex.eval.run import evaluate
    from loraplex.train.sft_lora import run

    data = write_jsonl(
        tmp_path / "facts.jsonl",
        [{"instruction": q, "output": a, "keywords": [k]} for (q, a), k in zip(FACTS, KEYWORDS, strict=True)],
    )

    def train(epochs: int, lr: float, retrieval: bool = True, **extra: int | str) -> registry.AdapterRef:
        cfg = load_config(
            extra={
                "name": "facts",
                "data": {"path": str(data), "eval_path": str(data)},
                "retrieval": {"enabled": retrieval},
                "train": {"epochs": epochs, "batch_size": 4, "learning_rate": lr, **extra},
            }
        )
        res = run(cfg)
        assert res.adapter is not None
        return res.adapter

    # Training-time generation eval every 3 steps, early stopping on its score: the facts are
    # all answered by step 3 or 6 (the passages hold them), so one more evaluation without
    # improvement ends the run early. (The eval loss at the same steps, not after every one-step
    # epoch: a third of the run's time.)
    # (48 new tokens per answer, as the eval below: the longest answer is 34)
    v1 = train(
        40,
        1e-3,
        gen_eval_steps=3,
        eval_steps=3,
        gen_eval_max_tokens=48,
        early_stopping_metric="gen_score",
        early_stopping_patience=1,
    )
    records = [json.loads(x) for x in (Path(v1.manifest()["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    gen = [r for r in records if "gen_score" in r]
    assert [r["step"] for r in gen] == list(range(3, 3 * len(gen) + 1, 3))
    assert gen[-1]["gen_keywords"] == 1.0 and v1.manifest()["steps"] < 40

    # The eval split the run held out is the default data; the base does not know the facts.
    # (the longest answer, the Chinese one, is 34 tokens: 48 keeps "stopped" meaningful and the base's rambling short)
    r = runner.invoke(
        app, ["eval", "--adapter", "facts@v1", "--report", str(tmp_path / "report"), "--json", "--max-tokens", "48"]
    )
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    a, b = res["summary"]["adapter"], res["summary"]["baseline"]
    assert a["exact"] == 1.0 and a["keywords"] == 1.0 and a["stopped"] == 1.0 and b["keywords"] == 0.0
    assert a["loss"] < 0.2 < b["loss"] and a["perplexity"] < b["perplexity"]
    assert res["comparison"] == {"improved": 4, "regressed": 0, "unchanged": 0}
    assert [e["adapter"]["text"] for e in res["examples"]] == [ans for _, ans in FACTS]
    listed = json.loads(runner.invoke(app, ["adapters", "list", "--json"]).stdout)
    assert listed[0]["eval_score"] == 1.0
    assert registry.resolve("facts@v1").manifest()["eval"]["score"] == 1.0

    # The report, in a real browser: nothing fetched from elsewhere, plots drawn, every example.
    shots = _screenshot_dir(tmp_path)
    seen = _render(tmp_path / "report" / "index.html", shots / "eval-report.png")
    assert seen["errors"] == [] and seen["examples"] == 4 and seen["summary_rows"] >= 10
    assert seen["bars"]["width"] > 300 and seen["curves"]["width"] > 300
    assert FACTS[0][1] in seen["first_adapter_answer"]

    # A judge: another loraplex server on loopback grades every answer. SmolLM2 is a poor judge, but
    # the grade is asked for as structured output, which the server enforces: every reply parses.
    engine = Engine("smollm2-135m", max_batch=16, max_loaded_adapters=2)
    server = Server(engine)
    try:
        judged = evaluate("facts@v1", data, judge=Judge(f"{server.url}/v1"), store=False, engine=engine, max_tokens=48)
    finally:
        server.stop()
        engine.close()
    grades = [e[side]["judge"] for e in judged["examples"] for side in ("adapter", "baseline")]
    assert len(grades) == 8 and all(g["raw"] for g in grades)
    assert all(g["score"] in (1, 2, 3, 4, 5) and len(g["reason"]) <= 200 for g in grades), grades
    assert engine.stats.requests >= 16  # 8 answers generated + 8 gradings, all through the server's engine
    page = report.write(judged, tmp_path / "judged")
    assert "Reply with JSON only" in _render(page, shots / "eval-report-judge.png")["judge_prompt"]

    # Promotion: v1 (evaluated) goes to prod; an undertrained v2 scores worse on the same data
    # and is refused, until --force, which is recorded.
    assert runner.invoke(app, ["adapters", "promote", "facts@v1", "--require-eval"]).exit_code == 0
    v2 = train(1, 1e-4, retrieval=False)  # with retrieval even one step copies the answers from the passages
    r = runner.invoke(app, ["adapters", "promote", v2.id, "--require-eval"])
    assert r.exit_code != 0 and "has no evaluation" in str(r.exception)
    r = runner.invoke(
        app, ["eval", "--adapter", v2.id, "--data", str(data), "--baseline", "facts@v1", "--json", "--max-tokens", "48"]
    )
    assert r.exit_code == 0, r.output
    res2 = json.loads(r.stdout)
    assert res2["baseline"] == "facts@v1" and res2["comparison"]["regressed"] >= 1
    r = runner.invoke(app, ["adapters", "promote", v2.id])
    assert r.exit_code != 0 and "worse than facts@v1" in str(r.exception)
    r = runner.invoke(app, ["adapters", "promote", v2.id, "--min-score", "0.99"])
    assert r.exit_code != 0 and "below --min-score" in str(r.exception)
    assert registry.aliases_of("facts") == {"prod": 1}
    r = runner.invoke(app, ["adapters", "promote", v2.id, "--force"])
    assert r.exit_code == 0, r.output
    assert registry.aliases_of("facts") == {"prod": 2}
    trail = registry.promotions("facts")
    assert [(t["to_version"], t["forced"]) for t in trail] == [(1, False), (2, True)]
    assert "worse than facts@v1" in trail[-1]["problems"][0]


def test_gen_score_early_stopping_needs_gen_eval_steps(tmp_path: Path) -> None:
    from loraplex.config import load_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: x\ntrain:\n  early_stopping_patience: 2\n  early_stopping_metric: gen_score\n")
    with pytest.raises(UserError, match=r"c.yaml:4.*gen_eval_steps > 0"):
        load_config(cfg)
    cfg.write_text("name: x\ntrain:\n  gen_eval_steps: 5\n  early_stopping_metric: gen_score\n")
    assert load_config(cfg).train.early_stopping_metric == "gen_score"


def test_the_loopback_server_for_lm_eval_leaves_the_process_logging_alone(tiny_base: Path, lp_home: Path) -> None:
    """`eval --general` serves the engine in this process; uvicorn's default logging config would
    close every logging handler of the process (absl's closed pytest's stderr that way)."""
    import logging

    import httpx

    from loraplex.engine.engine import Engine
    from loraplex.eval.general import _loopback

    class Recording(logging.Handler):
        closed = False

        def emit(self, record: logging.LogRecord) -> None:
            pass

        def close(self) -> None:
            self.closed = True
            super().close()

    handler = Recording()
    logging.getLogger("a.library").addHandler(handler)
    engine = Engine(str(tiny_base), dtype="fp32", max_batch=2, max_loaded_adapters=1)
    try:
        with _loopback(engine) as url:
            r = httpx.post(url, json={"model": engine.base.id, "prompt": "hello", "max_tokens": 2}, timeout=60)
            assert r.status_code == 200, r.text
        assert not handler.closed
    finally:
        engine.close()
        logging.getLogger("a.library").removeHandler(handler)
