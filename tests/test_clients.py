"""Client packages people already use, unchanged, against a real server on loopback.

(The openai SDK is exercised throughout test_api.py; here are the clients with conventions of their own.)
"""

from __future__ import annotations

import json
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
            task_manager=TaskManager(include_path=str(tasks)),
            log_samples=True,
        )
    finally:
        srv.stop()
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
