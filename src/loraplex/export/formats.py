"""`loraplex export`: a stored adapter in the shape another tool deploys.

- `peft`: the adapter directory as PEFT writes it (adapter_config.json + safetensors).
- `merged`: base + adapter merged (each weight plus its scaled delta B A, what PEFT's
  `merge_and_unload` computes) into a standalone Hugging Face model with the tokenizer, chat
  template and end-of-turn token, so plain transformers answers like loraplex.
- `gguf`: the adapter as a GGUF LoRA for llama.cpp (see to_gguf.py), and with `--merged` the base
  GGUF with the adapter merged in (f32).
- `ollama`: a Modelfile (FROM the base GGUF, ADAPTER the GGUF LoRA, TEMPLATE, stop parameters and
  SYSTEM taken from the base's chat template) with the files it names.
- `vllm`: PEFT directories for a set of adapters plus the `vllm serve --enable-lora` command line.

Every format is written into a temporary directory beside `out` and renamed into place at the
end, so a failed or killed export leaves nothing half-written under `out` (the next export there
removes what a killed one left, see staging.py). This module does not quantise or convert
base models to GGUF: the base must have come from a GGUF (the embedded default does).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from loraplex import staging
from loraplex.adapters import registry
from loraplex.data.tokenize import render
from loraplex.errors import UserError
from loraplex.models.load import (
    BaseRef,
    gguf_file,
    load_tokenizer,
    resolve_base,
)

FORMATS = ("peft", "merged", "gguf", "ollama", "vllm")
VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank accepts


@contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A temporary directory that becomes `out` only if the block finishes."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not empty; choose a new --out directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging.clear_leftovers(out.parent)
    tmp = staging.new_dir(out.parent, "export")
    try:
        yield tmp
        if out.exists():
            out.rmdir()  # empty, checked above
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _adapter_base(ref: registry.AdapterRef) -> BaseRef:
    from loraplex.adapters.compat import check_compatible

    registry.verify(ref)
    base = resolve_base(ref.manifest().get("base_model", {}).get("id"))
    check_compatible(ref, base)
    return base


def _copy_peft(ref: registry.AdapterRef, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for f in (*registry.ADAPTER_FILES, registry.KNOWLEDGE):
        if f in registry.ADAPTER_FILES or (ref.path / f).is_file():
            shutil.copy2(ref.path / f, out / f)


def export_peft(ref: registry.AdapterRef, out: Path) -> None:
    registry.verify(ref)
    with staged(out) as tmp:
        _copy_peft(ref, tmp)
        (tmp / "loraplex-manifest.json").write_text(json.dumps(ref.manifest(), indent=2, ensure_ascii=False))


def export_merged(ref: registry.AdapterRef, out: Path) -> None:
    from loraplex.export.merged import write_merged

    base = _adapter_base(ref)
    with staged(out) as tmp:
        write_merged(base, ref.path, ref.id, tmp)


def export_gguf(ref: registry.AdapterRef, out: Path, merged: bool = False) -> None:
    from transformers import AutoConfig

    from loraplex.export.to_gguf import write_gguf_lora, write_gguf_model

    base = _adapter_base(ref)
    base_gguf = gguf_file(base)
    with staged(out) as tmp:
        config = AutoConfig.from_pretrained(base.path)
        write_gguf_lora(ref.path, config, tmp / f"{ref.name}-v{ref.version}.gguf", ref.id)
        if merged:
            write_gguf_model(base_gguf, tmp / f"{ref.name}-v{ref.version}-merged-f32.gguf", config, ref.path, ref.id)
        (tmp / "README.txt").write_text(
            f"GGUF LoRA for {ref.id}, trained on {base.id}.\n"
            f"Base model GGUF: {base_gguf}\n"
            f"llama.cpp:  llama-cli -m {base_gguf} --lora {ref.name}-v{ref.version}.gguf\n",
            encoding="utf-8",
        )


def ollama_template(tok: Any) -> tuple[str, list[str], str | None]:
    """(TEMPLATE, stop strings, default SYSTEM) for Ollama from the base's Jinja chat template.

    Ollama templates are Go templates, so each chat-template family is translated by hand; the
    default system prompt (SmolLM2 adds one when a conversation has none) is read off the
    template by rendering a conversation without one."""
    probe = render(tok, [{"role": "user", "content": "\x00"}], add_generation_prompt=True)
    if "<|im_start|>" in probe and "<|im_end|>" in probe:
        system = None
        head = probe.split("<|im_start|>user", 1)[0]
        if "<|im_start|>system\n" in head:
            system = head.split("<|im_start|>system\n", 1)[1].split("<|im_end|>", 1)[0]
        template = (
            "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
            "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
            "<|im_start|>assistant\n"
        )
        return template, ["<|im_end|>", "<|im_start|>"], system
    if "<|start_header_id|>" in probe and "<|eot_id|>" in probe:
        template = (
            "{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
            "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
            "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
        )
        return template, ["<|eot_id|>", "<|start_header_id|>"], None
    raise UserError(
        "the base model's chat template is neither ChatML nor Llama 3; write the Modelfile's TEMPLATE by hand "
        "(the GGUF LoRA from `--format gguf` works with it)"
    )


def modelfile(base_gguf: str, adapter_gguf: str, tok: Any, system: str | None) -> str:
    template, stops, default_system = ollama_template(tok)
    system = system or default_system
    lines = [f"FROM {base_gguf}", f"ADAPTER {adapter_gguf}", f'TEMPLATE """{template}"""']
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stops]
    lines.append("PARAMETER temperature 0")
    if system:
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"


def export_ollama(ref: registry.AdapterRef, out: Path) -> None:
    from transformers import AutoConfig

    from loraplex.export.to_gguf import write_gguf_lora

    base = _adapter_base(ref)
    base_gguf = gguf_file(base)
    tok = load_tokenizer(base)
    system = ref.manifest().get("system_prompt")
    with staged(out) as tmp:
        shutil.copy2(base_gguf, tmp / base_gguf.name)
        write_gguf_lora(ref.path, AutoConfig.from_pretrained(base.path), tmp / "adapter.gguf", ref.id)
        (tmp / "Modelfile").write_text(
            modelfile(f"./{base_gguf.name}", "./adapter.gguf", tok, system), encoding="utf-8"
        )


def export_vllm(refs: list[registry.AdapterRef], out: Path) -> str:
    """PEFT directories for `refs` plus the vLLM command line serving them all; returns the command."""
    if not refs:
        raise UserError("name at least one adapter (or an alias with --alias) to export for vLLM")
    bases = {_adapter_base(r).path for r in refs}
    if len(bases) > 1:
        raise UserError("vLLM serves adapters of one base model; these were trained on different bases")
    base_path = bases.pop()
    ranks = []
    for r in refs:
        cfg = json.loads((r.path / registry.CONFIG).read_text())
        ranks.append(max([int(cfg.get("r", 8)), *map(int, (cfg.get("rank_pattern") or {}).values())]))
    max_rank = next((v for v in VLLM_RANKS if v >= max(ranks)), None)
    if max_rank is None:
        raise UserError(f"rank {max(ranks)} is above the largest rank vLLM serves ({VLLM_RANKS[-1]})")
    names = [r.name for r in refs]
    if len(set(names)) != len(names):
        raise UserError(
            f"two versions of the same adapter cannot share a name in vLLM: {', '.join(r.id for r in refs)}"
        )
    with staged(out) as tmp:
        for r in refs:
            _copy_peft(r, tmp / "adapters" / r.name)
        final = out.resolve()
        modules = [f"{r.name}={final / 'adapters' / r.name}" for r in refs]
        cmd = [
            "vllm", "serve", str(base_path), "--enable-lora", "--max-lora-rank", str(max_rank),
            "--max-loras", str(len(refs)), "--lora-modules", *modules,
        ]  # fmt: skip
        command = shlex.join(cmd)
        (tmp / "serve.sh").write_text(f"#!/bin/sh\nexec {command}\n", encoding="utf-8")
        os.chmod(tmp / "serve.sh", 0o755)
        spec = {
            "base_model": str(base_path),
            "max_lora_rank": max_rank,
            "lora_modules": [{"name": r.name, "path": str(final / "adapters" / r.name), "id": r.id} for r in refs],
            "command": cmd,
        }
        (tmp / "vllm.json").write_text(json.dumps(spec, indent=2), encoding="utf-8")
    return command


def export(refs: list[str], fmt: str, out: Path, merged: bool = False) -> str:
    """Run one export; returns a one-line summary for the CLI."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    resolved = [registry.resolve(r) for r in refs]
    if fmt == "vllm":
        return export_vllm(resolved, out)
    if len(resolved) != 1:
        raise UserError(f"--format {fmt} exports one adapter; got {len(resolved)}")
    if merged and fmt != "gguf":
        raise UserError("--merged goes with --format gguf (for a merged Hugging Face model use --format merged)")
    if fmt == "gguf":
        export_gguf(resolved[0], out, merged)
    else:
        {"peft": export_peft, "merged": export_merged, "ollama": export_ollama}[fmt](resolved[0], out)
    note = ""
    if any((r.path / registry.KNOWLEDGE).is_file() for r in resolved):
        # the weights learned to answer from passages; a runtime without loraplex's retrieval asks bare questions
        note = (
            f"; note: trained with retrieval, it answers best with its Q&A ({registry.KNOWLEDGE}) "
            "in the prompt, which only `loraplex serve` adds"
        )
    return f"exported {', '.join(r.id for r in resolved)} as {fmt} to {out}{note}"
