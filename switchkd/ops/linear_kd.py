"""KD loss from hidden states and LM-head weights, chunked over rows (no full [N, V] logits)."""

from __future__ import annotations

import torch

from . import reference
from .kd_loss import kd_loss_triton
from .spec import canonical_kind, check_labels, check_loss_args, check_temperature, resolve_backend

CHUNK_ELEMENTS = 2**26  # default chunk: about 64M logits (256 MiB in float32) per model


def _rows_and_logit_grad(s_logits, t_logits, labels, backend, **loss_args):
    """Per-row loss and d(row loss)/d(student logits) of one chunk, on the chosen backend."""
    if backend == "triton":
        return kd_loss_triton(s_logits, t_logits, labels, need_grad=True, **loss_args)
    with torch.enable_grad():
        s = s_logits.detach().requires_grad_()
        rows = reference.kd_loss(s, t_logits, labels, reduction="none", **loss_args)
        (grad,) = torch.autograd.grad(rows.sum(), s)
    return rows.detach(), grad


class FusedLinearKDFunction(torch.autograd.Function):
    """KD loss of ``softmax(h_S W_S^T / T)`` against ``softmax(h_T W_T^T / T)``, chunk by chunk.

    For each chunk of rows: logits from the two matmuls, the fused KD kernel's per-row loss and
    ``G = dL/ds`` (the student logits' gradient), then ``dL/dh_S = G W_S`` and ``dL/dW_S += G^T h_S``;
    the chunk's logits are freed before the next one. Backward scales the stored gradients.
    """

    @staticmethod
    def forward(ctx, s_hidden, s_weight, t_hidden, t_weight, labels, loss_args, reduction, chunk_rows, backend):
        n_rows = s_hidden.shape[0]
        rows = torch.empty(n_rows, device=s_hidden.device, dtype=torch.float32)
        grad_hidden = torch.zeros_like(s_hidden) if s_hidden.requires_grad else None
        grad_weight = torch.zeros(s_weight.shape, device=s_weight.device, dtype=torch.float32) \
            if s_weight.requires_grad else None
        for start in range(0, n_rows, chunk_rows):
            chunk = slice(start, min(start + chunk_rows, n_rows))
            s_logits = s_hidden[chunk] @ s_weight.T
            t_logits = t_hidden[chunk] @ t_weight.T
            chunk_labels = None if labels is None else labels[chunk]
            rows[chunk], grad = _rows_and_logit_grad(s_logits, t_logits, chunk_labels, backend, **loss_args)
            if grad_hidden is not None:
                grad_hidden[chunk] = grad @ s_weight
            if grad_weight is not None:
                grad_weight.addmm_(grad.T.to(torch.float32), s_hidden[chunk].to(torch.float32))
        ctx.grads = grad_hidden, None if grad_weight is None else grad_weight.to(s_weight.dtype)
        if reduction == "sum":
            ctx.scale = torch.ones((), device=rows.device)
            return rows.sum()
        kept = rows.new_tensor(n_rows) if labels is None else (labels != loss_args["ignore_index"]).sum()
        ctx.scale = 1.0 / kept.clamp_min(1).float()
        return rows.sum() * ctx.scale

    @staticmethod
    def backward(ctx, grad_output):
        scale = grad_output * ctx.scale
        grads = [None if g is None else g * scale.to(g.dtype) for g in ctx.grads]
        return (grads[0], grads[1]) + (None,) * 7


def fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None, *, kind="srkl",
                         alpha=0.1, beta=0.5, temperature=1.0, ignore_index=-100, reduction="mean",
                         chunk_rows=None, backend="auto"):
    """:func:`switchkd.kd_loss` of ``student_hidden @ student_weight.T`` against the teacher's, without
    materialising either model's ``[N, V]`` logits (rows are processed ``chunk_rows`` at a time).

    Args:
        student_hidden ``[..., H_S]``, student_weight ``[V, H_S]``: the student's last hidden states and
            LM-head weight (gradients flow to both); teacher_hidden ``[..., H_T]``, teacher_weight ``[V, H_T]``.
        labels ``[...]``: positions equal to ``ignore_index`` are skipped. reduction: ``mean`` or ``sum``.
            Other arguments as ``kd_loss``.
        chunk_rows: rows per chunk (default: about 64M logits per chunk); the extra memory is a few
            chunk-sized ``[chunk_rows, V]`` buffers instead of full ``[N, V]`` logits.

    Example::

        h_s = student(**batch, output_hidden_states=True).hidden_states[-1]
        h_t = teacher(**batch, output_hidden_states=True).hidden_states[-1]
        loss = fused_linear_kd_loss(h_s, student.lm_head.weight, h_t, teacher.lm_head.weight, labels)
    """
    for name, x in (("student_hidden", student_hidden), ("student_weight", student_weight),
                    ("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight)):
        if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point torch.Tensor")
    if student_weight.dim() != 2 or teacher_weight.dim() != 2:
        raise ValueError("student_weight and teacher_weight must be [V, H] LM-head weights")
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(f"vocabulary mismatch: student_weight has V={student_weight.shape[0]}, teacher_weight "
                         f"has V={teacher_weight.shape[0]}")
    if student_hidden.shape[-1] != student_weight.shape[1] or teacher_hidden.shape[-1] != teacher_weight.shape[1]:
        raise ValueError("hidden sizes do not match the weights: student "
                         f"{student_hidden.shape[-1]} vs {student_weight.shape[1]}, teacher "
                         f"{teacher_hidden.shape[-1]} vs {teacher_weight.shape[1]}")
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(f"student_hidden rows {tuple(student_hidden.shape[:-1])} != teacher_hidden rows "
                         f"{tuple(teacher_hidden.shape[:-1])}")
    check_loss_args(kind, alpha, beta)
    check_temperature(temperature, allow_zero=False)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum' (per-row losses: use kd_loss), got {reduction!r}")
    if chunk_rows is None:
        chunk_rows = max(1, CHUNK_ELEMENTS // student_weight.shape[0])
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive int, got {chunk_rows!r}")
    lead_shape = student_hidden.shape[:-1]
    if labels is not None:
        check_labels(labels, lead_shape, student_hidden.device)
        labels = labels.reshape(-1).to(torch.int64)
    loss_args = {"kind": canonical_kind(kind, beta), "alpha": alpha, "beta": beta,
                 "temperature": float(temperature), "ignore_index": ignore_index}
    out = FusedLinearKDFunction.apply(
        student_hidden.reshape(-1, student_hidden.shape[-1]), student_weight,
        teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]), teacher_weight.detach(), labels, loss_args,
        reduction, chunk_rows, resolve_backend(student_hidden, backend),
    )
    return out
