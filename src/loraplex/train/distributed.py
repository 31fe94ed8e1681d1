"""Data-parallel training under `torchrun` / `accelerate launch`: which process this is, and the
one collective the recipe needs.

Each optimizer step's micro-batches are dealt out round-robin over the processes; each process
back-propagates its share with the loss already divided by the answer tokens of the *whole* step,
so summing the LoRA gradients over processes gives exactly the single-process gradient:

    grad = sum over ranks r of sum over micro-batches b in group[r::world] of d(loss_b / n_total)

Why not `DistributedDataParallel`: it averages gradients (divide by world size) and needs every
process to run the same number of backward passes with `no_sync` in between; with ~1% of the
weights trainable, one flattened all-reduce per step is simpler and exact.

Only rank 0 writes (run directory, checkpoints, metrics, TensorBoard, the store). The state that
is saved is global (step, replicated optimizer state), so a run resumes on any number of
processes. This module does not shard the frozen base (FSDP / DeepSpeed ZeRO are not built).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

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

    def close(self) -> None:
        """Leave the process group (after the last collective; rank 0 may still write)."""
        if self.size > 1 and torch.distributed.is_initialized():
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
