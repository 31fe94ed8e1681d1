"""`loraplex plan`: what a LoRA run on a base will cost, before downloading or loading any weights.

The architecture is instantiated on the meta device (shapes only, no memory), and the LoRA
parameter count is derived from the shapes of the linear layers PEFT would adapt: r*(in+out) per
layer, plus `out` for DoRA's magnitude vector. tests/test_plan.py checks it equals PEFT's count.

Memory is an estimate, not a measurement: weights + LoRA weights/grads/AdamW moments (fp32) +
activations kept for backward + the fp32 logits of the output head + a fixed framework overhead.

With `gpus` > 1 it is per GPU, for the layout `loraplex train` uses with each `shard` choice:
  none   data parallel (DDP): every GPU holds the whole base and LoRA state;
  zero2  DeepSpeed ZeRO-2: the whole base, LoRA's gradients and moments split N ways;
  fsdp   FSDP2 as train.fsdp shards: decoder layers (LoRA included) split N ways, embeddings, final
         norm and head whole on every GPU, plus two gathered layers (the running one and the next);
  zero3  DeepSpeed ZeRO-3: every weight split N ways, plus two gathered layers.
`held_fraction` is the share of all weights (base + LoRA) one GPU keeps between uses: the trainer
prints the same figure ("each holds N% of the weights"; tests/test_distributed.py compares them).
"""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from loraplex.errors import UserError

SHIPPED = Path(str(files("loraplex") / "plan_configs"))
SHARDS = ("none", "zero2", "fsdp", "zero3")
OVERHEAD_BYTES = 400 * 2**20  # allocator slack, kernels' workspaces, framework state


def shipped_names() -> list[str]:
    return sorted(p.stem for p in SHIPPED.glob("*.json"))


def load_arch_config(spec: str) -> Any:
    from transformers import AutoConfig

    path = Path(spec).expanduser()
    if (SHIPPED / f"{spec.lower()}.json").is_file():
        path = SHIPPED / f"{spec.lower()}.json"
    elif not path.exists():
        from loraplex.models.load import EMBEDDED, resolve_base

        if spec not in EMBEDDED:
            raise UserError(
                f"unknown base {spec!r} for plan: use a config.json, a model directory, "
                f"smollm2-135m, or one of: {', '.join(shipped_names())}"
            )
        path = resolve_base(spec).path / "config.json"
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise UserError(f"no config.json at {path}")
    d = json.loads(path.read_text())
    model_type = d.get("model_type")
    if not model_type:
        raise UserError(f"{path}: no model_type; not a transformers config.json")
    return AutoConfig.for_model(model_type, **{k: v for k, v in d.items() if k != "model_type"})


def lora_targets(model: Any, targets: list[str] | str) -> list[tuple[str, int, int]]:
    """(name, in, out) of each linear layer LoRA adapts; `all-linear` skips the output head (as PEFT does)."""
    import torch

    head = model.get_output_embeddings()
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is head:
            continue
        if targets == "all-linear" or any(name == t or name.endswith("." + t) for t in targets):
            found.append((name, module.in_features, module.out_features))
    if not found:
        raise UserError(f"no linear layer matches target_modules {targets}")
    return found


def make_plan(
    base: str,
    rank: int = 16,
    targets: str = "all-linear",
    seq_len: int = 1024,
    batch: int = 4,
    use_dora: bool = False,
    gpus: int = 1,
    shard: str = "none",
    gradient_checkpointing: bool = False,
) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    if gpus < 1:
        raise UserError(f"--gpus must be 1 or more, not {gpus}")
    if shard not in SHARDS:
        raise UserError(f"--shard must be one of {', '.join(SHARDS)}, not {shard!r}")
    if shard != "none" and gpus == 1:
        raise UserError(f"--shard {shard} splits the model over several GPUs: give --gpus N (N > 1)")

    cfg = load_arch_config(base)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    target_list: list[str] | str = "all-linear" if targets == "all-linear" else [t.strip() for t in targets.split(",")]
    layers = lora_targets(model, target_list)
    trainable = sum(rank * (i + o) + (o if use_dora else 0) for _, i, o in layers)
    base_params = sum(p.numel() for p in model.parameters())
    head = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    embed_params = emb.weight.numel() + (
        head.weight.numel() if head is not None and head.weight is not emb.weight else 0
    )

    h, n_layers = cfg.hidden_size, cfg.num_hidden_layers
    inter = getattr(cfg, "intermediate_size", 4 * h)
    vocab = cfg.vocab_size
    tokens = batch * seq_len

    def activations(act_bytes: int) -> int:
        # Per layer and token, saved for backward: the inputs of the attention and MLP blocks and of
        # each projection (~10 h), the MLP's gate/up/act products (~4 i), with flash/SDPA attention
        # (no s^2 score matrix kept). With gradient checkpointing only each layer's input is kept, and
        # one layer's worth is rebuilt at a time in the backward pass.
        if gradient_checkpointing:
            return n_layers * tokens * act_bytes * h + tokens * act_bytes * (10 * h + 4 * inter)
        return n_layers * tokens * act_bytes * (10 * h + 4 * inter)

    logits = tokens * vocab * 4 * 2  # fp32 logits and their gradient
    n = gpus
    # LoRA's fp32 weights, gradients and AdamW moments (4 + 4 + 8 bytes each), as each layout splits them
    optimizer = trainable * {"none": 16, "zero2": 4 + 12 / n, "fsdp": 16 / n, "zero3": 16 / n}[shard]
    layer_params = (base_params - embed_params) / n_layers  # decoder layers (and the final norm, ~nothing)

    def weights(wbytes: float) -> float:
        if shard == "fsdp":
            return embed_params * wbytes + (base_params - embed_params) * wbytes / n + 2 * layer_params * wbytes
        if shard == "zero3":
            return base_params * wbytes / n + 2 * layer_params * wbytes
        return base_params * wbytes

    memory = {}
    for label, wbytes, abytes in (("fp32", 4.0, 4), ("bf16", 2.0, 2), ("fp16", 2.0, 2)):
        memory[label] = weights(wbytes) + optimizer + activations(abytes) + logits + OVERHEAD_BYTES
    if shard in ("none", "zero2"):  # loraplex shards no 4-bit base (FSDP / ZeRO-3 would need quant storage)
        # QLoRA: NF4 linear weights (0.5 byte) + double-quantised constants (~0.127 bit/param); embeddings bf16.
        linear_params = base_params - embed_params
        memory["qlora-4bit"] = (
            linear_params * (0.5 + 0.127 / 8) + embed_params * 2 + optimizer + activations(2) + logits + OVERHEAD_BYTES
        )
    everything = base_params + trainable
    held = {
        "none": everything,
        "zero2": everything,
        "fsdp": embed_params + (everything - embed_params) / n,  # LoRA lives in the layers
        "zero3": everything / n,
    }[shard]
    return {
        "base": base,
        "architecture": (cfg.architectures or [cfg.model_type])[0],
        "lora": {"rank": rank, "targets": target_list, "use_dora": use_dora, "adapted_layers": len(layers)},
        "base_params": base_params,
        "trainable_params": trainable,
        "trainable_percent": round(100 * trainable / (base_params + trainable), 4),
        "adapter_file_bytes": trainable * 4,
        "seq_len": seq_len,
        "batch": batch,
        "gpus": gpus,
        "shard": shard,
        "gradient_checkpointing": gradient_checkpointing,
        "held_fraction": round(held / everything, 4),
        "peak_memory_bytes": {k: int(v) for k, v in memory.items()},
    }


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def print_plan(p: dict[str, Any], console: Console) -> None:
    console.print(f"[bold]{p['base']}[/] ({p['architecture']}): {p['base_params']:,} parameters")
    console.print(
        f"LoRA r={p['lora']['rank']} on {p['lora']['adapted_layers']} layers "
        f"({p['lora']['targets'] if isinstance(p['lora']['targets'], str) else ','.join(p['lora']['targets'])})"
        f": {p['trainable_params']:,} trainable ({p['trainable_percent']:.3f}%), "
        f"adapter file {_gib(p['adapter_file_bytes'])}"
    )
    per = f" per GPU, {p['gpus']} GPUs, {p['shard']}" if p["gpus"] > 1 else ""
    per += ", checkpointing" if p["gradient_checkpointing"] else ""
    if p["gpus"] > 1:
        console.print(f"each GPU holds {p['held_fraction']:.0%} of the weights between uses")
    table = Table("precision", f"est. peak memory{per} (batch {p['batch']} x {p['seq_len']} tokens)")
    for k, v in p["peak_memory_bytes"].items():
        table.add_row(k, _gib(v))
    console.print(table)
