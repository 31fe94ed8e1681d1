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
    samples = Path(str(resources.files("loraplex.samples")))
    if "company-policies" not in loraplex("adapters", "list", env=env):
        print("training company-policies on the sample (a few minutes) ...", flush=True)
        loraplex("train", "--data", str(samples / "company_policies.jsonl"), "--name", "company-policies", env=env)
    if "hr-helper" not in loraplex("assistants", "list", env=env):
        loraplex(
            "assistants", "create", "hr-helper", "--adapter", "company-policies", "--knowledge",
            str(samples / "knowledge"), "--display-name", "HR 助手", "--temperature", "0", env=env,
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
    ok = record.get("picker_lists_adapter") and record.get("picker_lists_assistant") and record.get("sources_shown")
    sys.exit(0 if ok and record.get("answer") else 1)


def versions(open_webui: str, ui_port: int) -> dict[str, str]:
    import playwright

    from loraplex import __version__

    info = httpx.get(f"http://127.0.0.1:{ui_port}/api/version", timeout=10).json()
    chromium = subprocess.run(["chromium", "--version"], capture_output=True, text=True).stdout.strip()
    return {
        "loraplex": __version__,
        "open-webui": str(info.get("version")),
        "chromium": chromium,
        "playwright": getattr(playwright, "__version__", "?"),
    }


def drive(chromium: str, url: str, out: Path) -> dict[str, object]:
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    seen: dict[str, object] = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 860}, locale="zh-CN")
        page.goto(url)
        page.wait_for_selector("#chat-input", timeout=120_000)
        # the model picker: the base, the adapter and the assistant (by its display name or id)
        page.get_by_role("button", name="Select a model").first.click()
        page.wait_for_timeout(1000)
        listed = page.locator("[role=dialog], [data-melt-dropdown-menu], .model-selector").first.inner_text(timeout=10_000)
        seen["picker_lists_adapter"] = "company-policies" in listed
        seen["picker_lists_assistant"] = "hr-helper" in listed or "HR 助手" in listed
        page.screenshot(path=str(out / "open-webui-models.png"))
        page.get_by_text("hr-helper", exact=False).first.click()
        page.wait_for_timeout(500)
        page.locator("#chat-input").click()
        page.keyboard.type(QUESTION)
        page.keyboard.press("Enter")
        # the answer streams in; done when the regenerate control of the last message shows up
        page.wait_for_selector("#response-content-container", timeout=180_000)
        page.wait_for_function(
            "() => document.querySelectorAll('#response-content-container').length > 0 && "
            "!document.querySelector('.animate-pulse, [aria-label=\"Stop\"]')",
            timeout=300_000,
        )
        page.wait_for_timeout(1500)
        answer = page.locator("#response-content-container").last.inner_text()
        seen["answer"] = answer.strip()[:300]
        body = page.locator("body").inner_text()
        seen["sources_shown"] = any(doc in body for doc in ("holidays-2026.md", "travel-policy.md", "pricing.html"))
        page.screenshot(path=str(out / "open-webui-chat.png"), full_page=False)
        browser.close()
    return seen


if __name__ == "__main__":
    main()
