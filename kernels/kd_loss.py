"""Fused token-level distillation loss: forward and gradient, per row or over vocabulary splits.

Many rows (training, ``N >= 2 x SMs``): ``_kd_loss_kernel``, one program per row and three sweeps of it
(statistics; loss and centring sum, run backwards so that it starts on what is still in L2; gradient). Few rows:
``_stats_kernel`` → ``_kd_loss_split_kernel`` → ``_grad_kernel`` over a ``(rows, splits)`` grid
(``switchkd.kernels.split``). fkl needs no centring sum and skips the third sweep.
"""

import triton
import triton.language as tl

from .divergence import FKL, _grad_sweep, _loss_sweep, _nan_unless, _zero_sweep
from .split import NO_SAMPLE, SUMS, _combine_stats, _row_stats, autotuned, row_kernel_configs


@autotuned(key=["V", "KIND"], writes_grad=True, gpu_configs=row_kernel_configs)
@triton.jit
def _kd_loss_kernel(
    s_ptr,  # [N, V] student logits
    t_ptr,  # [N, V] teacher logits
    labels_ptr,  # [N] int64 labels (read only when HAS_LABELS)
    weight_ptr,  # [] float32 gradient scale, e.g. 1 / kept rows (read only when HAS_WEIGHT)
    loss_ptr,  # [N] float32 output: per-row loss (0 on ignored rows, NaN on non-finite rows)
    grad_ptr,  # [N, V] output: weight * d loss_row / d student logits (written only when HAS_GRAD)
    s_stride, t_stride, grad_stride, V,
    chunk,  # the row's width, for the autotuner's tile pruning only (the split kernels' argument list)
    scale2, inv_temp, alpha, beta, ignore_index,
    KIND: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_GRAD: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One row: statistics of both models, the loss sweep (backwards, starting on what is still in L2), and the
    gradient sweep for every kind but fkl; ignored rows get a zero loss and gradient."""
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride
    grad_row = grad_ptr + row * grad_stride
    keep = True
    if HAS_LABELS:
        keep = tl.load(labels_ptr + row) != ignore_index
    if keep:
        m_s, z_s, _, _, m_t, z_t, _, _ = _row_stats(s_row, t_row, 0, V, scale2, NO_SAMPLE, NO_SAMPLE, True, BLOCK)
        lz_s = tl.log2(z_s)
        lz_t = tl.log2(z_t)
        valid = (z_s > 0) & (z_t > 0)  # NaN/+inf logits make a softmax sum NaN, an all -inf row makes it 0
        grad_scale = _nan_unless(valid, inv_temp * tl.load(weight_ptr) if HAS_WEIGHT else inv_temp)
        loss, g_mean = _loss_sweep(s_row, t_row, grad_row, 0, V, scale2, grad_scale, m_s, lz_s, m_t, lz_t, alpha,
                                   beta, KIND, HAS_GRAD, True, BLOCK)
        tl.store(loss_ptr + row, _nan_unless(valid, loss))
        if HAS_GRAD and KIND != FKL:
            _grad_sweep(s_row, t_row, grad_row, 0, V, scale2, grad_scale, m_s, lz_s, m_t, lz_t, g_mean, alpha, beta,
                        KIND, BLOCK)
    else:
        tl.store(loss_ptr + row, 0.0)
        if HAS_GRAD:
            _zero_sweep(grad_row, 0, V, BLOCK)


@autotuned(key=["V", "chunk", "KIND"], writes_grad=True)
@triton.jit
def _kd_loss_split_kernel(
    s_ptr,  # [N, V] student logits
    t_ptr,  # [N, V] teacher logits
    labels_ptr,  # [N] int64 labels (read only when HAS_LABELS)
    weight_ptr,  # [] float32 gradient scale (read only when HAS_WEIGHT)
    stats_ptr,  # [N, S, 4] float32 per-split softmax statistics (from _stats_kernel)
    sums_ptr,  # [N, S, 4] float32 output: per-split (loss, sum(p_S g), -, -)
    grad_ptr,  # [N, V] output: fkl gradient, or zeros on ignored rows (written only when HAS_GRAD)
    s_stride, t_stride, grad_stride, V, chunk, scale2, inv_temp, alpha, beta, ignore_index,
    KIND: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_GRAD: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    SPLITS: tl.constexpr, BLOCK: tl.constexpr,
):
    """Phase 2 over one chunk, backwards: loss terms and centring sum with the row's combined statistics."""
    row = tl.program_id(0).to(tl.int64)
    n_splits = tl.num_programs(1)
    lo = tl.program_id(1) * chunk
    hi = tl.minimum(lo + chunk, V)
    grad_row = grad_ptr + row * grad_stride
    out = sums_ptr + (row * n_splits + tl.program_id(1)) * SUMS
    keep = True
    if HAS_LABELS:
        keep = tl.load(labels_ptr + row) != ignore_index
    if keep:
        m_s, lz_s, m_t, lz_t, valid = _combine_stats(stats_ptr, row, n_splits, SPLITS)
        grad_scale = _nan_unless(valid, inv_temp * tl.load(weight_ptr) if HAS_WEIGHT else inv_temp)
        # backwards: the statistics sweep ended on the chunk's last tiles, which L2 still holds (and the gradient
        # sweep, forwards, then starts on this one's last)
        loss, g_sum = _loss_sweep(s_ptr + row * s_stride, t_ptr + row * t_stride, grad_row, lo, hi,
                                  scale2, grad_scale, m_s, lz_s, m_t, lz_t, alpha, beta, KIND, HAS_GRAD,
                                  True, BLOCK)
        tl.store(out, _nan_unless(valid, loss))
        tl.store(out + 1, g_sum)
    else:
        tl.store(out, 0.0)
        tl.store(out + 1, 0.0)
        if HAS_GRAD and KIND == FKL:
            _zero_sweep(grad_row, lo, hi, BLOCK)


@triton.jit
def _scale_grad_kernel(
    grad_ptr,  # [N, V] stored gradient, scaled in place
    up_ptr,  # [N] upstream gradient of each row (stride 0 for a scalar)
    grad_stride, up_stride, V, BLOCK: tl.constexpr,
):
    """``grad[n] *= up[n]``; rows whose factor is exactly 1 are left alone (no memory traffic, no host sync)."""
    row = tl.program_id(0).to(tl.int64)
    factor = tl.load(up_ptr + row * up_stride).to(tl.float32)
    if factor != 1.0:
        grad_row = grad_ptr + row * grad_stride
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            g = tl.load(grad_row + cols, mask=cols < V).to(tl.float32)
            tl.store(grad_row + cols, (g * factor).to(grad_ptr.dtype.element_ty), mask=cols < V)


@triton.jit
def _scaled_copy_kernel(src_ptr, dst_ptr, factor_ptr, n, BLOCK: tl.constexpr):
    """``dst = src * factor`` over ``n`` contiguous elements, computed in float32, rounded once to dst's dtype."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    factor = tl.load(factor_ptr).to(tl.float32)
    x = tl.load(src_ptr + offs, mask=offs < n).to(tl.float32)
    tl.store(dst_ptr + offs, (x * factor).to(dst_ptr.dtype.element_ty), mask=offs < n)
