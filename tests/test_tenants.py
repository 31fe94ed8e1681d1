"""Many teams on one `loraplex serve`: the attacks of issue 22 against a real server process on
loopback (raw sockets, httpx, the openai SDK), each as it was reported, now answered safely."""

from __future__ import annotations

import base64
import contextlib
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from loraplex.cli import app
from tests.conftest import make_adapter
from tests.test_serve_process import ServeProcess

USER = [{"role": "user", "content": "How many days of leave do I get?"}]
# 0.25 MiB: 1,024 positions of the tiny model's 2-byte KV cache (256 bytes each) for one request:
# int4 weights (pinned below) keep an fp16 cache under fp32 activations and a bf16 one under bf16
KV_BUDGET_GB = 0.25 / 1024


class Tenants:
    def __init__(self, srv: ServeProcess, keys: dict[str, str], home: Path):
        self.srv, self.keys, self.home = srv, keys, home

    def post(self, path: str, body: dict, key: str, timeout: float = 60) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.keys[key]}"}
        return httpx.post(f"{self.srv.url}{path}", json=body, headers=headers, timeout=timeout)

    def chat(self, key: str, model: str, **kw: object) -> httpx.Response:
        return self.post("/v1/chat/completions", {"model": model, "messages": USER, "max_tokens": 4, **kw}, key)

    def metric(self, name: str) -> float:
        text = httpx.get(
            f"{self.srv.url}/metrics", headers={"Authorization": f"Bearer {self.keys['ops']}"}, timeout=30
        ).text
        return next(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)

    def loaded(self) -> list[str]:
        live = httpx.get(
            f"{self.srv.url}/ui/api/admin/live", headers={"Authorization": f"Bearer {self.keys['ops']}"}, timeout=30
        ).json()
        return [x["key"] for x in live["loaded"]]


@pytest.fixture(scope="module")
def tenants(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tenants]:
    import os

    home = tmp_path_factory.mktemp("tenants-home")
    old = os.environ.get("LORAPLEX_HOME")
    os.environ["LORAPLEX_HOME"] = str(home)
    try:
        for seed, name in enumerate(("hr", "secret", "legal")):
            make_adapter(tiny_base, name, rank=4, seed=seed)
        keys = {}
        for name, scope in (
            ("ops", ["--admin"]),
            ("hr-team", ["--adapters", "hr*"]),
            ("secret-team", ["--adapters", "secret"]),
            ("b-team", ["--adapters", "b*"]),
            ("helper-team", ["--adapters", "hr-helper"]),
        ):
            r = CliRunner().invoke(app, ["keys", "create", "--name", name, *scope])
            assert r.exit_code == 0, r.output
            keys[name] = r.stdout.strip()
    finally:
        if old is None:
            os.environ.pop("LORAPLEX_HOME", None)
        else:
            os.environ["LORAPLEX_HOME"] = old
    srv = ServeProcess(
        tiny_base,
        home,
        *("--max-loaded-adapters", "4", "--max-batch", "4", "--kv-cache-gb", str(KV_BUDGET_GB)),
        *("--header-timeout", "2", "--quantize", "int4"),
    )
    yield Tenants(srv, keys, home)
    srv.kill()


def test_one_long_request_gives_its_kv_memory_back_and_the_budget_bounds_it(tenants: Tenants) -> None:
    """Was: one 4,100-token completion took RSS from 1.9 to 7.5 GB, for good."""
    idle = tenants.metric("loraplex_kv_cache_bytes")
    assert tenants.metric("loraplex_kv_cache_budget_bytes") == int(KV_BUDGET_GB * 2**30)
    peak = [idle]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak.append(tenants.metric("loraplex_kv_cache_bytes"))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    long = tenants.chat("ops", "hr", max_tokens=900, temperature=0, ignore_eos=True)
    done.set()
    watcher.join()
    assert long.status_code == 200, long.text
    assert long.json()["usage"]["completion_tokens"] == 900
    assert max(peak) > idle and max(peak) <= tenants.metric("loraplex_kv_cache_budget_bytes")
    deadline = time.time() + 15  # the cache shrinks once its rows have needed a quarter for 5 s
    while time.time() < deadline and tenants.metric("loraplex_kv_cache_bytes") > max(peak) / 4:
        time.sleep(0.2)
    assert tenants.metric("loraplex_kv_cache_bytes") <= max(peak) / 4
    # what the budget cannot hold for one request is refused up front, saying why
    too_long = tenants.chat("ops", "hr", max_tokens=1000)
    assert too_long.status_code == 400
    err = too_long.json()["error"]
    assert err["code"] == "context_length_exceeded" and "KV cache budget" in err["message"], err


def test_chunked_bodies_over_the_limit_are_refused_while_they_stream(tenants: Tenants) -> None:
    """Was: a 10 MB chunked body was read and tokenised (9.8 s); a 60 MB one got 200."""
    sent = [0]

    def body() -> Iterator[bytes]:
        yield b'{"model": "hr", "max_tokens": 1, "messages": [{"role": "user", "content": "'
        for _ in range(60):  # 60 MB, without a Content-Length: chunked
            sent[0] += 1 << 20
            yield b"a" * (1 << 20)
        yield b'"}]}'

    t0 = time.perf_counter()
    r = httpx.post(
        f"{tenants.srv.url}/v1/chat/completions",
        content=body(),
        headers={"Authorization": f"Bearer {tenants.keys['ops']}", "content-type": "application/json"},
        timeout=60,
    )
    assert r.status_code == 413 and r.json()["error"]["message"].startswith("request body larger than"), r.text
    assert time.perf_counter() - t0 < 10


def test_a_body_that_stalls_is_cut_off(tenants: Tenants) -> None:
    with socket.create_connection(("127.0.0.1", int(tenants.srv.url.rsplit(":", 1)[1])), timeout=30) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {tenants.keys['ops']}\r\nContent-Length: 1000\r\n\r\n".encode()
            + b'{"model": "hr", '
        )
        t0 = time.perf_counter()
        reply = s.recv(65536).decode()
    assert reply.startswith("HTTP/1.1 408"), reply
    assert 1.0 < time.perf_counter() - t0 < 30  # --header-timeout 2 (the module's server)


def test_an_abandoned_request_stops_and_is_logged_as_such(tenants: Tenants) -> None:
    """Was: client gone after 2 s, generation ran 142 s, logged 200 with 2,000 tokens."""
    body = {"model": "legal", "messages": USER, "max_tokens": 900, "n": 4, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
        httpx.post(
            f"{tenants.srv.url}/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {tenants.keys['ops']}"},
            timeout=httpx.Timeout(10, read=0.1),
        )
    deadline = time.time() + 20
    row = None
    while time.time() < deadline and row is None:
        time.sleep(0.2)
        with sqlite3.connect(tenants.home / "server.db") as con:
            row = con.execute(
                "SELECT status, error, completion_tokens FROM requests WHERE model = 'legal' AND key = 'ops'"
            ).fetchone()
    assert row is not None and row[0] == 499 and row[1] == "client_disconnected", row
    assert row[2] < 3600  # metered as far as it went, and stopped there
    assert tenants.metric("loraplex_running_batch") == 0


def test_embeddings_follow_key_scopes_and_every_request_is_logged_and_metered(tenants: Tenants) -> None:
    def embed(key: str, given: object) -> httpx.Response:
        body = {"model": "multilingual", "input": given}
        auth = {"Authorization": f"Bearer {tenants.keys[key]}"}
        return httpx.post(f"{tenants.srv.url}/v1/embeddings", json=body, headers=auth, timeout=30)

    assert embed("ops", ["年假有几天？", "annual leave"]).status_code == 200
    hidden = embed("hr-team", "hello")  # its scope (hr*) does not name the encoder: as a missing model
    assert hidden.status_code == 404 and hidden.json()["error"]["code"] == "model_not_found"
    assert (
        hidden.json()["error"]["message"] == "the model 'multilingual' does not exist or you do not have access to it"
    )
    assert "multilingual" not in str(
        httpx.get(f"{tenants.srv.url}/v1/models", headers={"Authorization": f"Bearer {tenants.keys['hr-team']}"}).json()
    )
    assert embed("ops", [[1, 2, 3]]).status_code == 400
    assert (
        httpx.post(f"{tenants.srv.url}/v1/embeddings", json={"model": "multilingual", "input": "x"}).status_code == 401
    )
    rows: list = []
    deadline = time.time() + 20
    while time.time() < deadline and len(rows) < 4:
        time.sleep(0.2)
        with sqlite3.connect(tenants.home / "server.db") as con:
            rows = con.execute(
                "SELECT key, status, prompt_tokens, served FROM requests WHERE endpoint = 'embeddings' ORDER BY time"
            ).fetchall()
    assert [(k, st) for k, st, _, _ in rows] == [("ops", 200), ("hr-team", 404), ("ops", 400), (None, 401)]
    assert rows[0][2] > 2 and rows[0][3] == "multilingual"


def test_scoped_keys_learn_nothing_about_other_models_or_the_server(tenants: Tenants) -> None:
    """Was: a key for `hr*` asking for `hr-nonexistent` got the store's path and every adapter."""
    missing = tenants.chat("hr-team", "hr-nonexistent")
    hidden = tenants.chat("hr-team", "secret")
    as_version = tenants.chat("helper-team", "hr-helper@v1")
    weighted = tenants.chat("helper-team", "hr-helper:0.5")
    asked = {"hr-nonexistent": missing, "secret": hidden, "hr-helper@v1": as_version, "hr-helper:0.5": weighted}
    for model, r in asked.items():
        err = r.json()["error"]
        assert r.status_code == 404 and err["code"] == "model_not_found", (model, r.text)
        assert err["message"] == f"the model {model!r} does not exist or you do not have access to it"
        assert str(tenants.home) not in r.text and "legal" not in r.text
    assert tenants.chat("hr-team", "hr").status_code == 200
    # models.retrieve: another team's adapter reads as a missing one
    for model in ("secret", "hr-nonexistent", "secret@v1"):
        r = httpx.get(
            f"{tenants.srv.url}/v1/models/{model}", headers={"Authorization": f"Bearer {tenants.keys['hr-team']}"}
        )
        assert (
            r.status_code == 404
            and r.json()["error"]["message"] == f"the model {model!r} does not exist or you do not have access to it"
        )
    r = httpx.get(f"{tenants.srv.url}/v1/models/hr", headers={"Authorization": f"Bearer {tenants.keys['hr-team']}"})
    assert r.status_code == 200 and r.json()["id"] == "hr"


def test_a_glob_scope_matches_the_model_a_name_resolves_to(tenants: Tenants) -> None:
    """Was: a key for `b*` reached the base model through the names `base` and `default`."""
    for name in ("base", "default", tenants.srv.base_id):
        assert tenants.chat("b-team", name).status_code == 404, name
    assert tenants.chat("ops", "base").status_code == 200


def test_weighted_variants_never_evict_other_tenants_adapters(tenants: Tenants) -> None:
    """Was: `hr:0.01` ... `hr:0.10` each took an LRU slot and pushed out `secret@v1`."""
    assert tenants.chat("secret-team", "secret").status_code == 200
    assert tenants.chat("hr-team", "hr").status_code == 200
    for i in range(1, 11):
        assert tenants.chat("hr-team", f"hr:0.{i:02d}").status_code == 200
    loaded = tenants.loaded()
    assert "secret@v1" in loaded and "hr@v1" in loaded, loaded
    assert not [k for k in loaded if ":" in k], loaded  # every weight of hr on hr's one slot


def test_unload_reads_names_as_load_does(tenants: Tenants) -> None:
    """Was: `{"lora_name": "hr@../../x"}` returned 200 and unloaded every `hr` slot."""
    assert tenants.post("/v1/load_lora_adapter", {"lora_name": "hr"}, "ops").status_code == 200
    r = tenants.post("/v1/unload_lora_adapter", {"lora_name": "hr@../../x"}, "ops")
    load = tenants.post("/v1/load_lora_adapter", {"lora_name": "hr@../../x"}, "ops")
    # refused as load refuses it: a malformed name (the version part is not a name)
    assert r.status_code == load.status_code == 400, r.text
    assert r.json()["error"]["param"] == load.json()["error"]["param"] == "lora_name"
    # Was (schemathesis): a blank or padded name read as the base model, "loaded" "" with a 200
    for name in (" ", " hr"):
        blank = tenants.post("/v1/load_lora_adapter", {"lora_name": name}, "ops")
        assert blank.status_code == 400 and "not an adapter name" in blank.json()["error"]["message"], blank.text
    # Was (schemathesis): a NUL in vLLM's lora_path came back as a bare 400 "embedded null byte"
    for path in ("/tmp/elsewhere", "\u00d1k\u0000<"):
        wrong = tenants.post("/v1/load_lora_adapter", {"lora_name": "hr", "lora_path": path}, "ops")
        assert wrong.status_code == 422 and wrong.json()["error"]["param"] == "lora_path", wrong.text
    missing = tenants.post("/v1/unload_lora_adapter", {"lora_name": "hr@nosuch"}, "ops")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    assert "hr@v1" in tenants.loaded()
    unloaded = tenants.post("/v1/unload_lora_adapter", {"lora_name": "hr"}, "ops").json()["unloaded"]
    assert "hr@v1" in unloaded and all(k.startswith("hr@v1") for k in unloaded)


def test_slow_loris_connections_are_closed_and_health_keeps_answering(tiny_base: Path, tmp_path: Path) -> None:
    """Was: half-sent headers were never timed out; at the open-file limit `/health` stopped
    answering and the log filled with 124,745 tracebacks in 15 s."""
    srv = ServeProcess(tiny_base, tmp_path, "--header-timeout", "1.5", "--max-connections", "20")
    port = int(srv.url.rsplit(":", 1)[1])
    held = []
    try:
        for _ in range(60):  # three times the connection limit, each with half its headers sent
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
            held.append(s)
        time.sleep(2.5)  # past the header timeout
        for s in held:  # the server closed every one of them
            s.settimeout(5)
            with contextlib.suppress(ConnectionResetError):  # closed, or reset
                assert s.recv(1024) == b""
        for _ in range(3):
            assert httpx.get(f"{srv.url}/health", timeout=10).json() == {"status": "ok"}
    finally:
        for s in held:
            s.close()
        srv.proc.terminate()
        output = srv.proc.communicate(timeout=60)[0].decode()
    assert "Traceback" not in output, output[-3000:]
    lines = [x for x in output.splitlines() if "closed" in x and "connections" in x]
    assert 1 <= len(lines) <= 2, output[-3000:]  # one line per condition, not one per connection


def test_what_the_schema_allows_is_answered_as_documented(tenants: Tenants) -> None:
    """The cases the schemathesis run (test_fuzz.py) found the OpenAPI document untrue on, one by
    one: a 405 lists every method of the path; names that exist nowhere are 404s (also `base` as
    an adapter, and versions and aliases on the admin routes), an alias with nothing to roll back
    to a 409, an unusable upload a 422; JSON's types are strict (true is not 1, 0 is not false,
    4.0 is 4); a name with a trailing newline is refused; a tiny legal repetition_penalty answers."""
    srv, ops = tenants.srv, {"Authorization": f"Bearer {tenants.keys['ops']}"}
    options = httpx.request("OPTIONS", f"{srv.url}/ui/api/conversations/abcdefgh", headers=ops, timeout=30)
    assert options.status_code == 405 and set(options.headers["allow"].split(", ")) >= {"GET", "PUT", "DELETE"}

    def status(path: str, body: dict) -> tuple[int, str | None]:
        r = tenants.post(path, body, "ops")
        return r.status_code, r.json().get("error", {}).get("code")

    assert status("/v1/unload_lora_adapter", {"lora_name": "base"}) == (404, "model_not_found")
    assert status("/v1/load_lora_adapter", {"lora_name": "nobody"}) == (404, "model_not_found")
    assert status("/admin/aliases", {"name": "hr", "alias": "prod", "version": 9}) == (404, "not_found")
    assert status("/admin/aliases", {"name": "hr", "alias": "qa", "rollback": True}) == (404, "not_found")
    assert status("/admin/aliases", {"name": "hr", "alias": "qa", "version": 1}) == (200, None)
    assert status("/admin/aliases", {"name": "hr", "alias": "qa", "rollback": True}) == (409, "conflict")
    assert status("/admin/aliases", {"name": "hr", "alias": "qa", "version": True})[0] == 400
    assert status("/admin/aliases", {"name": "hr", "alias": "qa", "version": 1.0}) == (200, None)
    assert status("/admin/aliases", {"name": "hr\n", "alias": "qa", "version": 1})[0] == 400
    assert tenants.chat("ops", "hr", stream=0).status_code == 400
    assert tenants.chat("ops", "hr", n=1.0).status_code == 200
    assert tenants.chat("ops", "hr", repetition_penalty=2.2250738585072014e-309, temperature=1).status_code == 200
    lines = "\n".join('{"instruction": "hi"}' for _ in range(3))  # no answers: every record is invalid
    upload = {"filename": "faq.jsonl", "content_b64": base64.b64encode(lines.encode()).decode()}
    assert status("/ui/api/admin/train/check", upload)[0] == 200  # a check reports the records' errors
    assert status("/ui/api/admin/train/jobs", {**upload, "settings": {"name": "faq"}}) == (422, "unprocessable")
    not_utf8 = {"filename": "faq.jsonl", "content_b64": base64.b64encode("问".encode("gbk")).decode()}
    assert status("/ui/api/admin/train/check", not_utf8) == (422, "unprocessable")
    report = httpx.get(f"{srv.url}/ui/api/admin/train/jobs/0/report", headers=ops, timeout=30)
    assert report.status_code == 400 and report.json()["error"]["param"] == "path.job_id"
