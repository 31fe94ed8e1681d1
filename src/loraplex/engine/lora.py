"""Many LoRA adapters on one base, applied per row of a batch in the same forward pass.

An adapter's weights are kept per *site*, the fused projections of the serving model (q|k|v,
o, gate|up, down). At a site an adapter is one low-rank pair: `A` [R, in] stacks the A matrices of
the site's modules, `B` [out, R] holds their B matrices block-diagonally with the scaling folded
in, so `delta = x @ A.T @ B.T` is the sum of that adapter's per-module deltas. The same trick makes
composition free: "legal:0.7+formal:0.3" is the concatenation of both adapters' ranks with each
B scaled by its weight, and different ranks just pad with zeros.

Loaded adapters live in slots of stacked tensors `A[site]`: [layers, slots, R, in] (slot 0 is the
base: all zeros). A batch gathers its distinct adapters once (`LoraBatch`), then every layer does
two matmuls per projection for all rows together, each row masked to its own adapter's rank
segment (the S-LoRA/Punica segmented-gather idea in plain PyTorch). The naive reference it must equal
(`tests/test_engine.py` checks logits and greedy text against PEFT):

    for i in range(n):                       # each row on its own
        y[i] = x[i] @ W.T + sum(w * s * x[i] @ A_m.T @ B_m.T for (A_m, B_m, s), w in adapters_of_row[i])

This module does not decide which adapters stay loaded (see adapter_cache.py) and never reads a
name as a path: callers pass directories resolved by the store.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from loraplex.errors import UserError

SITES = ("qkv", "o", "gate_up", "down")
KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.\w+)?\.weight$")
# site name -> (in_features, [(module, out_features), ...]) for one model; see DecoderModel.site_shapes
SiteShapes = dict[str, tuple[int, list[tuple[str, int]]]]


@dataclass(frozen=True)
class AdapterRequest:
    """What a request asks for: resolved adapter ids (`name@vN`) and their weights; empty = the base."""

    parts: tuple[tuple[str, float], ...] = ()

    @property
    def key(self) -> str:
        if not self.parts:
            return ""
        if len(self.parts) == 1 and self.parts[0][1] == 1.0:
            return self.parts[0][0]
        return "+".join(f"{name}:{w:g}" for name, w in self.parts)


@dataclass
class AdapterWeights:
    """One adapter (or a composition) as per-site A and B tensors: A[site] [layers, R, in], B [layers, out, R]."""

    A: dict[str, torch.Tensor]
    B: dict[str, torch.Tensor]

    def rank(self, site: str) -> int:
        return self.A[site].shape[1]

    @classmethod
    def from_dir(cls, path: Path, n_layers: int, shapes: SiteShapes, label: str) -> AdapterWeights:
        """Read a PEFT LoRA adapter (safetensors only) and lay it out per site."""
        found = read_peft_lora(path, label)
        for layer, _module in found:
            if layer >= n_layers:
                raise UserError(f"adapter {label}: it has LoRA weights for layer {layer}; the base has {n_layers}")
        module_site = {mod: (site, i) for site, (_, mods) in shapes.items() for i, (mod, _) in enumerate(mods)}
        A: dict[str, torch.Tensor] = {}
        B: dict[str, torch.Tensor] = {}
        # rank of each module at each site (0 = not targeted), the max over layers
        site_ranks: dict[str, list[int]] = {s: [0] * len(mods) for s, (_, mods) in shapes.items()}
        for (_layer, module), (a, _) in found.items():
            if module not in module_site:
                raise UserError(f"adapter {label}: LoRA on module {module!r} is not supported for serving")
            site, i = module_site[module]
            site_ranks[site][i] = max(site_ranks[site][i], a.shape[0])
        for site, (fan_in, mods) in shapes.items():
            ranks = site_ranks[site]
            R = sum(ranks)
            out = sum(o for _, o in mods)
            A[site] = torch.zeros(n_layers, R, fan_in)
            B[site] = torch.zeros(n_layers, out, R)
            r_off, o_off = 0, 0
            for i, (module, fan_out) in enumerate(mods):
                for layer in range(n_layers):
                    pair = found.get((layer, module))
                    if pair is None:
                        continue
                    a, b = pair
                    r = a.shape[0]
                    if a.shape[1] != fan_in or b.shape != (fan_out, r):
                        raise UserError(
                            f"adapter {label}: layer {layer} {module} has A {tuple(a.shape)}, B {tuple(b.shape)}; "
                            f"the base needs A [r, {fan_in}] and B [{fan_out}, r] (was it trained on another base?)"
                        )
                    A[site][layer, r_off : r_off + r] = a
                    B[site][layer, o_off : o_off + fan_out, r_off : r_off + r] = b
                r_off += ranks[i]
                o_off += fan_out
        return cls(A, B)

    @classmethod
    def combine(cls, parts: list[tuple[AdapterWeights, float]]) -> AdapterWeights:
        """A weighted sum of adapters as one: concatenated ranks, each B scaled by its weight."""
        A = {s: torch.cat([w.A[s] for w, _ in parts], dim=1) for s in SITES}
        B = {s: torch.cat([w.B[s] * k for w, k in parts], dim=2) for s in SITES}
        return cls(A, B)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.A.values(), *self.B.values()))


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


class LoraStacks:
    """Slots of adapter weights on the device: A[site] [layers, slots, R, in], B[site] [layers, slots, out, R].

    R per site is the largest rank loaded so far; a bigger adapter regrows the stack (rare) and
    smaller ones pad with zeros, which add nothing to the delta.
    """

    def __init__(self, n_layers: int, slots: int, shapes: SiteShapes, dtype: torch.dtype, device: str):
        self.slots, self.dtype, self.device = slots, dtype, device
        self.A = {
            s: torch.zeros(n_layers, slots, 0, fan_in, dtype=dtype, device=device) for s, (fan_in, _) in shapes.items()
        }
        self.B = {
            s: torch.zeros(n_layers, slots, sum(o for _, o in mods), 0, dtype=dtype, device=device)
            for s, (_, mods) in shapes.items()
        }
        self.version = 0  # bumped whenever slot contents change; LoraBatch caches on it

    def put(self, slot: int, w: AdapterWeights) -> None:
        for s in SITES:
            r = w.rank(s)
            if r > self.A[s].shape[2]:
                a, b = self.A[s], self.B[s]
                self.A[s] = torch.cat([a, a.new_zeros(a.shape[0], a.shape[1], r - a.shape[2], a.shape[3])], dim=2)
                self.B[s] = torch.cat([b, b.new_zeros(*b.shape[:3], r - b.shape[3])], dim=3)
            self.A[s][:, slot].zero_()
            self.B[s][:, slot].zero_()
            self.A[s][:, slot, :r] = w.A[s].to(self.device, self.dtype)
            self.B[s][:, slot, :, :r] = w.B[s].to(self.device, self.dtype)
        self.version += 1


class LoraBatch:
    """Per-row adapter weights for one batch, set up once and reused by every layer and every step
    while the batch's rows and the stacks stay the same.

    The U distinct adapters of the batch are laid side by side along the rank axis
    (A_cat [in, U*R], B_cat [U*R, out]) and each row keeps only its own segment with a 0/1 mask:
    `delta = ((x @ A_cat) * mask) @ B_cat`. Two dense matmuls per projection read each distinct
    adapter once per step, however many rows share it; a per-row gather + bmm reads a shared
    adapter once per row (measured on CPU with 8 distinct adapters: about the same step time).
    """

    def __init__(self, stacks: LoraStacks, slots: list[int]):
        self.slots = list(slots)
        self.version = stacks.version
        distinct = sorted({s for s in slots if s})
        idx = torch.tensor(distinct, device=stacks.device)
        self.At: dict[str, torch.Tensor] = {}
        self.Bt: dict[str, torch.Tensor] = {}
        self.mask: dict[str, torch.Tensor | None] = {}
        for site in SITES:
            A, B = stacks.A[site], stacks.B[site]  # [layers, slots, R, in], [layers, slots, out, R]
            layers, _, R, fan_in = A.shape
            if R == 0 or not distinct:
                continue
            U = len(distinct)
            self.At[site] = A.index_select(1, idx).permute(0, 3, 1, 2).reshape(layers, fan_in, U * R).contiguous()
            self.Bt[site] = B.index_select(1, idx).permute(0, 1, 3, 2).reshape(layers, U * R, -1).contiguous()
            if U == 1 and all(self.slots):
                self.mask[site] = None  # every row uses the one adapter: nothing to mask
            else:
                seg = torch.tensor([distinct.index(s) if s else -1 for s in self.slots], device=stacks.device)
                cols = torch.arange(U * R, device=stacks.device) // R
                self.mask[site] = (cols[None, :] == seg[:, None]).to(A.dtype)[:, None, :]  # [n, 1, U*R]

    def matches(self, stacks: LoraStacks, slots: list[int]) -> bool:
        return self.version == stacks.version and self.slots == slots

    def delta(self, x: torch.Tensor, layer: int, site: str) -> torch.Tensor:
        """x [n, L, in] -> [n, L, out]: row i gets x[i] @ A_i.T @ B_i.T."""
        if site not in self.At:
            return torch.zeros((), dtype=x.dtype, device=x.device)
        u = torch.matmul(x, self.At[site][layer])
        mask = self.mask[site]
        if mask is not None:
            u = u * mask
        return torch.matmul(u, self.Bt[site][layer])
