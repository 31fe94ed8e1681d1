"""What everything that holds an engine may use of it: one interface, two implementations.

`Engine` (engine.py) runs the model in this process; `RemoteEngine` (remote.py) forwards to vLLM
over HTTP. The API, the gateway's metrics, the web app, eval and the CLI are typed against
`EngineClient`, so a third engine is a class with these members and nothing else changes.
mypy checks that both engines satisfy it (`loraplex serve` holds either as an EngineClient).

Next to the interface: the types that cross it (Delta, the two errors) and the two checks both
engines share (rendering a prompt, fitting it into the context). Nothing here batches, speaks
HTTP or loads adapters.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from loraplex.adapters.names import ModelSpec
from loraplex.data.tokenize import render
from loraplex.engine.lora import AdapterRequest
from loraplex.engine.sampling import SamplingParams, TokenLogprob
from loraplex.errors import UserError
from loraplex.models.load import BaseRef

Prompt = str | list[dict[str, Any]] | list[int]
"""Text, chat messages (rendered with the base's chat template), or token ids."""


class PromptTooLong(UserError):
    """Prompt plus max_tokens exceed the context (an OpenAI 400 `context_length_exceeded`)."""


class EngineClosed(Exception):
    """The engine is shutting down and takes no new requests (a 503)."""


@dataclass(frozen=True)
class Delta:
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...]
    finish_reason: str | None  # None while running; "stop", "length" or "abort" at the end
    prompt_tokens: int
    completion_tokens: int
    # with SamplingParams.prompt_logprobs, in the first Delta: one per prompt token, None for the
    # first (nothing predicts it)
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    cached_tokens: int = 0  # prompt tokens whose keys/values came from the prefix cache (engine/prefix_cache.py)


def encode_prompt(tokenizer: Any, prompt: Prompt) -> list[int]:
    """Messages are rendered with the base's chat template, exactly as in training."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    if prompt and isinstance(prompt[0], int):
        return list(prompt)
    text = render(tokenizer, prompt, add_generation_prompt=True)  # type: ignore[arg-type]
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def check_length(max_model_len: int, prompt_len: int, max_tokens: int | None) -> int:
    """The max_tokens to use; PromptTooLong when the request cannot fit the context. 0 is allowed:
    the prompt is only read (its logprobs, as lm-eval's loglikelihood requests ask)."""
    room = max_model_len - prompt_len
    if max_tokens is None:
        if room < 1:
            raise PromptTooLong(
                f"This model's maximum context length is {max_model_len} tokens. However, your "
                f"messages resulted in {prompt_len} tokens. Please reduce the length of the messages."
            )
        return room
    if max_tokens > room:
        raise PromptTooLong(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_len + max_tokens} tokens ({prompt_len} in the messages, {max_tokens} in the completion). "
            "Please reduce the length of the messages or completion."
        )
    return max_tokens


@dataclass(frozen=True)
class Answer:
    """A whole answer, collected from its deltas."""

    text: str
    finish_reason: str | None
    completion_tokens: int
    logprobs: tuple[TokenLogprob, ...]
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None


async def collect(stream: AsyncIterator[Delta], on_delta: Callable[[Delta], None] | None = None) -> Answer:
    """Read a `generate` stream to its end; `on_delta` sees each delta as it comes (metering)."""
    parts: list[str] = []
    logprobs: list[TokenLogprob] = []
    finish, tokens = None, 0
    prompt_logprobs = None
    async for d in stream:
        if on_delta is not None:
            on_delta(d)
        parts.append(d.text)
        logprobs.extend(d.logprobs)
        finish, tokens = d.finish_reason, d.completion_tokens
        prompt_logprobs = prompt_logprobs or d.prompt_logprobs
    return Answer("".join(parts), finish, tokens, tuple(logprobs), prompt_logprobs)


class AdapterTable(Protocol):
    """The engine's view of adapters: names -> exact versions, and what is loaded now."""

    @property
    def allowed(self) -> set[str] | None:
        """The adapter names this server serves (None: every adapter in the store)."""
        ...

    @property
    def slot_of(self) -> Mapping[str, int]:
        """Loaded adapter versions (and compositions) -> their slot."""
        ...

    def resolve(self, model: str | ModelSpec) -> AdapterRequest:
        """A `model` field (or a parsed spec) -> exact versions; InvalidModelName / ModelNotFound."""
        ...

    def describe(self) -> list[dict[str, Any]]:
        """What is loaded, for the dashboard and `/admin/adapters`."""
        ...


class EngineClient(Protocol):
    @property
    def base(self) -> BaseRef: ...
    @property
    def tokenizer(self) -> Any: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def max_model_len(self) -> int:
        """The longest prompt + answer one request may use (the KV budget may lower the model's own)."""
        ...

    @property
    def max_batch(self) -> int: ...
    @property
    def device(self) -> str: ...
    @property
    def dtype(self) -> Any: ...
    @property
    def threads(self) -> int:
        """CPU threads the model uses on this host (0: none, a GPU or a remote engine)."""
        ...

    @property
    def adapters(self) -> AdapterTable: ...
    @property
    def closing(self) -> bool:
        """Draining or closed: new requests are refused (a 503)."""
        ...

    def queue_depth(self) -> int: ...
    def running(self) -> int: ...
    def kv_cache(self) -> tuple[int, int] | None:
        """(bytes allocated now, budget) of a KV cache this engine manages; None when it does not."""
        ...

    def prefix_cache(self) -> tuple[int, int] | None:
        """(bytes held now, budget) of the prompt prefixes this engine keeps; None when it keeps none."""
        ...

    def encode(self, prompt: Prompt) -> list[int]: ...
    def check_length(self, prompt_len: int, max_tokens: int | None) -> int:
        """The tokens a request may generate; PromptTooLong when the prompt leaves no room."""
        ...

    def generate(
        self,
        prompt: Prompt,
        params: SamplingParams,
        adapter: AdapterRequest | str | None = None,
        max_tokens: int | None = None,
    ) -> AsyncIterator[Delta]:
        """Stream the answer to one prompt; the last Delta has a finish_reason."""
        ...

    def load_adapter(self, model: str, pin: bool = False) -> str: ...
    def unload_adapter(self, name: str) -> list[str]: ...
    def drain(self, timeout: float) -> None: ...
    def close(self, timeout: float = 10.0) -> None: ...
