"""General ability before and after: lm-evaluation-harness tasks on the adapter and its baseline.

An adapter trained on a company's Q&A should not forget what the base model knew. `loraplex eval
--general TASKS` runs any lm-eval task the user has locally (C-Eval, CMMLU, MMLU, or their own
YAML task with `--general-include DIR`) on both sides, through the same engine, behind the real
OpenAI-compatible API on a loopback port (`lm_eval --model local-completions`, the server's own
tokenizer): the numbers are the ones a user gets running lm-eval against `loraplex serve`.
The promotion gate can then refuse a version whose score drops by more than a margin
(`adapters promote --max-general-drop`).

This module does not download tasks or data sets: lm-eval reads what is on disk (HF_DATASETS_OFFLINE
is set), and a task whose data is missing fails with lm-eval's own message.
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loraplex.errors import UserError

PREFERRED = ("acc_norm", "acc", "exact_match", "f1", "mc2", "mc1")  # a task's headline metric, in this order


@contextlib.contextmanager
def _loopback(engine: Any) -> Iterator[str]:
    """The real API for `engine` on 127.0.0.1 (a free port), without keys; its request log goes to
    a throw-away database, not the server's."""
    import uvicorn

    from loraplex.api.server import create_app
    from loraplex.gateway.gate import Gateway

    with tempfile.TemporaryDirectory(prefix="loraplex-general-") as tmp:
        app = create_app(engine, Gateway(auth=False, database=Path(tmp) / "log.db", engine=engine))
        # log_config=None: uvicorn's default one runs logging.config.dictConfig, which closes every
        # handler of this process (absl's closed sys.stderr under pytest); this server is a guest here.
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", log_config=None)
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise UserError("the loopback API for lm-eval did not start")
            time.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        try:
            yield f"http://127.0.0.1:{port}/v1/completions"
        finally:
            server.should_exit = True
            thread.join(timeout=30)


def headline(metrics: dict[str, Any]) -> tuple[str, float] | None:
    """A task's main number from lm-eval's results ("acc,none" -> "acc")."""
    values = {
        k.split(",")[0]: v for k, v in metrics.items() if "," in k and "_stderr" not in k and isinstance(v, int | float)
    }
    for name in PREFERRED:
        if name in values:
            return name, float(values[name])
    return next(iter(values.items()), None)


@functools.cache
def _manager(include: Path | None, defaults: bool = True) -> Any:
    from lm_eval.tasks import TaskManager

    # indexing lm-eval's own ~15,000 tasks takes seconds: only a user's directory when that suffices
    return TaskManager(include_path=str(include) if include else None, include_defaults=defaults)


def check_tasks(tasks: list[str], include: Path | None) -> Any:
    """lm-eval's task manager, once every task is known to it (called before any generation)."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError('--general needs lm-evaluation-harness: pip install "loraplex[lmeval]"') from None
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # lm-eval reads local data only: never a download
    manager = _manager(include, False) if include else None
    if manager is None or any(t not in manager.all_tasks for t in tasks):
        manager = _manager(include)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" (with --general-include {include})" if include else " (add your own with --general-include DIR)"
        raise UserError(f"lm-eval has no task {', '.join(map(repr, unknown))}{where}")
    return manager


def general_ability(
    engine: Any,
    models: dict[str, str],
    tasks: list[str],
    include: Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Run `tasks` for each side ({"adapter": "hr@v2", "baseline": "base"}); per task the headline
    metric of both sides and the difference."""
    import lm_eval

    manager = check_tasks(tasks, include)
    scores: dict[str, dict[str, Any]] = {}
    with _loopback(engine) as url:
        for side, model in models.items():
            args = f"model={model},base_url={url},num_concurrent=1,max_retries=1,batch_size={batch_size}"
            args += ",tokenizer_backend=remote"  # the server's tokenizer: no local copy needed for an adapter name
            out = lm_eval.simple_evaluate(
                model="local-completions", model_args=args, tasks=tasks, task_manager=manager, limit=limit
            )
            if out is None:
                raise UserError("lm-eval returned no results")
            for task, metrics in out["results"].items():
                if (top := headline(metrics)) is not None:
                    scores.setdefault(task, {"metric": top[0]})[side] = top[1]
    for row in scores.values():
        if "adapter" in row and "baseline" in row:
            row["delta"] = row["adapter"] - row["baseline"]
    return {
        "tasks": scores,
        "limit": limit,
        "include": str(include) if include else None,
        "lm_eval": lm_eval.__version__,
    }
