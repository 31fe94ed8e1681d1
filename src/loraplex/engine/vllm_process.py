"""`serve --engine vllm`: the vLLM OpenAI server as a child process, started with our adapters.

* `command(...)` builds the argv: the base's safetensors directory (a GGUF base is served from its
  converted cache), `--enable-lora`, `--lora-modules` as JSON (name = the store's `name@vN`, so a
  version is never confused with another), `--max-loras`, `--max-lora-rank` (the smallest value vLLM
  accepts that covers every adapter), `--tensor-parallel-size`, and what the user adds.
* `plan(...)` picks what to start: the adapter versions the registry points at, a free port.
* `check_layout(ref)` says why vLLM would refuse an adapter directory before it is sent there.
* `VllmProcess` starts the child with runtime LoRA updates switched on (the front door loads and
  unloads versions as the registry changes, see remote.py), waits for `/health`, and stops it.

This module does not answer requests (remote.py does) and never installs vLLM.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from loraplex.adapters import registry
from loraplex.errors import UserError
from loraplex.models.load import BaseRef

# --max-lora-rank values vLLM accepts (vllm/config: possible_max_ranks).
RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
# Linear layers vLLM's Llama-family models take LoRA on (packed qkv / gate_up included).
VLLM_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
INSTALL_HINT = (
    "vLLM is not installed in this environment. On a Linux machine with an NVIDIA GPU:\n"
    "    pip install 'loraplex[vllm]'\n"
    "or start vLLM yourself (VLLM_ALLOW_RUNTIME_LORA_UPDATING=True vllm serve BASE --enable-lora ...) "
    "and pass --engine-url http://HOST:PORT/v1"
)


def pointed_at(allowed: set[str] | None) -> list[registry.AdapterRef]:
    """The versions the registry points at now: each adapter's latest and its alias targets."""
    aliases = registry.all_aliases()
    out = []
    for name, versions in registry.list_names():
        if allowed is None or name in allowed:
            for v in sorted({versions[-1], *aliases.get(name, {}).values()} & set(versions)):
                out.append(registry.AdapterRef(name, v, registry.store_root() / name / f"v{v}"))
    return out


def plan(
    base: BaseRef,
    names: list[str] | None,
    port: int | None,
    max_batch: int,
    max_loras: int,
    max_model_len: int | None,
    tensor_parallel_size: int,
    max_lora_rank_asked: int | None,
    dtype: str,
    extra: list[str],
) -> tuple[Launch, list[str]]:
    """What `serve --engine vllm` starts: the base, the adapter versions the registry points at
    (those of `names`, or all), a free port when none is given. Returns the launch and the adapters
    left out because vLLM would refuse their layout; a named adapter vLLM would refuse is an error."""
    from loraplex.adapters.names import parse_ref

    refs, left_out = [], []
    for ref in pointed_at({parse_ref(n).name for n in names} if names is not None else None):
        problems = check_layout(ref)
        if problems and names is not None:
            raise UserError("; ".join(problems))
        if problems:
            left_out.append("; ".join(problems))
            continue
        refs.append(ref)
    if port is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    launch = Launch(
        base=base,
        served_name=base.id,
        adapters=refs,
        port=port,
        max_loras=max_loras,
        max_lora_rank=max_lora_rank(refs, max_lora_rank_asked),
        max_num_seqs=max_batch,
        max_model_len=max_model_len,
        tensor_parallel_size=tensor_parallel_size,
        dtype=dtype,
        extra=extra,
    )
    return launch, left_out


def installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def check_layout(ref: registry.AdapterRef) -> list[str]:
    """Why vLLM would refuse this adapter version (empty = it is a plain PEFT LoRA it can load)."""
    problems: list[str] = []
    config_file = ref.path / "adapter_config.json"
    if not config_file.is_file():
        return [f"{ref.id}: no adapter_config.json in {ref.path}"]
    if not (ref.path / "adapter_model.safetensors").is_file():
        problems.append(f"{ref.id}: no adapter_model.safetensors (vLLM is given safetensors only)")
    try:
        cfg = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return [f"{ref.id}: adapter_config.json is not readable JSON: {e}"]
    if cfg.get("peft_type", "LORA") != "LORA":
        problems.append(f"{ref.id}: peft_type {cfg.get('peft_type')!r}; vLLM serves LoRA only")
    if cfg.get("use_dora"):
        problems.append(f"{ref.id}: DoRA adapters are not supported by vLLM; merge it or use --engine builtin")
    if cfg.get("modules_to_save"):
        problems.append(f"{ref.id}: modules_to_save {cfg['modules_to_save']} cannot be served by vLLM")
    rank = int(cfg.get("r", 0))
    if rank > RANKS[-1]:
        problems.append(f"{ref.id}: rank {rank} is above vLLM's largest --max-lora-rank ({RANKS[-1]})")
    targets = cfg.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]  # a regex: vLLM matches it against the same module names
    else:
        # PEFT writes either short names (q_proj) or full paths (model.layers.0.self_attn.q_proj)
        unknown = sorted({t.rsplit(".", 1)[-1] for t in targets} - VLLM_TARGETS)
        if unknown:
            problems.append(f"{ref.id}: vLLM takes LoRA on {', '.join(sorted(VLLM_TARGETS))}, not on {unknown}")
    return problems


def adapter_rank(ref: registry.AdapterRef) -> int:
    cfg = json.loads((ref.path / "adapter_config.json").read_text(encoding="utf-8"))
    ranks = [int(cfg.get("r", 8)), *(int(r) for r in (cfg.get("rank_pattern") or {}).values())]
    return max(ranks)


def max_lora_rank(refs: list[registry.AdapterRef], asked: int | None = None) -> int:
    """`asked`, else the smallest rank vLLM accepts that covers every adapter (at least its default 16)."""
    need = max([16, *(adapter_rank(r) for r in refs)])
    if asked is not None:
        if asked not in RANKS:
            raise UserError(f"--max-lora-rank {asked}: vLLM accepts {', '.join(map(str, RANKS))}")
        if asked < need:
            raise UserError(f"--max-lora-rank {asked} is below the largest adapter rank here ({need})")
        return asked
    return next(r for r in RANKS if r >= need)


@dataclass(frozen=True)
class Launch:
    """Everything the vLLM command line says."""

    base: BaseRef
    served_name: str
    adapters: list[registry.AdapterRef]
    host: str = "127.0.0.1"
    port: int = 8001
    max_loras: int = 8
    max_lora_rank: int = 16
    max_num_seqs: int = 16
    max_model_len: int | None = None
    tensor_parallel_size: int = 1
    dtype: str = "auto"
    extra: list[str] = field(default_factory=list)

    def command(self) -> list[str]:
        argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.base.path)]
        argv += ["--served-model-name", self.served_name, "--host", self.host, "--port", str(self.port)]
        dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(self.dtype, "auto")
        argv += ["--dtype", dtype, "--max-num-seqs", str(self.max_num_seqs)]
        argv += ["--tensor-parallel-size", str(self.tensor_parallel_size)]
        if self.max_model_len is not None:
            argv += ["--max-model-len", str(self.max_model_len)]
        argv += ["--enable-lora", "--max-loras", str(self.max_loras), "--max-lora-rank", str(self.max_lora_rank)]
        # vLLM's own CPU-side cache of adapters: every version the front door may ask for stays warm
        argv += ["--max-cpu-loras", str(max(self.max_loras, 2 * len(self.adapters), 16))]
        # usage.prompt_tokens_details.cached_tokens, which the front door passes on as the built-in
        # engine reports it: vLLM leaves the field out unless asked
        argv.append("--enable-prompt-tokens-details")
        if self.adapters:
            argv.append("--lora-modules")
            argv += [
                json.dumps({"name": r.id, "path": str(r.path), "base_model_name": self.served_name})
                for r in self.adapters
            ]
        return [*argv, *self.extra]

    def shell(self) -> str:
        env = "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"
        return env + " " + " ".join(shlex.quote(a) for a in self.command())


class VllmProcess:
    """The child vLLM server; its output goes to `log_path`."""

    def __init__(self, launch: Launch, log_path: Path, startup_timeout: float = 1800.0):
        if not installed():
            raise UserError(INSTALL_HINT)
        self.url = f"http://{launch.host}:{launch.port}"
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "ab")  # noqa: SIM115 - the child writes to it for its whole life
        env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
        self.proc = subprocess.Popen(launch.command(), env=env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + startup_timeout
        while True:
            if self.proc.poll() is not None:
                self._log.close()
                raise UserError(f"vLLM exited with code {self.proc.returncode} while starting:\n{self.tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise UserError(f"vLLM did not become healthy in {startup_timeout:.0f} s; log: {log_path}")
            time.sleep(1.0)

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (vLLM finishes and frees the GPU), SIGKILL after `timeout` s. Idempotent."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
