"""The terminal's models: `EngineChat` (what `loraplex chat` answers with: the serving engine, so
a chat answers as `serve` would, quantized base and composed adapters included) and `LocalModel`
(one base plus one adapter on `transformers.generate`, an implementation independent of the engine
that learning tests check recall with).

Neither schedules or batches requests (engine.py does) nor knows about assistants' retrieval
(assistants/retrieval.py prepares the messages both receive).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import nullcontext
from typing import Any

import torch

from loraplex.adapters import registry
from loraplex.adapters.compat import check_compatible
from loraplex.data.tokenize import render
from loraplex.engine.lora import AdapterRequest
from loraplex.engine.quant import Requested
from loraplex.models.load import GREEDY, eos_token_ids, load_model, load_tokenizer, resolve_base


class EngineChat:
    """A conversation's answers from the serving engine, streamed as text: `model` is what a request's
    `model` field would say ("" the base, `hr@v2`, `hr:0.7+formal:0.3`)."""

    def __init__(self, base: str | None, model: str, quantize: Requested = "none"):
        from loraplex.adapters.names import parse
        from loraplex.engine.engine import Engine

        spec = parse(model) if model else None
        first = registry.resolve(spec.parts[0].ref) if spec and spec.parts else None
        if base is None and first is not None:
            base = first.manifest().get("base_model", {}).get("id")
        self.engine = Engine(resolve_base(base), max_batch=1, max_loaded_adapters=1, quantize=quantize)
        self.base = self.engine.base
        # the exact versions, resolved once: a version registered mid-chat does not change its model
        self.request = self.engine.adapters.resolve(model) if model else AdapterRequest()

    def stream(
        self,
        messages: list[dict[str, str]],
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        use_adapter: bool = True,
    ) -> Iterator[str]:
        from loraplex.engine.sampling import SamplingParams

        params = SamplingParams(temperature=temperature, top_p=0.95 if temperature > 0 else 1.0)
        loop = asyncio.new_event_loop()  # the engine's generate is async; the terminal reads it in turn
        deltas = self.engine.generate(messages, params, self.request if use_adapter else None, max_new_tokens)
        try:
            while True:
                try:
                    delta = loop.run_until_complete(anext(deltas))
                except StopAsyncIteration:
                    return
                yield delta.text
        finally:
            loop.run_until_complete(deltas.aclose())  # type: ignore[attr-defined]
            loop.close()

    def close(self) -> None:
        self.engine.close()


class LocalModel:
    """A base model, plus an adapter when one is named; `use_adapter=False` answers as the base."""

    def __init__(self, base: str | None = None, adapter: str | None = None):
        self.adapter = registry.resolve(adapter) if adapter else None
        if base is None and self.adapter is not None:
            base = self.adapter.manifest().get("base_model", {}).get("id")
        self.base = resolve_base(base)
        self.tok = load_tokenizer(self.base)
        model = load_model(self.base)
        if self.adapter is not None:
            from peft import PeftModel

            registry.verify(self.adapter)
            check_compatible(self.adapter, self.base)
            model = PeftModel.from_pretrained(model, str(self.adapter.path))
        self.model = model.eval()
        self.eos = eos_token_ids(self.tok, model.generation_config.eos_token_id)

    def _inputs(self, messages: list[dict[str, str]]) -> dict[str, torch.Tensor]:
        text = render(self.tok, messages, add_generation_prompt=True)
        return dict(self.tok(text, add_special_tokens=False, return_tensors="pt"))

    def _gen_kwargs(self, max_new_tokens: int, temperature: float) -> dict[str, Any]:
        kw: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "eos_token_id": self.eos,
            "pad_token_id": self.tok.pad_token_id,
        }
        if temperature > 0:
            kw.update(do_sample=True, temperature=temperature, top_p=0.95)
        else:
            kw.update(GREEDY)
        return kw

    def _adapter_ctx(self, use_adapter: bool) -> Any:
        if self.adapter is not None and not use_adapter:
            return self.model.disable_adapter()
        return nullcontext()

    @torch.inference_mode()
    def answer(
        self,
        messages: list[dict[str, str]],
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        use_adapter: bool = True,
    ) -> str:
        inputs = self._inputs(messages)
        with self._adapter_ctx(use_adapter):
            out = self.model.generate(**inputs, **self._gen_kwargs(max_new_tokens, temperature))
        return str(self.tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)).strip()
