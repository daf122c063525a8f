"""Autograd glue for fused kernels that compute a loss and its gradient in one pass."""

from __future__ import annotations

import torch

from .spec import ceil_div, resolve_backend

SCALED_COPY_BLOCK = 4096


def scale_rows_(grad: torch.Tensor, upstream: torch.Tensor) -> torch.Tensor:
    """``grad[n] *= upstream[n]`` in place (``upstream`` ``[N]`` or a scalar). On the Triton path rows whose
    factor is exactly 1 are skipped on the device, so a ``loss.backward()`` costs no pass over ``grad``."""
    upstream = upstream.reshape(-1).expand(grad.shape[0])
    if resolve_backend(grad, "auto") != "triton" or grad.shape[0] == 0:
        return grad.mul_(upstream[:, None])
    launch_scale(grad, upstream)
    return grad


def launch_scale(grad: torch.Tensor, upstream: torch.Tensor):
    """Launch ``_scale_grad_kernel`` over the rows of ``grad`` ``[N, V]`` with ``upstream`` ``[N]``."""
    from ..kernels.kd_loss import _scale_grad_kernel

    _scale_grad_kernel[(grad.shape[0],)](grad_ptr=grad, up_ptr=upstream, grad_stride=grad.stride(0),
                                         up_stride=upstream.stride(0), V=grad.shape[1], BLOCK=2048, num_warps=8)


def scaled_copy(grad: torch.Tensor, factor: torch.Tensor, dtype: torch.dtype, backend: str = "auto") -> torch.Tensor:
    """A new ``grad * factor`` (``factor`` a device scalar), computed in float32 (float64 for float64) and rounded
    once to ``dtype``; ``grad`` is left as it is (a retained graph reuses it). On the Triton path no float32 copy of
    ``grad`` is made and there is no host sync."""
    out = torch.empty(grad.shape, dtype=dtype, device=grad.device)
    wide = torch.promote_types(torch.promote_types(grad.dtype, dtype), torch.float32)
    if wide == torch.float64 or resolve_backend(grad, backend) != "triton" or not grad.is_contiguous():
        return torch.mul(grad.to(wide), factor.to(wide), out=out)
    if out.numel():
        launch_scaled_copy(grad, factor.to(torch.float32), out)
    return out


def launch_scaled_copy(grad: torch.Tensor, factor: torch.Tensor, out: torch.Tensor):
    """Launch ``_scaled_copy_kernel``: ``out = grad * factor`` over contiguous tensors, ``factor`` a float32 scalar."""
    from ..kernels.kd_loss import _scaled_copy_kernel

    _scaled_copy_kernel[(ceil_div(out.numel(), SCALED_COPY_BLOCK),)](
        src_ptr=grad, dst_ptr=out, factor_ptr=factor, n=out.numel(), BLOCK=SCALED_COPY_BLOCK, num_warps=8)


class StoredGradFunction(torch.autograd.Function):
    """A fused kernel's output ``value`` (per-row ``[N]`` or a scalar), tied to ``logits [N, V]`` by the
    kernel's own gradient.

    ``grad [N, V]`` holds ``d value[n] / d logits[n]`` (for a scalar: ``d value / d logits``); backward
    scales it in place by the upstream gradient, so the only ``[N, V]`` buffer is the one the kernel wrote.
    """

    @staticmethod
    def forward(ctx, logits, value, grad):
        ctx.grad = grad
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad_value):
        if ctx.grad is None:
            raise RuntimeError(
                "switchkd: this graph was already back-propagated; the fused gradient is consumed by the first "
                "backward (retain_graph is not supported)"
            )
        grad, ctx.grad = ctx.grad, None
        return scale_rows_(grad, grad_value), None, None


def attach_grad(logits: torch.Tensor, value: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
    """``value``, differentiable w.r.t. ``logits`` through ``grad`` when the kernel computed one."""
    return value if grad is None else StoredGradFunction.apply(logits, value, grad)
