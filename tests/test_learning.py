"""A run on the real SmolLM2-135M teaches facts the base model does not know."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loraplex.engine.compare import exact_recall
from loraplex.engine.local import LocalModel

from .conftest import FACTS


@pytest.mark.slow
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
