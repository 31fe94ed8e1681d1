"""The company gateway over real HTTP on loopback: keys and access, rate limits, the request log and
Prometheus metrics, feedback into training data, upstream routing, output filters, overload."""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from loraplex.cli import app
from loraplex.engine.engine import Engine
from loraplex.gateway import keys
from loraplex.gateway.gate import Gateway
from loraplex.gateway.policy import Filter, OutputFilter, ServeConfig, Upstream
from tests.conftest import Server, home_env, make_adapter

USER = [{"role": "user", "content": "How many days of leave do I get?"}]
runner = CliRunner()


class Env:
    def __init__(self, srv: Server, tokens: dict[str, str], home: Path, tiny_base: Path):
        self.srv, self.tokens, self.home, self.tiny_base = srv, tokens, home, tiny_base

    def post(self, path: str, body: dict, key: str | None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.tokens.get(key, key)}"} if key else {}
        return httpx.post(f"{self.srv.url}{path}", json=body, headers=headers, timeout=60)

    def get(self, path: str, key: str | None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.tokens.get(key, key)}"} if key else {}
        return httpx.get(f"{self.srv.url}{path}", headers=headers, timeout=60)

    def chat(self, key: str, model: str, **kw: object) -> httpx.Response:
        return self.post("/v1/chat/completions", {"model": model, "messages": USER, "max_tokens": 8, **kw}, key)

    def client(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.srv.url}/v1", api_key=self.tokens[key], max_retries=0)


@pytest.fixture(scope="module")
def env(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    with home_env(tmp_path_factory.mktemp("gateway-home")) as home:
        make_adapter(tiny_base, "legal", rank=4, seed=1)
        make_adapter(tiny_base, "legal-cn", rank=4, seed=2)
        make_adapter(tiny_base, "hr", rank=4, seed=3)
        make_adapter(tiny_base, "formal", rank=8, targets=["q_proj", "v_proj"], seed=4)
        tokens = {}
        for args in (
            ["--name", "legal-team", "--adapters", "legal*"],
            ["--name", "ops", "--admin"],
            ["--name", "hr-team", "--adapters", "hr", "--rpm", "2"],
            ["--name", "tight", "--adapters", "formal", "--tpm", "120"],
            ["--name", "old", "--expires", "2020-01-01"],
            ["--name", "gone"],
            ["--name", "meter"],
        ):
            r = runner.invoke(app, ["keys", "create", *args])
            assert r.exit_code == 0, r.output
            tokens[args[1]] = r.stdout.strip()
        assert runner.invoke(app, ["keys", "revoke", "gone"]).exit_code == 0
        engine = Engine(str(tiny_base), dtype="fp32", max_batch=4, max_loaded_adapters=4)
        gateway = Gateway(engine=engine, max_pending=32)  # auth switches on by itself: keys exist
        srv = Server(engine, gateway, api_key=tokens["ops"])
        yield Env(srv, tokens, home, tiny_base)
        srv.stop()


def test_key_is_shown_once_and_only_its_hash_is_stored(env: Env) -> None:
    token = env.tokens["legal-team"]
    assert token.startswith("lp-")
    listed = runner.invoke(app, ["keys", "list", "--json"])
    assert token not in listed.stdout and "legal-team" in listed.stdout
    states = {r["name"]: r["state"] for r in json.loads(listed.stdout)}
    assert states["gone"] == "revoked" and states["old"] == "expired" and states["ops"] == "active"
    secret = token.split("-", 2)[2]
    blob = b"".join(p.read_bytes() for p in env.home.glob("server.db*"))
    assert secret.encode() not in blob and token.encode() not in blob


def test_auth_matrix(env: Env) -> None:
    assert env.srv.gateway.auth
    cases = {
        None: (401, "missing_api_key"),
        "lp-000000000000-" + "x" * 43: (401, "invalid_api_key"),
        "not a key": (401, "invalid_api_key"),
        "gone": (401, "revoked_api_key"),
        "old": (401, "expired_api_key"),
    }
    for key, (status, code) in cases.items():
        r = env.chat(key, "legal")  # type: ignore[arg-type]
        assert r.status_code == status and r.json()["error"]["code"] == code, (key, r.text)
    assert env.chat("legal-team", "legal").status_code == 200
    assert env.chat("legal-team", "legal-cn").status_code == 200  # the glob
    assert env.chat("legal-team", "legal:0.5+legal-cn:0.5").status_code == 200
    # outside the allow-list: the 404 a missing model gets, word for word (OpenAI's answer to both)
    hidden, missing = env.chat("legal-team", "hr"), env.chat("legal-team", "nobody-has-this")
    in_scope = env.chat("legal-team", "legal-xyz")  # allowed pattern, no such adapter
    assert hidden.status_code == missing.status_code == in_scope.status_code == 404
    codes = {r.json()["error"]["code"] for r in (hidden, missing, in_scope)}
    assert codes == {"model_not_found"}
    assert hidden.json()["error"]["message"].replace("'hr'", "X") == missing.json()["error"]["message"].replace(
        "'nobody-has-this'", "X"
    )
    assert env.chat("legal-team", "legal+hr").status_code == 404  # a composition needs every part
    assert env.chat("legal-team", env.srv.engine.base.id).status_code == 404  # the base is a model too
    with pytest.raises(openai.NotFoundError):
        env.client("legal-team").chat.completions.create(model="hr", messages=USER, max_tokens=2)
    seen = {m.id for m in env.client("legal-team").models.list().data}
    assert seen == {"legal", "legal-cn"}
    assert "hr" in {m.id for m in env.client("ops").models.list().data}
    # admin routes and metrics need an admin key
    for path in ("/admin/usage", "/admin/keys", "/metrics"):
        assert env.get(path, "legal-team").status_code == 403
        assert env.get(path, "ops").status_code == 200
        assert env.get(path, None).status_code == 401


def test_revoking_a_key_takes_effect_on_the_next_request(env: Env) -> None:
    _, token = keys.create(env.srv.gateway.db, "temp")
    env.tokens["temp"] = token
    assert env.chat("temp", "legal").status_code == 200
    assert runner.invoke(app, ["keys", "revoke", "temp"]).exit_code == 0
    assert env.chat("temp", "legal").status_code == 401


def test_rate_limits_answer_429_with_retry_after(env: Env) -> None:
    assert env.chat("hr-team", "hr").status_code == 200
    assert env.chat("hr-team", "hr").status_code == 200
    r = env.chat("hr-team", "hr")
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_requests"
    assert 1 <= int(r.headers["retry-after"]) <= 60
    codes = [env.chat("tight", "formal", max_tokens=40).status_code for _ in range(6)]
    assert 200 in codes and codes[-1] == 429, codes
    r = env.chat("tight", "formal")
    assert r.json()["error"]["code"] == "rate_limit_tokens" and "retry-after" in r.headers


def test_log_rows_and_prometheus_counters_match_the_requests(env: Env) -> None:
    c = env.client("meter")
    usages = [c.chat.completions.create(model="legal", messages=USER, max_tokens=6).usage for _ in range(2)]
    stream = list(
        c.chat.completions.create(
            model="legal", messages=USER, max_tokens=5, stream=True, stream_options={"include_usage": True}
        )
    )
    usages.append(stream[-1].usage)
    assert env.chat("meter", "legal", temperature=5).status_code == 400
    assert env.chat("meter", "legal", max_tokens=10**9).status_code == 400
    env.srv.gateway.log.flush()
    con = sqlite3.connect(env.home / "server.db")
    con.row_factory = sqlite3.Row
    rows = con.execute("SELECT * FROM requests WHERE key = 'meter' ORDER BY time").fetchall()
    assert [r["status"] for r in rows] == [200, 200, 200, 400, 400]
    assert [r["served"] for r in rows[:3]] == ["legal@v1"] * 3
    for row, u in zip(rows[:3], usages, strict=True):
        assert (row["prompt_tokens"], row["completion_tokens"]) == (u.prompt_tokens, u.completion_tokens)
        assert row["ttft_ms"] is not None and 0 < row["ttft_ms"] <= row["latency_ms"]
        assert row["prompt"] is None and row["response"] is None  # text only with --log-text
    metrics = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(env.get("/metrics", "ops").text)
        for s in fam.samples
    }

    def value(name: str, **labels: str) -> float:
        return metrics.get((name, tuple(sorted(labels.items()))), 0.0)

    assert value("loraplex_requests_total", model="legal@v1", key="meter", status="200") == 3
    # an invalid body names no model ("-"); the huge max_tokens is refused for the model asked for
    assert value("loraplex_requests_total", model="-", key="meter", status="400") == 1
    assert value("loraplex_requests_total", model="legal", key="meter", status="400") == 1
    assert [r["error"] for r in rows[3:]] == ["invalid_request", "context_length_exceeded"]
    assert value("loraplex_tokens_total", model="legal@v1", key="meter", kind="completion") == sum(
        u.completion_tokens for u in usages
    )
    assert value("loraplex_time_to_first_token_seconds_count", model="legal@v1") >= 3
    assert ("loraplex_loaded_adapters", ()) in metrics and ("loraplex_queue_depth", ()) in metrics
    # the system prompt every request repeats is kept for reuse: bytes held, within the budget
    assert 0 < value("loraplex_prefix_cache_bytes") <= value("loraplex_prefix_cache_budget_bytes")
    r = runner.invoke(app, ["usage", "--by", "key", "--json"])
    meter = next(x for x in json.loads(r.stdout) if x["name"] == "meter")
    assert meter["requests"] == 5 and meter["errors"] == 2


def test_feedback_export_round_trips_into_train(env: Env, tmp_path: Path) -> None:
    ids = [env.chat("legal-team", "legal", max_tokens=6).json()["id"] for _ in range(3)]
    correction = "The office opens at nine."
    ratings = [("down", correction), ("up", None), ("down", None)]
    for rid, (rating, fix) in zip(ids, ratings, strict=True):
        body = {"id": rid, "rating": rating, "comment": "checked", **({"correction": fix} if fix else {})}
        r = env.post("/v1/feedback", body, "legal-team")
        assert r.status_code == 200 and r.json()["model"] == "legal@v1", r.text
    # another key's response, or an unknown id: the same 404
    assert env.post("/v1/feedback", {"id": ids[0], "rating": "up"}, "hr-team").status_code in (404, 429)
    assert env.post("/v1/feedback", {"id": "chatcmpl-nope", "rating": "up"}, "legal-team").status_code == 404
    assert env.post("/v1/feedback", {"id": ids[0], "rating": "meh"}, "legal-team").status_code == 400
    stats = json.loads(runner.invoke(app, ["feedback", "stats", "--adapter", "legal", "--json"]).stdout)
    assert stats[0]["adapter"] == "legal@v1"
    assert (stats[0]["ratings"], stats[0]["up"], stats[0]["down"], stats[0]["corrected"]) == (3, 1, 2, 1)
    out = tmp_path / "fix.jsonl"
    r = runner.invoke(app, ["feedback", "export", "--adapter", "legal", "--out", str(out)])
    assert r.exit_code == 0, r.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2 and "skipped 1 down-rated" in " ".join(r.output.split())
    assert records[0]["messages"][:-1] == USER and records[0]["messages"][-1] == {
        "role": "assistant",
        "content": correction,
    }
    r = runner.invoke(
        app,
        [
            "train",
            "--data",
            str(out),
            "--name",
            "legal-fixed",
            "--base",
            str(env.tiny_base),
            "--set",
            "train.max_steps=2",
            "--set",
            "train.precision=fp32",
        ],
    )
    assert r.exit_code == 0, r.output
    assert json.loads(runner.invoke(app, ["adapters", "show", "legal-fixed@v1"]).stdout)["name"] == "legal-fixed"


def test_output_filter_on_streamed_and_whole_output(env: Env) -> None:
    c = env.client("ops")
    plain = c.chat.completions.create(model="formal", messages=USER, temperature=0, max_tokens=24)
    text = plain.choices[0].message.content or ""
    words = [w for w in regex.findall(r"\S{3,}", text)]
    assert words, text
    target = words[len(words) // 2]
    env.srv.gateway.set_config(ServeConfig(filters=[Filter(models=["formal"], block=[regex.escape(target)])]))
    try:
        expected = text.replace(target, "[blocked]")
        whole = c.chat.completions.create(model="formal", messages=USER, temperature=0, max_tokens=24)
        assert whole.choices[0].message.content == expected
        chunks = list(
            c.chat.completions.create(model="formal", messages=USER, temperature=0, max_tokens=24, stream=True)
        )
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == expected
        # another model is not filtered
        other = c.chat.completions.create(model="legal", messages=USER, temperature=0, max_tokens=4)
        assert "[blocked]" not in (other.choices[0].message.content or "")
    finally:
        env.srv.gateway.set_config(ServeConfig())


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 7), min_size=1, max_size=60), st.randoms())
def test_stream_filter_equals_whole_text_filter_however_it_is_chunked(cuts: list[int], rnd: random.Random) -> None:
    f = OutputFilter([Filter(block=[r"(?i)project \w+"], redact=["all"])])
    parts = [
        "请拨打 13800138000 ",
        "or mail li.lei@example.com. ",
        "Project Zeus 启动, ",
        "身份证 11010519491231002X。",
        "card 6222 0212 3456 7890 128 ok",
        "order 20261123 is not personal data",
    ]
    text = "".join(rnd.sample(parts, len(parts)))
    sf, out, i = f.stream(), [], 0
    for n in cuts * (len(text) // max(1, sum(cuts)) + 1):
        if i >= len(text):
            break
        out.append(sf.feed(text[i : i + n]))
        i += n
    out.append(sf.feed(text[i:]) + sf.finish())
    assert "".join(out) == f.apply(text)
    assert "13800138000" not in f.apply(text) and "li.lei@" not in f.apply(text) and "Zeus" not in f.apply(text)
    assert "20261123" in f.apply(text)


def test_upstream_route_proxies_streams_with_the_same_keys_and_log(env: Env, tmp_path: Path) -> None:
    upstream_engine = Engine(str(env.tiny_base), dtype="fp32", max_batch=2, max_loaded_adapters=2)
    up = Server(upstream_engine, Gateway(auth=False, database=tmp_path / "upstream.db", engine=upstream_engine))
    try:
        base = upstream_engine.base.id
        env.srv.gateway.set_config(
            ServeConfig(upstreams=[Upstream(models=["cloud-general"], base_url=f"{up.url}/v1", model=base)])
        )
        direct = up.client.chat.completions.create(model=base, messages=USER, temperature=0, max_tokens=12)
        c = env.client("ops")
        assert "cloud-general" in {m.id for m in c.models.list().data}
        whole = c.chat.completions.create(model="cloud-general", messages=USER, temperature=0, max_tokens=12)
        assert whole.choices[0].message.content == direct.choices[0].message.content
        chunks = list(
            c.chat.completions.create(
                model="cloud-general",
                messages=USER,
                temperature=0,
                max_tokens=12,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == (
            direct.choices[0].message.content
        )
        assert chunks[-1].usage.completion_tokens == direct.usage.completion_tokens
        assert len({ch.id for ch in chunks}) == 1 and chunks[0].id != whole.id  # one id per response, ours
        assert chunks[0].id.startswith("chatcmpl-") and whole.id != direct.id
        # the gateway's access rules apply: legal-team may not use it
        assert env.chat("legal-team", "cloud-general").status_code == 404
        env.srv.gateway.log.flush()
        con = sqlite3.connect(env.home / "server.db")
        rows = con.execute(
            "SELECT status, completion_tokens FROM requests WHERE model = 'cloud-general' AND key = 'ops'"
        ).fetchall()
        assert rows == [(200, direct.usage.completion_tokens)] * 2
        # an upstream that is down: a 502 in OpenAI's shape, and the server carries on
        env.srv.gateway.set_config(
            ServeConfig(upstreams=[Upstream(models=["cloud-general"], base_url="http://127.0.0.1:9/v1")])
        )
        r = env.chat("ops", "cloud-general")
        assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_unavailable"
        assert env.chat("ops", "legal").status_code == 200
    finally:
        env.srv.gateway.set_config(ServeConfig())
        up.stop()


def test_admin_routes_are_audited(env: Env) -> None:
    assert env.post("/admin/adapters/load", {"lora_name": "legal", "pin": True}, "ops").status_code == 200
    r = env.post("/admin/aliases", {"name": "legal", "alias": "prod", "version": 1}, "ops")
    assert r.status_code == 200 and r.json()["to"] == "legal@v1"
    assert env.post("/admin/adapters/reload", {"lora_name": "legal@prod"}, "ops").status_code == 200
    assert env.post("/admin/adapters/unload", {"lora_name": "nobody"}, "ops").status_code == 404
    assert env.post("/admin/adapters/load", {"lora_name": "legal"}, "legal-team").status_code == 403
    rows = env.get("/admin/audit", "ops").json()["data"]
    seen = [(r["key"], r["action"], r["status"]) for r in reversed(rows)]
    for entry in [
        ("ops", "load", 200),
        ("ops", "alias", 200),
        ("ops", "reload", 200),
        ("ops", "unload", 404),
        ("legal-team", "POST /admin/adapters/load", 403),
    ]:
        assert entry in seen, (entry, seen)


def test_a_repeated_query_parameter_is_a_400_naming_it(env: Env) -> None:
    """FastAPI reads `?limit=5&limit=9` as 9; no route takes a list, so the server refuses it (as
    schemathesis expects of a value that is not an integer) instead of picking one."""
    r = env.get("/admin/audit?limit=1&limit=2", "ops")
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "limit" and "more than once" in err["message"], r.text
    assert env.get("/admin/audit?limit=1", "ops").status_code == 200


def test_overload_answers_503_and_the_server_recovers(env: Env) -> None:
    gw = env.srv.gateway
    old, gw.max_pending = gw.max_pending, 2

    async def one(client: httpx.AsyncClient) -> httpx.Response:
        body = {"model": "legal", "messages": USER, "max_tokens": 64, "ignore_eos": True}
        return await client.post("/v1/chat/completions", json=body)

    async def burst() -> list[httpx.Response]:
        headers = {"Authorization": f"Bearer {env.tokens['ops']}"}
        async with httpx.AsyncClient(base_url=env.srv.url, headers=headers, timeout=120) as client:
            return await asyncio.gather(*[one(client) for _ in range(6)])

    try:
        codes = [r.status_code for r in asyncio.run(burst())]
        refused = [r for r in asyncio.run(burst()) if r.status_code == 503]
    finally:
        gw.max_pending = old
    assert set(codes) <= {200, 503} and codes.count(200) >= 2 and 503 in codes, codes
    assert refused and all(r.json()["error"]["code"] == "overloaded" and r.headers["retry-after"] for r in refused)
    assert gw.inflight == 0
    assert env.chat("ops", "legal").status_code == 200


def test_serve_config_errors_name_the_file_and_line(tmp_path: Path) -> None:
    from loraplex.errors import UserError
    from loraplex.gateway.policy import load_serve_config

    bad = tmp_path / "serve.yaml"
    bad.write_text("upstreams:\n  - models: [x]\n    base_url: ftp://x\nfilters:\n  - blok: [a]\n  - block: ['(']\n")
    with pytest.raises(UserError) as e:
        load_serve_config(bad)
    msg = str(e.value)
    assert f"{bad}:3: upstreams.0.base_url" in msg
    assert f"{bad}:5: unknown key 'filters.0.blok'; did you mean 'filters.0.block'?" in msg
    assert f"{bad}:6: filters.1.block" in msg and "not a valid regular expression" in msg


def test_stored_responses_belong_to_their_key(env: Env) -> None:
    """A stored Response (and its conversation) is read back, or continued with
    previous_response_id, only with the key that made it: another key, even an admin one, gets the
    404 a missing id gets. Each Responses request leaves one request-log row."""
    mine = env.client("legal-team").responses.create(model="legal", input="hi", max_output_tokens=4, temperature=0)
    assert env.client("legal-team").responses.retrieve(mine.id).id == mine.id
    for other in ("ops", "meter"):
        with pytest.raises(openai.NotFoundError):
            env.client(other).responses.retrieve(mine.id)
        with pytest.raises(openai.NotFoundError):
            env.client(other).responses.create(
                model="legal", input="and?", previous_response_id=mine.id, max_output_tokens=4
            )
    with pytest.raises(openai.NotFoundError):  # the key's scope applies as to any completion
        env.client("legal-team").responses.create(model="hr", input="hi", max_output_tokens=4)
    rows = (
        sqlite3.connect(env.home / "server.db")
        .execute("SELECT endpoint, status FROM requests WHERE id = ?", (mine.id,))
        .fetchall()
    )
    assert rows == [("responses", 200)]
