"""KD loss from hidden states and LM heads, chunked over rows: no full ``[N, V]`` logits of either model."""

from __future__ import annotations

import functools
import math

import torch

from . import reference
from .kd_loss import kd_loss_triton, row_weight
from .spec import (
    canonical_kind,
    check_int,
    check_labels,
    check_loss_args,
    check_reduction,
    check_temperature,
    resolve_backend,
)
from .stored_grad import scaled_copy

# Live [chunk_rows, V] buffers per chunk: the student logits (the kernels write their gradient over them) and
# the teacher logits.
LIVE_BUFFERS = 2
CPU_CHUNK_BYTES = 2**27  # CPU: 128 MiB of live chunk buffers
MAX_CHUNK_BYTES = 5 * 2**28  # CUDA: at most 1.25 GiB of live chunk buffers, and at most a quarter of the free memory
MAX_NARROW_ACC_CHUNKS = 4  # bf16 weight-gradient accumulator up to this many row chunks (see grad_acc_dtype)
ROW_ALIGN = 128  # chunk rows rounded to the tensor-core tile height when larger


def default_chunk_rows(n_rows: int, vocab: int, dtype: torch.dtype, device: torch.device) -> int:
    """Rows per chunk: the live chunk buffers fit the memory budget, and the chunks are about equal.

    Budget: ``min(MAX_CHUNK_BYTES, free / 4)`` on CUDA (free = the driver's free memory plus what the caching
    allocator holds unused; no host sync), ``CPU_CHUNK_BYTES`` elsewhere.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        budget = min(MAX_CHUNK_BYTES, free // 4)
    else:
        budget = CPU_CHUNK_BYTES
    fit = max(1, budget // (LIVE_BUFFERS * vocab * dtype.itemsize))
    rows = math.ceil(n_rows / math.ceil(max(n_rows, 1) / fit))  # equal chunks, none larger than `fit`
    return min(fit, math.ceil(rows / ROW_ALIGN) * ROW_ALIGN) if rows > ROW_ALIGN else max(rows, 1)


def grad_acc_dtype(dtype: torch.dtype, n_chunks: int) -> torch.dtype:
    """Dtype of the weight-gradient accumulator: bf16 itself for at most ``MAX_NARROW_ACC_CHUNKS`` chunks (each
    chunk's GEMM accumulates in float32 and rounds once into it: <= 4 roundings, about 2x one rounding's error, at
    half the memory traffic), else float32 (float64 for float64). fp16 stays float32: its range could
    under/overflow the running sum."""
    if dtype == torch.bfloat16 and n_chunks <= MAX_NARROW_ACC_CHUNKS:
        return dtype
    return torch.promote_types(dtype, torch.float32)


def fold_weight(dtype: torch.dtype) -> bool:
    """Whether the reduction's weight (1 / kept rows) is folded into the chunk's logit gradient in forward: not
    for fp16, whose stored gradient would underflow before a loss scaler's upstream factor reaches it."""
    return dtype != torch.float16


@functools.cache
def _cuda_out_dtype_mm(device: torch.device) -> bool:
    """Whether this torch's CUDA ``mm``/``addmm`` take ``out_dtype=float32`` with bf16 operands (a float32
    accumulator on the tensor cores)."""
    one, acc = torch.ones(1, 1, device=device, dtype=torch.bfloat16), torch.zeros(1, 1, device=device)
    try:
        torch.mm(one, one, out_dtype=torch.float32, out=acc)
        torch.addmm(acc, one, one, out_dtype=torch.float32, out=acc)
    except (RuntimeError, TypeError):
        return False
    return True


def _mm_into(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
    """``acc = a @ b`` (``first``) or ``acc += a @ b``. With a float32 ``acc`` and bf16/fp16 operands the product
    runs on the tensor cores with float32 accumulation (CUDA ``out_dtype``); elsewhere a product in the operands'
    dtype (itself accumulated in float32) is added into ``acc``. The operands are never upcast."""
    if acc.dtype == a.dtype:
        torch.mm(a, b, out=acc) if first else acc.addmm_(a, b)
    elif a.is_cuda and _cuda_out_dtype_mm(a.device):
        if first:
            torch.mm(a, b, out_dtype=acc.dtype, out=acc)
        else:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        product = torch.mm(a, b)
        acc.copy_(product) if first else acc.add_(product)


def _logits(hidden, weight, bias):
    return torch.mm(hidden, weight.T) if bias is None else torch.addmm(bias, hidden, weight.T)


def _rows_and_logit_grad(s_logits, t_logits, labels, backend, need_grad, weight, loss_args):
    """Per-row loss of one chunk and, if ``need_grad``, d(row loss)/d(student logits) times ``weight`` (None, a
    device scalar, or the chunk's ``[rows]``; the Triton kernel takes a scalar, rows are scaled after it)."""
    if backend == "triton":  # the gradient overwrites the chunk's student logits: no third [rows, V] buffer
        scalar = weight is not None and weight.dim() == 0
        rows, grad = kd_loss_triton(s_logits, t_logits, labels, need_grad=need_grad, grad_out=s_logits,
                                    weight=weight.float() if scalar else None, **loss_args)
        if grad is not None and weight is not None and not scalar:
            grad.mul_(weight[:, None])  # computed in float32, rounded once more
        return rows, grad
    if not need_grad:
        return reference.kd_loss(s_logits, t_logits, labels, reduction="none", **loss_args), None
    with torch.enable_grad():
        s = s_logits.detach().requires_grad_()
        rows = reference.kd_loss(s, t_logits, labels, reduction="none", **loss_args)
        (grad,) = torch.autograd.grad(rows.sum() if weight is None else (rows * weight).sum(), s)
    return rows.detach(), grad


def _chunked(student, teacher, labels, needs, row_scale, opts):
    """One pass over the row chunks: per-row losses and the gradients in ``needs`` (hidden, weight, bias).

    ``student``/``teacher``: ``(hidden [N, H], weight [V, H], bias [V] or None)``. ``row_scale`` (None, a device
    scalar or ``[N]``) weights each row's logit gradient. The weight gradient accumulates in
    :func:`grad_acc_dtype`, the bias gradient in float32 (float64 for float64 inputs); the hidden gradient is
    written chunk by chunk in the hidden dtype.
    """
    (s_hidden, s_weight, s_bias), (t_hidden, t_weight, t_bias) = student, teacher
    n_rows, (vocab, width) = s_hidden.shape[0], s_weight.shape
    chunk_rows = opts["chunk_rows"] or default_chunk_rows(n_rows, vocab, s_hidden.dtype, s_hidden.device)
    acc = torch.promote_types(s_weight.dtype, torch.float32)
    rows = torch.zeros(n_rows, device=s_hidden.device, dtype=torch.promote_types(s_hidden.dtype, torch.float32))
    new = torch.empty if n_rows else torch.zeros  # every chunk writes its rows; the first one sets the weight's
    grad_hidden = new(s_hidden.shape, device=s_hidden.device, dtype=s_hidden.dtype) if needs[0] else None
    grad_weight = new(vocab, width, device=s_weight.device,
                      dtype=grad_acc_dtype(s_weight.dtype, math.ceil(n_rows / chunk_rows))) if needs[1] else None
    grad_bias = torch.zeros(vocab, device=s_weight.device, dtype=acc) if needs[2] else None
    for start in range(0, n_rows, chunk_rows):
        chunk, first = slice(start, min(start + chunk_rows, n_rows)), start == 0
        s_logits = _logits(s_hidden[chunk], s_weight, s_bias)
        t_logits = _logits(t_hidden[chunk], t_weight, t_bias)
        weight = row_scale if row_scale is None or row_scale.dim() == 0 else row_scale[chunk]
        rows[chunk], grad = _rows_and_logit_grad(s_logits, t_logits, None if labels is None else labels[chunk],
                                                 opts["backend"], any(needs), weight, opts["loss_args"])
        del s_logits, t_logits
        if grad is None:
            continue
        if grad_hidden is not None:
            torch.mm(grad, s_weight, out=grad_hidden[chunk])
        if grad_weight is not None:
            _mm_into(grad_weight, grad.T, s_hidden[chunk], first)
        if grad_bias is not None:
            grad_bias.add_(grad.sum(0, dtype=acc))
    return rows, grad_hidden, grad_weight, grad_bias


class FusedLinearKDFunction(torch.autograd.Function):
    """KD loss of ``p_S = softmax((h_S W_S^T + b_S) / T)`` against ``p_T = softmax((h_T W_T^T + b_T) / T)``.

    Per chunk of rows: both logits from bf16/fp16 matmuls, the fused kernel's row loss ``L_n`` and
    ``G = dL_n/ds``, then ``dL/dh_S = G W_S``, ``dL/dW_S += G^T h_S`` (accumulated in :func:`grad_acc_dtype`)
    and ``dL/db_S += sum_n G`` (float32). ``mean``/``sum``: the gradients, with the reduction's weight folded into
    ``G`` (:func:`fold_weight`), are computed in forward; backward writes new copies scaled by the upstream
    gradient (so ``retain_graph`` works). ``none``: forward computes the losses only and backward recomputes the
    chunks with ``G`` scaled by each row's upstream gradient (the weight gradient depends on it).
    """

    @staticmethod
    def forward(ctx, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, labels, opts):
        student, teacher = (s_hidden, s_weight, s_bias), (t_hidden, t_weight, t_bias)
        ctx.opts, ctx.dtypes = opts, (s_hidden.dtype, s_weight.dtype, None if s_bias is None else s_bias.dtype)
        if opts["reduction"] == "none":
            ctx.save_for_backward(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, labels)
            return _chunked(student, teacher, labels, (False,) * 3, None, opts)[0]
        needs = tuple(opts["grad_enabled"] and need for need in ctx.needs_input_grad[:3])  # none under no_grad
        weights, wide = opts["row_weights"], torch.promote_types(s_hidden.dtype, torch.float32)
        scale = row_weight(s_hidden.shape[0], labels, opts["ignore_index"], opts["reduction"], s_hidden.device, wide)
        row_scale, ctx.scale = weights, scale  # ctx.scale: what backward still multiplies by
        if fold_weight(s_hidden.dtype):
            row_scale, ctx.scale = (scale if weights is None else weights * scale), None
        rows, *ctx.grads = _chunked(student, teacher, labels, needs, row_scale, opts)
        if weights is not None:
            rows = rows * weights
        return rows.sum() * scale

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.opts["reduction"] == "none":
            s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, labels = ctx.saved_tensors
            needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2])
            _, *grads = _chunked((s_hidden, s_weight, s_bias), (t_hidden, t_weight, t_bias), labels, needs,
                                 grad_output.contiguous(), ctx.opts)
            grads = [None if g is None else g.to(dtype) for g, dtype in zip(grads, ctx.dtypes, strict=True)]
        else:
            factor = grad_output if ctx.scale is None else grad_output * ctx.scale
            grads = [None if g is None else scaled_copy(g, factor, dtype, ctx.opts["backend"]) for g, dtype in
                     zip(ctx.grads, ctx.dtypes, strict=True)]
        return grads[0], grads[1], grads[2], None, None, None, None, None


def _check_head(role, hidden, weight, bias):
    for name, x in ((f"{role}_hidden", hidden), (f"{role}_weight", weight), (f"{role}_bias", bias)):
        if x is not None and (not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point):
            raise TypeError(f"{name} must be a floating-point torch.Tensor")
    if weight.dim() != 2:
        raise ValueError(f"{role}_weight must be a [V, H] LM-head weight, got shape {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden sizes do not match the weights: {role}_hidden {tuple(hidden.shape)} vs "
                         f"{role}_weight {tuple(weight.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"{role}_bias must have shape [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    for name, x in ((f"{role}_weight", weight), (f"{role}_bias", bias)):
        if x is not None and x.dtype != hidden.dtype:
            raise TypeError(f"{name} dtype {x.dtype} != {role}_hidden dtype {hidden.dtype}")
        if x is not None and x.device != hidden.device:
            raise ValueError(f"{name} is on {x.device} but {role}_hidden is on {hidden.device}")


def _check_inputs(student, teacher, labels):
    _check_head("student", *student)
    _check_head("teacher", *teacher)
    (s_hidden, s_weight, _), (t_hidden, t_weight, _) = student, teacher
    if s_weight.shape[0] != t_weight.shape[0]:
        raise ValueError(f"vocabulary mismatch: student_weight has V={s_weight.shape[0]}, teacher_weight "
                         f"has V={t_weight.shape[0]}")
    if s_hidden.shape[:-1] != t_hidden.shape[:-1]:
        raise ValueError(f"student_hidden rows {tuple(s_hidden.shape[:-1])} != teacher_hidden rows "
                         f"{tuple(t_hidden.shape[:-1])}")
    if s_hidden.device != t_hidden.device:
        raise ValueError(f"teacher_hidden is on {t_hidden.device} but student_hidden is on {s_hidden.device}")
    if labels is not None:
        check_labels(labels, s_hidden.shape[:-1], s_hidden.device)


def fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None, *, kind="srkl",
                         alpha=0.1, beta=0.5, temperature=1.0, ignore_index=-100, reduction="mean",
                         student_bias=None, teacher_bias=None, row_weights=None, chunk_rows=None, backend="auto"):
    """:func:`switchkd.kd_loss` of ``student_hidden @ student_weight.T + student_bias`` against the teacher's,
    without materialising either model's ``[N, V]`` logits: rows are processed a chunk at a time, the matmuls in
    the inputs' dtype (bf16/fp16 tensor cores) with float32 accumulation (the bf16 weight gradient of at most
    ``MAX_NARROW_ACC_CHUNKS`` chunks accumulates in bf16, each chunk's GEMM rounding once: :func:`grad_acc_dtype`).

    Args:
        student_hidden ``[..., H_S]``, student_weight ``[V, H_S]``, student_bias ``[V]`` or None: the student's
            last hidden states and LM head (gradients flow to all three); teacher_hidden ``[..., H_T]``,
            teacher_weight ``[V, H_T]``, teacher_bias ``[V]`` or None (no gradient). Each head's tensors share
            the hidden states' dtype.
        labels ``[...]``: positions equal to ``ignore_index`` are skipped (loss 0, no gradient).
        reduction: ``mean`` over kept positions, ``sum``, or ``none`` (float32 per-position losses, shape
            ``[...]``; backward then recomputes the chunks). Other arguments as ``kd_loss``.
        row_weights ``[...]`` or None: with ``sum``/``mean``, each position's loss is weighted first (e.g.
            ``1 / (response tokens * sequences)`` for a per-sequence mean in one call).
        chunk_rows: rows per chunk; default from V and the free memory (:func:`default_chunk_rows`).

    Example::

        h_s = student(**batch, output_hidden_states=True).hidden_states[-1]
        h_t = teacher(**batch, output_hidden_states=True).hidden_states[-1]
        loss = fused_linear_kd_loss(h_s, student.lm_head.weight, h_t, teacher.lm_head.weight, labels)
    """
    student = (student_hidden, student_weight, student_bias)
    teacher = (teacher_hidden, teacher_weight, teacher_bias)
    _check_inputs(student, teacher, labels)
    check_loss_args(kind, alpha, beta)
    check_temperature(temperature, allow_zero=False)
    check_reduction(reduction)
    check_int("ignore_index", ignore_index)
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be a positive int or None, got {chunk_rows!r}")
    lead_shape = student_hidden.shape[:-1]
    if row_weights is not None:
        if reduction == "none":
            raise ValueError("row_weights needs reduction 'sum' or 'mean' (with 'none', weight the returned rows)")
        if not isinstance(row_weights, torch.Tensor) or row_weights.shape != lead_shape:
            raise ValueError(f"row_weights must be a tensor of shape {tuple(lead_shape)}")
        wide = torch.promote_types(student_hidden.dtype, torch.float32)
        row_weights = row_weights.detach().reshape(-1).to(device=student_hidden.device, dtype=wide)
    labels = None if labels is None else labels.reshape(-1).to(torch.int64)
    opts = {"reduction": reduction, "chunk_rows": chunk_rows, "ignore_index": ignore_index, "row_weights": row_weights,
            "grad_enabled": torch.is_grad_enabled(),
            "backend": resolve_backend(student_hidden, backend),
            "loss_args": {"kind": canonical_kind(kind, beta), "alpha": alpha, "beta": beta,
                          "temperature": float(temperature), "ignore_index": ignore_index}}
    detach = [None if x is None else x.detach() for x in teacher]
    out = FusedLinearKDFunction.apply(student_hidden.reshape(-1, student_hidden.shape[-1]), student_weight,
                                      student_bias, detach[0].reshape(-1, detach[0].shape[-1]), detach[1], detach[2],
                                      labels, opts)
    return out.reshape(lead_shape) if reduction == "none" else out
