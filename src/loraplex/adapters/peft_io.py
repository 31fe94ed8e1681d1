"""Reading a PEFT LoRA adapter directory as plain low-rank deltas (safetensors only).

Used by the engine (to stack adapters into slots) and by export (to write GGUF LoRA files). It
does not know sites, slots or batches (engine/lora.py) and reads only the path it is given: the
store resolves names to directories.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors import safe_open

from loraplex.errors import UserError

KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.\w+)?\.weight$")
"""A LoRA tensor of a decoder layer in PEFT's naming: (layer, module, A|B)."""


def read_peft_lora(path: Path, label: str) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """A PEFT LoRA adapter directory (safetensors only) as {(layer, module): (A [r, in], B [out, r])}, fp32,
    with each module's scaling (alpha / r, rslora, alpha_pattern) folded into B, so the module's delta is
    `x @ A.T @ B.T`. Refuses what a plain low-rank delta cannot express (DoRA, modules_to_save)."""
    cfg_path, weights_path = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not weights_path.is_file():
        raise UserError(f"adapter {label}: {weights_path} is missing (only safetensors adapters are read)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"adapter {label}: cannot read {cfg_path}: {e}") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise UserError(f"adapter {label}: peft_type {cfg.get('peft_type')!r} is not LoRA")
    if cfg.get("use_dora"):
        raise UserError(f"adapter {label}: DoRA adapters are not a plain low-rank delta; merge it instead")
    if cfg.get("modules_to_save"):
        raise UserError(f"adapter {label}: modules_to_save ({cfg['modules_to_save']}) is not supported")
    r0, alpha0 = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
    rslora = bool(cfg.get("use_rslora"))
    alpha_pattern: dict[str, float] = cfg.get("alpha_pattern") or {}

    found: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
                m = KEY.search(key)
                if not m:
                    raise UserError(f"adapter {label}: tensor {key!r} is not a LoRA weight of a decoder layer")
                layer, module, ab = int(m.group(1)), m.group(2), m.group(3)
                found.setdefault((layer, module), {})[ab] = f.get_tensor(key).float()
    except (OSError, ValueError, RuntimeError) as e:  # safetensors raises these for a damaged header
        raise UserError(f"adapter {label}: {weights_path} is not a readable safetensors file: {e}") from None
    out: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for (layer, module), ab in sorted(found.items()):
        if set(ab) != {"A", "B"}:
            raise UserError(f"adapter {label}: layer {layer} {module} has lora_{'A' if 'A' not in ab else 'B'} missing")
        a, b = ab["A"], ab["B"]
        r = a.shape[0]
        if b.ndim != 2 or a.ndim != 2 or b.shape[1] != r:
            raise UserError(f"adapter {label}: layer {layer} {module} has A {tuple(a.shape)} and B {tuple(b.shape)}")
        alpha = next((float(v) for k, v in alpha_pattern.items() if module.endswith(k)), alpha0)
        scale = alpha / math.sqrt(r) if rslora else alpha / (r or r0)
        out[(layer, module)] = (a, b * scale)
    return out
