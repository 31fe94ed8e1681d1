"""Run a function in a fresh child process, so that a native crash (llama.cpp built for instructions
this CPU lacks dies with SIGILL) fails one test with a message instead of killing the test run."""

from __future__ import annotations

import multiprocessing
import signal
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any


def _call(conn: Connection, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    try:
        conn.send((True, fn(*args)))
    except BaseException as e:  # noqa: BLE001 - sent to the parent, which raises it
        conn.send((False, f"{type(e).__name__}: {e}"))


def in_child(fn: Callable[..., Any], *args: Any, what: str = "llama.cpp", timeout: float = 900) -> Any:
    """fn(*args) in a spawned process (fn importable at module level); its result, or RuntimeError
    that says how the child ended."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_call, args=(child, fn, args), daemon=True)
    proc.start()
    child.close()
    try:
        if not parent.poll(timeout):
            raise RuntimeError(f"{what}: no answer in {timeout:.0f} s")
        ok, value = parent.recv()
    except EOFError:  # the child died before it could answer
        proc.join(10)
        code = proc.exitcode
        how = f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
        hint = " (built for instructions this CPU lacks? rerun scripts/install.sh here)" if code == -4 else ""
        raise RuntimeError(f"{what} crashed the child process: {how}{hint}") from None
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    if not ok:
        raise RuntimeError(f"{what} failed: {value}")
    return value
