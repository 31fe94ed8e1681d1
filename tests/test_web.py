"""The web app in a real browser (Debian's Chromium driven by Playwright) against a real
`loraplex serve` process on loopback, keys on: sign in, pick an assistant, a streamed reply,
a thumbs down with a correction, history kept per key, compare two versions, phone width."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import FACTS, make_adapter, write_jsonl

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")


@pytest.fixture
def served(lp_home: Path, tiny_base: Path, tmp_path: Path) -> Iterator[dict]:
    from loraplex.gateway import db, keys

    make_adapter(tiny_base, "helper", seed=0)
    make_adapter(tiny_base, "helper", seed=1)
    make_adapter(tiny_base, "secret", seed=2)
    con = db.connect()
    _, alice = keys.create(con, "alice", models=("helper*",))
    _, bob = keys.create(con, "bob", models=("*",))
    _, root = keys.create(con, "root", admin=True)
    _, old = keys.create(con, "old", expires=time.time() - 60)
    con.close()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    procs: list[subprocess.Popen] = []

    def launch() -> None:
        log = tmp_path / f"serve-{len(procs)}.log"
        cmd = [sys.executable, "-m", "loraplex.cli", "serve", "--base", str(tiny_base), "--port", str(port)]
        with open(log, "w") as out:
            proc = subprocess.Popen(
                [*cmd, "--device", "cpu", "--dtype", "fp32"],
                env={**os.environ, "LORAPLEX_HOME": str(lp_home)},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        procs.append(proc)
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(url + "/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert time.time() < deadline
            time.sleep(0.2)

    def crash_and_restart() -> None:
        procs[-1].kill()  # no graceful drain: streams just break, as when a machine goes away
        procs[-1].wait()
        launch()

    launch()
    try:
        yield {
            "log": lambda: (tmp_path / f"serve-{len(procs) - 1}.log").read_text(errors="replace"),
            "url": url,
            "alice": alice,
            "bob": bob,
            "root": root,
            "old": old,
            "home": lp_home,
            "restart": crash_and_restart,
        }
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=60)


def _wait(page: Any, served: dict, selector: str, timeout: float = 180000) -> None:
    """page.wait_for_selector, and when it times out, what the page and the server showed then: a
    wait that fails once in many CI runs says why (an error banner, an answer without sources, a
    server still loading)."""
    from playwright.sync_api import TimeoutError as PageTimeout

    try:
        page.wait_for_selector(selector, timeout=timeout)
    except PageTimeout:
        banner = page.inner_text("#banner") if page.is_visible("#banner") else ""
        shown = page.inner_text("#messages")
        raise AssertionError(
            f"no {selector} after {timeout / 1000:.0f} s; banner: {banner!r}; messages: {shown[-1500:]!r}; "
            f"server log: {served['log']()[-4000:]}"
        ) from None


def _shots(tmp_path: Path) -> Path:
    d = Path(os.environ.get("LORAPLEX_SCREENSHOTS") or tmp_path / "shots")
    d.mkdir(parents=True, exist_ok=True)
    return d


def test_chat_feedback_history_and_compare_in_a_browser(served: dict, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    url, shots = served["url"], _shots(tmp_path)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 800})
        errors: list[str] = []
        streamed: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on(
            "response",
            lambda r: (
                streamed.append(r.headers.get("content-type", "")) if r.url.endswith("/chat/completions") else None
            ),
        )

        # Sign in: a wrong or expired key is refused with the server's reason, the right one opens the app.
        page.goto(url + "/")
        page.fill("#key-input", "lp-000000000000-wrong")
        page.click("#signin-form button")
        page.wait_for_selector("#signin-error:not([hidden])")
        assert "invalid" in page.inner_text("#signin-error").lower()
        page.fill("#key-input", served["old"])
        page.click("#signin-form button")
        page.wait_for_function("document.querySelector('#signin-error').innerText.includes('expired')")
        errors.clear()  # the refused sign-in logs its 401 in the console; nothing else may
        page.fill("#key-input", served["alice"])
        page.click("#signin-form button")
        page.wait_for_selector("#app:not([hidden])")

        # The picker offers what alice's key allows, and nothing else (its list arrives after sign-in).
        page.wait_for_selector("#model-select option", state="attached")
        offered = page.eval_on_selector_all("#model-select option", "os => os.map(o => o.value)")
        assert "helper" in offered and not any(o.startswith("secret") for o in offered)

        # A streamed reply to a message sent with Enter; Enter while an IME composes sends nothing.
        page.select_option("#model-select", "helper")
        page.click("#settings summary")  # sampling settings are tucked away
        page.fill("#max-tokens", "12")
        page.fill("#input", "年假有多少天？")
        page.dispatch_event("#input", "keydown", {"key": "Enter", "isComposing": True})
        assert page.locator(".msg.user").count() == 0
        page.press("#input", "Enter")
        page.wait_for_selector(".msg.assistant .down:not([disabled])", timeout=60000)
        assert page.inner_text(".msg.user") == "年假有多少天？"
        assert page.inner_text(".msg.assistant .content").strip()
        assert streamed and all(c.startswith("text/event-stream") for c in streamed)
        page.screenshot(path=str(shots / "web-chat.png"))

        # Thumbs down with a correction: stored against the exact version that answered.
        page.click(".msg.assistant .down")
        page.fill(".msg.assistant .fb-comment", "wrong number")
        page.fill(".msg.assistant .fb-correction", "员工每年有15天带薪年假。")
        page.click(".msg.assistant .feedback button[type=submit]")
        page.wait_for_selector(".fb-thanks")
        con = sqlite3.connect(served["home"] / "server.db")
        rows = con.execute("SELECT key, adapter, rating, comment, correction FROM feedback").fetchall()
        assert rows == [("alice", "helper@v2", "down", "wrong number", "员工每年有15天带薪年假。")]

        # After a reload the conversation is in the sidebar, with its rating.
        page.reload()
        page.wait_for_selector("#conversations li")
        page.click("#conversations li .open")
        page.wait_for_selector(".msg.assistant")
        assert page.get_attribute(".msg.assistant .down", "aria-pressed") == "true"
        cid = con.execute("SELECT id FROM conversations WHERE key='alice'").fetchone()[0]

        # Compare two versions side by side; the vote is feedback on both answers.
        page.click("#tab-compare")
        page.select_option("#cmp-a", "helper@v1")
        page.select_option("#cmp-b", "helper@v2")
        page.fill("#input", "Who approves expense claims?")
        page.press("#input", "Enter")
        page.wait_for_selector(".col .vote:not([disabled])", timeout=60000)
        assert page.locator(".compare-cols .col").count() == 2
        page.locator(".col .vote").first.click()
        page.wait_for_selector(".col.winner")
        page.screenshot(path=str(shots / "web-compare.png"))
        votes = con.execute("SELECT adapter, rating, comment FROM feedback WHERE comment LIKE 'compare:%'").fetchall()
        assert sorted(votes) == [
            ("helper@v1", "up", "compare: preferred over helper@v2"),
            ("helper@v2", "down", "compare: helper@v1 preferred"),
        ]

        # A huge paste is refused in the page with its size, and nothing is sent.
        page.click("#tab-chat")
        sent = len(streamed)
        page.fill("#input", "长" * 100_001)
        page.press("#input", "Enter")
        page.wait_for_selector("#banner:not([hidden])")
        assert "100001" in page.inner_text("#banner") and len(streamed) == sent

        # Chinese UI text, and a phone-width layout that does not scroll sideways.
        page.click("#lang")
        assert page.inner_text("#send") == "发送"
        page.set_viewport_size({"width": 390, "height": 844})
        page.click("#tab-chat")
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        page.screenshot(path=str(shots / "web-phone.png"))

        # Deleting a conversation (confirmed) removes it from the sidebar and the server.
        page.set_viewport_size({"width": 1200, "height": 800})
        page.on("dialog", lambda d: d.accept())
        page.click("#conversations li .del")
        page.wait_for_function("document.querySelectorAll('#conversations li').length === 0")
        assert con.execute("SELECT COUNT(*) FROM conversations").fetchone()[0] == 0
        assert errors == []
        browser.close()

    # Nothing of alice's is visible to another key.
    bob = {"Authorization": f"Bearer {served['bob']}"}
    assert httpx.get(url + "/ui/api/conversations", headers=bob).json() == {"data": []}
    alice = {"Authorization": f"Bearer {served['alice']}"}
    body = {"title": "mine", "model": "helper", "messages": [{"role": "user", "content": "hi"}]}
    assert httpx.put(f"{url}/ui/api/conversations/{cid}", headers=alice, json=body).status_code == 200
    r = httpx.get(f"{url}/ui/api/conversations/{cid}", headers=bob)
    assert r.status_code == 404 and r.json()["error"]["code"] == "conversation_not_found"
    r = httpx.put(f"{url}/ui/api/conversations/{cid}", headers=bob, json={"title": "x", "model": "m", "messages": []})
    assert r.status_code == 404
    assert httpx.get(url + "/ui/api/conversations").status_code == 401
    assert json.loads(httpx.get(f"{url}/ui/api/conversations/{cid}", headers=alice).text)["title"] == "mine"
    r = httpx.put(f"{url}/ui/api/conversations/../etc", headers=alice, json=body)
    assert r.status_code in (400, 404)


def test_admin_trains_from_an_upload_and_moves_an_alias(served: dict, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    from loraplex.adapters import registry

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "q1", "output": "a1"}\n{"instruction": "q2"}\nnot json\n', encoding="utf-8")
    good = write_jsonl(tmp_path / "policies.jsonl", [{"instruction": q, "output": a} for q, a in FACTS])
    url, shots = served["url"], _shots(tmp_path)
    for model in ("helper@v1", "helper@v2"):  # some traffic for the live and usage charts
        r = httpx.post(
            url + "/v1/chat/completions",
            headers={"Authorization": f"Bearer {served['root']}"},
            json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8},
            timeout=60,
        )
        assert r.status_code == 200
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("dialog", lambda d: d.accept())  # the alias move asks for confirmation

        # alice is not an admin: no admin tab, and the server refuses its admin calls anyway
        page.goto(url + "/")
        page.fill("#key-input", served["alice"])
        page.click("#signin-form button")
        page.wait_for_selector("#app:not([hidden])")
        assert page.locator("#tab-admin").is_hidden()
        r = httpx.get(url + "/ui/api/admin/adapters", headers={"Authorization": f"Bearer {served['alice']}"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin_required"
        page.click("#signout")

        page.wait_for_selector("#signin:not([hidden])")
        page.fill("#key-input", served["root"])
        page.click("#signin-form button")
        page.wait_for_selector("#app:not([hidden])")
        errors.clear()  # the signed-out page's 401s are the sign-in flow; nothing after may fail
        page.click("#tab-admin")
        page.wait_for_selector("#admin-adapters tr[data-id='helper@v2']")
        for chart in ("#usage-chart", "#tokens-chart", "#live-chart"):  # drawn from the requests above
            page.wait_for_selector(f"{chart} .uplot canvas")
        requests_cell = page.locator("#admin-adapters tr[data-id='helper@v1'] td").nth(6)
        assert requests_cell.inner_text() == "1"  # its one request is counted

        # A bad upload lists every bad record with its line; nothing can be started.
        page.set_input_files("#train-file", str(bad))
        page.wait_for_selector("#train-errors li")
        listed = page.inner_text("#train-errors")
        assert "bad.jsonl:2 [output]: missing field 'output'" in listed and "bad.jsonl:3: malformed JSON" in listed
        assert page.is_disabled("#train-start")

        # A good one trains in the background; the page follows it to the end and the eval report.
        page.set_input_files("#train-file", str(good))
        page.wait_for_selector("#train-start:not([disabled])")
        page.fill("#train-name", "policies")
        assert "(served here)" in page.inner_text("#train-base option:checked")  # the served base by default
        page.fill("#train-epochs", "2")
        page.click("#train-start")
        page.wait_for_selector(".job[data-status=done] .report", timeout=240000)
        page.wait_for_selector("#model-select option[value='policies']", state="attached")  # in the picker now
        assert registry.resolve("policies").id == "policies@v1"
        page.wait_for_selector("#admin-adapters tr[data-id='policies@v1']")
        page.screenshot(path=str(shots / "web-admin.png"))

        # Move an alias from the adapters table (confirmed in a dialog, audited by the server).
        row = page.locator("#admin-adapters tr[data-id='policies@v1']")
        row.locator("input").fill("prod")
        row.locator("button.move").click()
        page.wait_for_function(
            "document.querySelector(\"#admin-adapters tr[data-id='policies@v1']\").innerText.includes('prod')"
        )
        assert registry.aliases_of("policies") == {"prod": 1}
        assert errors == []
        browser.close()
    con = sqlite3.connect(served["home"] / "server.db")
    actions = [a for (a,) in con.execute("SELECT action FROM audit WHERE key='root' ORDER BY id")]
    assert "train" in actions and "alias" in actions


def test_a_server_crash_mid_stream_loses_no_conversation(served: dict, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    url = served["url"]
    alice = {"Authorization": f"Bearer {served['alice']}"}
    # A question whose greedy answer runs to the token limit (no early end of turn), so the
    # stream is still going when the server dies.
    long = None
    for q in ("Tell me everything about leave.", "年假有多少天？", "Who approves expense claims?", "Hello"):
        r = httpx.post(
            url + "/v1/chat/completions",
            headers=alice,
            json={"model": "helper", "messages": [{"role": "user", "content": q}], "max_tokens": 400, "temperature": 0},
            timeout=120,
        ).json()
        if r["choices"][0]["finish_reason"] == "length":
            long = q
            break
    assert long is not None, "no test question runs to the limit on the tiny model"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 800})
        page.goto(url + "/")
        page.fill("#key-input", served["alice"])
        page.click("#signin-form button")
        page.wait_for_selector("#app:not([hidden])")
        page.select_option("#model-select", "helper")
        page.click("#settings summary")
        page.fill("#max-tokens", "400")
        page.fill("#input", long)
        page.press("#input", "Enter")
        page.wait_for_function("(document.querySelector('.msg.assistant .content')?.innerText || '').length > 0")
        served["restart"]()
        page.wait_for_selector("#banner:not([hidden])")
        assert "Connection lost" in page.inner_text("#banner")
        assert page.inner_text(".msg.user") == long  # the question is still there ...
        page.reload()  # ... and on the (restarted) server, not only in this page
        page.wait_for_selector("#conversations li")
        page.click("#conversations li .open")
        page.wait_for_selector(".msg.user")
        assert page.inner_text(".msg.user") == long
        page.click("#settings summary")
        page.fill("#max-tokens", "8")
        page.click("#messages .retry")
        page.wait_for_selector(".msg.assistant .down:not([disabled])", timeout=60000)
        # Keyboard only: Tab from the message box reaches the answer's Good button; Enter rates it.
        page.focus("#input")
        for _ in range(60):
            page.keyboard.press("Shift+Tab")
            if page.evaluate("document.activeElement.classList.contains('up')"):
                break
        page.keyboard.press("Enter")
        page.wait_for_selector(".fb-thanks")
        browser.close()
    cid = httpx.get(url + "/ui/api/conversations", headers=alice).json()["data"][0]["id"]
    saved = httpx.get(f"{url}/ui/api/conversations/{cid}", headers=alice).json()["messages"]
    assert [m["role"] for m in saved] == ["user", "assistant"] and saved[1]["id"] and saved[1]["rating"] == "up"


def test_assistant_in_the_picker_answers_with_footnotes(served: dict, tmp_path: Path) -> None:
    from importlib import resources

    from playwright.sync_api import sync_playwright
    from typer.testing import CliRunner

    from loraplex.cli import app

    # made while the server runs: it reads assistants at each request, no restart
    docs = Path(str(resources.files("loraplex.samples") / "knowledge"))
    r = CliRunner().invoke(
        app,
        ["assistants", "create", "hr-helper", "--adapter", "helper", "--knowledge", str(docs),
         "--display-name", "HR 助手", "--description", "holidays and travel", "--max-tokens", "8"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    url, shots = served["url"], _shots(tmp_path)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 800})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto(url + "/")
        page.fill("#key-input", served["bob"])
        page.click("#signin-form button")
        page.wait_for_selector("#app:not([hidden])")
        errors.clear()  # the page's first look, before signing in, is a logged 401
        # listed first, by its display name; picking it fills in its own defaults
        page.wait_for_selector("#model-select option", state="attached")  # the list arrives after sign-in
        first = page.eval_on_selector("#model-select option", "o => [o.value, o.textContent]")
        assert first[0] == "hr-helper" and first[1].startswith("HR 助手")
        page.select_option("#model-select", "hr-helper")
        assert "知识库" in page.inner_text("#model-info") or "knowledge base" in page.inner_text("#model-info")
        assert page.input_value("#max-tokens") == "8"
        page.fill("#input", "国庆节哪天补班？")
        page.press("#input", "Enter")
        # the first question to a knowledge base loads the encoder in the server (~1 s alone); a
        # generous wait, not a speed check: it once ran out at 180 s in CI, cause unknown (_wait says why)
        _wait(page, served, ".msg.assistant .sources li")
        summary = page.inner_text(".msg.assistant .sources li summary")
        assert summary.startswith("holidays-2026.md")
        page.click(".msg.assistant .sources li summary")
        assert "9 月 27 日" in page.inner_text(".msg.assistant .sources li p")
        page.screenshot(path=str(shots / "web-sources.png"))
        # a question the knowledge base cannot answer says so under the answer
        page.fill("#input", "What is the capital of France?")
        page.press("#input", "Enter")
        page.wait_for_function("document.querySelectorAll('.msg.assistant .sources').length === 2", timeout=180000)
        assert page.locator(".msg.assistant .sources.muted").count() == 1
        # the footnotes are kept with the conversation
        page.reload()
        page.wait_for_selector("#conversations li")
        page.click("#conversations li .open")
        page.wait_for_selector(".msg.assistant .sources li")
        assert page.inner_text(".msg.assistant .sources li summary").startswith("holidays-2026.md")
        assert errors == []
        browser.close()
