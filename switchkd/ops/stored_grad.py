"""Autograd glue for fused kernels that compute a loss and its gradient in one pass."""

from __future__ import annotations

import torch


class StoredGradFunction(torch.autograd.Function):
    """Per-row values ``rows [N]`` of a fused kernel, tied to ``logits [N, V]`` by the kernel's own gradient.

    ``grad [N, V]`` holds ``d rows[n] / d logits[n]``; backward scales it in place by the upstream
    gradient of each row, so the only ``[N, V]`` buffer is the one the kernel wrote.
    """

    @staticmethod
    def forward(ctx, logits, rows, grad):
        ctx.grad = grad
        return rows.view_as(rows)

    @staticmethod
    def backward(ctx, grad_rows):
        if ctx.grad is None:
            raise RuntimeError(
                "switchkd: this graph was already back-propagated; the fused gradient is consumed by the first "
                "backward (retain_graph is not supported)"
            )
        grad, ctx.grad = ctx.grad, None
        return grad.mul_(grad_rows[:, None]), None, None


def attach_grad(logits: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
    """``rows``, differentiable w.r.t. ``logits`` through ``grad`` when the kernel computed one."""
    return rows if grad is None else StoredGradFunction.apply(logits, rows, grad)
