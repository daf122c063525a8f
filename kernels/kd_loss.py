"""Fused token-level distillation loss: forward and gradient, per row or over vocabulary splits.

Many rows (training, ``N >= 2 x SMs``): ``_kd_loss_kernel``, three sweeps of each row (statistics; loss and
centring sum, run backwards so that it starts on what is still in L2; gradient), one program per row or a
persistent grid whose groups of ``PARTS`` programs share a row and meet on a barrier between sweeps (fewer rows
in flight than L2 holds, so a row is read from memory about once). Few rows: ``_stats_kernel`` →
``_kd_loss_split_kernel`` → ``_grad_kernel`` over a ``(rows, splits)`` grid (``switchkd.kernels.split``).
fkl needs no centring sum and skips the third sweep.
"""

import triton
import triton.language as tl

from .divergence import FKL, INTERPRETED, _grad_sweep, _loss_sweep, _nan_unless, _zero_sweep
from .split import NO_SAMPLE, STATS, SUMS, _combine_stats, _row_stats, _sum_splits, autotuned, row_kernel_configs


@autotuned(key=["V", "KIND"], writes_grad=True, gpu_configs=row_kernel_configs)
@triton.jit
def _kd_loss_kernel(
    s_ptr,  # [N, V] student logits
    t_ptr,  # [N, V] teacher logits
    labels_ptr,  # [N] int64 labels (read only when HAS_LABELS)
    weight_ptr,  # [] float32 gradient scale, e.g. 1 / kept rows (read only when HAS_WEIGHT)
    loss_ptr,  # [N] float32 output: per-row loss (0 on ignored rows, NaN on non-finite rows)
    grad_ptr,  # [N, V] output: weight * d loss_row / d student logits (written only when HAS_GRAD)
    sync_ptr,  # [programs / PARTS] int32 barrier counters of the program groups: zero before and after (PARTS > 1)
    part_stats_ptr,  # [programs, 4] float32 each program's statistics of its part, for its group (PARTS > 1)
    part_sums_ptr,  # [programs, 4] float32 each program's (loss, sum(p_S g), -, -) of its part (PARTS > 1)
    n_rows, s_stride, t_stride, grad_stride, V, chunk, scale2, inv_temp, alpha, beta, ignore_index,
    KIND: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_GRAD: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    ROWS_PER_SM: tl.constexpr, PARTS: tl.constexpr, BLOCK: tl.constexpr,
):
    """Rows ``group, group + groups, ...`` of a persistent grid (``ROWS_PER_SM`` programs per multiprocessor; 0 = one
    program per row). With ``PARTS > 1`` the ``PARTS`` adjacent programs of a group share each row, a column part
    each, and meet twice per row on a barrier: fewer rows in flight, so each row's later sweeps read from L2."""
    group = tl.program_id(0) // PARTS
    part = tl.program_id(0) % PARTS
    n_groups = tl.num_programs(0) // PARTS
    # Columns of this program's part(s): the GPU runs one part per program; the interpreter, which runs programs
    # one after another (a barrier would wait forever), lets each group's first program run all its parts.
    if INTERPRETED:
        first, last, rows_end = 0, PARTS, tl.where(part == 0, n_rows, 0)
    else:
        first, last, rows_end = part, part + 1, n_rows
    width = tl.cdiv(tl.cdiv(V, PARTS), BLOCK) * BLOCK
    meetings = 0
    for row in range(group, rows_end, n_groups):
        keep = True
        if HAS_LABELS:
            keep = tl.load(labels_ptr + row) != ignore_index
        _kd_loss_row(tl.cast(row, tl.int64), keep, s_ptr, t_ptr, weight_ptr, loss_ptr, grad_ptr, sync_ptr,
                     part_stats_ptr + group * PARTS * STATS, part_sums_ptr + group * PARTS * SUMS, group, first, last,
                     width, meetings, s_stride, t_stride, grad_stride, V, scale2, inv_temp, alpha, beta, KIND,
                     HAS_GRAD, HAS_WEIGHT, PARTS, BLOCK)
        if keep:  # every program of the group sees the same labels: all meet on a kept row, none on an ignored one
            meetings += 2
    if PARTS > 1 and not INTERPRETED:  # the group's last program out puts its counter back to zero for the next launch
        if tl.atomic_add(sync_ptr + group, 1, sem="acq_rel") == PARTS * (meetings + 1) - 1:
            tl.atomic_xchg(sync_ptr + group, 0, sem="relaxed")


@triton.jit
def _meet(sync_ptr, group, meetings, PARTS: tl.constexpr):
    """Barrier of a program group: returns once all ``PARTS`` programs have arrived at meeting ``meetings + 1``.
    Every thread's stores come before the release; the exchange slots are then read with volatile loads."""
    if PARTS > 1 and not INTERPRETED:
        tl.debug_barrier()
        tl.atomic_add(sync_ptr + group, 1, sem="release")
        while tl.atomic_add(sync_ptr + group, 0, sem="acquire") < PARTS * (meetings + 1):
            pass
        tl.debug_barrier()


@triton.jit
def _kd_loss_row(row, keep, s_ptr, t_ptr, weight_ptr, loss_ptr, grad_ptr, sync_ptr, part_stats, part_sums, group,
                 first, last, width, meetings, s_stride, t_stride, grad_stride, V, scale2, inv_temp, alpha, beta,
                 KIND: tl.constexpr, HAS_GRAD: tl.constexpr, HAS_WEIGHT: tl.constexpr, PARTS: tl.constexpr,
                 BLOCK: tl.constexpr):
    """One row over the column parts ``[first, last)``: statistics of both models, the loss sweep (backwards,
    starting on what is still in L2), and the gradient sweep for every kind but fkl. With ``PARTS > 1`` the
    group's parts combine their statistics (first meeting) and their loss and centring sums (second) through
    ``part_stats`` and ``part_sums`` (``[PARTS, 4]`` each, the split kernels' layout); ignored rows (``keep``
    False) get a zero loss and gradient."""
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride
    grad_row = grad_ptr + row * grad_stride
    if keep:
        if PARTS == 1:
            m_s, z_s, _, _, m_t, z_t, _, _ = _row_stats(s_row, t_row, 0, V, scale2, NO_SAMPLE, NO_SAMPLE, True, BLOCK)
            lz_s = tl.log2(z_s)
            lz_t = tl.log2(z_t)
            valid = (z_s > 0) & (z_t > 0)  # NaN/+inf logits make a softmax sum NaN, an all -inf row makes it 0
        else:
            for p in range(first, last):
                lo = p * width
                hi = tl.minimum(lo + width, V)
                m_s, z_s, _, _, m_t, z_t, _, _ = _row_stats(s_row, t_row, lo, hi, scale2, NO_SAMPLE, NO_SAMPLE, True,
                                                            BLOCK, False)
                tl.store(part_stats + p * STATS, m_s)
                tl.store(part_stats + p * STATS + 1, z_s)
                tl.store(part_stats + p * STATS + 2, m_t)
                tl.store(part_stats + p * STATS + 3, z_t)
            _meet(sync_ptr, group, meetings, PARTS)
            m_s, lz_s, m_t, lz_t, valid = _combine_stats(part_stats, 0, PARTS, PARTS, True)
        grad_scale = _nan_unless(valid, inv_temp * tl.load(weight_ptr) if HAS_WEIGHT else inv_temp)
        if PARTS == 1:
            loss, g_mean = _loss_sweep(s_row, t_row, grad_row, 0, V, scale2, grad_scale, m_s, lz_s, m_t, lz_t, alpha,
                                       beta, KIND, HAS_GRAD, True, BLOCK)
        else:
            for p in range(first, last):
                lo = p * width
                part_loss, part_g = _loss_sweep(s_row, t_row, grad_row, lo, tl.minimum(lo + width, V), scale2,
                                                grad_scale, m_s, lz_s, m_t, lz_t, alpha, beta, KIND, HAS_GRAD, True,
                                                BLOCK, False)
                tl.store(part_sums + p * SUMS, part_loss)
                tl.store(part_sums + p * SUMS + 1, part_g)
            _meet(sync_ptr, group, meetings + 1, PARTS)
            loss = _sum_splits(part_sums, 0, PARTS, 0, PARTS, True)
            g_mean = _sum_splits(part_sums, 0, PARTS, 1, PARTS, True)
        if first == 0:
            tl.store(loss_ptr + row, _nan_unless(valid, loss))
        if HAS_GRAD and KIND != FKL:
            for p in range(first, last):
                lo = p * width
                _grad_sweep(s_row, t_row, grad_row, lo, tl.minimum(lo + width, V), scale2, grad_scale, m_s, lz_s, m_t,
                            lz_t, g_mean, alpha, beta, KIND, BLOCK, PARTS == 1)
    else:
        if first == 0:
            tl.store(loss_ptr + row, 0.0)
        if HAS_GRAD:
            for p in range(first, last):
                lo = p * width
                _zero_sweep(grad_row, lo, tl.minimum(lo + width, V), BLOCK)


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
    """Phase 2 over one chunk: loss terms and centring sum with the row's combined statistics."""
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
        loss, g_sum = _loss_sweep(s_ptr + row * s_stride, t_ptr + row * t_stride, grad_row, lo, hi,
                                  scale2, grad_scale, m_s, lz_s, m_t, lz_t, alpha, beta, KIND, HAS_GRAD,
                                  False, BLOCK)
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
