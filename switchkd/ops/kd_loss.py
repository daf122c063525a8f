"""kd_loss: token-level distillation loss, forward and gradient fused in one pass over the vocabulary."""

from __future__ import annotations

import torch

from . import reference
from .spec import (
    LOSS_CODES,
    canonical_kind,
    check_int,
    check_labels,
    check_loss_args,
    check_pair,
    check_reduction,
    check_temperature,
    kernel_rows,
    next_pow2,
    resolve_backend,
    rows_2d,
)
from .stored_grad import attach_grad

LOG2E = 1.4426950408889634


def kd_loss_triton(student_logits, teacher_logits, labels, *, kind, alpha, beta, temperature, ignore_index,
                   need_grad, weight=None, splits=None, grad_out=None):
    """Run the kd_loss kernels on ``[N, V]`` logits (last dim contiguous): one program per row when there
    are enough rows to fill the GPU, else statistics / loss / gradient phases over vocabulary splits.

    Returns ``(loss_rows [N] float32, grad [N, V] in the student dtype or None)``; ``grad`` is the
    gradient of each row's loss (zero on ignored rows) times ``weight`` (a device scalar, default 1),
    to be scaled by the upstream gradient. ``grad_out``: where to write it (like the student logits; may
    be the student logits themselves, which are then overwritten: every tile is read before it is
    written). ``splits`` overrides the split count (tests).
    """
    from ..kernels.kd_loss import _kd_loss_kernel, _kd_loss_split_kernel
    from ..kernels.split import NO_SAMPLE, _grad_kernel, _stats_kernel, split_plan

    (n_rows, vocab), device = student_logits.shape, student_logits.device
    loss = torch.empty(n_rows, device=device, dtype=torch.float32)
    grad = None
    if need_grad:
        grad = torch.empty_like(student_logits) if grad_out is None else grad_out
        if grad.shape != student_logits.shape or grad.dtype != student_logits.dtype or grad.stride(-1) != 1:
            raise ValueError("grad_out must have the student logits' shape and dtype, last dim contiguous")
    if n_rows == 0:
        return loss, grad
    n_splits, chunk = split_plan(n_rows, vocab, device, splits)
    f32 = {"device": device, "dtype": torch.float32}
    (s_rows, s_stride), (t_rows, t_stride) = kernel_rows(student_logits), kernel_rows(teacher_logits)
    args = {"s_ptr": s_rows, "t_ptr": t_rows, "labels_ptr": loss if labels is None else labels,
            "weight_ptr": loss if weight is None else weight, "grad_ptr": grad if need_grad else loss,
            "s_stride": s_stride, "t_stride": t_stride,
            "grad_stride": grad.stride(0) if need_grad else 0, "V": vocab, "chunk": chunk,
            "scale2": LOG2E / temperature, "inv_temp": 1.0 / temperature,
            "alpha": float(alpha), "beta": float(beta), "ignore_index": ignore_index, "KIND": LOSS_CODES[kind],
            "HAS_LABELS": labels is not None, "HAS_WEIGHT": weight is not None}
    if n_splits == 1:
        _kd_loss_kernel[(n_rows,)](loss_ptr=loss, HAS_GRAD=need_grad, **args)
        return loss, grad
    grid = (n_rows, n_splits)
    stats, sums = torch.empty(n_rows, n_splits, 4, **f32), torch.empty(n_rows, n_splits, 4, **f32)
    _stats_kernel[grid](s_ptr=s_rows, t_ptr=t_rows, stats_ptr=stats, cand_ptr=stats,
                        cand_col_ptr=stats, s_stride=args["s_stride"], t_stride=args["t_stride"], V=vocab, chunk=chunk,
                        scale2=args["scale2"], SAMPLE=NO_SAMPLE, SAMPLE_S=NO_SAMPLE)
    split_args = {**args, "stats_ptr": stats, "sums_ptr": sums, "SPLITS": next_pow2(n_splits)}
    _kd_loss_split_kernel[grid](HAS_GRAD=need_grad, **split_args)
    if need_grad and kind != "fkl":
        _grad_kernel[grid](**split_args)
    torch.sum(sums[:, :, 0], dim=1, out=loss)
    return loss, grad


def row_weight(n_rows: int, labels, ignore_index: int, reduction: str, device,
               dtype=torch.float32) -> torch.Tensor | None:
    """The gradient weight of every row under ``reduction`` as a device scalar (``mean``: 1 / kept rows,
    0 kept counting as 1; ``sum``: 1), or None for ``none``; no host sync."""
    if reduction == "none":
        return None
    if reduction == "sum":
        return torch.ones((), device=device, dtype=dtype)
    if labels is None:  # a fill, not torch.tensor(..., device=device): that copy from the host syncs the stream
        return torch.full((), 1.0 / max(n_rows, 1), device=device, dtype=dtype)
    return 1.0 / (labels != ignore_index).sum().clamp_min(1).to(dtype)


def kd_loss(student_logits, teacher_logits, labels=None, *, kind="srkl", alpha=0.1, beta=0.5, temperature=1.0,
            ignore_index=-100, reduction="mean", backend="auto"):
    """Token-level distillation loss between student and teacher logits, fused over the vocabulary.

    Every position contributes ``D(p_T, p_S)`` (nats) with ``p = softmax(logits / temperature)``;
    kinds: ``fkl`` KL(p_T||p_S), ``rkl`` KL(p_S||p_T), ``jsd`` (weight ``beta``; 0 → fkl, 1 → rkl),
    ``skl``/``srkl`` skew KL with ``alpha`` (DistiLLM), ``tvd``. Positions whose label equals
    ``ignore_index`` are skipped. The Triton kernels (one program per row, or vocabulary splits
    when there are few rows) compute the loss and, with ``z = s / T`` and ``g = dL/dp_S``, the gradient
    ``p_S * (g - sum(p_S * g)) / T`` times the reduction's weight in the same sweeps; backward only
    scales it by the upstream gradient, and skips even that when the upstream is 1. There is no host
    sync and no gradient flows to the teacher. NaN/inf logits give a NaN loss.

    Args:
        student_logits, teacher_logits: ``[..., V]`` float32/bfloat16/float16 (float64 runs the reference).
        labels: optional integer tensor of shape ``[...]``; only compared with ``ignore_index``.
        reduction: ``mean`` over kept positions (0 when none is kept), ``sum``, or ``none`` (shape ``[...]``).

    Returns:
        float32 loss (float64 for float64 inputs); the gradient has the student dtype.

    Example::

        loss = switchkd.kd_loss(student_out.logits, teacher_out.logits, labels, kind="srkl", alpha=0.1)
        loss.backward()
    """
    check_pair(student_logits, teacher_logits)
    check_loss_args(kind, alpha, beta)
    check_temperature(temperature, allow_zero=False)
    check_reduction(reduction)
    check_int("ignore_index", ignore_index)
    lead_shape = student_logits.shape[:-1]
    if labels is not None:
        check_labels(labels, lead_shape, student_logits.device)
    options = {"kind": canonical_kind(kind, beta), "alpha": alpha, "beta": beta, "temperature": temperature,
               "ignore_index": ignore_index}

    if resolve_backend(student_logits, backend) == "reference":
        return reference.kd_loss(student_logits, teacher_logits, labels, reduction=reduction, **options)
    s, t = rows_2d(student_logits), rows_2d(teacher_logits.detach())
    rows_labels = None if labels is None else labels.reshape(-1).to(torch.int64)
    weight = row_weight(s.shape[0], rows_labels, ignore_index, reduction, s.device)
    rows, grad = kd_loss_triton(s, t, rows_labels, need_grad=s.requires_grad, weight=weight, **options)
    if reduction == "none":
        return attach_grad(s, rows, grad).reshape(lead_shape)
    # The kernel's gradient already carries the reduction's weight: backward only scales by the upstream.
    return attach_grad(s, rows.sum() * weight, grad)
