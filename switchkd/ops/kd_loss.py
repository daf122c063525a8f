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
    resolve_backend,
    rows_2d,
)
from .stored_grad import attach_grad


def kd_loss_triton(student_logits, teacher_logits, labels, *, kind, alpha, beta, temperature, ignore_index,
                   need_grad):
    """Launch ``_kd_loss_kernel`` on ``[N, V]`` logits (last dim contiguous).

    Returns ``(loss_rows [N] float32, grad [N, V] in the student dtype or None)``; ``grad`` is the
    gradient of each row's loss (zero on ignored rows), to be scaled by the upstream gradient.
    """
    from ..kernels.divergence import block_size, num_warps
    from ..kernels.kd_loss import _kd_loss_kernel

    n_rows, vocab = student_logits.shape
    loss = torch.empty(n_rows, device=student_logits.device, dtype=torch.float32)
    grad = torch.empty_like(student_logits) if need_grad else None
    block = block_size(vocab)
    if n_rows > 0:
        _kd_loss_kernel[(n_rows,)](
            s_ptr=student_logits, t_ptr=teacher_logits, labels_ptr=labels if labels is not None else loss,
            loss_ptr=loss, grad_ptr=grad if need_grad else loss,
            s_stride=student_logits.stride(0), t_stride=teacher_logits.stride(0),
            grad_stride=grad.stride(0) if need_grad else 0,
            V=vocab, inv_temp=1.0 / temperature, alpha=float(alpha), beta=float(beta), ignore_index=ignore_index,
            KIND=LOSS_CODES[kind], HAS_LABELS=labels is not None, HAS_GRAD=need_grad, BLOCK=block,
            num_warps=num_warps(block),
        )
    return loss, grad


def reduce_rows(rows: torch.Tensor, labels, ignore_index: int, reduction: str) -> torch.Tensor:
    """``none`` | ``sum`` | ``mean`` over kept rows (0 when none is kept); no host sync."""
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    kept = rows.new_tensor(rows.shape[0]) if labels is None else (labels != ignore_index).sum()
    return rows.sum() / kept.clamp_min(1).to(rows.dtype)


def kd_loss(student_logits, teacher_logits, labels=None, *, kind="srkl", alpha=0.1, beta=0.5, temperature=1.0,
            ignore_index=-100, reduction="mean", backend="auto"):
    """Token-level distillation loss between student and teacher logits, fused over the vocabulary.

    Every position contributes ``D(p_T, p_S)`` (nats) with ``p = softmax(logits / temperature)``;
    kinds: ``fkl`` KL(p_T||p_S), ``rkl`` KL(p_S||p_T), ``jsd`` (weight ``beta``; 0 → fkl, 1 → rkl),
    ``skl``/``srkl`` skew KL with ``alpha`` (DistiLLM), ``tvd``. Positions whose label equals
    ``ignore_index`` are skipped. One Triton kernel per row computes the loss and, with
    ``z = s / T`` and ``g = dL/dp_S``, the gradient ``p_S * (g - sum(p_S * g)) / T``; backward scales
    it by the reduction. There is no host sync and no gradient flows to the teacher. NaN/inf logits
    give a NaN loss.

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
    rows, grad = kd_loss_triton(s, t, rows_labels, need_grad=s.requires_grad, **options)
    out = reduce_rows(attach_grad(s, rows, grad), rows_labels, ignore_index, reduction)
    return out.reshape(lead_shape) if reduction == "none" else out
