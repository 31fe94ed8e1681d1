"""The server database on PostgreSQL (`LORAPLEX_DATABASE_URL`), for front doors on several hosts.

* Every table's module (keys, request log, audit, feedback, conversations, jobs) gives the same
  answers on SQLite and on a real PostgreSQL server, migrations included.
* The adapter index (versions, aliases, history, promotions) answers the same on both.
* Two `loraplex serve` processes on one store directory and one PostgreSQL (two hosts): a key made
  by the CLI works on both, an alias move and a revoke reach both, usage and feedback add up, and
  a conversation saved through one is read through the other.
* A key's rate limits hold across front doors; the shared limiter decides exactly as the
  in-memory one on a random sequence.
* A PostgreSQL outage answers 503 in OpenAI's shape, keeps the server up, and loses no log row.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from loraplex.errors import UserError
from loraplex.gateway import db, feedback, keys
from loraplex.gateway.log import RequestLog, RequestRow, audit_rows, summary
from loraplex.web import conversations
from tests.conftest import Server, make_adapter
from tests.pg import PostgresServer, start_or_skip
from tests.test_serve_process import ServeProcess

ASK = [{"role": "user", "content": "How many days of leave do I get?"}]


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    server = start_or_skip()
    yield server
    server.remove()


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[db.Database]:
    if request.param == "sqlite":
        d = db.connect(tmp_path / "server.db")
    else:
        d = db.connect(request.getfixturevalue("pg").new_database())
    yield d
    d.close()


def test_schema_is_built_once_even_when_many_processes_start_together(pg: PostgresServer, tmp_path: Path) -> None:
    for url in (f"sqlite:///{tmp_path / 'server.db'}", pg.new_database()):
        code = f"from loraplex.gateway import db; print(db.connect({url!r})._version())"
        procs = [
            subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(4)
        ]
        outs = [p.communicate(timeout=120) for p in procs]
        assert [p.returncode for p in procs] == [0] * 4, [e for _, e in outs]
        assert {o.strip() for o, _ in outs} == {str(len(db.MIGRATIONS))}
        d = db.connect(url)  # and opening it again changes nothing
        assert d._version() == len(db.MIGRATIONS)
        tables = (
            "SELECT name FROM sqlite_master WHERE type = 'table'"
            if d.dialect == "sqlite"
            else "SELECT tablename AS name FROM pg_tables WHERE schemaname = 'public'"
        )
        names = {r["name"] for r in d.all(tables)} - {"sqlite_sequence", "loraplex_schema"}
        assert names == {"keys", "requests", "feedback", "audit", "conversations", "jobs", "rate_events", "responses"}
        d.close()


def test_an_older_database_upgrades_in_place_and_keeps_its_rows(pg: PostgresServer, tmp_path: Path) -> None:
    for url in (f"sqlite:///{tmp_path / 'old.db'}", pg.new_database()):
        old = db.Database(url, db.MIGRATIONS[:3], "server")  # as a loraplex before the jobs' host column
        keys.create(old, "alice")
        old.run(
            "INSERT INTO jobs (id, key, name, status, config, run_dir, created) VALUES ('j', '', 'hr', 'done', '{}', '/x', 1)"
        )
        old.close()
        new = db.connect(url)
        assert new._version() == len(db.MIGRATIONS) == 6
        assert [k.name for k in keys.list_keys(new)] == ["alice"]
        assert dict(new.one("SELECT id, status, host FROM jobs") or {}) == {"id": "j", "status": "done", "host": None}
        new.close()


def test_a_bad_database_url_says_what_is_wrong_and_never_shows_the_password(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not a database URL"):
        db.connect("not a url")
    with pytest.raises(UserError, match=r"mysql://bob:\*\*\*@.*use a sqlite:///PATH or postgresql://"):
        db.connect("mysql://bob:hunter2@127.0.0.1/x")
    with pytest.raises(db.Unavailable) as e:
        db.connect("postgresql://bob:hunter2@127.0.0.1:1/x")  # nothing listens on port 1
    assert "postgresql://bob:***@127.0.0.1:1/x" in str(e.value) and "hunter2" not in str(e.value)
    made = _cli("keys", "list", home=tmp_path, env={db.URL_ENV: "postgresql://bob:hunter2@127.0.0.1:1/x"})
    assert made.returncode == 2 and "is unavailable" in made.stderr and "hunter2" not in made.stderr


def test_a_newer_schema_is_refused_with_what_to_do(database: db.Database) -> None:
    if database.dialect == "sqlite":
        database.run(f"PRAGMA user_version = {len(db.MIGRATIONS) + 1}")
    else:
        database.run(
            "UPDATE loraplex_schema SET version = :v WHERE component = 'server'", {"v": len(db.MIGRATIONS) + 1}
        )
    url = database.engine.url.render_as_string(hide_password=False)
    with pytest.raises(UserError, match="server database .* schema version .* upgrade loraplex"):
        db.connect(url)


def test_keys_log_audit_feedback_and_conversations_agree_on_both_databases(
    database: db.Database, tmp_path: Path
) -> None:
    # keys
    key, token = keys.create(database, "alice", models=("legal*",), rpm=5, expires=time.time() + 3600)
    assert keys.authenticate(database, f"Bearer {token}") == key
    assert (key.models, key.rpm, key.admin) == (("legal*",), 5, False)
    with pytest.raises(UserError, match="exists already"):
        keys.create(database, "alice")
    with pytest.raises(keys.AuthError):
        keys.authenticate(database, f"Bearer {token[:-4]}abcd")
    assert keys.any_active(database)
    revoked = keys.revoke(database, "alice")
    assert revoked.revoked is not None and keys.revoke(database, "alice").revoked == revoked.revoked
    with pytest.raises(keys.AuthError, match="revoked"):
        keys.authenticate(database, f"Bearer {token}")
    assert not keys.any_active(database)

    # the request log: batches, an id written twice is replaced, and times keep full precision
    log = RequestLog(database)
    t0 = 1_790_000_000.123456
    for i in range(300):
        log.write(
            RequestRow(
                id=f"chatcmpl-{i}",
                time=t0 + i,
                key="alice" if i % 3 else None,
                model="legal",
                served="legal@v1" if i % 2 else "hr_x@v2",
                endpoint="/v1/chat/completions",
                status=200 if i % 10 else 429,
                prompt_tokens=10,
                completion_tokens=i % 7,
                ttft_ms=5.0 + i,
                latency_ms=50.0 + i,
            )
        )
    log.write(RequestRow(id="chatcmpl-0", time=t0, key=None, model="legal", served="hr_x@v2", endpoint="x", status=500))
    log.flush()
    log.close()
    assert log.written == 301
    row = log.lookup("chatcmpl-5")
    assert row is not None and row["time"] == pytest.approx(t0 + 5, abs=1e-6)
    assert log.lookup("chatcmpl-0")["status"] == 500  # type: ignore[index]
    by_adapter = {r["name"]: r for r in summary(database, t0, "adapter")}
    assert {n: r["requests"] for n, r in by_adapter.items()} == {"legal@v1": 150, "hr_x@v2": 150}
    assert by_adapter["hr_x@v2"]["errors"] == 30  # every 10th row (all even) is a 429, row 0 now a 500
    assert by_adapter["legal@v1"]["completion_tokens"] == sum(i % 7 for i in range(1, 300, 2))
    assert by_adapter["legal@v1"]["avg_latency_ms"] == pytest.approx(
        sum(50.0 + i for i in range(1, 300, 2) if i % 10) / len([i for i in range(1, 300, 2) if i % 10])
    )
    assert {r["name"]: r["requests"] for r in summary(database, t0 + 150, "key")} == {"alice": 100, "-": 50}

    # audit
    log.audit("root", "alias", "legal", {"alias": "prod", "version": 2}, 200)
    log.audit(None, "keys", None, None, 403)
    rows = audit_rows(database, 10)
    assert [(r["key"], r["action"], r["status"]) for r in rows] == [(None, "keys", 403), ("root", "alias", 200)]
    assert json.loads(rows[1]["detail"]) == {"alias": "prod", "version": 2}

    # feedback: ids, the LIKE pattern ('_' is literal), export and stats
    said = [{"role": "user", "content": "年假几天?"}]
    ids = [
        feedback.record(database, "r1", feedback.Answered("alice", "hr_x@v2", said, ("10天",)), 0, "up", None, None),
        feedback.record(
            database, "r2", feedback.Answered("bob", "hr_x@v2", said, ("5天",)), 0, "down", "wrong", "15天"
        ),
        feedback.record(database, "r3", feedback.Answered("bob", "hrax@v1", said, ("?",)), 0, "down", None, None),
    ]
    assert ids[0] < ids[1] < ids[2]
    stats = {r["adapter"]: r for r in feedback.stats(database)}
    assert (stats["hr_x@v2"]["up"], stats["hr_x@v2"]["down"], stats["hr_x@v2"]["corrected"]) == (1, 1, 1)
    assert stats["hr_x@v2"]["up_ratio"] == 0.5
    assert [r["adapter"] for r in feedback.stats(database, "hr_x")] == ["hr_x@v2"]  # not hrax
    out = tmp_path / "fb.jsonl"
    assert feedback.export(database, "hr_x", out) == {"written": 2, "skipped": 0}
    answers = [json.loads(line)["messages"][-1]["content"] for line in out.read_text(encoding="utf-8").splitlines()]
    assert answers == ["10天", "15天"]

    # conversations: a key never reads or overwrites another's
    cid = "c0ffee00-1234"
    assert conversations.save(database, "alice", cid, "假期", "hr", [{"role": "user", "content": "年假"}])
    assert conversations.save(database, "alice", cid, "假期", "hr", [{"role": "user", "content": "年假?"}] * 2)
    assert not conversations.save(database, "bob", cid, "mine now", "hr", [])
    got = conversations.get(database, "alice", cid)
    assert got is not None and got["title"] == "假期" and len(got["messages"]) == 2
    assert conversations.get(database, "bob", cid) is None
    assert [c["id"] for c in conversations.listing(database, "alice")] == [cid]
    assert not conversations.delete(database, "bob", cid)
    assert conversations.delete(database, "alice", cid) and conversations.listing(database, "alice") == []


def test_a_front_door_marks_only_its_own_hosts_dead_jobs_interrupted(database: db.Database) -> None:
    import socket

    from loraplex.web.jobs import Jobs

    dead = 2**22 + 12345  # above the largest pid_max Linux allows: no such process
    for job_id, host in (("a" * 32, socket.gethostname()), ("b" * 32, "gpu-node-7"), ("c" * 32, None)):
        database.run(
            "INSERT INTO jobs (id, key, name, status, config, run_dir, pid, created, host)"
            " VALUES (:id, '', 'hr', 'training', '{}', '/x', :pid, 0, :host)",
            {"id": job_id, "pid": dead, "host": host},
        )
    Jobs(database, "base")
    status = {r["id"][0]: r["status"] for r in database.all("SELECT id, status FROM jobs")}
    assert status == {"a": "interrupted", "b": "training", "c": "interrupted"}


def test_shared_rate_limits_decide_exactly_as_the_in_memory_ones(pg: PostgresServer) -> None:
    """The reference is RateLimiter (one process); SharedRateLimiter must give the same answer,
    the same limit and the same Retry-After for every request of a random sequence."""
    import random

    from loraplex.gateway.limits import RateLimited, RateLimiter, SharedRateLimiter

    shared_db = db.connect(pg.new_database())
    memory, shared = RateLimiter(), SharedRateLimiter(shared_db)

    def key(name: str, rpm: int | None, tpm: int | None) -> keys.Key:
        return keys.Key(
            id=name, name=name, models=("*",), admin=False, rpm=rpm, tpm=tpm, expires=None, created=0.0, revoked=None
        )

    limits = [key("a", 5, None), key("b", None, 300), key("c", 8, 500)]
    rnd = random.Random(7)
    now, seen = 1_790_000_000.0, []
    for _ in range(300):
        now += rnd.choice([0.5, 1.0, 3.0, 7.0, 20.0])
        k, prompt, completion = rnd.choice(limits), rnd.randint(1, 120), rnd.randint(0, 80)
        answers = []
        for limiter in (memory, shared):
            try:
                usage = limiter.admit(k, prompt, now=now)
                assert usage is not None
                usage.add(completion)
                answers.append("ok")
            except RateLimited as e:
                answers.append(f"{e.limit} {e.retry_after}")
        shared.flush()
        assert answers[0] == answers[1], (k.name, now, answers)
        seen.append(answers[0])
    assert 60 < seen.count("ok") < 280  # the sequence exercises both admitting and refusing
    assert any(s.startswith("requests") for s in seen) and any(s.startswith("tokens") for s in seen)
    shared.close()
    shared_db.close()


def test_a_keys_rate_limit_holds_across_front_doors(pg: PostgresServer, tiny_base: Path, lp_home: Path) -> None:
    from loraplex.engine.engine import Engine
    from loraplex.gateway.gate import Gateway

    url = pg.new_database()
    _, token = keys.create(db.connect(url), "capped", rpm=3)
    engine = Engine(str(tiny_base), dtype="fp32", max_batch=2)
    doors = [Server(engine, Gateway(engine=engine, database=url), api_key=token) for _ in range(2)]
    try:
        codes = []
        for i in range(5):
            r = httpx.post(
                f"{doors[i % 2].url}/v1/chat/completions",
                headers={"Authorization": f"Bearer {token}"},
                json={"model": engine.base.id, "messages": ASK, "max_tokens": 2},
                timeout=60,
            )
            codes.append((i % 2, r.status_code, r.json().get("error", {}).get("code")))
        # 3 a minute in all: door B refuses the 4th having admitted only one itself
        assert codes == [
            (0, 200, None),
            (1, 200, None),
            (0, 200, None),
            (1, 429, "rate_limit_requests"),
            (0, 429, "rate_limit_requests"),
        ]
    finally:
        for d in doors:
            d.stop()
        engine.close()


def _registry_story(tiny_base: Path) -> list[object]:
    """Tag, move, roll back, promote, edit, remove and repair, returning what each step shows."""
    from loraplex.adapters import promotion, registry

    seen: list[object] = []
    for seed in (1, 2, 3):
        make_adapter(tiny_base, "hr_x", seed=seed)
    make_adapter(tiny_base, "legal", seed=4)
    registry.tag("hr_x@v1", "prod")
    registry.tag("hr_x@v2", "prod")
    registry.tag("hr_x@v3", "staging")
    seen += [registry.aliases_of("hr_x"), registry.resolve("hr_x@prod").id]
    seen.append(registry.rollback("hr_x", "prod"))
    seen.append(registry.resolve("hr_x@prod").id)
    promoted = promotion.promote("hr_x@v3", "prod")
    seen += [promoted.previous, [(p["from_version"], p["to_version"]) for p in registry.promotions("hr_x")]]
    registry.describe("legal@v1", description="合同审查")
    seen.append([(e["name"], e["versions"], e["aliases"], e["description"]) for e in registry.catalog()])
    registry.tag("hr_x@v2", "canary")
    with pytest.raises(UserError, match="points to"):
        registry.remove("hr_x@v3")
    registry.remove("hr_x@v3", force=True)
    shutil.rmtree(registry.store_root() / "legal" / "v1")  # gone behind the index's back
    seen.append([(e["name"], e["versions"], e["aliases"]) for e in registry.catalog()])
    seen.append(registry.all_aliases())
    return seen


def test_the_adapter_index_behaves_the_same_on_postgres(
    pg: PostgresServer, tiny_base: Path, lp_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    on_sqlite = _registry_story(tiny_base)
    assert (lp_home / "adapters" / "index.db").is_file()
    other = lp_home.parent / "home-pg"
    other.mkdir()
    monkeypatch.setenv("LORAPLEX_HOME", str(other))
    monkeypatch.setenv(db.URL_ENV, pg.new_database())
    on_postgres = _registry_story(tiny_base)
    assert on_postgres == on_sqlite
    assert on_sqlite[-1] == {"hr_x": {"canary": 2}}  # removing v3 (--force) took prod and staging along
    assert not (other / "adapters" / "index.db").exists()


def _cli(*args: str, home: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LORAPLEX_HOME": str(home), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "loraplex.cli", *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_front_doors_on_two_hosts_share_one_postgres(
    pg: PostgresServer, tiny_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two front doors as on two hosts: the store's directory is the shared volume, and every
    # table (keys, log, feedback, conversations, the adapter index) is in PostgreSQL, none in a file.
    monkeypatch.setenv(db.URL_ENV, pg.new_database())
    home = tmp_path / "shared-volume"
    monkeypatch.setenv("LORAPLEX_HOME", str(home))
    make_adapter(tiny_base, "legal", seed=1)
    make_adapter(tiny_base, "legal", seed=2)
    assert _cli("adapters", "tag", "legal@v1", "prod", home=home).returncode == 0
    made = _cli("keys", "create", "--name", "alice", home=home)
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    admin = _cli("keys", "create", "--name", "ops", "--admin", home=home).stdout.strip()
    doors = [ServeProcess(tiny_base, home, "--log-text"), ServeProcess(tiny_base, home, "--log-text")]
    try:
        clients = [openai.OpenAI(base_url=d.url + "/v1", api_key=token, max_retries=0) for d in doors]
        greedy = {"temperature": 0, "max_tokens": 6}
        answers = [c.chat.completions.create(model="legal@prod", messages=ASK, **greedy) for c in clients]  # type: ignore[call-overload]
        assert answers[0].choices[0].message.content == answers[1].choices[0].message.content

        # the alias moves on "host A"'s CLI: both front doors follow on their next request
        assert _cli("adapters", "tag", "legal@v2", "prod", home=home).returncode == 0
        answers += [c.chat.completions.create(model="legal@prod", messages=ASK, **greedy) for c in clients]  # type: ignore[call-overload]

        # usage from both front doors adds up (each writes its rows in the background), seen from
        # either: the CLI, and the admin route on door B
        deadline = time.time() + 30
        while True:
            use = {r["name"]: r for r in json.loads(_cli("usage", "--json", home=home).stdout)}
            if sum(r["requests"] for r in use.values()) == 4 or time.time() > deadline:
                break
            time.sleep(0.3)
        assert {n: r["requests"] for n, r in use.items()} == {"legal@v1": 2, "legal@v2": 2}
        assert sum(r["completion_tokens"] for r in use.values()) == sum(a.usage.completion_tokens for a in answers)  # type: ignore[union-attr]
        listed = httpx.get(doors[1].url + "/admin/keys", headers={"Authorization": f"Bearer {admin}"}, timeout=30)
        assert {k["name"]: (k["usage"] or {}).get("requests") for k in listed.json()["data"]} == {
            "alice": 4,
            "ops": None,
        }

        # feedback on door A's answer, given through door B (it finds the response in the shared log)
        fb = httpx.post(
            doors[1].url + "/v1/feedback",
            headers={"Authorization": f"Bearer {token}"},
            json={"id": answers[0].id, "rating": "down", "correction": "十五天"},
            timeout=30,
        )
        assert fb.status_code == 200, fb.text
        stats = json.loads(_cli("feedback", "stats", "--json", home=home).stdout)
        assert [(s["adapter"], s["down"], s["corrected"]) for s in stats] == [("legal@v1", 1, 1)]

        # a conversation saved through A is there through B
        auth = {"Authorization": f"Bearer {token}"}
        cid = "0d6f3c1e-aaaa-bbbb"
        conv = {"title": "年假", "model": "legal@prod", "messages": [{"role": "user", "content": "年假几天"}]}
        assert httpx.put(f"{doors[0].url}/ui/api/conversations/{cid}", json=conv, headers=auth).status_code == 200
        back = httpx.get(f"{doors[1].url}/ui/api/conversations/{cid}", headers=auth).json()
        assert back["messages"] == conv["messages"]

        # revoked with the CLI: refused by both front doors on the next request
        assert _cli("keys", "revoke", "alice", home=home).returncode == 0
        for c in clients:
            with pytest.raises(openai.AuthenticationError):
                c.chat.completions.create(model="legal@prod", messages=ASK, **greedy)  # type: ignore[call-overload]
        assert not (home / "server.db").exists() and not (home / "adapters" / "index.db").exists()
    finally:
        for d in doors:
            d.proc.terminate()
            d.proc.wait(timeout=30)


def test_a_long_outage_holds_log_rows_up_to_a_bound_and_counts_the_rest(lp_home: Path) -> None:
    """While PostgreSQL is down the writer holds rows in memory, but at most `max_pending`: later
    rows are dropped and counted (in the /metrics counter too), so a long outage cannot grow the
    server without end. The held rows are written once the database is back."""
    from loraplex.gateway.metrics import Metrics

    own = start_or_skip()  # its own server: this test stops it
    try:
        database = db.connect(own.new_database())
        metrics = Metrics()
        log = RequestLog(database, max_pending=5, dropped=metrics.log_dropped)
        own.stop()
        for i in range(8):
            log.write(
                RequestRow(id=f"r{i}", time=time.time(), key=None, model="m", served=None, endpoint="e", status=200)
            )
        assert (log.pending, log.dropped) == (5, 3)
        assert b"loraplex_request_log_dropped_total 3.0" in metrics.render()
        own.start()
        log.flush(60)
        assert log.pending == 0 and log.written == 5
        ids = [r["id"] for r in database.all("SELECT id FROM requests ORDER BY id")]
        assert ids == ["r0", "r1", "r2", "r3", "r4"]  # the first five of the outage, none of the rest
        log.write(RequestRow(id="after", time=time.time(), key=None, model="m", served=None, endpoint="e", status=200))
        log.flush()
        assert database.one("SELECT id FROM requests WHERE id = 'after'") is not None
        log.close()
    finally:
        own.remove()


def test_a_postgres_outage_answers_503_and_loses_no_log_row(tiny_base: Path, tmp_path: Path, lp_home: Path) -> None:
    from loraplex.engine.engine import Engine
    from loraplex.gateway.gate import Gateway

    own = start_or_skip()  # its own server: this test stops it
    url = own.new_database()
    _, token = keys.create(db.connect(url), "alice")
    engine = Engine(str(tiny_base), dtype="fp32", max_batch=2)
    srv = Server(engine, Gateway(engine=engine, database=url), api_key=token)
    try:
        greedy = {"temperature": 0, "max_tokens": 4}
        first = srv.client.chat.completions.create(model=engine.base.id, messages=ASK, **greedy)  # type: ignore[call-overload]
        own.stop()
        with pytest.raises(openai.APIStatusError) as e:
            srv.client.chat.completions.create(model=engine.base.id, messages=ASK, **greedy)  # type: ignore[call-overload]
        assert e.value.status_code == 503
        assert e.value.body["code"] == "database_unavailable"  # type: ignore[index]
        assert "postgresql://loraplex@127.0.0.1" in e.value.body["message"]  # type: ignore[index]
        assert httpx.get(srv.url + "/health").status_code == 200
        flushed = threading.Thread(target=srv.gateway.log.flush, args=(60,))
        flushed.start()  # the writer holds the rows (the success and the 503) while the database is down
        time.sleep(1.0)
        own.start()
        flushed.join()
        after = srv.client.chat.completions.create(model=engine.base.id, messages=ASK, **greedy)  # type: ignore[call-overload]
        srv.gateway.log.flush()
        rows = db.connect(url).all("SELECT id, status FROM requests ORDER BY time")
        assert [(r["id"], r["status"]) for r in rows][:1] == [(first.id, 200)]
        assert [r["status"] for r in rows] == [200, 503, 200] and rows[-1]["id"] == after.id
    finally:
        srv.stop()
        engine.close()
        own.remove()
