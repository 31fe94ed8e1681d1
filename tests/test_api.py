"""The OpenAI-compatible API over real HTTP on loopback, with the official `openai` SDK as the client."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from loraplex.adapters import registry
from loraplex.engine.engine import Engine
from tests.conftest import Server, home_env, make_adapter

USER = [{"role": "user", "content": "How many days of leave do I get?"}]


@pytest.fixture(scope="module")
def server(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with home_env(tmp_path_factory.mktemp("api-home")):
        make_adapter(tiny_base, "legal", rank=4, seed=1)
        make_adapter(tiny_base, "formal", rank=8, targets=["q_proj", "v_proj"], seed=2)
        srv = Server(Engine(str(tiny_base), dtype="fp32", max_batch=4, max_loaded_adapters=3))
        yield srv
        srv.stop()


def test_models_lists_base_and_adapters(server: Server) -> None:
    models = {m.id: m for m in server.client.models.list().data}
    base = server.engine.base.id
    assert base in models
    legal = models["legal"].model_dump()
    assert legal["parent"] == base and legal["root"] == "legal@v1" and legal["version"] == 1
    assert legal["description"] == "random test adapter legal"


def test_models_retrieve_one_model_a_version_or_a_404(server: Server) -> None:
    """The openai SDK's `models.retrieve` (GET /v1/models/{id}), as clients check a model exists."""
    c = server.client
    base = server.engine.base.id
    assert c.models.retrieve(base).id == base
    legal = c.models.retrieve("legal")
    assert legal.id == "legal" and legal.model_dump()["root"] == "legal@v1"
    v1 = c.models.retrieve("legal@v1").model_dump()
    assert v1["id"] == "legal@v1" and v1["version"] == 1 and v1["kind"] == "adapter"
    for missing in ("nope", "legal@v99", "legal/../formal"):
        with pytest.raises(openai.NotFoundError) as e:
            c.models.retrieve(missing)
        assert e.value.body["code"] == "model_not_found" and repr(missing) in e.value.body["message"]


def test_embeddings_from_the_openai_sdk_in_both_encodings(server: Server) -> None:
    """POST /v1/embeddings with the built-in multilingual encoder: the SDK's default (base64) and
    float give the same unit vectors; a question and its translation are nearer than another topic."""
    import numpy as np

    c = server.client
    texts = [
        "How many days of annual leave do employees get?",
        "员工每年有多少天年假？",
        "The canteen serves lunch at noon.",
    ]
    r = c.embeddings.create(model="multilingual", input=texts)  # the SDK asks for base64 and decodes it
    v = np.array([d.embedding for d in r.data])
    assert v.shape == (3, 512) and [d.index for d in r.data] == [0, 1, 2]
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-4)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2
    plain = c.embeddings.create(model="multilingual", input=texts[0], encoding_format="float")
    np.testing.assert_allclose(plain.data[0].embedding, v[0], atol=1e-6)
    assert r.usage.prompt_tokens == r.usage.total_tokens > plain.usage.prompt_tokens > 2
    assert c.models.retrieve("multilingual").model_dump()["kind"] == "embedding"
    with pytest.raises(openai.NotFoundError, match="the embedding model here is 'multilingual'"):
        c.embeddings.create(model="legal", input="hi")
    with pytest.raises(openai.BadRequestError, match="check_embedding_ctx_length=False"):
        c.embeddings.create(model="multilingual", input=[[9906, 1917]])  # tiktoken ids, as LangChain sends
    with pytest.raises(openai.BadRequestError, match="512 dimensions"):
        c.embeddings.create(model="multilingual", input="hi", dimensions=256)
    with pytest.raises(openai.BadRequestError, match=r"input\[1\] is empty"):
        c.embeddings.create(model="multilingual", input=["hi", ""])


def test_stream_and_non_stream_agree_and_name_the_version(server: Server) -> None:
    c = server.client
    full = c.chat.completions.create(model="legal", messages=USER, temperature=0, max_tokens=20)
    assert full.model == "legal@v1"
    assert full.choices[0].finish_reason in ("stop", "length")
    chunks = list(
        c.chat.completions.create(
            model="legal",
            messages=USER,
            temperature=0,
            max_tokens=20,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert all(ch.model == "legal@v1" for ch in chunks)
    base = c.chat.completions.create(model=server.engine.base.id, messages=USER, temperature=0, max_tokens=20)
    assert base.choices[0].message.content != full.choices[0].message.content


def test_usage_counts_match_the_tokenizer(server: Server) -> None:
    r = server.client.chat.completions.create(
        model="formal", messages=USER, temperature=0, max_tokens=12, logprobs=True, top_logprobs=3
    )
    tok = server.engine.tokenizer
    rendered = tok.apply_chat_template(USER, tokenize=False, add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(tok(rendered, add_special_tokens=False)["input_ids"])
    content = r.choices[0].logprobs.content
    assert r.usage.completion_tokens == len(content)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)
    # greedy: the chosen token is the most likely one
    assert all(abs(t.logprob - t.top_logprobs[0].logprob) < 1e-5 for t in content)


def test_a_repeated_system_prompt_is_read_from_the_prefix_cache(server: Server) -> None:
    """The second request with the same system prompt reuses its keys (OpenAI's
    usage.prompt_tokens_details.cached_tokens, streamed and not), and says so in /metrics."""
    c = server.client
    system = {"role": "system", "content": "You answer for Brightwave's HR team, briefly and politely. " * 4}
    first = c.chat.completions.create(
        model="formal", messages=[system, {"role": "user", "content": "When is payday?"}], temperature=0, max_tokens=4
    )
    again = c.chat.completions.create(
        model="formal",
        messages=[system, {"role": "user", "content": "Who approves leave?"}],
        temperature=0,
        max_tokens=4,
    )
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens_details is None or first.usage.prompt_tokens_details.cached_tokens < cached
    assert 40 < cached < again.usage.prompt_tokens
    chunks = list(
        c.chat.completions.create(
            model="formal",
            messages=[system, {"role": "user", "content": "Who approves leave?"}],
            temperature=0,
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1
    other = c.chat.completions.create(  # another adapter computes its own keys
        model="legal", messages=[system, {"role": "user", "content": "When is payday?"}], temperature=0, max_tokens=4
    )
    assert other.usage.prompt_tokens_details is None
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'kind="cached_prompt"' in metrics


def test_stop_strings_cut_exactly(server: Server) -> None:
    c = server.client
    text = (
        c.completions.create(model="legal", prompt="The office opens at", temperature=0, max_tokens=30).choices[0].text
    )
    assert len(text) > 6
    stop = text[3:6]
    cut = c.completions.create(model="legal", prompt="The office opens at", temperature=0, max_tokens=30, stop=[stop])
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = c.completions.create(
        model="legal", prompt="The office opens at", temperature=0, max_tokens=30, stop=stop, stream=True
    )
    assert "".join(ch.choices[0].text for ch in streamed) == text[: text.index(stop)]


def test_seed_reproduces_and_n(server: Server) -> None:
    c = server.client
    kw = dict(model="legal", messages=USER, temperature=1.0, top_p=0.9, max_tokens=16)
    a = c.chat.completions.create(seed=7, **kw)
    b = c.chat.completions.create(seed=7, **kw)
    assert a.choices[0].message.content == b.choices[0].message.content
    many = c.chat.completions.create(seed=7, n=3, **kw)
    assert [ch.index for ch in many.choices] == [0, 1, 2]
    assert many.choices[0].message.content == a.choices[0].message.content  # choice i uses seed + i
    others = {c.chat.completions.create(seed=s, **kw).choices[0].message.content for s in range(8, 12)}
    assert len(others) > 1  # different seeds, different samples


def test_async_client_concurrent_mixed_adapters(server: Server) -> None:
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)

    async def one(model: str) -> str:
        r = await client.chat.completions.create(model=model, messages=USER, temperature=0, max_tokens=16)
        return r.choices[0].message.content or ""

    async def main() -> list[str]:
        return await asyncio.gather(*[one(m) for m in ["legal", "formal", "legal+formal", "legal:0.5+legal:0.5"]])

    legal, formal, both, halves = asyncio.run(main())
    alone = server.client.chat.completions.create(model="legal", messages=USER, temperature=0, max_tokens=16)
    assert legal == alone.choices[0].message.content == halves
    assert len({legal, formal, both}) == 3


def test_client_disconnect_frees_the_row(server: Server) -> None:
    engine = server.engine
    cancelled = engine.stats.cancelled
    with httpx.stream(
        "POST",
        f"{server.url}/v1/chat/completions",
        json={
            "model": "legal",
            "messages": USER,
            "max_tokens": 400,
            "stream": True,
            "temperature": 0.8,
            "stop_token_ids": [],
        },
        timeout=30,
    ) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
    deadline = time.time() + 10
    while (engine.stats.cancelled == cancelled or engine.in_flight) and time.time() < deadline:
        time.sleep(0.05)
    assert engine.stats.cancelled == cancelled + 1
    assert engine.in_flight == 0
    ok = server.client.chat.completions.create(model="legal", messages=USER, max_tokens=4)
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_hot_reload_during_traffic_fails_nothing(server: Server, tiny_base: Path) -> None:
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)

    async def one() -> str:
        stream = await client.chat.completions.create(
            model="formal", messages=USER, temperature=0, max_tokens=40, stream=True
        )
        models = [ch.model async for ch in stream]
        return models[-1]

    async def main() -> list[str]:
        tasks = [asyncio.create_task(one()) for _ in range(6)]
        await asyncio.sleep(0.05)
        new = await asyncio.to_thread(make_adapter, tiny_base, "formal", 8, ["q_proj", "v_proj"], 3)
        async with httpx.AsyncClient() as h:
            r = await h.post(f"{server.url}/v1/load_lora_adapter", json={"lora_name": new})
            assert r.status_code == 200, r.text
            r = await h.post(f"{server.url}/v1/unload_lora_adapter", json={"lora_name": "formal"})
            assert r.status_code == 200, r.text
        tasks += [asyncio.create_task(one()) for _ in range(2)]
        return await asyncio.gather(*tasks)

    served = asyncio.run(main())
    assert set(served) <= {"formal@v1", "formal@v2"}
    assert served[-1] == "formal@v2"
    assert registry.resolve("formal").id == "formal@v2"


def test_alias_moves_are_seen_without_a_restart(server: Server, tiny_base: Path) -> None:
    c = server.client
    if len(registry.versions("legal")) < 2:
        make_adapter(tiny_base, "legal", rank=4, seed=5)
    registry.tag("legal@v1", "prod")
    ask = {"messages": USER, "temperature": 0, "max_tokens": 8}
    assert c.chat.completions.create(model="legal@prod", **ask).model == "legal@v1"
    ids = {m.id: m.model_dump() for m in c.models.list().data}
    assert ids["legal@prod"]["root"] == "legal@v1" and ids["legal"]["aliases"] == {"prod": "legal@v1"}
    registry.tag("legal@v2", "prod")
    assert c.chat.completions.create(model="legal@prod", **ask).model == "legal@v2"
    registry.rollback("legal", "prod")
    assert c.chat.completions.create(model="legal@prod", **ask).model == "legal@v1"
    with pytest.raises(openai.NotFoundError, match="no alias 'staging'"):
        c.chat.completions.create(model="legal@staging", **ask)


def _error(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
    return body["error"]


def test_errors_use_openai_shape_and_server_keeps_serving(server: Server) -> None:
    c = server.client
    with pytest.raises(openai.NotFoundError) as nf:
        c.chat.completions.create(model="nope", messages=USER)
    assert nf.value.code == "model_not_found"
    for bad in ["../../etc/passwd", "legal/../../x", "Legal"]:
        with pytest.raises(openai.BadRequestError):
            c.chat.completions.create(model=bad, messages=USER)
    with pytest.raises(openai.BadRequestError) as functions:  # the deprecated form of tools
        c.chat.completions.create(
            model="legal", messages=USER, functions=[{"name": "f", "parameters": {"type": "object"}}]
        )
    assert "function calling is not supported" in functions.value.message
    with pytest.raises(openai.BadRequestError) as long:
        c.chat.completions.create(model="legal", messages=USER, max_tokens=100_000)
    assert long.value.code == "context_length_exceeded" and "maximum context length" in long.value.message

    url = f"{server.url}/v1/chat/completions"
    cases = {
        "malformed json": dict(
            content=b'{"model": "legal", "messages": [', headers={"content-type": "application/json"}
        ),
        "invalid utf-8": dict(
            content=b'{"model": "legal", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
            headers={"content-type": "application/json"},
        ),
        "wrong type": dict(json={"model": "legal", "messages": "hi"}),
        "negative max_tokens": dict(json={"model": "legal", "messages": USER, "max_tokens": -5}),
        "absurd n": dict(json={"model": "legal", "messages": USER, "n": 1000}),
        "empty messages": dict(json={"model": "legal", "messages": []}),
        "unknown role": dict(json={"model": "legal", "messages": [{"role": "wizard", "content": "x"}]}),
        "temperature": dict(json={"model": "legal", "messages": USER, "temperature": 5}),
        "unknown field": dict(json={"model": "legal", "messages": USER, "frobnicate": 1}),
        "image part": dict(
            json={
                "model": "legal",
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}],
            }
        ),
    }
    for name, kw in cases.items():
        r = httpx.post(url, timeout=30, **kw)
        assert r.status_code == 400, (name, r.status_code, r.text)
        assert _error(r)["message"], name
    r = httpx.post(url, json={"model": "legal", "messages": USER, "frobnicate": 1}, timeout=30)
    assert _error(r)["param"] == "frobnicate"
    assert httpx.get(f"{server.url}/v1/nothing", timeout=30).status_code == 404
    assert httpx.get(f"{server.url}/health", timeout=30).json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/ready", timeout=30).status_code == 200
    ok = c.chat.completions.create(model="legal", messages=USER, max_tokens=4)
    assert ok.choices[0].message.content is not None


def test_text_that_is_not_unicode_is_a_400_naming_the_field(server: Server) -> None:
    """JSON can escape half of a UTF-16 pair alone; such a string reached the tokenizer and gave a
    500. Every route refuses it, naming the field; a whole pair, or the same characters escaped
    as text, still work."""

    def post(path: str, raw: str) -> httpx.Response:
        """`raw` JSON as written: a JSON encoder would refuse these strings."""
        method = "PUT" if path.startswith("/ui/") else "POST"
        headers = {"content-type": "application/json"}
        return httpx.request(method, f"{server.url}{path}", content=raw.encode(), headers=headers, timeout=30)

    lone = {
        "/v1/chat/completions": (
            '{"model":"legal","messages":[{"role":"user","content":"a\\ud800b"}]}',
            "messages.0.content",
        ),
        "/v1/completions": ('{"model":"legal","prompt":["ok","\\udc00"],"max_tokens":2}', "prompt.1"),
        "/v1/feedback": ('{"request_id":"x","rating":1,"comment":"\\udfff"}', "comment"),
        "/ui/api/conversations/c1": ('{"title":"\\ud83d","messages":[]}', "title"),
    }
    for path, (raw, field) in lone.items():
        r = post(path, raw)
        assert r.status_code == 400, (path, r.status_code, r.text)
        err = _error(r)
        assert err["param"] == field and "surrogate" in err["message"], (path, err)
    keyed = post(
        "/v1/chat/completions",
        '{"model":"legal","messages":[{"role":"user","content":"x"}],"logit_bias":{"\\ud800":1}}',
    )
    assert keyed.status_code == 400 and _error(keyed)["param"] == "logit_bias.\\ud800"
    pair = post(
        "/v1/chat/completions",
        '{"model":"legal","messages":[{"role":"user","content":"\\ud83d\\ude00"}],"max_tokens":2}',
    )
    assert pair.status_code == 200, pair.text  # 😀, written as a surrogate pair
    escaped = post(
        "/v1/chat/completions", '{"model":"legal","messages":[{"role":"user","content":"\\\\ud800"}],"max_tokens":2}'
    )
    assert escaped.status_code == 200, escaped.text  # a backslash, then "ud800"
    assert httpx.get(f"{server.url}/health", timeout=30).json() == {"status": "ok"}


def test_a_request_that_fails_in_the_model_fails_alone_over_http(tiny_base: Path, lp_home: Path) -> None:
    """Through the API with the openai SDK: requests to an adapter whose weights overflow get
    OpenAI-shaped errors (streamed and not), the requests sent with them get the answers they
    get alone, and the server keeps serving."""
    from concurrent.futures import ThreadPoolExecutor

    make_adapter(tiny_base, "good", rank=4, seed=1)
    make_adapter(tiny_base, "broken", rank=4, seed=2, fill_b=float("inf"))
    srv = Server(Engine(str(tiny_base), dtype="fp32", max_batch=8, max_loaded_adapters=2))
    c = srv.client
    base = srv.engine.base.id

    def ask(model: str, top_p: float = 1.0) -> str:
        temp = 1.0 if top_p < 1.0 else 0.0
        r = c.chat.completions.create(model=model, messages=USER, temperature=temp, top_p=top_p, max_tokens=16)
        return r.choices[0].message.content or ""

    def ask_stream(model: str) -> str:
        parts = []
        for chunk in c.chat.completions.create(model=model, messages=USER, temperature=0, max_tokens=16, stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
        return "".join(parts)

    def outcome(fn: object, *args: object) -> str | Exception:
        try:
            return fn(*args)  # type: ignore[operator,no-any-return]
        except Exception as e:  # noqa: BLE001 - the outcome under test
            return e

    try:
        alone = {m: ask(m) for m in ("good", base)}
        calls = [(ask, "good"), (ask, base), (ask_stream, "good"), (ask, base), (ask, "broken"), (ask_stream, "broken")]
        calls.append((lambda m: ask(m, top_p=5e-324), "good"))  # once a 500 for the whole batch
        with ThreadPoolExecutor(len(calls)) as pool:
            got = list(pool.map(lambda fc: outcome(*fc), calls))
        assert got[:4] == [alone["good"], alone[base], alone["good"], alone[base]]
        assert got[6] == alone["good"]  # only the most likely token survives a tiny top_p: greedy
        plain, streamed = got[4], got[5]
        assert isinstance(plain, openai.InternalServerError), plain
        assert plain.body["type"] == "server_error" and "non-finite logits" in plain.body["message"]  # type: ignore[index]
        assert isinstance(streamed, openai.APIError) and "non-finite logits" in str(streamed), streamed
        assert httpx.get(srv.url + "/health").status_code == 200
        assert ask("good") == alone["good"]
    finally:
        srv.stop()
        srv.engine.close()


def test_echo_prompt_logprobs_and_batched_prompts_as_lm_eval_sends_them(server: Server) -> None:
    """lm-eval's loglikelihood requests: token-id prompts in a batch, `echo`, `logprobs: 1`,
    `max_tokens` 0 or 1. Each choice answers its own prompt (index prompt * n + i), echoes it with
    its logprobs (none for the first token), and scores the same whatever else is in the batch."""
    c = server.client
    tok = server.engine.tokenizer
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in ("The office opens at nine", "年假有几天", "Hi")]
    batch = c.completions.create(model="legal", prompt=ids, max_tokens=0, echo=True, logprobs=1, temperature=0)
    assert [ch.index for ch in batch.choices] == [0, 1, 2]
    assert batch.usage.prompt_tokens == sum(map(len, ids)) and batch.usage.completion_tokens == 0
    for ch, p in zip(batch.choices, ids, strict=True):
        lp = ch.logprobs
        assert ch.text == tok.decode(p) and ch.finish_reason == "length"
        assert lp.tokens == [tok.decode([t]) for t in p]
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert all(x <= 0 for x in lp.token_logprobs[1:])
        assert all(
            len(top) == 1 and max(top.values()) >= x
            for top, x in zip(lp.top_logprobs[1:], lp.token_logprobs[1:], strict=True)
        )
        assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(p))]
        # alone, with one answer token: the prompt scores the same; the answer token follows the prompt
        one = c.completions.create(model="legal", prompt=p, max_tokens=1, echo=True, logprobs=1, temperature=0)
        got = one.choices[0].logprobs
        assert len(got.tokens) == len(p) + 1 and one.usage.completion_tokens == 1
        assert got.token_logprobs[0] is None
        assert got.token_logprobs[1:-1] == pytest.approx(lp.token_logprobs[1:], abs=1e-4)
        plain = c.completions.create(model="legal", prompt=p, max_tokens=1, logprobs=1, temperature=0)
        assert one.choices[0].text == ch.text + plain.choices[0].text
        assert got.token_logprobs[-1] == pytest.approx(plain.choices[0].logprobs.token_logprobs[0], abs=1e-4)
    # several text prompts and n: choice prompt * n + i; streaming echoes each prompt once, first
    texts = ["The office opens at", "Expense claims are"]
    r = c.completions.create(model="formal", prompt=texts, n=2, max_tokens=4, echo=True, temperature=0)
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3]
    assert all(ch.text.startswith(texts[ch.index // 2]) for ch in r.choices)
    chunks = list(
        c.completions.create(model="formal", prompt=texts, n=2, max_tokens=4, echo=True, temperature=0, stream=True)
    )
    joined = {
        i: "".join(ch.choices[0].text for ch in chunks if ch.choices and ch.choices[0].index == i) for i in range(4)
    }
    assert joined == {ch.index: ch.text for ch in r.choices}
    # what is refused, and says why
    with pytest.raises(openai.UnprocessableEntityError, match=r"asks for 80 answers \(5 prompt\(s\) x n=16\)"):
        c.completions.create(model="legal", prompt=[[5, 6]] * 5, n=16, max_tokens=1)  # more than it ever runs at once
    with pytest.raises(openai.UnprocessableEntityError, match="max_tokens 0 needs echo"):
        c.completions.create(model="legal", prompt="Hi", max_tokens=0)
    with pytest.raises(openai.BadRequestError, match=r"prompt\[1\]: token ids must be within the vocabulary"):
        c.completions.create(model="legal", prompt=[[5, 6], [10**6]], max_tokens=1)


def test_tokenize_detokenize_and_tokenizer_info_as_vllm_serves_them(server: Server) -> None:
    """The endpoints lm-eval's remote tokenizer (and other vLLM clients) use."""
    tok = server.engine.tokenizer
    with httpx.Client(base_url=server.url, timeout=30) as h:
        info = h.get("/tokenizer_info").json()
        assert info["eos_token"] == tok.eos_token and info["model_max_length"] == server.engine.max_model_len
        assert info["chat_template"] == tok.chat_template
        r = h.post("/tokenize", json={"prompt": "年假有几天 today", "add_special_tokens": False}).json()
        assert r["tokens"] == tok("年假有几天 today", add_special_tokens=False)["input_ids"]
        assert r["count"] == len(r["tokens"])
        assert h.post("/detokenize", json={"tokens": r["tokens"]}).json()["prompt"] == "年假有几天 today"
        chat = h.post("/tokenize", json={"messages": USER, "model": "legal"}).json()
        assert chat["tokens"] == server.engine.encode(USER)
        bad = h.post("/detokenize", json={"tokens": [10**7]})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
        assert h.post("/tokenize", json={"prompt": "x", "model": "nope"}).status_code == 404
        assert h.post("/tokenize", json={}).status_code == 400


LEAVE = {
    "type": "object",
    "properties": {
        "team": {"enum": ["hr", "legal", "ops"]},
        "urgent": {"type": "boolean"},
        "days": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["team", "urgent", "days"],
    "additionalProperties": False,
}


def test_response_format_json_schema_and_object_in_a_mixed_batch(server: Server) -> None:
    """json_schema and json_object rows decode in one batch with free-text rows and other adapters:
    every constrained answer is JSON that follows its schema and ends with "stop"; the free rows'
    answers are those they get alone; a stream gives the same text; a schema that cannot be
    enforced is a 422 naming response_format."""
    import json

    c = server.client
    fmt = {"type": "json_schema", "json_schema": {"name": "leave", "schema": LEAVE, "strict": True}}
    alone = {
        m: c.chat.completions.create(model=m, messages=USER, temperature=0, max_tokens=16).choices[0].message.content
        for m in ("legal", "formal")
    }

    async def batch() -> list:
        ac = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        jobs = [
            ac.chat.completions.create(model="legal", messages=USER, temperature=0, max_tokens=40, response_format=fmt),
            ac.chat.completions.create(model="formal", messages=USER, temperature=0, max_tokens=16),
            ac.chat.completions.create(
                model="formal", messages=USER, temperature=0.9, seed=3, max_tokens=40, response_format=fmt
            ),
            ac.chat.completions.create(model="legal", messages=USER, temperature=0, max_tokens=16),
            ac.chat.completions.create(
                model="legal", messages=USER, temperature=0, max_tokens=60, response_format={"type": "json_object"}
            ),
        ]
        return await asyncio.gather(*jobs)

    got = asyncio.run(batch())
    for r in (got[0], got[2]):
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        data = json.loads(r.choices[0].message.content)
        assert set(data) == {"team", "urgent", "days"} and data["team"] in ("hr", "legal", "ops")
        assert isinstance(data["urgent"], bool) and isinstance(data["days"], int) and 0 <= data["days"] <= 99
    assert got[1].choices[0].message.content == alone["formal"] and got[3].choices[0].message.content == alone["legal"]
    obj = got[4].choices[0]
    if obj.finish_reason == "stop":  # a random model may not close its object within max_tokens
        assert isinstance(json.loads(obj.message.content), dict)
    else:
        assert obj.message.content.startswith("{")
    chunks = c.chat.completions.create(
        model="legal", messages=USER, temperature=0, max_tokens=40, response_format=fmt, stream=True
    )
    assert (
        "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == got[0].choices[0].message.content
    )
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}, "strict": True}}
    with pytest.raises(openai.UnprocessableEntityError) as e:
        c.chat.completions.create(model="legal", messages=USER, response_format=bad, stream=True)
    assert e.value.body["param"] == "response_format" and "no-such-type" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="legal", messages=USER, response_format={"type": "json_schema"})


def test_vllm_structured_outputs_from_extra_body(server: Server) -> None:
    """vLLM's `structured_outputs` (what its clients send in extra_body, and what the front door
    sends vLLM): a choice, a regex, a JSON schema or a Lark grammar constrain chat and completions;
    one at a time, not with response_format; a pattern that cannot be enforced is a 422 naming it."""
    import json
    import re

    c = server.client

    def ask(extra: dict, chat: bool = True) -> str:
        body = {"extra_body": {"structured_outputs": extra}, "temperature": 0, "max_tokens": 40}
        if chat:
            return c.chat.completions.create(model="legal", messages=USER, **body).choices[0].message.content or ""
        return c.completions.create(model="legal", prompt="Leave days:", **body).choices[0].text

    for chat in (True, False):
        assert ask({"choice": ["yes", "no", "a.b"]}, chat) in ("yes", "no", "a.b")
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", ask({"regex": "[0-9]{3}-[a-z]{2}"}, chat))
        data = json.loads(ask({"json": LEAVE}, chat))
        assert set(data) == {"team", "urgent", "days"} and data["team"] in ("hr", "legal", "ops")
        assert ask({"grammar": 'start: "room " ("A" | "B")'}, chat) in ("room A", "room B")
    assert json.loads(ask({"json": json.dumps({"type": "array", "items": {"type": "integer"}, "maxItems": 3})})) != {}
    with pytest.raises(openai.UnprocessableEntityError, match="either response_format or structured_outputs"):
        c.chat.completions.create(
            model="legal",
            messages=USER,
            response_format={"type": "json_object"},
            extra_body={"structured_outputs": {"regex": "a"}},
        )
    with pytest.raises(openai.UnprocessableEntityError, match="exactly one of"):
        c.chat.completions.create(
            model="legal", messages=USER, extra_body={"structured_outputs": {"regex": "a", "choice": ["b"]}}
        )
    with pytest.raises(openai.UnprocessableEntityError) as e:
        c.completions.create(model="legal", prompt="x", extra_body={"structured_outputs": {"regex": "(a|b"}})
    assert e.value.body["param"] == "structured_outputs" and "unclosed group" in e.value.body["message"]
    with pytest.raises(openai.UnprocessableEntityError, match="unknown name"):
        c.completions.create(model="legal", prompt="x", extra_body={"structured_outputs": {"grammar": "start: nope"}})
    for text, why in (("[not json", "is not JSON"), ("", "is not JSON"), ("[1]", "must be a JSON schema object")):
        with pytest.raises(openai.UnprocessableEntityError, match=why) as e:
            c.completions.create(model="legal", prompt="x", extra_body={"structured_outputs": {"json": text}})
        assert e.value.body["param"] == "structured_outputs.json"


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_leave_days",
            "description": "Days of annual leave left for an employee",
            "parameters": {
                "type": "object",
                "properties": {
                    "employee": {"type": "string", "maxLength": 20},
                    "year": {"type": "integer", "minimum": 2000, "maximum": 2100},
                },
                "required": ["employee", "year"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "book_room",
            "parameters": {
                "type": "object",
                "properties": {"room": {"enum": ["A", "B"]}},
                "required": ["room"],
                "additionalProperties": False,
            },
        },
    },
]


def test_tool_calls_required_named_streamed_and_answered(server: Server) -> None:
    """tool_choice `required` and a named function constrain decoding: even a random model returns
    calls whose arguments follow the function's schema, finish_reason "tool_calls"; a stream
    carries the same calls in OpenAI's delta shape; the tool's result goes back as a `tool`
    message and is rendered into the next prompt (Hermes style on a template without tools)."""
    import json

    c = server.client
    for choice, names in (
        ("required", {"get_leave_days", "book_room"}),
        ({"type": "function", "function": {"name": "book_room"}}, {"book_room"}),
    ):
        one = {"tools": TOOLS, "tool_choice": choice, "parallel_tool_calls": False, "temperature": 0, "max_tokens": 200}
        r = c.chat.completions.create(model="legal", messages=USER, **one)
        ch = r.choices[0]
        assert ch.finish_reason == "tool_calls" and len(ch.message.tool_calls) == 1, ch.message
        for call in ch.message.tool_calls:
            assert call.function.name in names and call.id.startswith("call_")
            args = json.loads(call.function.arguments)
            if call.function.name == "book_room":
                assert args["room"] in ("A", "B")
            else:
                assert set(args) == {"employee", "year"} and 2000 <= args["year"] <= 2100
        stream = c.chat.completions.create(model="legal", messages=USER, stream=True, **one)
        chunks = [x for x in stream if x.choices]
        deltas = [d for x in chunks for d in (x.choices[0].delta.tool_calls or [])]
        assert [(d.function.name, d.function.arguments) for d in deltas] == [
            (t.function.name, t.function.arguments) for t in ch.message.tool_calls
        ]
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # parallel calls (the default): a random model may go on calling until max_tokens; each whole call counts
    many = c.chat.completions.create(
        model="legal", messages=USER, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=200
    )
    assert many.choices[0].message.tool_calls and all(
        json.loads(t.function.arguments) for t in many.choices[0].message.tool_calls
    )
    call = many.choices[0].message.tool_calls[0]
    turn = [
        *USER,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"days": 15}'},
    ]
    answered = c.chat.completions.create(model="legal", messages=turn, tools=TOOLS, temperature=0, max_tokens=8)
    assert answered.choices[0].finish_reason in ("stop", "length", "tool_calls")
    tok = server.engine.tokenizer
    rendered = tok.apply_chat_template(
        [
            {"role": "system", "content": answered_system(TOOLS)},
            USER[0],
            {
                "role": "assistant",
                "content": f"<tool_call>\n{json.dumps({'name': call.function.name, 'arguments': json.loads(call.function.arguments)})}\n</tool_call>",
            },
            {"role": "user", "content": '<tool_response>\n{"days": 15}\n</tool_response>'},
        ],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert answered.usage.prompt_tokens == len(tok(rendered, add_special_tokens=False)["input_ids"])
    none = c.chat.completions.create(
        model="legal", messages=USER, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=8
    )
    assert none.choices[0].message.tool_calls is None
    assert (
        none.usage.prompt_tokens
        == c.chat.completions.create(model="legal", messages=USER, temperature=0, max_tokens=1).usage.prompt_tokens
    )
    with pytest.raises(openai.UnprocessableEntityError, match="not in tools"):
        c.chat.completions.create(
            model="legal", messages=USER, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}
        )


# Qwen2.5's and Llama-3.1's own chat templates, byte for byte as their model repositories ship them
# (the copies TRL keeps for template identification: trl/chat_templates).
CHAT_TEMPLATES = Path(__file__).parent / "data" / "chat_templates"


@pytest.mark.parametrize(
    ("template", "opening"),
    [
        ("qwen2_5", '<tool_call>\n{"name": "book_room", "arguments": {"room": '),
        ("llama3_1", '{"name": "book_room", "parameters": {"room": '),
    ],
)
def test_a_template_with_tools_renders_them_and_calls_come_in_its_own_format(
    template: str, opening: str, tiny_base: Path, tmp_path: Path, lp_home: Path
) -> None:
    """On a base whose template renders tools itself, the template renders the offered tools, the
    assistant's calls and the tools' results (the prompt is exactly its rendering), and a forced
    call is written the way that template writes calls, so a model trained on it is constrained to
    its own format: Qwen2.5 a `<tool_call>` block with `arguments`, Llama-3.1 one bare JSON object
    with `parameters`. Either way the client gets OpenAI `tool_calls`; a conversation the template
    refuses (Llama-3.1: two calls in one turn) is a 400 with the template's words."""
    import json
    import shutil

    from transformers import AutoTokenizer

    base = tmp_path / template
    shutil.copytree(tiny_base, base)
    tok = AutoTokenizer.from_pretrained(base)
    tok.chat_template = (CHAT_TEMPLATES / f"{template}.jinja").read_text(encoding="utf-8")
    tok.save_pretrained(base)
    srv = Server(Engine(str(base), dtype="fp32", max_batch=2))
    c, model = srv.client, srv.engine.base.id

    def prompt_tokens(messages: list[dict], **extra: object) -> int:
        text = tok.apply_chat_template(messages, tools=TOOLS, add_generation_prompt=True, tokenize=False, **extra)
        return len(tok(text, add_special_tokens=False)["input_ids"])

    try:
        named = {"type": "function", "function": {"name": "book_room"}}
        one = {"tools": TOOLS, "tool_choice": named, "temperature": 0, "max_tokens": 200}
        r = c.chat.completions.create(model=model, messages=USER, logprobs=True, **one)
        ch = r.choices[0]
        written = "".join(t.token for t in ch.logprobs.content)  # what the model wrote, token by token
        assert written.startswith(opening), written
        assert ch.finish_reason == "tool_calls" and ch.message.content is None
        [call] = ch.message.tool_calls
        assert call.function.name == "book_room" and json.loads(call.function.arguments)["room"] in ("A", "B")
        assert r.usage.prompt_tokens == prompt_tokens(USER)  # the template rendered the tools
        stream = [x for x in c.chat.completions.create(model=model, messages=USER, stream=True, **one) if x.choices]
        deltas = [d for x in stream for d in (x.choices[0].delta.tool_calls or [])]
        assert [(d.function.name, d.function.arguments) for d in deltas] == [("book_room", call.function.arguments)]
        assert stream[-1].choices[0].finish_reason == "tool_calls"

        # the call and its result, rendered by the template (Qwen: <tool_response>, Llama: ipython)
        turn = [
            *USER,
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": '{"booked": true}'},
        ]
        answered = c.chat.completions.create(model=model, messages=turn, tools=TOOLS, temperature=0, max_tokens=4)
        as_template = [
            *USER,
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "type": "function",
                        "id": call.id,
                        "function": {"name": "book_room", "arguments": json.loads(call.function.arguments)},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": call.id, "content": '{"booked": true}'},
        ]
        assert answered.usage.prompt_tokens == prompt_tokens(as_template)
        twice = [*USER, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()] * 2}]
        if template == "llama3_1":
            with pytest.raises(openai.BadRequestError, match="only supports single tool-calls"):
                c.chat.completions.create(model=model, messages=twice, tools=TOOLS, max_tokens=4)
            # and a client's default parallel_tool_calls cannot make it write a second call
            many = c.chat.completions.create(
                model=model, messages=USER, tools=TOOLS, tool_choice="required", max_tokens=200
            )
            assert len(many.choices[0].message.tool_calls) == 1
        else:
            assert c.chat.completions.create(model=model, messages=twice, tools=TOOLS, max_tokens=4).choices
    finally:
        srv.stop()
        srv.engine.close()


def answered_system(tools: list[dict]) -> str:
    import json

    from loraplex.data.hermes import HERMES_TOOLS

    return HERMES_TOOLS.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))


def test_tool_call_parsing_keeps_what_is_not_a_call() -> None:
    """`auto` parses what the model wrote: <tool_call> blocks of known functions become calls (the
    same call twice is one), a bare JSON call is a call, anything else stays content."""
    from loraplex.api import tools
    from loraplex.api.schemas import ChatCompletionRequest

    plan = tools.plan(ChatCompletionRequest(model="legal", messages=USER, tools=TOOLS))
    assert plan is not None and plan.choice == "auto" and tools.grammar(plan) is None
    call = '<tool_call>\n{"name": "book_room", "arguments": {"room": "A"}}\n</tool_call>'
    got = tools.parse(f"Booking it.\n{call}\n{call}", plan)
    assert got.content == "Booking it." and len(got.calls) == 1
    assert got.calls[0]["function"] == {"name": "book_room", "arguments": '{"room": "A"}'}
    assert (
        tools.parse('{"name": "book_room", "parameters": {"room": "B"}}', plan).calls[0]["function"]["name"]
        == "book_room"
    )
    for text in ('<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', "<tool_call>{not json", "plain answer"):
        got = tools.parse(text, plan)
        assert got.calls == [] and got.content == text
    stream = tools.ToolStream(plan)
    assert (
        stream.feed("Sure. <tool_") == "Sure. "
        and stream.feed('call>{"name": "book_room", "arguments": {"room": "B"}}') == ""
    )
    assert stream.finish().calls[0]["function"]["arguments"] == '{"room": "B"}'
    # Llama-3.1's format: a streamed answer that opens with "{" is held (it may be the call), other text flows
    bare = tools.ToolPlan(plan.tools, "auto", False, tools.CallFormat(tagged=False, key="parameters"))
    stream = tools.ToolStream(bare)
    assert stream.feed(" {") == "" and stream.feed('"name": "book_room", "parameters": {"room": "A"}}') == ""
    assert stream.finish().calls[0]["function"] == {"name": "book_room", "arguments": '{"room": "A"}'}
    assert tools.ToolStream(bare).feed("No call: ") == "No call: "


def test_responses_api_text_chain_tools_and_stream(server: Server) -> None:
    """The openai SDK's `responses.create` / `retrieve`: instructions and input become the chat
    prompt; `previous_response_id` carries the stored conversation on; a function tool with
    tool_choice required gives a `function_call` item whose output goes back as
    `function_call_output`; a stream's events end in the same Response the deltas add up to."""
    import json

    c = server.client
    first = c.responses.create(
        model="legal", input="How many days of leave?", instructions="Be brief.", max_output_tokens=12, temperature=0
    )
    assert first.status in ("completed", "incomplete") and first.model == "legal" and first.output_text
    assert c.responses.retrieve(first.id).output_text == first.output_text
    chat = c.chat.completions.create(
        model="legal",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How many days of leave?"}],
        max_tokens=12,
        temperature=0,
    )
    assert first.output_text == chat.choices[0].message.content and first.usage.input_tokens == chat.usage.prompt_tokens
    second = c.responses.create(
        model="legal", input="And sick days?", previous_response_id=first.id, max_output_tokens=8, temperature=0
    )
    assert (
        second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    )  # the history is in the prompt
    tools = [
        {"type": "function", "name": f["function"]["name"], "parameters": f["function"]["parameters"]} for f in TOOLS
    ]
    called = c.responses.create(
        model="legal",
        input="Book room A",
        tools=tools,
        tool_choice={"type": "function", "name": "book_room"},
        parallel_tool_calls=False,
        temperature=0,
        max_output_tokens=200,
    )
    (fc,) = called.output
    assert fc.type == "function_call" and fc.name == "book_room" and json.loads(fc.arguments)["room"] in ("A", "B")
    done = c.responses.create(
        model="legal",
        previous_response_id=called.id,
        input=[{"type": "function_call_output", "call_id": fc.call_id, "output": "booked"}],
        tools=tools,
        max_output_tokens=8,
        temperature=0,
    )
    assert done.usage.input_tokens > called.usage.input_tokens
    events = list(
        c.responses.create(
            model="legal",
            input="How many days of leave?",
            instructions="Be brief.",
            max_output_tokens=12,
            temperature=0,
            stream=True,
        )
    )
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] in (
        "response.completed",
        "response.incomplete",
    )
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == events[-1].response.output_text == first.output_text
    assert [e.sequence_number for e in events] == list(range(len(events)))
    with pytest.raises(openai.NotFoundError):
        c.responses.create(model="legal", input="hi", previous_response_id="resp-nope")


def _segmenter_loaded_at_startup(base_dir: str, home: str) -> bool:
    import os
    import sys

    os.environ["LORAPLEX_HOME"] = home
    srv = Server(Engine(base_dir, dtype="fp32", max_batch=2))  # started: the lifespan's warm-up has run
    try:
        return "jieba" in sys.modules
    finally:
        srv.stop()


def test_the_server_loads_the_word_segmenter_only_when_something_is_searched(tiny_base: Path, tmp_path: Path) -> None:
    """jieba and the tables of search hold ~30 MiB: a server of plain adapters never needs them, one
    with a version trained with retrieval loads them before its first question."""
    import shutil

    from loraplex.assistants import faq
    from tests.child import in_child

    home = tmp_path / "home"
    with home_env(home):
        plain = registry.resolve(make_adapter(tiny_base, "plain"))
        assert in_child(_segmenter_loaded_at_startup, str(tiny_base), str(home), what="server") is False
        with_knowledge = tmp_path / "with-knowledge"
        shutil.copytree(plain.path, with_knowledge)
        (with_knowledge / registry.MANIFEST).unlink()
        faq.write(with_knowledge / registry.KNOWLEDGE, [faq.Pair("How many days of leave?", "25 days.", "")])
        registry.register("faq", with_knowledge, {"retrieval": {"enabled": True}})
        assert in_child(_segmenter_loaded_at_startup, str(tiny_base), str(home), what="server") is True
