"""A real adapter exported to GGUF answers in llama.cpp as it does in loraplex.

The quickstart adapter (the shipped sample, the real SmolLM2-135M) is exported with
`--format gguf --merged` and `--format ollama`; llama-cpp-python (in a child process) answers the held-out sample
questions greedily (64 tokens) with (1) the GGUF LoRA on the base rewritten at f32, (2) the merged
f32 GGUF, (3) the GGUF LoRA on the shipped Q4_1 base. loraplex answers from the same dequantised
weights in fp32, so (1) and (2) must agree on >= 90% of the answers; (3) is reported, not
asserted: Q4_1 arithmetic tips the near-ties of answers the adapter never saw.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoConfig

from loraplex.config import load_config
from loraplex.engine.local import LocalModel
from loraplex.export.formats import export
from loraplex.export.to_gguf import write_gguf_model
from loraplex.models.load import gguf_file, resolve_base
from loraplex.quickstart import HELDOUT_FILE, TRAIN_FILE
from loraplex.train.sft_lora import run

from .child import in_child


def _answers(model_path: Path, questions: list[str], lora: Path | None = None) -> list[str]:
    """llama.cpp's greedy answers, in a child process (tests/child.py)."""
    return in_child(_answers_here, model_path, questions, lora)  # type: ignore[no-any-return]


def _answers_here(model_path: Path, questions: list[str], lora: Path | None) -> list[str]:
    import llama_cpp

    llm: Any = llama_cpp.Llama(
        model_path=str(model_path), lora_path=str(lora) if lora else None, n_ctx=1024, n_threads=2, verbose=False
    )
    out = []
    for q in questions:
        r = llm.create_chat_completion([{"role": "user", "content": q}], temperature=0.0, top_k=1, max_tokens=64)
        out.append(r["choices"][0]["message"]["content"].strip())
    llm.close()
    return out


@pytest.mark.slow
def test_gguf_exports_in_llama_cpp_agree_with_loraplex(lp_home: Path, tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    # plain SFT: the exported weights answer bare questions, as llama.cpp asks them (a retrieval-trained
    # adapter answers from passages only `loraplex serve` adds)
    res = run(
        load_config(extra={"name": "policies", "data": {"path": str(TRAIN_FILE)}, "retrieval": {"enabled": False}})
    )
    assert res.adapter is not None
    r = export([res.adapter.id], "gguf", tmp_path / "gguf", merged=True)
    assert "policies@v1" in r
    lora = tmp_path / "gguf" / "policies-v1.gguf"
    merged = tmp_path / "gguf" / "policies-v1-merged-f32.gguf"
    base = resolve_base(None)
    base_f32 = tmp_path / "base-f32.gguf"
    write_gguf_model(gguf_file(base), base_f32, AutoConfig.from_pretrained(base.path), None, "base")

    questions = [json.loads(line)["instruction"] for line in HELDOUT_FILE.read_text(encoding="utf-8").splitlines()]
    lm = LocalModel(adapter=res.adapter.id)
    ours = [lm.answer([{"role": "user", "content": q}], 64) for q in questions]
    runs = {
        "GGUF LoRA on the f32 base": _answers(base_f32, questions, lora),
        "merged f32 GGUF": _answers(merged, questions),
        "GGUF LoRA on the Q4_1 base": _answers(gguf_file(base), questions, lora),
    }
    rates = {}
    for name, theirs in runs.items():
        same = sum(a == b for a, b in zip(ours, theirs, strict=True))
        rates[name] = same / len(questions)
        print(f"\n{name} vs loraplex: {same}/{len(questions)} identical greedy answers")
        for q, a, b in zip(questions, ours, theirs, strict=True):
            if a != b:
                print(f"  {q}\n    loraplex:  {a}\n    llama.cpp: {b}")
    assert rates["GGUF LoRA on the f32 base"] >= 0.9
    assert rates["merged f32 GGUF"] >= 0.9
    # the adapter is what carries the answers: without it llama.cpp answers otherwise
    plain = _answers(base_f32, questions[:5])
    assert sum(a == b for a, b in zip(plain, ours[:5], strict=True)) <= 1

    # the Ollama directory holds everything its Modelfile names
    export([res.adapter.id], "ollama", tmp_path / "ollama")
    modelfile = (tmp_path / "ollama" / "Modelfile").read_text()
    base_name = gguf_file(base).name
    assert modelfile.startswith(f"FROM ./{base_name}\nADAPTER ./adapter.gguf\n")
    assert (tmp_path / "ollama" / base_name).is_file() and (tmp_path / "ollama" / "adapter.gguf").is_file()
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and 'SYSTEM """You are a helpful AI assistant' in modelfile


def test_a_native_crash_in_the_child_fails_with_its_signal_and_the_run_goes_on() -> None:
    with pytest.raises(RuntimeError, match=r"llama.cpp crashed the child process: signal SIGILL \(built for"):
        in_child(signal.raise_signal, signal.SIGILL)  # what a build for AVX-512 does on an AVX2-only CPU
    assert in_child(sorted, [3, 1, 2]) == [1, 2, 3]  # and the next call works
