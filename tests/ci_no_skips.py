"""A pytest plugin: with CI=true, a test that would be skipped fails instead, saying why, so CI
cannot pass with a part untested (no Chromium, PostgreSQL, llama.cpp, C compiler, torchrun...).
Without CI, skips stay skips (a laptop may lack a browser). Loaded by conftest.py."""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

import pytest

ON = os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def _fail(report: Any) -> None:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = f"skipped under CI=true, where every part must be tested: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if ON and report.skipped and not hasattr(report, "wasxfail"):
        _fail(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if ON and report.skipped:  # a module-level importorskip
        _fail(report)
