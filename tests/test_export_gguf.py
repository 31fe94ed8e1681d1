"""A real adapter exported to GGUF answers in llama.cpp as it does in loraplex.

An adapter of the real SmolLM2-135M (the session's `smollm2_facts`: plain SFT, so the facts are in
the weights) is exported with `--format gguf --merged` and `--format ollama`; llama-cpp-python (in a
child process) answers its four trained questions and the shipped sample's 20 held-out questions
greedily (48 tokens: the longest trained answer is 34; held-out answers are compared over their
first 48, a quarter less of llama.cpp's time than 64) with (1) the GGUF LoRA on the base rewritten
at f32, (2) the merged f32 GGUF, (3) the GGUF LoRA on the shipped Q4_1 base, as Ollama runs it.
loraplex's engine answers (as `loraplex serve` does) from the same dequantised weights in fp32, so
(1) and (2) must agree on >= 90% of the answers. (3) is asked the trained questions only and must
state the trained facts: on the held-out ones Q4_1 arithmetic tips near-tied tokens (14 of 20
agreed when measured, 2026-11), which says nothing about the export and cost a third of this test.
"""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoConfig

from loraplex.engine.engine import Engine
from loraplex.engine.protocol import collect
from loraplex.engine.sampling import GREEDY
from loraplex.export.formats import export
from loraplex.export.to_gguf import write_gguf_model
from loraplex.models.load import gguf_file, resolve_base
from loraplex.quickstart import HELDOUT_FILE

from .child import in_child
from .conftest import FACTS

TOKENS = 48  # per answer, both sides


def _answers(model_path: Path, questions: list[str], lora: Path | None = None) -> list[str]:
    """llama.cpp's greedy answers, in a child process (tests/child.py)."""
    return in_child(_answers_here, model_path, questions, lora)  # type: ignore[no-any-return]


def _answers_here(model_path: Path, questions: list[str], lora: Path | None) -> list[str]:
    import llama_cpp

    from loraplex import threads

    llm: Any = llama_cpp.Llama(
        model_path=str(model_path),
        lora_path=str(lora) if lora else None,
        n_ctx=1024,
        n_threads=threads.budget() or threads.cores(),  # one under `pytest -n 2` (tests/conftest.py)
        verbose=False,
    )
    out = []
    for q in questions:
        r = llm.create_chat_completion([{"role": "user", "content": q}], temperature=0.0, top_k=1, max_tokens=TOKENS)
        out.append(r["choices"][0]["message"]["content"].strip())
    llm.close()
    return out


def _same(ours: str, theirs: str) -> bool:
    """The same greedy answer. Bytes that are not whole UTF-8 characters (a byte token out of place,
    a character cut by max_tokens) are rendered differently by each side: transformers writes U+FFFD,
    llama.cpp drops them or finishes the cut character; the characters they do render must agree."""
    a, b = ours.replace("\ufffd", ""), theirs.replace("\ufffd", "")
    return a == b or (abs(len(a) - len(b)) <= 1 and (a.startswith(b) or b.startswith(a)))


def _served(questions: list[str], adapter: str) -> list[str]:
    """loraplex's greedy answers as `loraplex serve` gives them (the engine, batched), in fp32."""
    engine = Engine("smollm2-135m", dtype="fp32", max_batch=len(questions), max_loaded_adapters=1)

    async def one(q: str) -> str:
        answer = await collect(
            engine.generate(engine.encode([{"role": "user", "content": q}]), GREEDY, adapter, TOKENS)
        )
        return answer.text.strip()

    async def every() -> list[str]:
        return list(await asyncio.gather(*(one(q) for q in questions)))

    try:
        return asyncio.run(every())
    finally:
        engine.close()


@pytest.mark.slow(140)
def test_gguf_exports_in_llama_cpp_agree_with_loraplex(facts_adapter: str, tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    r = export([facts_adapter], "gguf", tmp_path / "gguf", merged=True)
    assert "facts@v1" in r
    lora = tmp_path / "gguf" / "facts-v1.gguf"
    merged = tmp_path / "gguf" / "facts-v1-merged-f32.gguf"
    base = resolve_base(None)
    base_f32 = tmp_path / "base-f32.gguf"
    write_gguf_model(gguf_file(base), base_f32, AutoConfig.from_pretrained(base.path), None, "base")

    heldout = [json.loads(line)["instruction"] for line in HELDOUT_FILE.read_text(encoding="utf-8").splitlines()]
    questions = [q for q, _ in FACTS] + heldout
    ours = _served(questions, facts_adapter)
    runs = {
        "GGUF LoRA on the f32 base": _answers(base_f32, questions, lora),
        "merged f32 GGUF": _answers(merged, questions),
    }
    rates = {}
    for name, theirs in runs.items():
        same = sum(_same(a, b) for a, b in zip(ours, theirs, strict=True))
        rates[name] = same / len(questions)
        print(f"\n{name} vs loraplex: {same}/{len(questions)} identical greedy answers")
        for q, a, b in zip(questions, ours, theirs, strict=True):
            if not _same(a, b):
                print(f"  {q}\n    loraplex:  {a}\n    llama.cpp: {b}")
    assert rates["GGUF LoRA on the f32 base"] >= 0.9
    assert rates["merged f32 GGUF"] >= 0.9
    # the adapter is what carries the answers: it states the facts, and without it llama.cpp does not
    assert ours[: len(FACTS)] == [a for _, a in FACTS]
    plain = _answers(base_f32, questions[: len(FACTS)])
    assert all(a not in b for (_, a), b in zip(FACTS, plain, strict=True))
    # and on the shipped Q4_1 base, as `ollama run` would use the export, it still states them
    quantized = _answers(gguf_file(base), questions[: len(FACTS)], lora)
    assert all(a in b for (_, a), b in zip(FACTS, quantized, strict=True)), quantized

    # the Ollama directory holds everything its Modelfile names
    export([facts_adapter], "ollama", tmp_path / "ollama")
    modelfile = (tmp_path / "ollama" / "Modelfile").read_text()
    base_name = gguf_file(base).name
    assert modelfile.startswith(f"FROM ./{base_name}\nADAPTER ./adapter.gguf\n")
    assert (tmp_path / "ollama" / base_name).is_file() and (tmp_path / "ollama" / "adapter.gguf").is_file()
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and 'SYSTEM """You are a helpful AI assistant' in modelfile


def test_a_native_crash_in_the_child_fails_with_its_signal_and_the_run_goes_on() -> None:
    with pytest.raises(RuntimeError, match=r"llama.cpp crashed the child process: signal SIGILL \(built for"):
        in_child(signal.raise_signal, signal.SIGILL)  # what a build for AVX-512 does on an AVX2-only CPU
    assert in_child(sorted, [3, 1, 2]) == [1, 2, 3]  # and the next call works
