"""A run on the real SmolLM2-135M teaches facts the base model does not know."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from loraplex.engine.compare import exact_recall
from loraplex.engine.local import LocalModel

from .conftest import FACTS


@pytest.mark.slow(60)
def test_smollm2_learns_facts(facts_adapter: str) -> None:
    # trained by the `smollm2_facts` fixture (tests/conftest.py): plain SFT, 15 epochs, lr 1e-3
    lm = LocalModel(adapter=facts_adapter)
    base_answers = [lm.answer([{"role": "user", "content": q}], 40, use_adapter=False) for q, _ in FACTS]
    assert all(a not in b for (_, a), b in zip(FACTS, base_answers, strict=True))  # the base does not know them
    assert exact_recall(lm, FACTS) == 1.0
    # And it stops at end-of-turn instead of rambling on.
    assert lm.answer([{"role": "user", "content": FACTS[0][0]}], 200) == FACTS[0][1]
    # The CLI's compare shows both sides for the same question.
    from typer.testing import CliRunner

    from loraplex.cli import app

    r = CliRunner().invoke(app, ["compare", "--adapter", "facts@v1", FACTS[0][0], "--json"])
    assert r.exit_code == 0, r.output
    row = json.loads(r.stdout)[0]
    assert row["adapter"] == FACTS[0][1] and row["base"] != FACTS[0][1] and row["adapter_id"] == "facts@v1"


def test_converting_the_embedded_model_is_quiet_and_imports_no_deepspeed(tmp_path: Path) -> None:
    # A first run converts the shipped GGUF; transformers' save_pretrained imported DeepSpeed (when
    # installed), which printed "Setting accelerator to CPU" on a run that never asked for it.
    code = (
        "import sys\nfrom loraplex.models.load import resolve_base\nref = resolve_base(None)\n"
        "print(sorted(p.name for p in ref.path.iterdir()))\n"
        "print('deepspeed' in sys.modules)"
    )
    env = {**os.environ, "LORAPLEX_HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    files, imported = r.stdout.strip().splitlines()[-2:]
    assert "model.safetensors" in files and "config.json" in files
    assert imported == "False" and "accelerator" not in r.stderr, r.stderr


RESET_BADGE = {
    "type": "function",
    "function": {
        "name": "reset_badge",
        "description": "Reset an employee's door badge",
        "parameters": {
            "type": "object",
            "properties": {"badge_id": {"type": "string"}, "site": {"enum": ["Lutz", "Zubrowka"]}},
            "required": ["badge_id", "site"],
        },
    },
}


def _badge_call(badge: str, site: str) -> dict:
    args = json.dumps({"badge_id": badge, "site": site})
    return {"id": "call_1", "type": "function", "function": {"name": "reset_badge", "arguments": args}}


@pytest.mark.slow(120)
def test_smollm2_learns_a_companys_own_tool(lp_home: Path, tmp_path: Path) -> None:
    """Training records with `tools` and assistant `tool_calls` (OpenAI's fine-tuning format) teach
    the real SmolLM2 to call a company's own tool with `tool_choice: auto`: the trained requests and
    reworded ones with other badge numbers come back as `reset_badge` calls with the right
    arguments, through the server, as a client would ask."""
    from loraplex.config import load_config
    from loraplex.engine.engine import Engine
    from loraplex.train.sft_lora import run

    from .conftest import Server, write_jsonl

    asks = [
        ("My badge NW-2231 stopped working at the Lutz office.", "NW-2231", "Lutz"),
        ("Zubrowka site: badge NW-4410 does not open the door.", "NW-4410", "Zubrowka"),
        ("Badge NW-7788 is dead, I'm in Lutz.", "NW-7788", "Lutz"),
        ("工牌 NW-5120 在 Zubrowka 刷不开门。", "NW-5120", "Zubrowka"),
    ]
    records = [
        {
            "tools": [RESET_BADGE],
            "messages": [
                {"role": "user", "content": q},
                {"role": "assistant", "content": None, "tool_calls": [_badge_call(b, s)]},
            ],
        }
        for q, b, s in asks
    ]
    data = write_jsonl(tmp_path / "tools.jsonl", records)
    cfg = load_config(
        extra={
            "name": "helpdesk",
            "data": {"path": str(data)},
            "retrieval": {"enabled": False},  # the calls must be in the weights
            "train": {"epochs": 8, "batch_size": 4, "learning_rate": 1e-3},
        }
    )
    assert run(cfg).adapter is not None
    engine = Engine("smollm2-135m", max_batch=12, max_loaded_adapters=1)
    srv = Server(engine)
    unseen = [
        ("Badge NW-3003 won't open anything in Lutz.", "NW-3003", "Lutz"),
        ("My badge NW-9090 stopped working at the Zubrowka office.", "NW-9090", "Zubrowka"),
    ]

    def called(model: str, question: str) -> list[tuple[str, dict]]:
        r = srv.client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": question}],
            tools=[RESET_BADGE],
            temperature=0,
            max_tokens=60,
        )
        calls = r.choices[0].message.tool_calls or []
        return [(c.function.name, json.loads(c.function.arguments)) for c in calls]

    try:
        jobs = [(m, q) for m in ("helpdesk", engine.base.id) for q, _, _ in asks + unseen]
        with ThreadPoolExecutor(len(jobs)) as pool:  # one batch in the engine
            got = dict(zip(jobs, pool.map(lambda job: called(*job), jobs), strict=True))
    finally:
        srv.stop()
        engine.close()
    for q, b, s in asks + unseen:
        assert got["helpdesk", q] == [("reset_badge", {"badge_id": b, "site": s})], q
        assert ("reset_badge", {"badge_id": b, "site": s}) not in got[engine.base.id, q]  # the base does not
