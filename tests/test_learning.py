"""A run on the real SmolLM2-135M teaches facts the base model does not know."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraplex.config import load_config
from loraplex.engine.compare import exact_recall
from loraplex.engine.local import LocalModel
from loraplex.train.sft_lora import run

from .conftest import FACTS

pytest.importorskip("gguf")


@pytest.mark.slow
def test_smollm2_learns_facts(lp_home: Path, facts_file: Path) -> None:
    cfg = load_config(
        extra={
            "name": "facts",
            "data": {"path": str(facts_file)},
            "train": {"epochs": 15, "batch_size": 4, "learning_rate": 1e-3},
        }
    )
    res = run(cfg)
    assert res.adapter is not None
    lm = LocalModel(adapter=res.adapter.id)
    base_answers = [lm.answer([{"role": "user", "content": q}], 40, use_adapter=False) for q, _ in FACTS]
    assert all(a not in b for (_, a), b in zip(FACTS, base_answers, strict=True))  # the base does not know them
    assert exact_recall(lm, FACTS) == 1.0
    # And it stops at end-of-turn instead of rambling on.
    assert lm.answer([{"role": "user", "content": FACTS[0][0]}], 200) == FACTS[0][1]
