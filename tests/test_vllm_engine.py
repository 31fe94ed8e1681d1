"""`serve --engine vllm` without a GPU.

* The vLLM command line `serve --engine vllm --dry-run` prints, and the adapter layouts it accepts.
* The front door (keys, per-adapter access, assistants, metering, feedback, registry sync) in front
  of a second, real `loraplex serve` process that stands in for vLLM over HTTP: it speaks the same
  /v1/completions with token-id prompts, `return_tokens_as_token_ids` and the runtime LoRA API.
  Answers through the front door must equal the stand-in's own answers.
"""

from __future__ import annotations

import json
import shlex
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from typer.testing import CliRunner

from loraplex.cli import app
from tests.conftest import Server, home_env, make_adapter
from tests.test_serve_process import ServeProcess

runner = CliRunner()
ASK = [{"role": "user", "content": "How many days of leave do I get?"}]


def _register_dora_copy(name: str, of: str) -> None:
    """A copy of adapter `of` whose config says DoRA: a layout vLLM refuses."""
    from loraplex.adapters import registry

    src = registry.resolve(of)
    with tempfile.TemporaryDirectory() as tmp:
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy(src.path / f, Path(tmp) / f)
        cfg = json.loads((Path(tmp) / "adapter_config.json").read_text())
        cfg["use_dora"] = True
        (Path(tmp) / "adapter_config.json").write_text(json.dumps(cfg))
        registry.register(name, Path(tmp), {"base_model": src.manifest()["base_model"]})


def test_vllm_command_line_and_adapter_layouts(tiny_base: Path, lp_home: Path) -> None:
    from loraplex.adapters import registry
    from loraplex.engine import vllm_process
    from loraplex.models.load import resolve_base

    make_adapter(tiny_base, "legal", rank=4, seed=1)
    make_adapter(tiny_base, "legal", rank=4, seed=2)
    make_adapter(tiny_base, "wide", rank=24, targets=["q_proj", "v_proj"], seed=3)
    registry.tag("legal@v1", "prod")
    base = resolve_base(str(tiny_base))
    args = ["serve", "--base", str(tiny_base), "--engine", "vllm", "--dry-run", "--max-loaded-adapters", "4"]
    args += ["--max-batch", "32", "--tensor-parallel-size", "2", "--max-model-len", "1024", "--dtype", "bf16"]
    args += ["--engine-port", "9123", "--vllm-arg=--gpu-memory-utilization=0.85"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    line = r.stdout.strip()
    assert line.startswith("VLLM_ALLOW_RUNTIME_LORA_UPDATING=True "), line
    argv = shlex.split(line)[1:]
    assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]

    def opt(flag: str) -> str:
        return argv[argv.index(flag) + 1]

    assert opt("--model") == str(base.path)
    assert opt("--served-model-name") == base.id
    assert (opt("--host"), opt("--port")) == ("127.0.0.1", "9123")
    assert opt("--dtype") == "bfloat16"
    assert (opt("--max-num-seqs"), opt("--tensor-parallel-size"), opt("--max-model-len")) == ("32", "2", "1024")
    assert "--enable-lora" in argv and "--enable-prompt-tokens-details" in argv
    assert opt("--max-loras") == "4"
    assert opt("--max-lora-rank") == "32"  # rank 24 -> the next rank vLLM accepts
    start = argv.index("--lora-modules") + 1
    modules = [json.loads(a) for a in argv[start : start + 3]]
    root = registry.store_root()
    # latest of each adapter and every alias target, by exact version, on this base
    assert modules == [
        {"name": f"{n}@v{v}", "path": str(root / n / f"v{v}"), "base_model_name": base.id}
        for n, v in (("legal", 1), ("legal", 2), ("wide", 1))
    ]
    assert argv[-1] == "--gpu-memory-utilization=0.85"

    # a layout vLLM cannot load: left out of "every adapter", refused when named
    _register_dora_copy("fancy", "legal@v1")
    assert vllm_process.check_layout(registry.resolve("fancy")) == [
        "fancy@v1: DoRA adapters are not supported by vLLM; merge it or use --engine builtin"
    ]
    r = runner.invoke(app, ["serve", "--base", str(tiny_base), "--engine", "vllm", "--dry-run"])
    assert r.exit_code == 0 and "left out" in r.stderr and "fancy@v1: DoRA" in r.stderr
    assert "fancy@v1" not in r.stdout and "legal@v2" in r.stdout
    r = runner.invoke(app, ["serve", "--base", str(tiny_base), "--engine", "vllm", "--dry-run", "--adapters", "fancy"])
    assert r.exit_code == 1 and "DoRA" in str(r.exception)
    r = runner.invoke(app, [*args[:6], "--max-lora-rank", "8"])
    assert r.exit_code == 1 and "below the largest adapter rank here (24)" in str(r.exception)
    r = runner.invoke(app, [*args[:6], "--max-lora-rank", "48"])
    assert r.exit_code == 1 and "vLLM accepts 8, 16, 32" in str(r.exception)
    if not vllm_process.installed():  # CI: the extra is not installed, and the command says how
        r = runner.invoke(app, ["serve", "--base", str(tiny_base), "--engine", "vllm"])
        assert r.exit_code == 1 and "pip install 'loraplex[vllm]'" in str(r.exception)


@dataclass
class Stack:
    standin: ServeProcess  # the engine: a second loraplex server, its own home, the same adapter store
    door: Server  # the front door: RemoteEngine + gateway with keys
    tokens: dict[str, str]
    home: Path
    tiny_base: Path

    def direct(self, model: str, messages: list[dict[str, str]], **kw: object) -> openai.types.chat.ChatCompletion:
        return self.standin.client.chat.completions.create(model=model, messages=messages, **kw)  # type: ignore[arg-type]

    def via(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.door.url}/v1", api_key=self.tokens[key], max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def stack(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory, models_cache: Path) -> Iterator[Stack]:
    from loraplex.engine.remote import RemoteEngine
    from loraplex.gateway.gate import Gateway

    door_home = tmp_path_factory.mktemp("door")
    engine_home = tmp_path_factory.mktemp("engine")
    (door_home / "models").symlink_to(models_cache)
    with home_env(door_home):
        make_adapter(tiny_base, "legal", rank=4, seed=1)
        make_adapter(tiny_base, "hr", rank=8, targets=["q_proj", "v_proj"], seed=2)
        # one adapter store for both, as a shared volume would be
        (engine_home / "adapters").symlink_to(door_home / "adapters")
        (engine_home / "models").symlink_to(models_cache)
        tokens = {}
        for args in (["--name", "legal-team", "--adapters", "legal,counsel"], ["--name", "ops", "--admin"]):
            r = runner.invoke(app, ["keys", "create", *args])
            assert r.exit_code == 0, r.output
            tokens[args[1]] = r.stdout.strip()
        standin = ServeProcess(tiny_base, engine_home, "--no-auth")
        try:
            engine = RemoteEngine(f"{standin.url}/v1", str(tiny_base), max_batch=4, sync_interval=0.3, idle_unload=0.0)
            door = Server(engine, Gateway(engine=engine, max_pending=16), api_key=tokens["ops"])
            yield Stack(standin, door, tokens, door_home, tiny_base)
            door.stop()
            engine.close()
        finally:
            standin.kill()


def _wait(condition: object, what: str, timeout: float = 15.0) -> None:
    deadline = time.time() + timeout
    while not condition():  # type: ignore[operator]
        assert time.time() < deadline, what
        time.sleep(0.1)


def _audit(stack: Stack) -> list[tuple[str, str]]:
    rows = httpx.get(f"{stack.standin.url}/admin/audit", params={"limit": 1000}).json()["data"]
    return [(r["action"], r["target"]) for r in rows]


def test_front_door_answers_like_the_engine_and_keeps_it_in_sync(stack: Stack) -> None:
    from loraplex.adapters import registry
    from loraplex.assistants import store as assistants

    with home_env(stack.home):
        greedy = {"temperature": 0, "max_tokens": 12}
        models = {m.id for m in stack.via("ops").models.list().data}
        assert {"legal", "hr", stack.standin.base_id} <= models

        # the same greedy answer, token counts and logprobs as asking the engine directly
        got = stack.via("legal-team").chat.completions.create(
            model="legal", messages=ASK, logprobs=True, top_logprobs=2, **greedy
        )  # type: ignore[call-overload]
        want = stack.direct("legal", ASK, logprobs=True, top_logprobs=2, **greedy)
        assert got.model == "legal@v1"
        assert got.choices[0].message.content == want.choices[0].message.content
        # the same counts; what the prefix cache held differs (the engine saw this prompt first from the front door)
        assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (
            want.usage.prompt_tokens,
            want.usage.completion_tokens,
        )
        assert want.usage.prompt_tokens_details.cached_tokens > 0  # the second time the engine sees it
        again = stack.via("legal-team").chat.completions.create(model="legal", messages=ASK, **greedy)  # type: ignore[call-overload]
        assert again.usage.prompt_tokens_details.cached_tokens > 0  # the engine's count, passed through
        for a, b in zip(got.choices[0].logprobs.content, want.choices[0].logprobs.content, strict=True):
            assert a.token == b.token and abs(a.logprob - b.logprob) < 1e-5
            assert [t.token for t in a.top_logprobs] == [t.token for t in b.top_logprobs]
        stream = stack.via("legal-team").chat.completions.create(
            model="legal", messages=ASK, stream=True, stream_options={"include_usage": True}, **greedy
        )  # type: ignore[call-overload]
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.choices[0].message.content
        assert chunks[-1].usage.completion_tokens == want.usage.completion_tokens
        base = stack.via("ops").chat.completions.create(model=stack.standin.base_id, messages=ASK, **greedy)
        assert base.choices[0].message.content == stack.direct("base", ASK, **greedy).choices[0].message.content

        # keys and access are the front door's; compositions have no vLLM equivalent
        with pytest.raises(openai.NotFoundError):  # outside the key: as if it did not exist
            stack.via("legal-team").chat.completions.create(model="hr", messages=ASK, **greedy)  # type: ignore[call-overload]
        with pytest.raises(openai.BadRequestError, match="built-in engine"):
            stack.via("ops").chat.completions.create(model="legal:0.5+hr:0.5", messages=ASK, **greedy)  # type: ignore[call-overload]
        with pytest.raises(openai.NotFoundError):
            stack.via("ops").chat.completions.create(model="nobody", messages=ASK, **greedy)  # type: ignore[call-overload]

        # an assistant: system prompt + adapter applied here, the engine sees a plain prompt
        assistants.create(
            assistants.build(
                {"name": "counsel", "adapters": [{"ref": "legal"}], "system_prompt": "Answer in one line."}
            )
        )
        got = stack.via("legal-team").chat.completions.create(model="counsel", messages=ASK, **greedy)  # type: ignore[call-overload]
        with_system = [{"role": "system", "content": "Answer in one line."}, *ASK]
        assert got.model == "counsel"
        assert got.choices[0].message.content == stack.direct("legal", with_system, **greedy).choices[0].message.content

        # metering and feedback are the front door's too
        r = httpx.post(
            f"{stack.door.url}/v1/feedback",
            json={"id": got.id, "rating": "up"},
            headers={"Authorization": f"Bearer {stack.tokens['legal-team']}"},
        )
        assert r.status_code == 200, r.text
        usage = httpx.get(
            f"{stack.door.url}/admin/usage", headers={"Authorization": f"Bearer {stack.tokens['ops']}"}
        ).json()["data"]
        by_model = {row["name"]: row for row in usage}
        assert by_model["legal@v1"]["requests"] >= 2 and by_model["counsel"]["requests"] == 1
        assert by_model["legal@v1"]["completion_tokens"] >= 2 * want.usage.completion_tokens

        # the web app and its admin dashboard read the remote engine like the built-in one
        ops = {"Authorization": f"Bearer {stack.tokens['ops']}"}
        assert httpx.get(f"{stack.door.url}/").status_code == 200
        live = httpx.get(f"{stack.door.url}/ui/api/admin/live", headers=ops).json()
        assert "legal@v1" in {a["key"] for a in live["loaded"]} and live["running"] == 0

        # a second front door on the same home: the same keys, and usage adds up in one server.db
        from loraplex.engine.remote import RemoteEngine
        from loraplex.gateway.gate import Gateway

        engine2 = RemoteEngine(f"{stack.standin.url}/v1", str(stack.tiny_base), sync_interval=60)
        door2 = Server(engine2, Gateway(engine=engine2, max_pending=16), api_key=stack.tokens["legal-team"])
        try:
            again = door2.client.chat.completions.create(model="legal", messages=ASK, **greedy)  # type: ignore[call-overload]
            assert again.choices[0].message.content == want.choices[0].message.content
            with pytest.raises(openai.NotFoundError):
                door2.client.chat.completions.create(model="hr", messages=ASK, **greedy)  # type: ignore[call-overload]
            door2.gateway.log.flush()
        finally:
            door2.stop()
            engine2.close()
        usage = httpx.get(
            f"{stack.door.url}/admin/usage", headers={"Authorization": f"Bearer {stack.tokens['ops']}"}
        ).json()["data"]
        assert {row["name"]: row for row in usage}["legal@v1"]["requests"] == by_model["legal@v1"]["requests"] + 1

        # registry sync: a new version is loaded into the engine, the one nothing points at unloaded
        engine = stack.door.engine
        assert "legal@v1" in engine.adapters.slot_of
        make_adapter(stack.tiny_base, "legal", rank=4, seed=7)
        _wait(lambda: "legal@v2" in engine.adapters.slot_of, "legal@v2 was not loaded")
        _wait(lambda: "legal@v1" not in engine.adapters.slot_of, "legal@v1 was not unloaded")
        assert ("load", "legal@v2") in _audit(stack) and ("unload", "legal@v1") in _audit(stack)
        got = stack.via("legal-team").chat.completions.create(model="legal", messages=ASK, **greedy)  # type: ignore[call-overload]
        assert got.model == "legal@v2"
        assert got.choices[0].message.content == stack.direct("legal@v2", ASK, **greedy).choices[0].message.content

        # an alias move: the engine gets the version the alias now names, and the alias answers with it
        registry.tag("legal@v1", "prod")
        _wait(lambda: "legal@v1" in engine.adapters.slot_of, "legal@v1 (prod) was not loaded")
        got = stack.via("legal-team").chat.completions.create(model="legal@prod", messages=ASK, **greedy)  # type: ignore[call-overload]
        assert got.model == "legal@v1"
        assert got.choices[0].message.content == want.choices[0].message.content


def test_front_door_passes_formats_echo_tools_and_responses_to_the_engine(stack: Stack) -> None:
    """Behind the front door, the engine (vLLM, here its stand-in) enforces `response_format`
    itself and returns prompt logprobs for `echo`; tools are rendered and parsed by the front door
    (auto), and the Responses API rides on the chat path: every answer equals the engine's own."""
    import json

    with home_env(stack.home):
        greedy = {"temperature": 0, "max_tokens": 40}
        schema = {
            "type": "object",
            "properties": {"ok": {"type": "boolean"}},
            "required": ["ok"],
            "additionalProperties": False,
        }
        fmt = {"type": "json_schema", "json_schema": {"name": "ok", "schema": schema, "strict": True}}
        got = stack.via("ops").chat.completions.create(model="legal", messages=ASK, response_format=fmt, **greedy)
        want = stack.direct("legal", ASK, response_format=fmt, **greedy)
        assert got.choices[0].message.content == want.choices[0].message.content
        assert isinstance(json.loads(got.choices[0].message.content)["ok"], bool)

        tok = stack.standin.client.completions.create  # the engine's own answer to the same request
        ids = [[5, 6, 7, 8], [9, 10, 11]]
        for n in (0, 1):
            door = stack.via("ops").completions.create(
                model="legal", prompt=ids, max_tokens=n, echo=True, logprobs=1, temperature=0
            )
            own = tok(model="legal", prompt=ids, max_tokens=n, echo=True, logprobs=1, temperature=0)
            for a, b in zip(door.choices, own.choices, strict=True):
                assert a.text == b.text and a.logprobs.tokens == b.logprobs.tokens
                assert a.logprobs.token_logprobs[0] is None and b.logprobs.token_logprobs[0] is None
                assert a.logprobs.token_logprobs[1:] == pytest.approx(b.logprobs.token_logprobs[1:], abs=1e-5)

        tools = [
            {
                "type": "function",
                "function": {
                    "name": "book_room",
                    "parameters": {"type": "object", "properties": {"room": {"type": "string"}}},
                },
            }
        ]
        auto = stack.via("ops").chat.completions.create(model="legal", messages=ASK, tools=tools, **greedy)
        assert (
            auto.choices[0].message.content
            == stack.direct("legal", ASK, tools=tools, **greedy).choices[0].message.content
        )
        # forced calls: the front door sends its call grammar as vLLM's `structured_outputs`, and the
        # engine's constrained answer is the built-in engine's (the stand-in answers as one)
        for choice in ("required", {"type": "function", "function": {"name": "book_room"}}):
            forced = {"tools": tools, "tool_choice": choice, "parallel_tool_calls": False, **greedy, "max_tokens": 200}
            got = stack.via("ops").chat.completions.create(model="legal", messages=ASK, **forced)
            want = stack.direct("legal", ASK, **forced)
            [call] = got.choices[0].message.tool_calls
            assert got.choices[0].finish_reason == "tool_calls" and call.function.name == "book_room"
            assert [(c.function.name, c.function.arguments) for c in want.choices[0].message.tool_calls] == [
                (call.function.name, call.function.arguments)
            ]
            assert got.usage == want.usage
        # vLLM's own structured_outputs from a client (extra_body) reaches the engine too
        for extra in ({"choice": ["yes", "no"]}, {"regex": "[0-9]{3}"}, {"json": schema}):
            got = stack.via("ops").chat.completions.create(
                model="legal", messages=ASK, extra_body={"structured_outputs": extra}, **greedy
            )
            want = stack.direct("legal", ASK, extra_body={"structured_outputs": extra}, **greedy)
            assert got.choices[0].message.content == want.choices[0].message.content

        r = stack.via("ops").responses.create(
            model="legal", input=ASK[-1]["content"], max_output_tokens=12, temperature=0
        )
        assert (
            r.output_text == stack.direct("legal", [ASK[-1]], temperature=0, max_tokens=12).choices[0].message.content
        )


def test_cli_front_door_and_a_lost_engine(stack: Stack, tiny_base: Path, tmp_path: Path) -> None:
    """`loraplex serve --engine vllm --engine-url` as a user runs it; when the engine goes away,
    requests fail with an OpenAI error and the front door stays up."""
    door_home = tmp_path / "door2"
    door_home.mkdir()
    (door_home / "adapters").symlink_to(stack.home / "adapters")
    door = ServeProcess(
        tiny_base, door_home, "--engine", "vllm", "--engine-url", f"{stack.standin.url}/v1", "--no-auth"
    )
    try:
        greedy = {"temperature": 0, "max_tokens": 8}
        got = door.client.chat.completions.create(model="hr", messages=ASK, **greedy)  # type: ignore[call-overload]
        assert got.choices[0].message.content == stack.direct("hr", ASK, **greedy).choices[0].message.content
        stack.standin.kill()
        with pytest.raises(openai.APIStatusError) as e:
            door.client.chat.completions.create(model="hr", messages=ASK, **greedy)  # type: ignore[call-overload]
        assert e.value.status_code == 502
        assert e.value.body["code"] == "engine_unavailable"  # type: ignore[index]
        assert httpx.get(door.url + "/health").status_code == 200
    finally:
        door.kill()


def test_vllm_top_logprobs_with_the_sampled_token_added_are_cut_to_k() -> None:
    """Real vLLM puts the sampled token into `top_logprobs` when it is not among the k asked for
    (k+1 entries; the stand-in engine above never does): the front door passes on exactly k, the
    most likely first, as OpenAI's API does. The payload is vLLM's completions logprobs shape with
    `return_tokens_as_token_ids`."""
    from loraplex.engine.remote import _logprobs

    payload = {
        "tokens": ["token_id:11", "token_id:7"],
        "token_logprobs": [-2.5, -0.1],
        "top_logprobs": [
            {"token_id:3": -0.4, "token_id:5": -1.2, "token_id:11": -2.5},  # 11 sampled, outside the top 2
            {"token_id:7": -0.1, "token_id:9": -2.9},
        ],
    }
    ids, lps = _logprobs(payload, "http://engine", k=2)
    assert ids == (11, 7)
    assert [lp.top for lp in lps] == [((3, -0.4), (5, -1.2)), ((7, -0.1), (9, -2.9))]
    assert [lp.logprob for lp in lps] == [-2.5, -0.1]
    _, untrimmed = _logprobs(payload, "http://engine")  # echo requests cut per part themselves
    assert len(untrimmed[0].top) == 3
