"""Open WebUI against `loraplex serve`, driven in a real browser: the recorded check in docs/clients.md.

    .venv/bin/python scripts/check_open_webui.py --open-webui /path/to/venv/bin/open-webui [--out DIR]

Open WebUI pins its own versions of many packages, so it lives in its own virtual environment
(`python -m venv owui && owui/bin/pip install torch==2.13.0 open-webui`: the CPU torch first, or
pip pulls a CUDA build). Not part of CI: installing it takes minutes and ~260 packages.

1. A throw-away LORAPLEX_HOME: the sample Q&A trained into `company-policies` (`loraplex train`,
   a few minutes on 2 cores) and an assistant `hr-helper` on it with the sample knowledge base.
2. `loraplex serve` on a free loopback port; Open WebUI on another, with `OPENAI_API_BASE_URL`
   pointing at it, sign-in off (`WEBUI_AUTH=False`), offline.
3. Playwright with Debian's Chromium: the model picker lists the adapter and the assistant; a chat
   with the assistant streams an answer and shows its sources (Open WebUI's citations, from the
   `source` events loraplex sends with an assistant's stream). Screenshots and a JSON record
   (date, versions, what was seen) go to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path

import httpx

QUESTION = "年假有多少天？"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(url: str, seconds: float, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{url}: the process exited ({proc.returncode}); its log: {log}\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    sys.exit(f"{url} did not answer within {seconds:.0f} s; log: {log}")


def loraplex(*args: str, env: dict[str, str]) -> str:
    exe = Path(sys.executable).with_name("loraplex")
    done = subprocess.run([str(exe), *args], env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"loraplex {' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return done.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--open-webui", required=True, help="the open-webui executable (in its own venv)")
    ap.add_argument("--out", type=Path, default=Path("docs"))
    ap.add_argument("--home", type=Path, help="reuse this LORAPLEX_HOME (skips training when the adapter exists)")
    args = ap.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("needs Debian's chromium (apt install chromium)")
    work = Path(tempfile.mkdtemp(prefix="loraplex-owui-"))
    home = args.home or work / "home"
    env = {**os.environ, "LORAPLEX_HOME": str(home)}
    samples = resources.files("loraplex.samples")
    adapters = {a["name"] for a in json.loads(loraplex("adapters", "list", "--json", env=env))}
    if "company-policies" not in adapters:
        print("training company-policies on the sample (a few minutes) ...", flush=True)
        data = str(samples / "company_policies.jsonl")
        loraplex("train", "--data", data, "--name", "company-policies", env=env)
    if not (home / "assistants" / "hr-helper.yaml").exists():
        loraplex(
            "assistants", "create", "hr-helper", "--adapter", "company-policies", "--knowledge",
            str(samples / "knowledge"), "--display-name", "HR 助手", "--temperature", "0", "--max-tokens", "64",
            env=env,
        )  # fmt: skip

    api_port, ui_port = free_port(), free_port()
    api_log, ui_log = work / "serve.log", work / "open-webui.log"
    exe = Path(sys.executable).with_name("loraplex")
    serve = subprocess.Popen(
        [str(exe), "serve", "--port", str(api_port)], env=env, stdout=api_log.open("wb"), stderr=subprocess.STDOUT
    )
    ui_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON"))},
        "DATA_DIR": str(work / "owui-data"),
        "WEBUI_AUTH": "False",
        "ENABLE_OLLAMA_API": "False",
        "OPENAI_API_BASE_URL": f"http://127.0.0.1:{api_port}/v1",
        "OPENAI_API_KEY": "unused",
        "OFFLINE_MODE": "True",
        "HF_HUB_OFFLINE": "1",
        "RAG_EMBEDDING_MODEL_AUTO_UPDATE": "False",
        "ENABLE_VERSION_UPDATE_CHECK": "False",
        "ENABLE_TITLE_GENERATION": "False",
        "ENABLE_FOLLOW_UP_GENERATION": "False",
        "ENABLE_TAGS_GENERATION": "False",
        "ENABLE_AUTOCOMPLETE_GENERATION": "False",
        "WEBUI_SECRET_KEY": "check-open-webui",
        # Open WebUI 0.12 sends its built-in tools (~7,000 tokens of signatures) to every model that
        # takes `tools`; a 135M model on a CPU would read them for minutes (docs/clients.md)
        "DEFAULT_MODEL_PARAMS": json.dumps({"function_calling": "legacy"}),
        "PORT": str(ui_port),
    }
    ui = subprocess.Popen(
        [args.open_webui, "serve", "--host", "127.0.0.1", "--port", str(ui_port)],
        env=ui_env,
        stdout=ui_log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    record: dict[str, object] = {"date": datetime.now(UTC).isoformat(timespec="seconds")}
    try:
        wait_for(f"http://127.0.0.1:{api_port}/ready", 300, serve, api_log)
        wait_for(f"http://127.0.0.1:{ui_port}/health", 600, ui, ui_log)
        record["versions"] = versions(args.open_webui, ui_port)
        record.update(drive(chromium, f"http://127.0.0.1:{ui_port}", args.out))
    finally:
        for p in (ui, serve):
            p.terminate()
        for p in (ui, serve):
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "open-webui-check.json").write_text(json.dumps(record, ensure_ascii=False, indent=2) + "\n")
    print(json.dumps(record, ensure_ascii=False, indent=2))
    ok = record.get("picker_lists_adapter") and record.get("picker_lists_assistant") and record.get("source_documents")
    sys.exit(0 if ok and record.get("answer") else 1)


def versions(open_webui: str, ui_port: int) -> dict[str, str]:
    from importlib import metadata

    from loraplex import __version__

    info = httpx.get(f"http://127.0.0.1:{ui_port}/api/version", timeout=10).json()
    chromium = subprocess.run(["chromium", "--version"], capture_output=True, text=True).stdout.strip()
    return {
        "loraplex": __version__,
        "open-webui": str(info.get("version")),
        "chromium": chromium,
        "playwright": metadata.version("playwright"),
    }


def drive(chromium: str, url: str, out: Path) -> dict[str, object]:
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    seen: dict[str, object] = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 860}, locale="en-US")
        page.goto(url)
        page.wait_for_selector("#chat-input", timeout=120_000)
        page.wait_for_timeout(4000)  # the first visit opens "What's New" a moment later
        welcome = page.get_by_text("Okay, Let's Go!")
        if welcome.count() and welcome.is_visible():
            welcome.click()
        page.keyboard.press("Escape")  # any other first-visit dialog
        # the model picker: the base, the adapter and the assistant (shown by its display name)
        page.locator("#model-selector-model-button").click()
        page.wait_for_selector("[role=listbox] [role=option]", timeout=10_000)
        listed = [o.inner_text().strip() for o in page.get_by_role("option").all()]
        seen["picker"] = listed
        seen["picker_lists_adapter"] = any("company-policies" in x for x in listed)
        seen["picker_lists_assistant"] = any("HR 助手" in x or "hr-helper" in x for x in listed)
        page.screenshot(path=str(out / "open-webui-models.png"))
        page.get_by_role("option").filter(has_text="HR 助手").first.click()
        page.wait_for_timeout(500)
        page.locator("#chat-input").click()
        page.keyboard.type(QUESTION)
        page.keyboard.press("Enter")
        sent = time.monotonic()
        # the answer streams in: text appears while it is generating, and the sources under it
        page.wait_for_function(
            "() => { const r = document.querySelectorAll('#response-content-container'); "
            "return r.length && r[r.length - 1].innerText.trim().length > 0; }",
            timeout=180_000,
        )
        seen["first_text_s"] = round(time.monotonic() - sent, 1)
        page.wait_for_timeout(20_000)  # 64 tokens at most (the assistant's default)
        answer = page.locator("#response-content-container").last.inner_text()
        seen["answer"] = answer.strip().removesuffix("1 Source").strip()[:300]
        page.screenshot(path=str(out / "open-webui-chat.png"), full_page=False)
        sources = page.get_by_text("Source", exact=False)
        seen["sources_shown"] = sources.count() > 0
        if sources.count():  # the citation opens the passage the assistant was given
            sources.first.click()
            page.wait_for_timeout(1000)
            body = page.locator("body").inner_text()
            docs = ("holidays-2026.md", "travel-policy.md", "pricing.html", "campaign-december.txt")
            seen["source_documents"] = [d for d in docs if d in body]
            page.screenshot(path=str(out / "open-webui-source.png"), full_page=False)
        browser.close()
    return seen


if __name__ == "__main__":
    main()
