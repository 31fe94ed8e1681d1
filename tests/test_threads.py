"""The training loop's thread tuner (threads.py) against a simulated machine: it settles on the
fastest count, moves when another process starts or stops, and spends few steps probing. And
CI's rule that nothing is skipped (tests/ci_no_skips.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from loraplex import threads


def _run(tuner: threads.Tuner, speed: dict[int, float], steps: int) -> list[int]:
    used = []
    for _ in range(steps):
        used.append(tuner.threads)
        tuner.observe(1000, 1000 / speed[tuner.threads])
    return used


def test_the_tuner_follows_the_fastest_thread_count_as_the_machine_changes() -> None:
    quiet = {2: 570.0, 1: 350.0}  # measured on 2 cores: 2 threads alone, 1 thread alone
    busy = {2: 160.0, 1: 360.0}  # next to a busy process: the 2-thread team stalls on every op
    tuner = threads.Tuner(2)
    assert tuner.candidates == [2, 1] and tuner.threads == 2

    used = _run(tuner, quiet, 200)
    assert used[-1] == 2 and tuner.speeds == {2: 570.0, 1: 350.0}
    assert used.count(1) <= 10  # probing costs few steps, and fewer as the choice holds (period doubles)

    used = _run(tuner, busy, 60)  # a busy process starts: the speed drop starts a round at once
    assert tuner.speeds[2] == 160.0
    # noticed within `probe` steps (2), a round (2 more), a confirming round 16 steps later (2)
    assert used[:4] == [2, 2, 2, 2] and used[4:20] == [1] * 16 and used.count(2) <= 8

    used = _run(tuner, quiet, 120)  # it stops: found again at the next round (a period, 64 steps, at most)
    assert used[-30:] == [2] * 30


def test_one_core_has_nothing_to_tune_and_the_budget_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tuner = threads.Tuner(1)
    assert _run(tuner, {1: 100.0}, 50) == [1] * 50 and tuner.switches == 0
    assert threads.Tuner(8).candidates == [8, 7, 4]
    assert 1 <= threads.cores() <= (os.cpu_count() or 1)
    monkeypatch.delenv(threads.ENV, raising=False)
    monkeypatch.delenv(threads.OMP_ENV, raising=False)
    assert threads.budget() is None
    for raw, want in (("3", 3), ("0", None), ("two", None), (" 2 ", 2)):
        monkeypatch.setenv(threads.ENV, raw)
        assert threads.budget() == want, raw
    # torch's own variable counts where loraplex's is unset; loraplex's wins where both are
    monkeypatch.delenv(threads.ENV)
    for raw, want in (("1", 1), ("2,1", None), ("", None)):
        monkeypatch.setenv(threads.OMP_ENV, raw)
        assert threads.budget() == want, raw
    monkeypatch.setenv(threads.OMP_ENV, "1")
    monkeypatch.setenv(threads.ENV, "2")
    assert threads.budget() == 2


def test_under_ci_a_skip_fails_and_says_why(tmp_path: Path) -> None:
    (tmp_path / "test_parts.py").write_text(
        "import pytest\npytest.importorskip('no_such_module_here')\ndef test_a(): pass\n"
    )
    (tmp_path / "test_more.py").write_text(
        "import pytest\ndef test_b(): pytest.skip('chromium is not installed')\ndef test_c(): pass\n"
    )

    def pytest_in(ci: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "tests.ci_no_skips", "-p", "no:cacheprovider", str(tmp_path)],
            cwd=Path(__file__).parent.parent,
            env={**os.environ, "CI": ci},
            capture_output=True,
            text=True,
            timeout=120,
        )

    # under CI a module-level skip is a collection error: the run stops there (exit 2), loudly
    for ci, code, words in (("true", 2, "skipped under CI=true"), ("", 0, "2 skipped")):
        r = pytest_in(ci)
        assert r.returncode == code and words in r.stdout, r.stdout
        if ci:
            assert "no_such_module_here" in r.stdout
    (tmp_path / "test_parts.py").unlink()
    r = pytest_in("true")  # a skip inside a test fails that test, and the run goes on
    assert r.returncode == 1 and "1 failed, 1 passed" in r.stdout and "chromium is not installed" in r.stdout
