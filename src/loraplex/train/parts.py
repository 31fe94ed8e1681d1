"""The pieces both training recipes use: the loss, the schedule, the model a run trains, its logs,
progress bar and end-of-run record. Each recipe (sft_lora.py for one process, sft_lora_distributed.py
under torchrun / accelerate) owns its loop and calls these; nothing here loops over steps.

Why the loss and model are built this way (bench/train_throughput.py):
  * the output head runs only on positions that carry a label (assistant tokens): on a small
    model with a 49k vocabulary the head is a fifth of the FLOPs and most of the activation memory;
  * bf16 autocast with the frozen base weights stored in bf16 where the CPU/GPU runs bf16 faster,
    so weights are not re-cast on every forward (LoRA weights and optimizer state stay fp32).

This module does not read data (train/data.py), write checkpoints (train/checkpoint.py) or know
about processes other than the one it runs in.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import shutil
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from loraplex import cpu_isa
from loraplex.adapters import registry
from loraplex.assistants import faq
from loraplex.config import TrainConfig
from loraplex.data.tokenize import IGNORE, Example
from loraplex.engine import lora_kernel
from loraplex.errors import UserError
from loraplex.models.load import BaseRef, load_model
from loraplex.paths import home
from loraplex.train import attention
from loraplex.train.cross_entropy import head_cross_entropy
from loraplex.train.data import Prepared, make_batch

# oneDNN, which runs PyTorch's CPU matmuls, keeps a compiled primitive per matmul shape, 1,024 of
# them by default. Packed rows change length from step to step, so a run meets new shapes at every
# step, and its bf16 primitives (which hold memory of their own) pile up for hundreds of steps.
# Bounded to 64 (SmolLM2, the sample's 80 steps, bf16, 3 alternating runs each): peak RSS
# 2,374-2,475 -> 1,754-1,813 MiB and 60.8 -> 54.8 s (medians); with no cache at all, slower. In fp32
# it changed nothing measurable (RSS 1,958-1,993 vs 2,040-2,054 MiB, 136 vs 138-144 s), so it is
# left alone there.
ONEDNN_CACHE_ENV = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
ONEDNN_CACHE = 64


def bound_onednn_cache(device: str, dtype: torch.dtype) -> None:
    """Bound oneDNN's primitive cache for a bf16 CPU run, unless the user set it. oneDNN reads the
    variable when it creates its first primitive, so the recipes call this right after picking the
    precision, before any matmul (picking bf16 times none: the CPU flag or the config says so)."""
    if device == "cpu" and dtype == torch.bfloat16:
        os.environ.setdefault(ONEDNN_CACHE_ENV, str(ONEDNN_CACHE))


INDUCTOR_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def compile_cache() -> Path:
    """Point torch.compile's on-disk kernel cache (inductor's) at a directory of its own for this CPU
    and instruction set, under $LORAPLEX_HOME/inductor/, unless the user chose another than the
    default (TORCHINDUCTOR_CACHE_DIR); the directory in use. The recipes call this before compiling.

    Why: inductor's cache key leaves out the instruction set PyTorch is held to
    (ATEN_CPU_CAPABILITY, which LORAPLEX_CPU_ISA=avx2 sets; cpu_isa.py). With the one default
    directory (/tmp/torchinductor_USER), a run held to AVX2 loaded kernels an earlier run had
    compiled for AVX-512, for code generated for AVX2: 16-float stores where the loop expects 8.
    `train.compile` then gave NaN losses, and small compiled functions corrupted the heap
    (torch 2.13, tests/test_train.py). A VM moved to a host with other instructions (live migration
    keeps /tmp) meets the same. loraplex's own kernels are cached per CPU and instruction set the
    same way (engine/lora_kernel.py)."""
    # inductor writes its default into the variable the first time anything asks for the directory
    # (an import may): that value is not the user's choice
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    chosen = os.environ.get(INDUCTOR_CACHE_ENV)
    if chosen and os.path.abspath(chosen) != os.path.abspath(default_cache_dir()):
        return Path(chosen)
    isa = cpu_isa.held()
    key = hashlib.sha256("\0".join([lora_kernel.cpu_id(), isa, torch.__version__]).encode())
    path = home() / "inductor" / f"{isa}-{key.hexdigest()[:16]}"
    os.environ[INDUCTOR_CACHE_ENV] = str(path)
    return path


def loss_sum(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labelled positions, and how many there were.

    Equivalent to `model(**batch).loss * n`, but the output head runs only on labelled positions,
    a few of them at a time (train/cross_entropy.py).
    """
    inner = model.get_base_model()
    spans = {"segments": attention.segments(batch["position_ids"])} if packed_attention(inner) else {}
    hidden = inner.get_decoder()(
        input_ids=batch["input_ids"],
        position_ids=batch["position_ids"],
        attention_mask=batch.get("attention_mask"),
        use_cache=False,
        **spans,
    ).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    # the logits a few rows at a time, never the whole (positions x vocabulary) matrix (cross_entropy.py)
    loss = head_cross_entropy(inner.get_output_embeddings(), hidden[:, :-1][keep], targets[keep])
    return loss, int(keep.sum())


def packed_attention(model: Any) -> bool:
    """Whether `model` attends per packed example (train/attention.py), so needs the spans passed."""
    return getattr(model.config, "_attn_implementation", None) == attention.NAME


def labelled(batch: dict[str, torch.Tensor]) -> int:
    """The answer tokens a collated batch is scored on."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def lr_at(step: int, total: int, warmup: int, peak: float, kind: str) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    if kind == "constant":
        return peak
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return peak * max(0.0, 1.0 - progress)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def schedule(cfg: TrainConfig, examples: int) -> tuple[int, int, int]:
    """(steps per epoch, total steps, warmup steps) for `examples` training examples."""
    tc = cfg.train
    steps_per_epoch = max(1, math.ceil(examples / (tc.batch_size * tc.gradient_accumulation)))
    total = tc.max_steps or max(1, math.ceil(steps_per_epoch * cfg.epochs))
    return steps_per_epoch, total, int(total * tc.warmup_ratio)


def quantization_config(cfg: TrainConfig, device: str, dtype: torch.dtype) -> Any:
    """bitsandbytes' config for a QLoRA run (None without `train.quantization_bit`)."""
    tc = cfg.train
    if tc.quantization_bit is None:
        return None
    if device.split(":")[0] != "cuda":
        raise UserError(
            f"train.quantization_bit: {tc.quantization_bit}: QLoRA's quantised base needs a CUDA GPU (bitsandbytes); "
            f"this run is on {device}. Remove quantization_bit to train LoRA on the full-precision base "
            "(`loraplex plan` shows the memory each needs)."
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("train.quantization_bit needs bitsandbytes: pip install 'loraplex[qlora]'")
    from transformers import BitsAndBytesConfig

    if tc.quantization_bit == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=tc.quantization_type,
        bnb_4bit_use_double_quant=tc.double_quantization,
        bnb_4bit_compute_dtype=dtype if dtype != torch.float32 else torch.bfloat16,
    )


def build_model(
    cfg: TrainConfig, base: BaseRef, device: str, dtype: torch.dtype, quantization: Any, load_on: str
) -> Any:
    """The base with a fresh PEFT LoRA on it, loaded on `load_on`, ready to train in `dtype`."""
    from peft import get_peft_model

    # On a GPU the base loads straight in the compute dtype: an fp32 copy first would need twice its
    # memory (32 GB for an 8B base, more than a 24 GB card that trains it in bf16). On the CPU it
    # loads in fp32, so LoRA's initial weights are exact (PEFT rounds a new adapter to its base's
    # dtype before lifting it back to fp32).
    model = load_model(
        base,
        dtype=dtype if quantization is not None or device != "cpu" else torch.float32,
        device=load_on,
        attn_implementation="eager" if device == "cpu" else "sdpa",
        quantization=quantization,
    )
    # On the CPU, attention per packed example where the architecture's attention is the plain kind
    # (train/attention.py); not under torch.compile, where the spans (Python ints that change every
    # step) would recompile the graph at each step.
    if device == "cpu" and not cfg.train.compile and attention.supports(model.config):
        model.set_attn_implementation(attention.NAME)
    # The LoRA weights' initial values come from the seed alone: seeded here, right before they are
    # drawn, not only at the start of the run, since what ran in this process before may have drawn
    # from the global generator (a cached sentence encoder is built by a process's first run only,
    # and its layers draw as they are made): a second identical run in one process (a script or
    # notebook calling `run` twice, a test worker) trained another adapter than the first and the CLI.
    torch.manual_seed(cfg.train.seed)
    # No `prepare_model_for_kbit_training` for QLoRA: it casts every unquantised weight to fp32, and the
    # embeddings and head of a 128k-vocabulary model are then 4 GB instead of 2; autocast computes in
    # the compute dtype and the RMSNorms already compute in fp32. Checkpointing is our own switch below.
    model = get_peft_model(model, cfg.lora.peft())
    if dtype != torch.float32 and quantization is None:
        # Frozen base weights live in the compute dtype, LoRA weights stay fp32 (autocast casts them).
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(dtype)
        # PEFT casts each LoRA input up to the fp32 adapter dtype and autocast casts it straight
        # back down: two copies of every activation per module and step, for nothing.
        for m in model.modules():
            if hasattr(m, "cast_input_dtype_enabled"):
                m.cast_input_dtype_enabled = False
    if cfg.train.gradient_checkpointing:
        # Non-reentrant checkpointing: gradients reach the LoRA weights without the input
        # embeddings having to require grad (the reentrant kind needs that hack under PEFT).
        inner = model.get_base_model()
        if hasattr(inner, "activation_checkpointing_enable"):  # transformers 5's name for it
            inner.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def autocast(device: str, dtype: torch.dtype) -> Callable[[], Any]:
    """A factory of the run's autocast contexts (off in fp32)."""
    kind = device.split(":")[0] if device != "mps" else "cpu"
    return lambda: torch.autocast(device_type=kind, dtype=dtype, enabled=dtype != torch.float32)


def eval_loss(
    model: Any, examples: list[Example], cfg: TrainConfig, pad_id: int, device: str, cast: Callable[[], Any]
) -> float | None:
    """Mean loss per answer token over `examples` (None without any)."""
    if not examples:
        return None
    model.eval()
    share = cfg.data.packing and packed_attention(model.get_base_model())
    tot, n = 0.0, 0
    with torch.no_grad(), cast():
        for k in range(0, len(examples), cfg.train.batch_size):
            batch = make_batch(
                examples[k : k + cfg.train.batch_size], pad_id, cfg.data.packing, cfg.data.max_seq_length, share
            )
            s, c = loss_sum(model, {key: v.to(device) for key, v in batch.items()})
            tot, n = tot + float(s), n + c
    model.train()
    return tot / max(n, 1)


class EarlyStop:
    """Tracks the watched eval figure (lower is better; a score enters negated) and says when to stop."""

    def __init__(self, patience: int, best: float = float("inf"), bad: int = 0):
        self.patience, self.best, self.bad = patience, best, bad

    def update(self, watched: float) -> bool:
        if watched < self.best - 1e-4:
            self.best, self.bad = watched, 0
            return False
        self.bad += 1
        return bool(self.patience) and self.bad >= self.patience

    def state(self) -> dict[str, Any]:
        return {"best_eval": self.best, "bad_evals": self.bad}


class RunLog:
    """metrics.jsonl and TensorBoard in the run directory; `RunLog(None)` writes nothing (another
    process's log)."""

    def __init__(self, run_dir: Path | None):
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(run_dir / "tensorboard")) if run_dir else None
        self.file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8") if run_dir else None  # noqa: SIM115

    def __call__(self, record: dict[str, Any]) -> None:
        if self.file is None or self.tb is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for k, v in record.items():
            if k != "step" and isinstance(v, int | float):
                self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.file is not None and self.tb is not None:
            self.file.close()
            self.tb.close()


def progress_bar(console: Any) -> Any:
    """The live training bar: step, loss, lr, tokens/s, elapsed, ETA (off when not a terminal,
    unless LORAPLEX_PROGRESS=1)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("lr {task.fields[lr]}"),
        TextColumn("{task.fields[tps]} tok/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=not console.is_terminal and os.environ.get("LORAPLEX_PROGRESS") != "1",
    )


def write_run_config(run_dir: Path, cfg: TrainConfig, data: Prepared) -> None:
    from loraplex.train.data import write_eval_split

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=2, ensure_ascii=False))
    if data.eval_convs:
        write_eval_split(run_dir / "eval_split.jsonl", data.eval_convs)


def run_facts(cfg: TrainConfig, data: Prepared, run_dir: Path) -> dict[str, Any]:
    """What the manifest records of a run's data and retrieval."""
    assert cfg.data.path is not None
    return {
        "data": {
            "path": str(Path(cfg.data.path).resolve()),
            "format": data.format,
            "sha256": data.sha256,
            "records": data.records,
            "eval_records": len(data.eval_convs),
            "eval_file": str(run_dir / "eval_split.jsonl") if data.eval_convs else None,
            "examples": len(data.train_ex),
            "tokens": data.stats.tokens,
            "answer_tokens": data.stats.label_tokens,
            "truncated": data.stats.truncated,
            "redactions": data.redactions,
        },
        "retrieval": {
            "enabled": bool(data.pairs),
            "top_k": cfg.retrieval.top_k,
            "min_similarity": cfg.retrieval.min_similarity,
            "language": faq.LANGUAGE,
            "offtopic": cfg.retrieval.offtopic_gate,  # faq.Index; versions trained before it have none
            "english": cfg.retrieval.english_encoder,  # faq.Index's second encoder; none before: no
            "spelling": cfg.retrieval.spelling,  # faq.Index's typo correction; none before: no
            "bilingual": cfg.retrieval.bilingual,  # faq.Index's mixed-language questions; none before: no
            # the English encoder's second opinion on `topic`; none before: the multilingual one alone
            "english_topic": cfg.retrieval.english_encoder,
            # and on the off-topic gate, for questions and pairs in English letters; none before: no
            "english_gate": cfg.retrieval.english_encoder,
            "refuse_below": cfg.retrieval.refuse_below,  # retrieval.prepare; none before: never refuse
            "passages": len(data.pairs),
            **data.augmented,
        },
    }


def register(
    cfg: TrainConfig,
    model: Any,
    gathered: dict[str, torch.Tensor] | None,
    base: BaseRef,
    run_dir: Path,
    facts: dict[str, Any],
    pairs: list[faq.Pair],
) -> registry.AdapterRef:
    """Save the trained LoRA (with its Q&A when retrieval is on) and register it as `cfg.name@vN`."""
    out = run_dir / "adapter"
    if out.exists():
        shutil.rmtree(out)
    if pairs:  # registered with the weights: the version answers from the Q&A it was trained on
        out.mkdir(parents=True)
        faq.write(out / faq.FILE, pairs)
    # The saved adapter is fp32 whatever the training precision (it is what the LoRA weights are);
    # under FSDP it is written from the whole tensors gathered from the shards.
    model.save_pretrained(str(out), safe_serialization=True, **({"state_dict": gathered} if gathered else {}))
    adapter_cfg = json.loads((out / registry.CONFIG).read_text())
    adapter_cfg["base_model_name_or_path"] = base.id  # not the cache path, which differs per machine
    (out / registry.CONFIG).write_text(json.dumps(adapter_cfg, indent=2))
    manifest = {
        "base_model": {"id": base.id, "source": base.source, "fingerprint": base.fingerprint},
        "config": cfg.model_dump(mode="json"),
        "description": cfg.description,
        "owner": cfg.owner,
        "tags": cfg.tags,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "run_dir": str(run_dir),
        **facts,
    }
    return registry.register(cfg.name, out, manifest)


def summary(facts: dict[str, Any], ref: registry.AdapterRef | None) -> str:
    """The run's last line, from the manifest's facts."""
    threads, peak = facts["threads"], facts["peak_memory"]
    return (
        f"[green]done[/] in {facts['wall_time_s']:.0f}s: {facts['steps']} steps, train loss {facts['train_loss']:.4f}"
        + (f", eval loss {facts['eval_loss']:.4f}" if facts["eval_loss"] is not None else "")
        + f", {facts['tokens_per_s']:,.0f} tok/s"
        + (f" on {threads['text']}" if threads else "")
        + f", peak {peak['kind']} {peak['bytes'] / 2**30:.2f} GiB"
        + f", trainable {facts['trainable_params']:,} "
        f"({100 * facts['trainable_params'] / facts['total_params']:.2f}%)" + (f" -> [bold]{ref.id}[/]" if ref else "")
    )
