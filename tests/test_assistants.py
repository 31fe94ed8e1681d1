"""Assistants over real HTTP on loopback: made with the CLI, served as models through the `openai`
SDK, their system prompt, adapters and retrieved passages in the prompt, sources in the response and
the stream, the relevance threshold and refusal, keys limited to assistants, bad definitions."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import httpx
import openai
import pytest
from typer.testing import CliRunner

from loraplex.assistants import retrieval
from loraplex.assistants import store as assistants
from loraplex.cli import app
from loraplex.engine.engine import Engine
from loraplex.gateway.gate import Gateway
from tests.conftest import Server, home_env, make_adapter

SAMPLE = Path(str(resources.files("loraplex.samples") / "knowledge"))
runner = CliRunner()


@dataclass
class Env:
    srv: Server
    tokens: dict[str, str]
    home: Path
    docs: Path

    def client(self, key: str = "ops") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.srv.url}/v1", api_key=self.tokens[key], max_retries=0)

    def post(self, body: dict, key: str = "ops", path: str = "/v1/chat/completions") -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.tokens[key]}"}
        return httpx.post(f"{self.srv.url}{path}", json=body, headers=headers, timeout=60)


def invoke(*args: str) -> str:
    r = runner.invoke(app, list(args))
    assert r.exit_code == 0, r.output
    return r.stdout


@pytest.fixture(scope="module")
def env(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    with home_env(tmp_path_factory.mktemp("assistants-home")) as home:
        make_adapter(tiny_base, "hr", rank=4, seed=3)
        make_adapter(tiny_base, "formal", rank=8, targets=["q_proj", "v_proj"], seed=4)
        docs = home.parent / "docs"
        shutil.copytree(SAMPLE, docs)
        prompt = home.parent / "prompt.md"
        prompt.write_text("你是明澜科技的人事助手。Answer briefly.\n", encoding="utf-8")
        invoke(
            "assistants", "create", "hr-helper", "--adapter", "hr", "--adapter", "formal:0.3",
            "--system-file", str(prompt), "--knowledge", str(docs), "--display-name", "HR 助手",
            "--description", "holidays, pricing, travel", "--temperature", "0", "--max-tokens", "12",
        )  # fmt: skip
        invoke("assistants", "create", "strict", "--adapter", "hr", "--knowledge-base", "hr-helper", "--refuse")
        invoke("assistants", "create", "plain", "--adapter", "hr", "--system", "You are terse.")
        tokens = {}
        for args in (["--name", "ops", "--admin"], ["--name", "hr-only", "--adapters", "hr-helper"]):
            tokens[args[1]] = invoke("keys", "create", *args).strip()
        engine = Engine(str(tiny_base), dtype="fp32", max_batch=4, max_loaded_adapters=4)
        srv = Server(engine, Gateway(engine=engine, max_pending=32), api_key=tokens["ops"])
        yield Env(srv, tokens, home, docs)
        srv.stop()


def sources_of(message: object) -> list[dict]:
    extra = getattr(message, "model_extra", None) or {}
    return extra["sources"]


def test_cli_makes_shows_edits_and_refuses_bad_assistants(env: Env) -> None:
    listed = {a["name"]: a for a in json.loads(invoke("assistants", "list", "--json"))}
    assert set(listed) == {"hr-helper", "strict", "plain"}
    h = listed["hr-helper"]
    assert h["adapters"] == [{"ref": "hr", "weight": 1.0}, {"ref": "formal", "weight": 0.3}]
    assert h["system_prompt"].startswith("你是明澜科技的人事助手")
    assert h["knowledge"]["base"] == "hr-helper" and h["knowledge"]["when_nothing_found"] == "answer"
    assert h["sampling"] == {"temperature": 0.0, "top_p": None, "max_tokens": 12}
    assert listed["strict"]["knowledge"]["when_nothing_found"] == "refuse"
    assert "display_name: HR 助手" in invoke("assistants", "show", "hr-helper")

    def fails(*args: str) -> str:
        r = runner.invoke(app, list(args))
        assert r.exit_code != 0, r.output
        return str(r.exception) if r.exception and not isinstance(r.exception, SystemExit) else r.output

    assert "no adapter" in fails("assistants", "create", "x1", "--adapter", "nobody").lower()
    assert "already an adapter" in fails("assistants", "create", "hr")
    assert "exists" in fails("assistants", "create", "plain")
    assert "invalid assistant name" in fails("assistants", "create", "HR/../x")
    assert "--adapter 'hr:lots'" in fails("assistants", "create", "x2", "--adapter", "hr:lots")
    assert "not both" in fails("assistants", "create", "x3", "--system", "a", "--system-file", "b")
    assert "no knowledge base" in fails("assistants", "create", "x4", "--knowledge-base", "nope")
    assert "need a knowledge base" in fails("assistants", "create", "x5", "--refuse")
    assert "sampling.temperature" in fails("assistants", "create", "x6", "--temperature", "9")
    assert not any((env.home / "assistants").glob("x*.yaml"))  # nothing half-made

    invoke("assistants", "create", "temp", "--adapter", "hr", "--system", "one")
    invoke("assistants", "edit", "temp", "--temperature", "0.5", "--description", "changed")
    t = assistants.get("temp")
    assert (t.sampling.temperature, t.description, t.system_prompt, t.model) == (0.5, "changed", "one", "hr")
    invoke("assistants", "edit", "temp", "--no-adapters", "--knowledge-base", "hr-helper", "--top-k", "2")
    t = assistants.get("temp")
    assert t.model == "" and t.knowledge is not None and (t.knowledge.base, t.knowledge.top_k) == ("hr-helper", 2)
    assert t.sampling.temperature == 0.5  # untouched fields stay
    assert "nothing to change" in fails("assistants", "edit", "temp")
    # a hand edit with a mistake names the file, line and field
    path = env.home / "assistants" / "temp.yaml"
    path.write_text(path.read_text().replace("top_k: 2", "top_k: 99"))
    message = fails("assistants", "show", "temp")
    assert "temp.yaml:" in message and "knowledge.top_k" in message
    assert "removed assistant temp" in invoke("assistants", "rm", "temp", "--yes")
    assert not path.exists()


def test_assistant_answers_through_the_openai_sdk_with_sources(env: Env) -> None:
    c = env.client()
    models = {m.id: m.model_dump() for m in c.models.list().data}
    h = models["hr-helper"]
    assert h["kind"] == "assistant" and h["display_name"] == "HR 助手" and h["adapters"] == "hr+formal:0.3"
    assert h["knowledge"] == "hr-helper" and h["defaults"] == {"temperature": 0.0, "max_tokens": 12}
    assert models["hr"]["kind"] == "adapter"

    cases = {
        "春节放几天假？": ("holidays-2026.md", "2 月 14 日至 2 月 22 日"),
        "How much does the Pro plan cost per seat?": ("pricing.html", "268 yuan"),
    }
    for question, (document, fact) in cases.items():
        messages = [{"role": "user", "content": question}]
        r = c.chat.completions.create(model="hr-helper", messages=messages)  # no temperature/max_tokens: defaults
        assert r.model == "hr-helper"
        sources = sources_of(r.choices[0].message)
        assert sources[0]["document"] == document and fact in sources[0]["text"], sources
        assert [s["index"] for s in sources] == list(range(1, len(sources) + 1))
        assert all(s["relevance"] >= 0.3 for s in sources)
        assert r.usage.completion_tokens <= 12
        # the model saw exactly: the assistant's system prompt, the passages, the question
        prepared = retrieval.prepare(assistants.get("hr-helper"), messages, retrieval.Searcher())
        assert prepared.messages[0] == {"role": "system", "content": "你是明澜科技的人事助手。Answer briefly."}
        assert fact in prepared.messages[-1]["content"] and prepared.messages[-1]["content"].endswith(question)
        assert r.usage.prompt_tokens == len(env.srv.engine.encode(prepared.messages))
        # ... through its adapters: the same prompt sent to the composition gives the same greedy answer
        direct = c.chat.completions.create(
            model="hr+formal:0.3", messages=prepared.messages, temperature=0, max_tokens=12
        )
        assert direct.choices[0].message.content == r.choices[0].message.content
        # the stream carries the same sources in its first chunk and the same text
        chunks = list(c.chat.completions.create(model="hr-helper", messages=messages, stream=True))
        assert sources_of(chunks[0].choices[0].delta) == sources
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == r.choices[0].message.content
        # ... and each passage as Open WebUI's `source` event, which it shows as a citation
        events = [(ch.model_extra or {}).get("event") for ch in chunks if (ch.model_extra or {}).get("event")]
        assert [e["data"]["document"] for e in events] == [[s["text"]] for s in sources]
        assert all(
            e["type"] == "source" and s["document"] in e["data"]["source"]["name"]
            for e, s in zip(events, sources, strict=True)
        )
    # the request's own values win over the assistant's defaults
    long = c.chat.completions.create(
        model="hr-helper", messages=[{"role": "user", "content": "优惠码是什么？"}], max_tokens=20, temperature=0
    )
    assert long.usage.completion_tokens > 12 or long.choices[0].finish_reason == "stop"
    # a client's own system message is kept, after the assistant's
    sys_msgs = [{"role": "system", "content": "Reply in English."}, {"role": "user", "content": "客服电话多少"}]
    p = retrieval.prepare(assistants.get("hr-helper"), sys_msgs, retrieval.Searcher())
    assert p.messages[0]["content"] == "你是明澜科技的人事助手。Answer briefly.\n\nReply in English."
    assert "400-820-3721" in p.messages[-1]["content"]


def test_no_relevant_passage_answers_without_retrieval_or_refuses(env: Env) -> None:
    c = env.client()
    question = [{"role": "user", "content": "What is the capital of France?"}]
    r = c.chat.completions.create(model="hr-helper", messages=question)
    assert sources_of(r.choices[0].message) == []
    plain = [{"role": "system", "content": "你是明澜科技的人事助手。Answer briefly."}, *question]
    direct = c.chat.completions.create(model="hr+formal:0.3", messages=plain, temperature=0, max_tokens=12)
    assert r.choices[0].message.content == direct.choices[0].message.content  # no passages were added
    # the strict assistant says it does not know, in the question's language, without guessing
    refused = c.chat.completions.create(model="strict", messages=question, max_tokens=50)
    assert refused.choices[0].message.content == retrieval.REFUSAL["en"]
    assert refused.choices[0].finish_reason == "stop" and sources_of(refused.choices[0].message) == []
    zh = [{"role": "user", "content": "法国的首都是哪里？"}]
    chunks = list(c.chat.completions.create(model="strict", messages=zh, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == retrieval.REFUSAL["zh"]
    assert chunks[-1].choices[0].finish_reason == "stop"
    # ... but answers, with sources and the "say you don't know" instruction, when something is found
    found = c.chat.completions.create(model="strict", messages=[{"role": "user", "content": "国庆节哪天补班"}])
    assert sources_of(found.choices[0].message)[0]["document"] == "holidays-2026.md"
    p = retrieval.prepare(
        assistants.get("strict"), [{"role": "user", "content": "国庆节哪天补班"}], retrieval.Searcher()
    )
    assert "请直接说不知道" in p.messages[-1]["content"]
    # an assistant without knowledge has no `sources` at all
    r = c.chat.completions.create(model="plain", messages=question, max_tokens=4)
    assert "sources" not in (r.choices[0].message.model_extra or {})


def test_keys_can_be_limited_to_assistants(env: Env) -> None:
    c = env.client("hr-only")
    assert {m.id for m in c.models.list().data} == {"hr-helper"}
    ok = c.chat.completions.create(model="hr-helper", messages=[{"role": "user", "content": "春节放几天假？"}])
    assert sources_of(ok.choices[0].message)
    for model in ("hr", "strict", "hr+formal:0.3", env.srv.engine.base.id):  # as if they did not exist
        with pytest.raises(openai.NotFoundError):
            c.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2)


def test_reingest_is_seen_by_the_running_server(env: Env) -> None:
    policy = env.docs / "travel-policy.md"
    old = policy.read_text(encoding="utf-8")
    assert "450 yuan" in old
    ask = [{"role": "user", "content": "hotel allowance in Shanghai"}]
    before = sources_of(env.client().chat.completions.create(model="hr-helper", messages=ask).choices[0].message)
    assert "450 yuan" in before[0]["text"]
    try:
        policy.write_text(old.replace("450 yuan", "520 yuan"), encoding="utf-8")
        invoke("knowledge", "add", "hr-helper", str(env.docs))
        after = sources_of(env.client().chat.completions.create(model="hr-helper", messages=ask).choices[0].message)
        assert "520 yuan" in after[0]["text"] and not any("450 yuan" in s["text"] for s in after)
    finally:
        policy.write_text(old, encoding="utf-8")
        invoke("knowledge", "add", "hr-helper", str(env.docs))


def test_bad_requests_and_broken_assistants_get_openai_errors(env: Env) -> None:
    r = env.post({"model": "hr-helper", "prompt": "hi"}, path="/v1/completions")
    assert r.status_code == 400 and "use /v1/chat/completions" in r.json()["error"]["message"]
    # a hand edit breaks one assistant: it answers 500 with the reason, leaves the listing, and nothing else breaks
    path = env.home / "assistants" / "plain.yaml"
    good = path.read_text(encoding="utf-8")
    try:
        path.write_text(good.replace("adapters:", "adaptors:"), encoding="utf-8")
        r = env.post({"model": "plain", "messages": [{"role": "user", "content": "hi"}]})
        err = r.json()["error"]
        assert r.status_code == 500 and err["code"] == "assistant_misconfigured" and "plain.yaml" in err["message"]
        assert "plain" not in {m.id for m in env.client().models.list().data}
        ok = env.post({"model": "hr-helper", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert ok.status_code == 200
    finally:
        path.write_text(good, encoding="utf-8")
    assert env.post({"model": "plain", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).is_success


def test_passages_that_crowd_out_the_answer_are_dropped(env: Env) -> None:
    ask = [{"role": "user", "content": "春节放几天假？"}]
    bare = retrieval.prepare(assistants.get("hr-helper"), ask, retrieval.Searcher(), retrieval=False)
    room = env.srv.engine.max_model_len - len(env.srv.engine.encode(bare.messages))
    r = env.client().chat.completions.create(model="hr-helper", messages=ask, max_tokens=room - 2)
    assert sources_of(r.choices[0].message) == []  # no passage fits next to so long an answer
    assert r.usage.prompt_tokens == len(env.srv.engine.encode(bare.messages))


@pytest.mark.slow(70)
def test_eval_shows_what_retrieval_adds_on_smollm2(lp_home: Path) -> None:
    """The real SmolLM2 cannot know these facts; with the sample knowledge base it answers some."""
    invoke("assistants", "create", "company", "--knowledge", str(SAMPLE), "--system", "You are Mingland's assistant.")
    result = json.loads(
        invoke(
            "eval", "--assistant", "company", "--data", str(SAMPLE / "questions.jsonl"), "--max-tokens", "48", "--json"
        )
    )
    on, off = result["summary"]["with_retrieval"], result["summary"]["without_retrieval"]
    assert result["data"]["examples"] == 16 and result["retrieval"]["hit_rate"] >= 0.9
    assert off["score"] <= 0.1, off  # facts no base model can know
    assert on["score"] >= off["score"] + 0.2, (on, off)
    row = next(e for e in result["examples"] if "Pro plan" in e["question"])
    assert row["retrieval"]["rank"] == 1 and row["retrieval"]["used"][0]["document"] == "pricing.html"
    assert "268" in row["with_retrieval"]["text"]
    # the table a person reads
    table = invoke("eval", "--assistant", "company", "--data", str(SAMPLE / "questions.jsonl"), "--max-tokens", "8")
    assert "retrieval off" in table and "hit rate @4" in table
    assert "--assistant needs --data" in str(runner.invoke(app, ["eval", "--assistant", "company"]).exception)


def test_retrieval_time_is_reported_per_request_and_in_metrics(env: Env) -> None:
    r = env.post({"model": "hr-helper", "messages": [{"role": "user", "content": "春节放几天假？"}]})
    assert r.status_code == 200 and 0 < float(r.headers["x-retrieval-ms"]) < 5000
    assert "x-retrieval-ms" not in env.post({"model": "plain", "messages": [{"role": "user", "content": "hi"}]}).headers
    metrics = httpx.get(f"{env.srv.url}/metrics", headers={"Authorization": f"Bearer {env.tokens['ops']}"}).text
    count = next(
        line for line in metrics.splitlines() if line.startswith('loraplex_retrieval_seconds_count{model="hr-helper"}')
    )
    assert float(count.split()[-1]) >= 1


def test_terminal_chat_with_an_assistant(env: Env) -> None:
    """`loraplex chat --assistant` in a real subprocess: retrieval, sources, and the refusal."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "loraplex.cli", "chat", "--assistant", "strict", "--max-new-tokens", "4"],
        input="What is the capital of France?\n国庆节哪天补班？\n/exit\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    answers = [line.split("strict> ", 1)[1] for line in proc.stdout.splitlines() if "strict> " in line]
    assert answers[0] == retrieval.REFUSAL["en"] and len(answers) == 2
    assert "[1] holidays-2026.md #1" in proc.stderr
    # an assistant that composes adapters (hr + formal:0.3) chats too: the engine serves compositions
    composed = runner.invoke(app, ["chat", "--assistant", "hr-helper", "--max-new-tokens", "4"], input="hi\n/exit\n")
    assert composed.exit_code == 0, composed.output
    assert "hr-helper> " in composed.output
