"""`loraplex serve` fuzzed from its own OpenAPI schema by schemathesis, as users' clients and
attackers would send: every route, with an admin key, with a key scoped to one adapter, and with
keys off, half the requests naming models that exist (tests/fuzz_hooks.py). Bounded in time.
Every schemathesis check runs: no 5xx; every status, content type, header (a 405's Allow) and
body as the OpenAPI document says; schema-valid requests accepted (or refused only with a
documented 401/403/404/409/422/429, see tests/schemathesis.toml) and schema-invalid ones
refused. The server must be alive afterwards.

Why the CLI (`st run`) and not schemathesis' pytest plugin: it drives a server in its own process
over real HTTP, exactly as `loraplex serve` runs for users, and its `--max-time` bounds the run.
The request bodies the schema cannot describe (a lone UTF-16 surrogate, raw bytes) are tested by
hand in test_api.py.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from loraplex.cli import app
from tests.conftest import make_adapter
from tests.test_serve_process import ServeProcess

TESTS = Path(__file__).parent


def _fuzz(url: str, seconds: int, seed: int, models: list[str], key: str | None = None) -> int:
    """Run schemathesis against `url` for `seconds`; the number of requests it sent."""
    cmd = [str(Path(sys.executable).parent / "st"), "--config-file", str(TESTS / "schemathesis.toml")]
    cmd += ["run", f"{url}/openapi.json", "--checks", "all", "--max-time", str(seconds), "--workers", "1"]
    # Not the coverage phase: its boundary cases (1,024 messages) bypass tests/fuzz_hooks.py, which
    # keeps prompts within the test model's context (a longer one is OpenAI's 400, which no schema can
    # foresee); the fuzzing and stateful phases reach every field and route.
    cmd += ["--phases", "examples,fuzzing,stateful", "--max-response-time", "120"]
    cmd += ["--seed", str(seed), "--request-timeout", "60", "--no-shrink", "--warnings", "off"]
    cmd += ["--header", f"Authorization: Bearer {key}"] if key else []
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": "tests.fuzz_hooks",
        "PYTHONPATH": str(TESTS.parent),
        "LORAPLEX_FUZZ_MODELS": ",".join(models),
    }
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=seconds + 300, cwd=tempfile.gettempdir(), env=env
    )
    assert done.returncode == 0, done.stdout[done.stdout.find("FAILURES") :][:6000] + done.stderr[-2000:]
    counts = re.search(r"(\d+) generated, (\d+) passed", done.stdout)
    assert counts is not None and counts[1] == counts[2], done.stdout[-3000:]
    return int(counts[1])


def _alive(srv: ServeProcess) -> None:
    assert srv.proc.poll() is None
    assert httpx.get(f"{srv.url}/health", timeout=30).json() == {"status": "ok"}
    answer = srv.client.chat.completions.create(
        model=srv.base_id, messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert answer.choices[0].message.content is not None


@pytest.mark.slow(110)
def test_schemathesis_finds_nothing_with_keys_on_and_off(tiny_base: Path, lp_home: Path, tmp_path: Path) -> None:
    make_adapter(tiny_base, "hr", seed=1)
    make_adapter(tiny_base, "legal", seed=2)
    runner = CliRunner()
    keys = {}
    for name, scope in (("ops", ["--admin"]), ("hr-team", ["--adapters", "hr"])):
        r = runner.invoke(app, ["keys", "create", "--name", name, *scope])
        assert r.exit_code == 0, r.output
        keys[name] = r.stdout.strip()
    srv = ServeProcess(tiny_base, lp_home)
    srv.client.api_key = keys["ops"]
    try:
        assert httpx.get(f"{srv.url}/v1/models", timeout=30).status_code == 401  # keys exist: auth is on
        models = ["hr", "legal", "hr@v1", "hr:0.5", "hr+legal", "base", srv.base_id]
        sent = _fuzz(srv.url, 30, seed=1, models=models, key=keys["ops"])
        sent += _fuzz(srv.url, 15, seed=2, models=models, key=keys["hr-team"])
        _alive(srv)
    finally:
        srv.kill()
    assert sent > 1000, sent  # enough requests to mean something (about 10,000 a minute here)

    open_home = tmp_path / "open-home"  # the same adapters, no keys: every route is open
    shutil.copytree(lp_home / "adapters", open_home / "adapters")
    srv = ServeProcess(tiny_base, open_home)
    try:
        assert httpx.get(f"{srv.url}/v1/models", timeout=30).status_code == 200
        assert _fuzz(srv.url, 30, seed=3, models=models) > 500
        _alive(srv)
    finally:
        srv.kill()


def test_every_message_role_has_a_schema_of_its_own() -> None:
    """The messages' discriminator maps each role to its own schema. With "system" and "developer"
    both mapped to one, schemathesis took the schema to allow only one of them and reported a valid
    developer message as a schema violation accepted (6 seeds in 6 at 100 s)."""
    from pydantic import TypeAdapter

    from loraplex.api.schemas import Message

    schema = TypeAdapter(list[Message]).json_schema()
    mapping = schema["items"]["discriminator"]["mapping"]
    assert set(mapping) == {"system", "developer", "user", "assistant", "tool"}
    assert len(set(mapping.values())) == len(mapping), mapping
    for role, ref in mapping.items():
        allowed = schema["$defs"][ref.rsplit("/", 1)[1]]["properties"]["role"]
        assert allowed.get("enum", [allowed.get("const")]) == [role], (role, allowed)
    parsed = TypeAdapter(list[Message]).validate_python([{"role": "developer", "content": "be brief"}])
    assert parsed[0].text() == "be brief"
