"""Many LoRA adapters on one base, applied per row of a batch in the same forward pass.

The serving model fuses its projections into *sites* (q|k|v, o, gate|up, down). At a site an
adapter is one fused A ([R, in], the A matrices of the site's modules stacked) and one B per *run*
of modules with the same output size (q | k,v; gate,up; ...), so `u = x @ A.T` feeds every module
of the site in one matmul and no B is padded into a block-diagonal matrix. Each module's scaling
(alpha / r, rslora, alpha_pattern) is folded into its B. Composition is free: "legal:0.7+formal:0.3"
is the concatenation of both adapters' ranks with each B scaled by its weight.

A batch (`LoraBatch`) gathers its U distinct adapters once and lays its rows out in U groups
(padded to the largest group), so each row meets only its own adapter's weights and each adapter
is read once per step however many rows share it: two batched matmuls per site (the
S-LoRA/Punica grouped-GEMM idea in plain PyTorch), or on CPU one call per site into a small C
kernel that reads bf16 weights in place (lora_cpu.c). The naive reference it must equal
(`tests/test_engine.py` checks logits and greedy text against PEFT):

    for i in range(n):                       # each row on its own
        y[i] = x[i] @ W.T + sum(w * s * x[i] @ A_m.T @ B_m.T for (A_m, B_m, s), w in adapters_of_row[i])

This module does not decide which adapters stay loaded (see adapter_cache.py) and never reads a
name as a path: callers pass directories resolved by the store.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from loraplex.adapters.peft_io import read_peft_lora
from loraplex.engine import lora_kernel
from loraplex.errors import UserError

SITES = ("qkv", "o", "gate_up", "down")
KERNEL_ACTIVATIONS = {torch.bfloat16: 1, torch.float32: 0}  # what lora_cpu.c reads and writes (its act_bf16)
_threads = torch.get_num_threads  # the kernel runs on as many threads as torch (OpenMP's pool)
# site name -> (in_features, [(module, out_features), ...]) for one model; see DecoderModel.site_shapes
SiteShapes = dict[str, tuple[int, list[tuple[str, int]]]]
Found = dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]


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

    @property
    def slot_key(self) -> str:
        """What holds an adapter slot: one version's weights, whatever the weight a request gives
        it (`hr@v1:0.5` uses `hr@v1`'s slot, scaled per row), or a whole composition."""
        return self.parts[0][0] if len(self.parts) == 1 else self.key

    @property
    def scale(self) -> float:
        """The per-row factor on the slot's delta: the weight of a single adapter, else 1."""
        return self.parts[0][1] if len(self.parts) == 1 else 1.0


def runs(mods: list[tuple[str, int]]) -> list[list[str]]:
    """A site's modules in runs of equal output size, in order: [[q], [k, v]] for grouped-query attention."""
    out: list[list[str]] = []
    for i, (module, fan_out) in enumerate(mods):
        if i and fan_out == mods[i - 1][1]:
            out[-1].append(module)
        else:
            out.append([module])
    return out


@dataclass
class AdapterWeights:
    """One adapter (or a composition) per module: A[module] [layers, r, in], B[module] [layers, out, r]
    (scaling folded in; r = 0 where the module is not targeted)."""

    A: dict[str, torch.Tensor]
    B: dict[str, torch.Tensor]

    def rank(self, module: str) -> int:
        return self.A[module].shape[1]

    @classmethod
    def from_dir(cls, path: Path, n_layers: int, shapes: SiteShapes, label: str) -> AdapterWeights:
        """Read a PEFT LoRA adapter (safetensors only)."""
        return cls.from_found(read_peft_lora(path, label), n_layers, shapes, label)

    @classmethod
    def from_found(cls, found: Found, n_layers: int, shapes: SiteShapes, label: str) -> AdapterWeights:
        mods = {module: (fan_in, fan_out) for fan_in, ms in shapes.values() for module, fan_out in ms}
        ranks = dict.fromkeys(mods, 0)  # the max over layers
        for (layer, module), (a, _) in found.items():
            if layer >= n_layers:
                raise UserError(f"adapter {label}: it has LoRA weights for layer {layer}; the base has {n_layers}")
            if module not in mods:
                raise UserError(f"adapter {label}: LoRA on module {module!r} is not supported for serving")
            ranks[module] = max(ranks[module], a.shape[0])
        A = {m: torch.zeros(n_layers, ranks[m], fan_in) for m, (fan_in, _) in mods.items()}
        B = {m: torch.zeros(n_layers, fan_out, ranks[m]) for m, (_, fan_out) in mods.items()}
        for (layer, module), (a, b) in found.items():
            fan_in, fan_out = mods[module]
            r = a.shape[0]
            if a.shape[1] != fan_in or b.shape != (fan_out, r):
                raise UserError(
                    f"adapter {label}: layer {layer} {module} has A {tuple(a.shape)}, B {tuple(b.shape)}; "
                    f"the base needs A [r, {fan_in}] and B [{fan_out}, r] (was it trained on another base?)"
                )
            A[module][layer, :r] = a
            B[module][layer, :, :r] = b
        return cls(A, B)

    @classmethod
    def combine(cls, parts: list[tuple[AdapterWeights, float]]) -> AdapterWeights:
        """A weighted sum of adapters as one: concatenated ranks, each B scaled by its weight."""
        first = parts[0][0]
        A = {m: torch.cat([w.A[m] for w, _ in parts], dim=1) for m in first.A}
        B = {m: torch.cat([w.B[m] * k for w, k in parts], dim=2) for m in first.B}
        return cls(A, B)


def int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., n] -> (q int8 [..., n], scale fp32 [...]) with w ~ q * scale: one scale per row, its
    largest magnitude at 127 (a row of zeros: scale 0)."""
    w = w.float()
    scale = w.abs().amax(-1) / 127
    q = torch.round(w / scale.clamp_min(torch.finfo(torch.float32).tiny)[..., None]).clamp_(-127, 127)
    return q.to(torch.int8), scale


class LoraStacks:
    """Slots of adapter weights on the device. Per site: A [layers, slots, R, in] with each run's modules
    at `r_run`-wide segments, and per run B [layers, slots, k, r_run, out] (k modules in the run).

    `r_run` is the largest rank of the run's modules loaded so far; a bigger adapter regrows the stacks
    (rare) and smaller ones pad with zeros, which add nothing to the delta.

    `dtype=torch.int8` (lora_cpu.c only): every row of A ([in] values) and of B ([out] values for one
    rank) is int8 with one fp32 scale, in `A_scale` [layers, slots, R] and `B_scale` [layers, slots, k,
    r_run]. Half the bytes of bf16 to stream per decode step, which is what the LoRA delta of many
    adapters at once costs on a CPU; the scales fold into the rank-r intermediate, so the kernel's
    arithmetic per weight is a conversion and a multiply-add, as for bf16.
    """

    def __init__(self, n_layers: int, slots: int, shapes: SiteShapes, dtype: torch.dtype, device: str):
        self.slots, self.dtype, self.device = slots, dtype, device
        self.quantized = dtype == torch.int8
        if self.quantized and device != "cpu":
            raise ValueError("int8 LoRA stacks are for lora_cpu.c (CPU) only")
        self.n_layers = n_layers
        self.shapes = shapes
        self.runs = {s: runs(mods) for s, (_, mods) in shapes.items()}
        self.r = {s: [0] * len(self.runs[s]) for s in shapes}  # segment width of each run
        out = {m: o for _, mods in shapes.values() for m, o in mods}
        self.A = {
            s: torch.zeros(n_layers, slots, 0, fan_in, dtype=dtype, device=device) for s, (fan_in, _) in shapes.items()
        }
        self.B = {
            s: [
                torch.zeros(n_layers, slots, len(run), 0, out[run[0]], dtype=dtype, device=device)
                for run in self.runs[s]
            ]
            for s in shapes
        }
        # int8: one scale per row of A and of each B run (empty and unused otherwise)
        self.A_scale = {s: torch.zeros(n_layers, slots, 0) for s in shapes} if self.quantized else {}
        self.B_scale = {s: [torch.zeros(*B.shape[:4]) for B in self.B[s]] for s in shapes} if self.quantized else {}
        self.targets: dict[int, set[str]] = {}  # slot -> sites where its adapter is not zero
        self.version = 0  # bumped whenever slot contents change; LoraBatch caches on it
        self.regrows = 0  # bumped when the stacks are new tensors (a CUDA graph holds their addresses)
        self._tables: dict[str, KernelSite] | None = None  # lora_cpu.c's view, until the next regrow

    def _regrow(self, site: str, r_new: list[int]) -> None:
        old_r, A = self.r[site], self.A[site]
        k = [len(run) for run in self.runs[site]]
        A_new = A.new_zeros(*A.shape[:2], sum(ki * ri for ki, ri in zip(k, r_new, strict=True)), A.shape[3])
        As = self.A_scale.get(site)
        As_new = None if As is None else As.new_zeros(A_new.shape[:3])
        off_old = off_new = 0
        for i, ki in enumerate(k):
            for j in range(ki):
                old, new = off_old + j * old_r[i], off_new + j * r_new[i]
                A_new[:, :, new : new + old_r[i]] = A[:, :, old : old + old_r[i]]
                if As is not None and As_new is not None:
                    As_new[:, :, new : new + old_r[i]] = As[:, :, old : old + old_r[i]]
            off_old += ki * old_r[i]
            off_new += ki * r_new[i]
            B = self.B[site][i]
            self.B[site][i] = torch.cat([B, B.new_zeros(*B.shape[:3], r_new[i] - old_r[i], B.shape[4])], dim=3)
            if self.quantized:
                Bs = self.B_scale[site][i]
                self.B_scale[site][i] = torch.cat([Bs, Bs.new_zeros(*Bs.shape[:3], r_new[i] - old_r[i])], dim=3)
        self.A[site], self.r[site] = A_new, r_new
        if As_new is not None:
            self.A_scale[site] = As_new
        self._tables = None
        self.regrows += 1

    def put(self, slot: int, w: AdapterWeights) -> None:
        self.targets[slot] = set()
        for s in SITES:
            need = [max(w.rank(m) for m in run) for run in self.runs[s]]
            if any(n > r for n, r in zip(need, self.r[s], strict=True)):
                self._regrow(s, [max(n, r) for n, r in zip(need, self.r[s], strict=True)])
            self.A[s][:, slot].zero_()
            if self.quantized:
                self.A_scale[s][:, slot].zero_()
            off = 0
            for i, run in enumerate(self.runs[s]):
                B, width = self.B[s][i], self.r[s][i]
                B[:, slot].zero_()
                if self.quantized:
                    self.B_scale[s][i][:, slot].zero_()
                for j, m in enumerate(run):
                    r = w.rank(m)
                    if not r:
                        continue
                    self.targets[slot].add(s)
                    a, b = w.A[m], w.B[m].transpose(1, 2)  # [layers, r, in], [layers, r, out]
                    if self.quantized:
                        (a, a_scale), (b, b_scale) = int8_rows(a), int8_rows(b)
                        self.A_scale[s][:, slot, off + j * width : off + j * width + r] = a_scale
                        self.B_scale[s][i][:, slot, j, :r] = b_scale
                    self.A[s][:, slot, off + j * width : off + j * width + r] = a.to(self.device, self.dtype)
                    B[:, slot, j, :r] = b.to(self.device, self.dtype)
                off += len(run) * width
        self.version += 1

    def kernel_tables(self) -> dict[str, KernelSite]:
        """lora_cpu.c reads the stacks in place: per site and layer one int64 descriptor with the
        addresses of A's and each B run's layer slice (and of their scales, int8), their shapes and slot
        strides (layout in the C file). Addresses change only when a regrow replaces the tensors."""

        def scale_ptr(t: torch.Tensor | None) -> int:
            return 0 if t is None else t.data_ptr()  # 0: bf16 weights

        if self._tables is None:
            self._tables = {}
            for site in SITES:
                A = self.A[site]
                layers, _, R, fan_in = A.shape
                per_layer = []
                for layer in range(layers):
                    runs, lo = [], 0
                    for i, B in enumerate(self.B[site]):
                        _, _, k, r, out = B.shape
                        Bs = self.B_scale[site][i][layer] if self.quantized else None
                        runs += [B[layer].data_ptr(), k, r, out, lo, k * r * out, scale_ptr(Bs), k * r]
                        lo += k * out
                    As = self.A_scale[site][layer] if self.quantized else None
                    per_layer.append([A[layer].data_ptr(), R, R * fan_in, len(self.B[site]), scale_ptr(As), R, *runs])
                desc = torch.tensor([[fan_in, lo, *d] for d in per_layer], dtype=torch.int64)
                self._tables[site] = KernelSite(fan_in, lo, desc, [row.data_ptr() for row in desc])
        return self._tables


class GatheredRows:
    """Per-row LoRA for one decode token per row, every row's A and B gathered by its slot
    (`row_slots` [n] int64; slot 0 holds zeros, the bare base), weighted by `row_scale` [n].

    The Punica BGMV form, for a CUDA graph: no shape or kernel depends on which adapters the rows
    use, so one captured step serves every mix (`LoraBatch` groups rows per adapter on the host, a
    layout a graph would freeze). Its cost is kernels: a gather and two small matmuls per run of a
    site, ~1,000 a step on a 32-layer model (measured on an H200: 8.5 ms added to a 9.7 ms step),
    so `DenseRows` replaces it where few slots are loaded. The same naive reference as LoraBatch
    (module docstring); tests/test_engine.py checks both against `forward`.
    """

    def __init__(self, stacks: LoraStacks, row_slots: torch.Tensor, row_scale: torch.Tensor | None):
        self.stacks, self.row_slots, self.row_scale = stacks, row_slots, row_scale

    def add(self, y: torch.Tensor, x: torch.Tensor, layer: int, site: str) -> torch.Tensor:
        """y [n, out] += each row's delta for x [n, in]."""
        A = self.stacks.A[site][layer]  # [slots, R, in]
        if A.shape[1] == 0:
            return y
        n = x.shape[0]
        if self.row_scale is not None:
            x = x * self.row_scale[:, None].to(x.dtype)
        u = torch.bmm(A.index_select(0, self.row_slots), x[:, :, None].to(A.dtype))  # [n, R, 1]
        off = lo = 0
        for B in self.stacks.B[site]:  # per run: [layers, slots, k, r, out]
            _, _, k, r, out = B.shape
            d = torch.matmul(u[:, off : off + k * r].view(n, k, 1, r), B[layer].index_select(0, self.row_slots))
            y[:, lo : lo + k * out] += d.view(n, k * out).to(y.dtype)  # d: [n, k, 1, out]
            off, lo = off + k * r, lo + k * out
        return y


class DenseLora:
    """Every slot's LoRA at each site as two plain matrices, for decode steps in a CUDA graph.

    A is the stacks' own A seen flat, [layers, slots*R, in] (no copy); B [layers, slots*R, out] puts
    each slot's run rows at their module's output columns (zeros elsewhere: q's rows under q's
    columns, k's under k's). A step then multiplies every row by every slot's A, keeps its own
    slot's columns (`DenseRows`' weights: one-hot, times the row's weight) and adds one matmul of B:
    three kernels a site, ~380 a step on a 32-layer model, against ~1,000 gathering per row. It
    reads every loaded slot's weights once a step, used or not, so it pays only for few slots
    (`cuda_graph.DENSE_SLOTS`). B is refreshed in place when adapters load (`refresh`), so a
    captured graph keeps reading it; a regrow of the stacks makes new tensors (recapture).
    """

    def __init__(self, stacks: LoraStacks):
        self.stacks = stacks
        self.regrows = stacks.regrows
        self.version = -1
        self.A: dict[str, torch.Tensor] = {}
        self.B: dict[str, torch.Tensor] = {}
        for site, A in stacks.A.items():
            layers, slots, R, fan_in = A.shape
            if R == 0:
                continue
            out = sum(B.shape[2] * B.shape[4] for B in stacks.B[site])
            self.A[site] = A.view(layers, slots * R, fan_in)
            self.B[site] = torch.zeros(layers, slots, R, out, dtype=A.dtype, device=A.device)
        self.refresh()

    def refresh(self) -> None:
        """Copy the stacks' B into the dense layout if an adapter was loaded since the last copy."""
        if self.version == self.stacks.version:
            return
        assert self.stacks.regrows == self.regrows, "the stacks regrew: make a new DenseLora"
        for site, dense in self.B.items():
            off = lo = 0
            for B in self.stacks.B[site]:  # [layers, slots, k, r, out]
                _, _, k, r, out = B.shape
                for m in range(k):
                    dense[:, :, off + m * r : off + (m + 1) * r, lo + m * out : lo + (m + 1) * out] = B[:, :, m]
                off, lo = off + k * r, lo + k * out
        self.version = self.stacks.version


class DenseRows:
    """Per-row LoRA through `DenseLora`: `weights` [n, slots], row i's weight at its slot, 0 elsewhere
    (in the stacks' dtype, or it is cast at every site)."""

    def __init__(self, dense: DenseLora, weights: torch.Tensor):
        self.dense, self.weights = dense, weights

    def add(self, y: torch.Tensor, x: torch.Tensor, layer: int, site: str) -> torch.Tensor:
        A = self.dense.A.get(site)
        if A is None:
            return y
        n, slots = self.weights.shape
        u = F.linear(x if x.dtype == A.dtype else x.to(A.dtype), A[layer]).view(n, slots, -1)  # [n, slots, R]
        u = (u * self.weights[:, :, None]).view(n, -1)  # only the row's own slot, weighted
        B = self.dense.B[site][layer].view(u.shape[1], -1)  # [slots*R, out]
        if y.dtype == B.dtype:
            return y.addmm_(u, B)
        return y.add_((u @ B).to(y.dtype))


@dataclass(frozen=True)
class KernelSite:
    """One site's descriptors for lora_cpu.c, one row per layer (kept alive here), their addresses,
    and the in and out features the call is checked against."""

    fan_in: int
    out: int
    desc: torch.Tensor
    addr: list[int]


class LoraBatch:
    """Per-row adapter weights for one batch, set up once and reused by every layer and every step
    while the batch's rows and the stacks stay the same.

    Rows are laid out as U groups of G (one group per distinct adapter, padded with repeats of row 0
    whose results are dropped); with 8 rows on 8 adapters, or 8 rows on one, the layout is the rows
    themselves and nothing is gathered. Per site and layer: `u = bmm(x_g, A_u.T)` [U, G*L, R], then one
    matmul per run `u_run @ B_u` [U, (k,) G*L, out]. Only the sites some adapter in the batch targets
    are computed. (Measured on this 2-core CPU, SmolLM2 with 8 all-linear rank-16 adapters: a mask over
    all adapters' ranks for every row cost 1.5x the base step; per-group in fp32, see `LoraStacks`'
    dtype in engine.py, much less.)
    """

    def __init__(self, stacks: LoraStacks, slots: list[int], scales: list[float] | None = None):
        self.slots = list(slots)
        self.stacks = stacks  # what a CUDA graph reads by slot (GatheredRows, DenseLora)
        # per row, the weight on its slot's delta (`hr:0.5`): applied to the row's input, as
        # x -> s*x gives s * B(A x), so one slot serves every weight of an adapter
        self.scales = None if scales is None or all(s == 1.0 for s in scales) else list(scales)
        self.version = stacks.version
        dev = stacks.device
        self.row_scale = None if self.scales is None else torch.tensor(self.scales, dtype=torch.float32, device=dev)
        distinct = list(dict.fromkeys(s for s in slots if s))  # in order of first row
        targeted = set().union(*(stacks.targets.get(d, set()) for d in distinct))
        self.A: dict[str, list[torch.Tensor]] = {}
        self.runs: dict[str, list[tuple[int, int, int, int, list[torch.Tensor]]]] = {}
        self.kernel = lora_kernel.load() if dev == "cpu" and stacks.dtype in (torch.bfloat16, torch.int8) else None
        if stacks.quantized and self.kernel is None:
            raise RuntimeError("int8 LoRA stacks need lora_cpu.c, which is not built here")
        if self.kernel is not None:
            self._kernel_args(stacks, slots, targeted)
            self.add_to = self._kernel_add_to  # type: ignore[method-assign]  # one Python call fewer per site
            return
        groups = [[i for i, s in enumerate(slots) if s == d] for d in distinct]
        self.U, self.G = len(distinct), max((len(g) for g in groups), default=0)
        gather = [g[j] if j < len(g) else g[0] for g in groups for j in range(self.G)]
        if gather == list(range(len(slots))):
            self.gather: torch.Tensor | None = None  # the rows are the groups already
        else:
            self.gather = torch.tensor(gather, device=dev)
        self.rows = torch.tensor([i for i, s in enumerate(slots) if s], device=dev)
        self.pos = torch.tensor(
            [distinct.index(s) * self.G + groups[distinct.index(s)].index(i) for i, s in enumerate(slots) if s],
            device=dev,
        )
        idx = torch.tensor(distinct, device=dev)
        # Per site and layer, as plain lists so the forward pass indexes Python lists, not tensors:
        # A [U, R, in], and per run (k modules, rank r, columns [lo, hi) of the site's output) B [U*k, r, out].
        for site in SITES:
            if site not in targeted:
                continue
            A = stacks.A[site].index_select(1, idx)  # [layers, U, R, in]
            self.A[site] = list(A.unbind(0))
            self.runs[site], lo = [], 0
            for B in stacks.B[site]:
                layers, _, k, r, out = B.shape
                B = B.index_select(1, idx).reshape(layers, self.U * k, r, out)
                self.runs[site].append((k, r, lo, lo + k * out, list(B.unbind(0))))
                lo += k * out

    def _kernel_args(self, stacks: LoraStacks, slots: list[int], targeted: set[str]) -> None:
        self.n = len(slots)
        self.row_slot = torch.tensor(slots, dtype=torch.int32)
        self.row_ptr = self.row_slot.data_ptr()
        self.scale_ptr = 0 if self.row_scale is None else self.row_scale.data_ptr()  # NULL: every row 1
        tables = stacks.kernel_tables()
        self.kargs = {site: tables[site] for site in SITES if site in targeted}
        # the batch holds the stacks' tensors, so a regrow (new tensors) never leaves it an address of freed memory
        self.held = [stacks.A[s] for s in targeted] + [B for s in targeted for B in stacks.B[s]]
        if stacks.quantized:
            self.held += [stacks.A_scale[s] for s in targeted] + [B for s in targeted for B in stacks.B_scale[s]]

    def matches(self, stacks: LoraStacks, slots: list[int], scales: list[float] | None = None) -> bool:
        scales = None if scales is None or all(s == 1.0 for s in scales) else scales
        return self.version == stacks.version and self.slots == slots and self.scales == scales

    def add_to(self, y: torch.Tensor, x: torch.Tensor, layer: int, site: str) -> torch.Tensor:
        """y [n, L, out] += each row's delta for input x [n, L, in]: row i gets x[i] @ A_i.T @ B_i.T.

        Written for few tensor ops per call: at decode sizes each op's fixed cost (~4 us) is
        comparable to the matmuls, and there are 4 sites x 30 layers of these per step.
        """
        A = self.A.get(site)
        if A is None:
            return y
        if self.row_scale is not None:
            x = x * self.row_scale[:, None, None]
        n, L, fan_in = x.shape
        U, GL = self.U, self.G * L
        xg = x if self.gather is None else x.index_select(0, self.gather)
        # A @ x.T rather than x @ A.T: with A's rows contiguous the batched GEMV streams them at about
        # twice the bandwidth (measured: 23 vs 11-15 GB/s on this CPU in fp32)
        ut = torch.bmm(A[layer], xg.reshape(U, GL, fan_in).transpose(1, 2).to(A[layer].dtype))  # [U, R, GL]
        out = y if self.gather is None else torch.zeros(U * self.G, L, y.shape[-1], dtype=ut.dtype, device=y.device)
        out3 = out.view(U, GL, -1)
        off = 0
        for k, r, lo, hi, B in self.runs[site]:
            u = ut[:, off : off + k * r]
            off += k * r
            if k == 1:
                d = torch.bmm(u.transpose(1, 2), B[layer])  # [U, GL, out]
                (out3 if hi - lo == out3.shape[-1] else out3[..., lo:hi]).add_(d)
            else:  # the run's modules as more batches: [U*k, GL, r] @ [U*k, r, out]
                d = torch.bmm(u.reshape(U * k, r, GL).transpose(1, 2), B[layer])
                out3[..., lo:hi].view(U, GL, k, -1).add_(d.view(U, k, GL, -1).transpose(1, 2))
        if self.gather is None:
            return y
        return y.index_add_(0, self.rows, out.index_select(0, self.pos).to(y.dtype))

    def _kernel_add_to(self, y: torch.Tensor, x: torch.Tensor, layer: int, site: str) -> torch.Tensor:
        ks = self.kargs.get(site)
        if ks is None:
            return y
        n, L, fan_in = x.shape
        act_bf16 = KERNEL_ACTIVATIONS.get(x.dtype)
        # the kernel trusts its arguments: a wrong shape or dtype would read out of bounds, not raise
        if act_bf16 is None or y.dtype != x.dtype or n != self.n or fan_in != ks.fan_in or y.shape != (n, L, ks.out):
            raise ValueError(f"LoRA site {site}: x {tuple(x.shape)} {x.dtype}, y {tuple(y.shape)} do not fit the batch")
        if not x.is_contiguous():
            x = x.contiguous()
        if not y.is_contiguous():
            raise ValueError(f"LoRA site {site}: y must be contiguous")
        assert self.kernel is not None
        if self.kernel.lora_site(
            n, L, x.data_ptr(), y.data_ptr(), act_bf16, self.row_ptr, self.scale_ptr, ks.addr[layer], _threads()
        ):
            raise MemoryError("the LoRA kernel could not allocate its scratch memory")
        return y
