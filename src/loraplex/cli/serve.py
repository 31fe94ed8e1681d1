"""`serve`: the OpenAI-compatible server on the built-in engine or in front of vLLM.

Each command parses its options and calls the package that does the work."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from loraplex.cli.app import (
    app,
    err,
    out,
)
from loraplex.errors import UserError


@app.command()
def serve(
    base: Annotated[str | None, typer.Option(help="Base model: smollm2-135m, a HF directory or a .gguf file.")] = None,
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
    adapters: Annotated[
        str | None, typer.Option(help="Comma-separated adapter names to serve (default: every adapter in the store).")
    ] = None,
    max_batch: Annotated[int, typer.Option(min=1, max=256, help="Requests decoded together.")] = 16,
    max_loaded_adapters: Annotated[int, typer.Option(min=1, max=1024, help="Adapter slots kept in memory.")] = 8,
    max_model_len: Annotated[int | None, typer.Option(help="Context length (default: the model's).")] = None,
    kv_cache_gb: Annotated[
        float | None,
        typer.Option(
            min=0.0001,
            help="GiB the KV cache may use; rows that outgrow it wait (default: 1/4 of RAM, 1/2 of free GPU memory).",
        ),
    ] = None,
    prefix_cache_mb: Annotated[
        float | None,
        typer.Option(
            min=0,
            help="MiB of prompt prefixes kept for reuse (system prompts, chat history, an adapter's passages); "
            "0 turns it off (default: 1/8 of the KV cache budget, at most 256).",
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (bf16 where faster), bf16, fp16 or fp32")] = "auto",
    quantize: Annotated[
        str,
        typer.Option(
            help="Base weights: auto (int4 on a CPU, unquantized on a GPU), none, int8 or int4 "
            "(weight-only, CPU; adapters unchanged)."
        ),
    ] = "auto",
    pin: Annotated[str | None, typer.Option(help="Comma-separated adapters to load now and keep loaded.")] = None,
    enforce_eager: Annotated[
        bool, typer.Option("--enforce-eager", help="On CUDA, decode eagerly instead of replaying CUDA graphs.")
    ] = False,
    shutdown_timeout: Annotated[
        float, typer.Option(min=0, help="On SIGINT/SIGTERM, seconds in-flight requests may still run.")
    ] = 10.0,
    threads: Annotated[
        int | None, typer.Option(min=1, help="CPU threads for the model (default: all cores but one).")
    ] = None,
    header_timeout: Annotated[
        float, typer.Option(min=0.1, help="Seconds a client may take to send a request's headers (or body chunk).")
    ] = 10.0,
    max_connections: Annotated[
        int | None,
        typer.Option(min=1, help="Open connections at most; more are closed (default: by the file limit)."),
    ] = None,
    auth: Annotated[
        bool | None,
        typer.Option("--auth/--no-auth", help="Require API keys (default: on when any key exists)."),
    ] = None,
    config: Annotated[Path | None, typer.Option(help="YAML with upstream routes and output filters.")] = None,
    log_text: Annotated[
        bool, typer.Option("--log-text", help="Store prompts and responses in the request log.")
    ] = False,
    max_queue: Annotated[
        int, typer.Option(min=0, help="Requests that may wait beyond the running batch; more get 503.")
    ] = 64,
    engine_kind: Annotated[
        str, typer.Option("--engine", help="builtin (this process) or vllm (a vLLM server behind this one).")
    ] = "builtin",
    engine_url: Annotated[
        str | None,
        typer.Option(help="With --engine vllm: use the vLLM server at this /v1 URL instead of starting one."),
    ] = None,
    engine_port: Annotated[
        int | None, typer.Option(help="With --engine vllm: vLLM's port (default: a free one).")
    ] = None,
    tensor_parallel_size: Annotated[int, typer.Option(min=1, help="With --engine vllm: GPUs per model.")] = 1,
    max_lora_rank: Annotated[
        int | None, typer.Option(help="With --engine vllm: largest adapter rank (default: fits the store's).")
    ] = None,
    vllm_arg: Annotated[
        list[str] | None, typer.Option(help="With --engine vllm: one more vLLM argument (repeatable).")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="With --engine vllm: print the vLLM command and exit.")
    ] = False,
) -> None:
    """Serve the base model and its adapters behind an OpenAI-compatible API."""
    from loraplex import malloc

    malloc.limit_arenas(2)  # first, before any thread: a long-running server's heap stays flat (malloc.py)
    malloc.limit_kernel_caches(256)  # and before the first matmul
    from loraplex.adapters import registry
    from loraplex.api.server import run
    from loraplex.engine import quant
    from loraplex.engine.engine import Engine
    from loraplex.engine.protocol import EngineClient
    from loraplex.gateway.gate import Gateway
    from loraplex.gateway.policy import load_serve_config

    serve_config = load_serve_config(config)  # fail on a bad file before loading the model

    if dtype not in ("auto", "bf16", "fp16", "fp32"):
        raise UserError(f"--dtype {dtype!r}: use auto, bf16, fp16 or fp32")
    names = [a.strip() for a in adapters.split(",") if a.strip()] if adapters else None
    for name in names or []:
        registry.resolve(name)  # fail now, with the store's message, not at the first request
    pins = [p.strip() for p in (pin or "").split(",") if p.strip()]
    served = ", ".join(names) if names else "every adapter in the store"
    if engine_kind not in ("builtin", "vllm"):
        raise UserError(f"--engine {engine_kind!r}: use builtin or vllm")
    if quant.mode(quantize) not in ("auto", "none") and (engine_kind == "vllm" or engine_url):
        raise UserError("--quantize is the built-in engine's; for vLLM pass --vllm-arg --quantization=METHOD")
    engine: EngineClient
    remote = None
    if engine_kind == "vllm" or engine_url:
        remote = _vllm_engine(
            base, names, pins, engine_url, engine_port, max_batch, max_loaded_adapters, max_model_len,
            tensor_parallel_size, max_lora_rank, dtype, vllm_arg or [], dry_run,
        )  # fmt: skip
        if remote is None:
            return
        engine, where = remote, f"vLLM at {remote.url}"
    else:
        engine = Engine(
            base,
            max_batch=max_batch,
            max_loaded_adapters=max_loaded_adapters,
            max_model_len=max_model_len,
            device=device,
            dtype=dtype,
            quantize=quant.mode(quantize),
            adapters=names,
            threads=threads,
            kv_cache_bytes=int(kv_cache_gb * 2**30) if kv_cache_gb else None,
            prefix_cache_bytes=None if prefix_cache_mb is None else int(prefix_cache_mb * 2**20),
            cuda_graphs=not enforce_eager,
        )
        for name in pins:
            engine.load_adapter(name, pin=True)
        where = f"{engine.device} {str(engine.dtype).removeprefix('torch.')}"
        where += f", {engine.quantize} weights" if engine.quantize != "none" else ""
    gateway = Gateway(
        auth=auth, config=serve_config, log_text=log_text, max_pending=max_batch + max_queue, engine=engine
    )
    err.print(f"serving [bold]{engine.base.id}[/] ({where}) with {served} at http://{host}:{port}/v1")
    if gateway.auth:
        err.print("API keys required (loraplex keys list)")
    elif host not in ("127.0.0.1", "localhost", "::1"):
        err.print(f"[yellow]warning:[/] no API keys: anyone who reaches {host}:{port} can use every model")
    try:
        run(engine, host, port, shutdown_timeout, gateway, header_timeout, max_connections)
    finally:
        if remote is not None and remote.process is not None:
            remote.process.stop()  # also when uvicorn never started (a port in use): no orphaned vLLM


def _vllm_engine(
    base: str | None,
    names: list[str] | None,
    pins: list[str],
    url: str | None,
    port: int | None,
    max_batch: int,
    max_loaded_adapters: int,
    max_model_len: int | None,
    tensor_parallel_size: int,
    max_lora_rank: int | None,
    dtype: str,
    extra: list[str],
    dry_run: bool,
) -> Any:
    """The front door's engine for `--engine vllm`: vLLM started here (or found at `url`) behind a RemoteEngine."""
    from loraplex.engine import vllm_process
    from loraplex.engine.remote import RemoteEngine
    from loraplex.models.load import resolve_base
    from loraplex.paths import home

    base_ref = resolve_base(base)
    api_key = os.environ.get("LORAPLEX_ENGINE_API_KEY")
    if url:
        if dry_run:
            raise UserError("--dry-run prints the vLLM command this would start; with --engine-url none is started")
        return RemoteEngine(
            url, base_ref, adapters=names, pin=pins, max_model_len=max_model_len, max_batch=max_batch, api_key=api_key
        )
    launch, left_out = vllm_process.plan(
        base_ref, names, port, max_batch, max_loaded_adapters, max_model_len, tensor_parallel_size,
        max_lora_rank, dtype, extra,
    )  # fmt: skip
    for problem in left_out:
        err.print(f"[yellow]left out:[/] {problem}", highlight=False)
    if dry_run:
        out.print(launch.shell(), highlight=False, soft_wrap=True, markup=False)
        return None
    log_path = home() / "logs" / f"vllm-{port}.log"
    err.print(f"starting vLLM on port {port} (log: {log_path}); a large model takes minutes")
    process = vllm_process.VllmProcess(launch, log_path)
    try:
        return RemoteEngine(
            f"{process.url}/v1",
            base_ref,
            adapters=names,
            pin=pins,
            preloaded=[r.id for r in launch.adapters],
            max_model_len=max_model_len,
            max_batch=max_batch,
            process=process,
        )
    except BaseException:
        process.stop()
        raise
