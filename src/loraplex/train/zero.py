"""DeepSpeed ZeRO for `loraplex train` under `torchrun` / `accelerate launch`: read and check the
DeepSpeed config, wrap the model in DeepSpeed's engine, and move whole tensors in and out of it.

The recipe keeps its own loop (data, loss normalisation, learning rate, logging, checkpoints).
DeepSpeed does what it is for: ZeRO-2 partitions the LoRA gradients and AdamW moments over the
processes; ZeRO-3 also partitions the weights, the frozen base included, so each process holds
1/N of them; `offload_optimizer` / `offload_param` move those partitions to CPU memory. The loss is
scaled by the world size because DeepSpeed averages the gradients it reduces (the recipe's losses
are already normalised over the whole step), the same trick as under FSDP.

Checkpoints stay loraplex's own (whole tensors in safetensors): `full` and `restore_moments` use
DeepSpeed's whole-tensor accessors (`safe_get_full_fp32_param`, `safe_{get,set}_full_optimizer_state`)
so a ZeRO run resumes on any number of processes, with or without DeepSpeed, and vice versa.

This module does not use DeepSpeed's optimizer, scheduler or fp16/bf16 modes (the recipe's AdamW,
learning-rate schedule and autocast decide; a config that sets them is refused, naming the field),
nor DeepSpeed's own checkpoint files or launcher.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from loraplex.errors import UserError

INSTALL = "DeepSpeed is not installed: pip install 'loraplex[deepspeed]'"
MOMENTS = ("exp_avg", "exp_avg_sq")
# Hugging Face's fill-ins for ZeRO's "auto" bucket sizes (transformers.integrations.deepspeed), from the hidden size.
BUCKETS: dict[str, Callable[[int], int]] = {
    "reduce_bucket_size": lambda h: h * h,
    "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
    "stage3_param_persistence_threshold": lambda h: 10 * h,
}


def requested(path: str | None) -> tuple[dict[str, Any], str] | None:
    """The DeepSpeed config a run asks for, and where it came from: `train.deepspeed` (a JSON file,
    as LLaMA-Factory's `deepspeed:`), or what `accelerate launch` with a DeepSpeed config put in the
    environment (its `deepspeed_config_file`, else its zero_stage and offload fields)."""
    if path is None and os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or None
        if path is None or path.lower() == "none":
            zero: dict[str, Any] = {"stage": int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))}
            for field in ("offload_optimizer", "offload_param"):
                device = os.environ.get(f"ACCELERATE_DEEPSPEED_{field.upper()}_DEVICE", "none")
                if device != "none":
                    zero[field] = {"device": device}
            return {"zero_optimization": zero}, "accelerate's DeepSpeed config"
    if path is None:
        return None
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"train.deepspeed: config file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid JSON in the DeepSpeed config: {e.msg}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a DeepSpeed config is a JSON object")
    return raw, path


def prepare(
    raw: dict[str, Any],
    where: str,
    *,
    micro_batch: int,
    micro_per_process: int,
    world_size: int,
    max_grad_norm: float,
) -> dict[str, Any]:
    """The config DeepSpeed is given: the user's ZeRO settings, with the batch sizes and clipping
    the recipe uses; checked before the model loads. `"auto"` values are filled as the Hugging Face
    integration fills them (the bucket sizes in `engine`, from the model's hidden size), so
    LLaMA-Factory's and accelerate's sample configs work as they are."""
    for field in ("optimizer", "scheduler"):
        if field in raw:
            raise UserError(
                f"{where}: field '{field}': loraplex trains with its own AdamW and train.learning_rate / "
                "train.scheduler; remove the field"
            )
    for field in ("fp16", "bf16", "amp"):
        if isinstance(raw.get(field), dict) and raw[field].get("enabled") not in (False, "auto", None):
            raise UserError(
                f"{where}: field '{field}.enabled': train.precision decides the compute precision "
                '(bf16 autocast, frozen base in bf16); set it to "auto" or false'
            )
    zero = raw.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise UserError(f"{where}: field 'zero_optimization' must be an object")
    stage = zero.get("stage", 0)
    if stage not in (1, 2, 3):
        raise UserError(
            f"{where}: field 'zero_optimization.stage' must be 1, 2 or 3, not {stage!r} "
            "(stage 0 is plain data parallel: leave DeepSpeed out and loraplex's own runs it)"
        )
    fixed = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": micro_per_process,
        "train_batch_size": micro_batch * micro_per_process * world_size,
        "gradient_clipping": max_grad_norm,
    }
    for field, ours in fixed.items():
        given = raw.get(field, "auto")
        if given != "auto" and given != ours:
            raise UserError(
                f"{where}: field '{field}' is {given!r}, but the train config makes it {ours!r} "
                "(batch_size, gradient_accumulation, max_grad_norm and the process count decide it); "
                'set it to "auto"'
            )
    zero = {k: v for k, v in zero.items() if v != "auto" or k in BUCKETS}
    # DeepSpeed's whole-tensor accessors put the fragments of a round-robin partition in the wrong
    # places (found by tests/test_distributed.py: right losses, permuted checkpoints), and
    # loraplex's checkpoints depend on them. It only speeds up copying gradients to an offloaded optimizer.
    zero["round_robin_gradients"] = False
    config = {k: v for k, v in raw.items() if v != "auto" and k not in ("fp16", "bf16", "amp")}
    return {
        **config,
        **fixed,
        "zero_optimization": zero,
        # The recipe's torch AdamW, also with the optimizer state offloaded (it runs on the CPU
        # there; LoRA's moments are ~1% of the model, so DeepSpeed's CPUAdam would save little).
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,  # the recipe logs
    }


def stage(config: dict[str, Any]) -> int:
    return int(config.get("zero_optimization", {}).get("stage", 0))


def check_installed() -> None:
    """Before any work: a run that asks for DeepSpeed without it fails at once, saying how to get it."""
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise UserError(INSTALL)


class Forward(torch.nn.Module):
    """`fn(model, *args)` as a module's forward, so that DeepSpeed's engine runs the recipe's loss:
    the engine's forward keeps ZeRO's per-micro-batch bookkeeping (without it ZeRO-3 overwrites,
    instead of accumulating, the gradients of a step's earlier micro-batches)."""

    model: Any  # the PEFT model

    def __init__(self, model: torch.nn.Module, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, *args: Any) -> Any:
        return self.fn(self.model, *args)


def engine(model: Forward, opt: torch.optim.Optimizer, config: dict[str, Any], device: str) -> Any:
    """DeepSpeed's engine around the recipe's loss and optimizer: `engine(batch)` is `fn(model, batch)`.

    Under ZeRO-3 the model (loaded on the CPU) is partitioned parameter by parameter straight onto
    `device` (`zero.Init(module=...)`), so no process ever holds the whole base on its GPU; the
    buffers (rotary tables) are small and move whole."""
    import deepspeed

    hidden = model.model.get_base_model().config.hidden_size
    zero = {k: BUCKETS[k](hidden) if v == "auto" else v for k, v in config["zero_optimization"].items()}
    config = {**config, "zero_optimization": zero}
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # On a CPU, DeepSpeed's process group JIT-compiles a shared-memory all-reduce (deepspeed_shm_comm)
    # that only AutoTP inference calls, never ZeRO training. The compile needs a C++ toolchain, and
    # waits forever on the lock file of a compile that was killed (seen: two processes idle for 90 min).
    # Marked incompatible, DeepSpeed skips it (deepspeed.ops keeps edits to __compatible_ops__).
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())  # the recipe's process group
    if stage(config) == 3:
        deepspeed.zero.Init(module=model, config_dict_or_path=config)
        for m in model.modules():
            for k, b in m.named_buffers(recurse=False):
                m._buffers[k] = b.to(device)
    wrapped, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config, dist_init_required=False)
    return wrapped


def is_zero(p: Any) -> bool:
    """A parameter DeepSpeed manages. Under ZeRO-1/2 `_hp_mapping` is None on the processes that
    hold none of it, and those must still join the gathers."""
    return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")


def full(p: Any) -> torch.Tensor:
    """The whole fp32 value of a trainable parameter under ZeRO (a collective: every process calls it)."""
    from deepspeed.utils import safe_get_full_fp32_param

    return safe_get_full_fp32_param(p)


def moments(p: Any, step: int) -> dict[str, torch.Tensor]:
    """AdamW's state of one parameter as whole tensors, keyed like torch's (a collective)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    state = {k: safe_get_full_optimizer_state(p, k) for k in MOMENTS}
    return {**state, "step": torch.tensor(float(step))}


def restore_moments(opt: Any, named: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Put a checkpoint's whole AdamW moments into ZeRO's partitions (each process takes its part).

    torch's AdamW creates its state at the first step; DeepSpeed's setters write into that state,
    so it is created here first (zeros and the step count), as AdamW itself would."""
    from deepspeed.utils import safe_set_full_optimizer_state

    step = next((v for k, v in tensors.items() if k.endswith("::step")), None)
    if step is None:
        return
    # The fp32 partitions AdamW steps: ZeRO-3's sub-groups, or ZeRO-1/2's one partition per group.
    flats = getattr(opt, "fp32_partitioned_groups_flat", None) or opt.single_partition_of_fp32_groups
    for flat in flats:
        opt.optimizer.state[flat] = {
            "step": torch.tensor(float(step), dtype=torch.float32),
            **{k: torch.zeros_like(flat) for k in MOMENTS},
        }
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2 link their views of it now
        opt._lazy_init_hp_params_optimizer_state()
    for name, p in named.items():
        if p.requires_grad:
            for k in MOMENTS:
                safe_set_full_optimizer_state(p, tensors[f"{name}::{k}"].to(torch.float32), k)


def local_share(model: Any) -> float:
    """The fraction of the model's weights this process holds (ZeRO-3 partitions; 1.0 otherwise)."""
    params = list(model.parameters())
    held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
    return held / max(1, sum(getattr(p, "ds_numel", p.numel()) for p in params))
