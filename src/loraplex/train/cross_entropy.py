"""Cross-entropy through a frozen output head, a few rows at a time: the loss and the gradient
for the hidden states, without the (positions x vocabulary) logits and their copies.

The plain way (`reference`) makes the whole logits matrix, an fp32 copy of it, its log-softmax, and
in backward a zero-filled matrix of the same size for the loss's gradient, then the log-softmax's
gradient: five (n x 49,152) fp32 matrices a micro-batch on SmolLM2, ~30 MB each at 158 answer
tokens, each large enough to arrive as fresh pages from the system. Measured on the sample's
recipe (4 epochs, one thread, 2-core AMD EPYC, three alternated runs each, 2026-12-05): peak RSS
1.38-1.43 -> 1.30-1.32 GiB in bf16 and 1.83-1.87 -> 1.77-1.84 GiB in fp32, tokens/s 366-378 -> 376-381
in bf16 and the same in fp32; the losses equal to four digits.

Here each chunk of `CHUNK_BYTES` of logits is computed with the head as the model would (the same
module call, under the caller's autocast), reduced to its log-sum-exp and target logit, turned in
place into softmax - one-hot, and multiplied back through the head's weight at once: the forward
pass keeps the gradient for the hidden states (n x hidden, small), and backward only scales it. The
gradient is the one
autograd computes through `reference` (softmax - one-hot, cast to the head's compute dtype, times
the weight), scaled after the product instead of before it (tests/test_train.py: equal to the
reference within fp32 rounding, and within bf16 rounding under autocast).

Why not Liger-Kernel's fused linear cross-entropy: it is Triton, GPU only; this is the same idea
in a few lines of PyTorch, and runs wherever PyTorch does.

This does not train the head: a head that is trained (a LoRA on `lm_head`, `modules_to_save`), has
a bias, or is not a plain `nn.Linear` (quantized, partitioned by DeepSpeed ZeRO-3) goes through
`reference` (`fused_ok`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

CHUNK_BYTES = 8 << 20  # fp32 logits a chunk: ~42 rows of SmolLM2's 49,152-token vocabulary


def fused_ok(head: Any) -> bool:
    """Whether `head` can go through the chunked path (module docstring)."""
    return (
        type(head) is torch.nn.Linear
        and head.bias is None
        and not head.weight.requires_grad
        and not hasattr(head.weight, "ds_id")  # a ZeRO-3 partition: the module's hooks gather it
    )


def reference(head: Any, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of `head(hidden)` against `targets`, the plain way."""
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def head_cross_entropy(head: Any, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of `head(hidden)` (n x vocab) against `targets` (n), chunked where
    `fused_ok(head)`; `reference` otherwise."""
    if not fused_ok(head):
        return reference(head, hidden, targets)
    return _Chunked.apply(hidden, targets, head, torch.is_grad_enabled() and hidden.requires_grad)


class _Chunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, targets: torch.Tensor, head: Any, grad: bool) -> torch.Tensor:
        rows = max(1, CHUNK_BYTES // (4 * head.out_features))
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grads, weight = [], None
        for s in range(0, hidden.shape[0], rows):
            h, t = hidden[s : s + rows], targets[s : s + rows]
            out = head(h)  # the model's own call, under the caller's autocast: the reference's logits
            logits = out.float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if grad:
                p = logits.sub_(lse[:, None]).exp_()  # softmax, in place
                p[torch.arange(len(t), device=p.device), t] -= 1.0
                # what autograd does through `reference`: d logits cast to the logits' dtype, times W
                weight = head.weight.to(out.dtype) if weight is None else weight  # once (a no-op unless autocast casts)
                grads.append(p.to(out.dtype) @ weight)
        if grad:  # no labelled positions (an answer truncated away): a zero gradient, as the plain loss gives
            ctx.save_for_backward(torch.cat(grads).to(hidden.dtype) if grads else torch.zeros_like(hidden))
        return total

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        (d_hidden,) = ctx.saved_tensors
        return d_hidden * g.to(d_hidden.dtype), None, None, None
