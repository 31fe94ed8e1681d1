"""Data-parallel training under `torchrun` / `accelerate launch`: which process this is, and the
one collective the recipe needs.

Each optimizer step's micro-batches are dealt out round-robin over the processes; each process
back-propagates its share with the loss already divided by the answer tokens of the *whole* step,
so summing the LoRA gradients over processes gives exactly the single-process gradient:

    grad = sum over ranks r of sum over micro-batches b in group[r::world] of d(loss_b / n_total)

Why not `DistributedDataParallel`: it averages gradients (divide by world size) and needs every
process to run the same number of backward passes with `no_sync` in between; with ~1% of the
weights trainable, one flattened all-reduce per step is simpler and exact.

With `train.fsdp` (or `accelerate launch` with an FSDP config) the frozen base is sharded too:
`shard` applies FSDP2's `fully_shard` to each decoder layer, so each process holds 1/N of every
layer's weights and gathers a layer only while it runs it. FSDP then reduces the
LoRA gradients itself (an average over processes, hence the loss scaled by N: on gloo the
pre-scaled sum FSDP would otherwise use does not exist), and every process must run the same
number of forward passes per step, so a process short of micro-batches runs a zero-weighted one.

DeepSpeed ZeRO (`train.deepspeed`, or `accelerate launch` with a DeepSpeed config) is the other
way to shard; it lives in zero.py.

Only rank 0 writes (run directory, checkpoints, metrics, TensorBoard, the store). The state that
is saved is global (step, optimizer state, full tensors gathered from the shards), so a run
resumes on any number of processes, sharded or not.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            torch.distributed.barrier()

    def close(self, together: bool = True) -> None:
        """Leave the process group. `together`: first wait until every process gets here (rank 0
        after registering), so none tears its connections down while another still holds them:
        a rank leaving early once died in CI with SIGABRT ("terminate called without an active
        exception") after its work was done, which failed the whole torchrun. An interrupted run
        leaves without waiting: the others may be gone already."""
        if self.size > 1 and torch.distributed.is_initialized():
            if together:
                torch.distributed.barrier()
            torch.distributed.destroy_process_group()

    def sum_grads(self, params: list[torch.nn.Parameter]) -> None:
        """All-reduce (sum) the gradients of `params` in one flattened buffer."""
        if self.size == 1:
            return
        for p in params:
            if p.grad is None:  # a process with no micro-batch this step still takes part
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch._utils._flatten_dense_tensors(grads)
        torch.distributed.all_reduce(flat)
        for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
            g.copy_(synced)

    def sum(self, value: float) -> float:
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return float(t.item())


def launched() -> bool:
    """Whether torchrun / accelerate launch started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str) -> World:
    """The process group from torchrun's / accelerate's environment (WORLD_SIZE, RANK, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT); a single process without them."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not torch.distributed.is_initialized():
        backend = "nccl" if device == "cuda" else "gloo"
        if device == "cuda":
            torch.cuda.set_device(local)
        torch.distributed.init_process_group(backend)
    return World(rank, size, local)


def wants_fsdp(configured: bool) -> bool:
    """`train.fsdp`, or an `accelerate launch` whose config chose FSDP (it sets ACCELERATE_USE_FSDP)."""
    return configured or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"


def shard(model: Any, device: str, size: int) -> None:
    """FSDP2 over all processes, one unit per decoder layer (gathered while it runs, freed after).

    The embeddings, final norm and output head stay whole on every process: they are often one
    tied tensor used at both ends of the model (an FSDP unit cannot span both), the recipe calls
    the decoder and the head separately (the head runs on labelled positions only), and they are
    a small share of a large model (1 of Llama-3-8B's 8 billion weights).

    The model comes from the CPU: those whole parts move to `device` here, and `fully_shard` moves
    each layer's share, so no process holds the whole base on its GPU."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    layers = model.get_base_model().get_decoder().layers
    in_layers = {id(t) for layer in layers for t in [*layer.parameters(), *layer.buffers()]}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            if id(p) not in in_layers:
                p.data = p.data.to(device)  # in place: a tied embedding stays one tensor
        for k, b in m.named_buffers(recurse=False):
            if id(b) not in in_layers:
                m._buffers[k] = b.to(device)
    mesh = init_device_mesh(device.split(":")[0], (size,))
    for layer in layers:
        fully_shard(layer, mesh=mesh)


def full(t: Any) -> torch.Tensor:
    """A whole tensor from a shard (a collective: every process calls it), or `t` as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def like(value: torch.Tensor, param: Any) -> torch.Tensor:
    """`value` (a whole tensor) laid out like `param`: this process's shard of it when sharded."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    value = value.to(param.device)
    if isinstance(param, DTensor) and value.shape == param.shape:
        return distribute_tensor(value, param.device_mesh, param.placements)
    return value


def local_share(model: Any) -> float:
    """The fraction of the model's weights this process holds (1.0 unsharded)."""
    from torch.distributed.tensor import DTensor

    params = list(model.parameters())
    held = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params)
    return held / max(1, sum(p.numel() for p in params))
