"""Client packages people already use, unchanged, against a real server on loopback.

(The openai SDK is exercised throughout test_api.py; here are the clients with conventions of their own.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from loraplex.cli import app
from loraplex.engine import lora_kernel
from loraplex.engine.engine import Engine
from loraplex.gateway.gate import Gateway
from tests.conftest import Server, make_adapter

MC = [  # a small local multiple-choice task, in lm-eval's own YAML task format
    {"question": "The office opens at", "choices": ["nine", "midnight", "never"], "answer": 0},
    {"question": "年假有几天?", "choices": ["十五天", "三天", "一百天"], "answer": 0},
    {"question": "Expense claims are filed", "choices": ["monthly", "by fax", "in person"], "answer": 1},
    {"question": "How many days of leave do I get?", "choices": ["15", "none", "42 days"], "answer": 2},
    {"question": "Badges are collected from", "choices": ["security", "the roof"], "answer": 0},
]

TASK = """task: loraplex_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


def test_lm_eval_local_completions_multiple_choice_on_an_adapter(
    lp_home: Path, tiny_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`lm_eval --model local-completions` runs a multiple-choice task against an adapter, with a
    key scoped to it (as docs/clients.md says): it finds the server's tokenizer (/tokenizer_info,
    /tokenize), sends token-id batches with echo and logprobs, and every loglikelihood it reports
    equals the one computed from PEFT directly."""
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(lora_kernel, "load", lambda: None)  # fp32 LoRA weights: equal to PEFT's to 1e-4
    import lm_eval
    from lm_eval.tasks import TaskManager

    adapter = make_adapter(tiny_base, "legal", rank=4, seed=1)
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in MC), encoding="utf-8")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "loraplex_mc.yaml").write_text(TASK.format(data=data), encoding="utf-8")
    made = CliRunner().invoke(app, ["keys", "create", "--name", "eval", "--adapters", "legal"])
    assert made.exit_code == 0, made.output
    key = made.stdout.strip()
    monkeypatch.setenv("OPENAI_API_KEY", key)
    engine = Engine(str(tiny_base), dtype="fp32", max_batch=4)
    srv = Server(engine, Gateway(engine=engine), api_key=key)
    url = f"{srv.url}/v1/completions"
    try:
        out = lm_eval.simple_evaluate(
            model="local-completions",
            model_args=f"model=legal,base_url={url},num_concurrent=1,max_retries=1,batch_size=4,auth_token={key}",
            tasks=["loraplex_mc"],
            task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
            log_samples=True,
        )
    finally:
        srv.stop()
        srv.engine.close()
    assert out is not None
    samples = out["samples"]["loraplex_mc"]
    assert len(samples) == len(MC)

    from tests.test_engine import _peft

    peft = _peft(tiny_base, [adapter])
    peft.set_adapter(adapter)
    tok = srv.engine.tokenizer
    correct = 0
    for s in samples:
        scores = []
        for (context, continuation), resp in zip(s["arguments"], s["resps"], strict=True):
            whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
            ctx = tok(context, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(peft(input_ids=torch.tensor([whole])).logits[0].float(), dim=-1)
            expected = sum(float(logp[p - 1, whole[p]]) for p in range(len(ctx), len(whole)))
            assert float(resp[0][0]) == pytest.approx(expected, abs=1e-3), (context, continuation)
            scores.append(expected)
        correct += int(max(range(len(scores)), key=scores.__getitem__) == s["target"])
    assert out["results"]["loraplex_mc"]["acc,none"] == pytest.approx(correct / len(MC))


SCHEMA_DOC = "How many days of leave do I get, which team, and is it urgent?"


def _tiny_server(tiny_base: Path) -> Server:
    make_adapter(tiny_base, "legal", rank=4, seed=1)
    return Server(Engine(str(tiny_base), dtype="fp32", max_batch=4))


def test_langchain_with_structured_output_json_schema_and_function_calling(lp_home: Path, tiny_base: Path) -> None:
    """LangChain's `with_structured_output` in both methods: `json_schema` sends a strict
    response_format, `function_calling` a tool with tool_choice naming it; either way even a random
    model's answer parses into the pydantic class (decoding is constrained)."""
    from typing import Literal

    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class Leave(BaseModel):
        team: Literal["hr", "legal", "ops"]
        urgent: bool
        days: int = Field(ge=0, le=99)

    srv = _tiny_server(tiny_base)
    try:
        chat = ChatOpenAI(model="legal", base_url=f"{srv.url}/v1", api_key="unused", temperature=0, max_tokens=48)
        got = chat.with_structured_output(Leave, method="json_schema").invoke(SCHEMA_DOC)
        assert isinstance(got, Leave) and 0 <= got.days <= 99
        raw = chat.with_structured_output(Leave, method="json_schema", include_raw=True).invoke(SCHEMA_DOC)
        assert raw["parsing_error"] is None and raw["parsed"] == got
        assert raw["raw"].response_metadata["model_name"] == "legal@v1"
        roomy = ChatOpenAI(model="legal", base_url=f"{srv.url}/v1", api_key="unused", temperature=0, max_tokens=200)
        called = roomy.with_structured_output(Leave, method="function_calling", include_raw=True).invoke(SCHEMA_DOC)
        assert called["parsing_error"] is None and isinstance(called["parsed"], Leave), called
        assert called["raw"].tool_calls[0]["name"] == "Leave"
    finally:
        srv.stop()
        srv.engine.close()


def test_pydantic_ai_native_output_and_llm_json_object(lp_home: Path, tiny_base: Path, tmp_path: Path) -> None:
    """pydantic-ai's `NativeOutput` (response_format json_schema) returns a valid object on the first
    try; `llm -o json_object 1` (the `llm` CLI with the server in extra-openai-models.yaml) returns a
    JSON object."""
    import subprocess
    import sys
    from typing import Literal

    from pydantic import BaseModel
    from pydantic_ai import Agent, NativeOutput
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    class Ticket(BaseModel):
        team: Literal["hr", "legal", "ops"]
        urgent: bool

    srv = _tiny_server(tiny_base)
    try:
        model = OpenAIChatModel("legal", provider=OpenAIProvider(base_url=f"{srv.url}/v1", api_key="unused"))
        agent = Agent(
            model, output_type=NativeOutput(Ticket), retries=0, model_settings={"temperature": 0, "max_tokens": 32}
        )
        result = agent.run_sync(SCHEMA_DOC)
        assert isinstance(result.output, Ticket)

        home = tmp_path / "llm"
        home.mkdir()
        (home / "extra-openai-models.yaml").write_text(
            f"- model_id: loraplex-legal\n  model_name: legal\n  api_base: {srv.url}/v1\n", encoding="utf-8"
        )
        env = {**os.environ, "LLM_USER_PATH": str(home)}
        out = subprocess.run(
            [sys.executable, "-m", "llm", "-m", "loraplex-legal", "--key", "unused", "-o", "json_object", "1",
             "-o", "temperature", "0", "-o", "max_tokens", "64", "--no-log", "Reply in JSON: " + SCHEMA_DOC],
            capture_output=True, text=True, env=env, timeout=120,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        text = out.stdout.strip()
        assert text.startswith("{")
        try:
            assert isinstance(json.loads(text), dict)
        except json.JSONDecodeError:  # a random model may run out of max_tokens mid-object: still JSON so far
            assert len(srv.engine.tokenizer(text)["input_ids"]) >= 60, text
    finally:
        srv.stop()
        srv.engine.close()


def test_pydantic_ai_agent_with_a_tool_and_tool_output(lp_home: Path, tiny_base: Path) -> None:
    """A pydantic-ai Agent with a function tool and a structured output (its default ToolOutput
    mode: tools with tool_choice "required"): the server's calls are valid, so the agent runs to a
    Ticket within its request limit; every call in the history names a tool it offered, and any call
    of the function tool was executed with schema-valid arguments."""
    from typing import Literal

    from pydantic import BaseModel
    from pydantic_ai import Agent
    from pydantic_ai.messages import ToolCallPart
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider
    from pydantic_ai.usage import UsageLimits

    class Ticket(BaseModel):
        team: Literal["hr", "legal", "ops"]
        urgent: bool

    srv = _tiny_server(tiny_base)
    ran: list[str] = []
    try:
        model = OpenAIChatModel("legal", provider=OpenAIProvider(base_url=f"{srv.url}/v1", api_key="unused"))
        agent = Agent(model, output_type=Ticket, retries=0, model_settings={"temperature": 0, "max_tokens": 200})

        @agent.tool_plain
        def leave_days(employee: str) -> int:
            """Days of annual leave an employee has left."""
            ran.append(employee)
            return 15

        result = agent.run_sync(SCHEMA_DOC, usage_limits=UsageLimits(request_limit=4))
        assert isinstance(result.output, Ticket)
        parts = [p for m in result.all_messages() for p in getattr(m, "parts", []) if isinstance(p, ToolCallPart)]
        assert parts and {p.tool_name for p in parts} <= {"leave_days", "final_result"}
        assert len(ran) == sum(p.tool_name == "leave_days" for p in parts)
    finally:
        srv.stop()
        srv.engine.close()
