"""One base model with (optionally) one adapter, for the terminal: `chat`, `compare`, `quickstart`.

This is the simple single-request path built on `transformers.generate`; it renders prompts with
the same chat template call as training. Batched multi-adapter serving is the engine issue's job
and does not live here.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import nullcontext
from typing import Any

import torch

from loraplex.adapters import registry
from loraplex.adapters.compat import check_compatible
from loraplex.data.tokenize import render
from loraplex.models.load import GREEDY, eos_token_ids, load_model, load_tokenizer, resolve_base


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
        self.eos = eos_token_ids(self.tok, model)

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

    def stream(
        self,
        messages: list[dict[str, str]],
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        use_adapter: bool = True,
    ) -> Iterator[str]:
        from transformers import TextIteratorStreamer

        inputs = self._inputs(messages)
        streamer = TextIteratorStreamer(self.tok, skip_prompt=True, skip_special_tokens=True)
        errors: list[BaseException] = []

        def work() -> None:
            try:
                with torch.inference_mode(), self._adapter_ctx(use_adapter):
                    self.model.generate(**inputs, **self._gen_kwargs(max_new_tokens, temperature), streamer=streamer)
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                errors.append(e)
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        yield from streamer
        thread.join()
        if errors:
            raise errors[0]
