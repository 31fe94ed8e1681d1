"""Training checkpoints: safetensors + JSON only (never pickles), with everything needed to
continue bit-for-bit: LoRA weights, AdamW moments, step, RNG state, best eval score.

Under FSDP and ZeRO every process calls `save_checkpoint` (the shards are gathered) and one writes.
This module does not decide when to checkpoint (the recipe does).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from loraplex.errors import UserError
from loraplex.train import distributed, zero


def whole(p: Any) -> torch.Tensor:
    """A trainable parameter as one whole tensor (a collective under FSDP and ZeRO: every process calls it)."""
    return (zero.full(p) if zero.is_zero(p) else distributed.full(p.detach())).detach().clone().contiguous()


def trainable_state(model: Any) -> dict[str, torch.Tensor]:
    """The LoRA weights as whole tensors (gathered from the shards under FSDP / ZeRO)."""
    return {n: whole(p) for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    model: Any,
    opt: Any,
    state: dict[str, Any],
    keep: int,
    write: bool = True,
) -> Path | None:
    """Under FSDP / ZeRO every process calls this (the shards are gathered) and only `write` writes."""
    weights = trainable_state(model)
    opt_tensors: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        kept = zero.moments(p, step) if zero.is_zero(p) else opt.state.get(p, {})
        for key, value in kept.items():
            opt_tensors[f"{name}::{key}"] = distributed.full(torch.as_tensor(value)).detach().clone().contiguous()
    if not write:
        return None
    opt_tensors["rng.torch"] = torch.get_rng_state()
    final = ckpt_root / f"step-{step:07d}"
    # whole or not at all: written into a temporary directory, renamed into place (a kill leaves a
    # .tmp- directory that nothing reads); a full disk removes it and says which checkpoint is kept
    tmp = None
    try:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        for old_tmp in ckpt_root.glob(".tmp-*"):  # left by a killed run
            shutil.rmtree(old_tmp, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=ckpt_root))
        save_file(weights, str(tmp / "trainable.safetensors"))
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(json.dumps({**state, "step": step, "python_rng": random.getstate()[1][:1]}))
    except (OSError, SafetensorError) as e:  # safetensors reports a full disk as its own error
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        kept = latest_checkpoint(ckpt_root)
        raise UserError(
            f"cannot write checkpoint {final}: {getattr(e, 'strerror', None) or e}. "
            + (f"The last whole checkpoint, {kept}, is kept: " if kept else "No earlier checkpoint: ")
            + "free space and run the same command again to resume."
        ) from e
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    for old in sorted(p for p in ckpt_root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    done = sorted(p for p in ckpt_root.glob("step-*") if (p / "state.json").is_file())
    return done[-1] if done else None


def load_checkpoint(path: Path, model: Any, opt: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Weights, RNG and state into the model; AdamW's moments too, unless `opt` is None (DeepSpeed
    takes them after it has wrapped the model: `zero.restore_moments`)."""
    weights = load_file(str(path / "trainable.safetensors"))
    named = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in weights.items():
            named[n].copy_(distributed.like(t, named[n]))  # this process's shard of it under FSDP
    tensors = load_file(str(path / "optimizer.safetensors"))
    for n, p in named.items():
        if not p.requires_grad or opt is None:
            continue
        # laid out like the parameter (device, shard): the fused AdamW kernel wants its moments there
        st = {k.split("::", 1)[1]: distributed.like(v, p) for k, v in tensors.items() if k.split("::", 1)[0] == n}
        if st:
            opt.state[p] = st
    torch.set_rng_state(tensors["rng.torch"])
    return dict(json.loads((path / "state.json").read_text()))


# ----------------------------------------------------------------------------- the recipe
