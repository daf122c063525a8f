"""Fused SWITCH decoding step over vocabulary splits: divergence, decision, both samples and the KD loss.

Launches over a ``(B, S)`` grid (``switchkd.kernels.split``):

1. ``_stats_kernel``: per chunk, both models' softmax statistics (and, greedy, their argmax candidates).
2. ``_switch_step_kernel``: combine the row's statistics, then one sweep of the chunk for the JSD, the loss,
   the fkl gradient or the centring sum, and the teacher rank of the student token (topk). Sampling is by
   inverse CDF: each model's uniform falls in one chunk (known from the statistics), and only that chunk's
   program sums its tiles' probabilities until the running sum passes the uniform (``kernels.sampling``).
3. ``_switch_step_finish_kernel`` (grid ``B``): sum the partials, take the decision, write the outputs.
4. ``_grad_kernel``, only with a gradient of a kind other than fkl.
"""

import triton
import triton.language as tl

from .divergence import (
    FKL,
    JSD_CONSTANT,
    LANE_GROUP,
    LN2,
    NEG_BIG,
    _fold,
    _jsd_sum,
    _loss_trip,
    _nan_unless,
    _prefetch,
)
from .sampling import NO_TOKEN, _cdf_tile, _row_uniform, _scan_result
from .split import STATS, SUMS, _combine_stats, _sum_splits, autotuned


@triton.jit
def _combine_candidates(
    cand_ptr,  # [B, S, 2] float32 per-split best logit
    cand_col_ptr,  # [B, S, 2] int32 its column
    row, n_splits, model, SPLITS: tl.constexpr,
):
    """The row's greedy token of ``model`` (0 student, 1 teacher): the best split candidate; ties go to the lowest
    column."""
    k = tl.arange(0, SPLITS)
    mask = k < n_splits
    idx = row * n_splits + k
    best = tl.load(cand_ptr + idx * 2 + model, mask=mask, other=-float("inf"))
    _, arg = tl.max(best, 0, return_indices=True, return_indices_tie_break_left=True)
    return tl.sum(tl.where(k == arg, tl.load(cand_col_ptr + idx * 2 + model, mask=mask, other=0), 0), 0)


@triton.jit
def _cdf_split(stats_ptr, row, n_splits, model, u, m_all, lz, SPLITS: tl.constexpr):
    """Where ``model``'s inverse-CDF token lies: the first split whose cumulative probability passes ``u`` (the last
    split with probability when rounding leaves the total at or below ``u``; split 0 when none has any), and the
    probability of the splits before it. Every program of the row computes the same."""
    k = tl.arange(0, SPLITS)
    mask = k < n_splits
    idx = row * n_splits + k
    m = tl.load(stats_ptr + idx * STATS + 2 * model, mask=mask, other=NEG_BIG)
    z = tl.load(stats_ptr + idx * STATS + 2 * model + 1, mask=mask, other=0.0)
    mass = z * tl.exp2((m - m_all) - lz)
    split = tl.sum(((tl.cumsum(mass, 0) <= u) & mask).to(tl.int32), 0)
    split = tl.minimum(split, tl.max(tl.where(mass > 0, k, 0), 0))
    return split, tl.sum(tl.where(k < split, mass, 0.0), 0)


@autotuned(key=["V", "chunk", "KIND"])
@triton.jit
def _switch_step_kernel(
    s_ptr,  # [B, V] student logits
    t_ptr,  # [B, V] teacher logits
    positions_ptr,  # [B] int64 generated-token index (read unless POS_SCALAR)
    row_keys_ptr,  # [B] int64 stable sequence ids (read unless KEYS_ARANGE)
    stats_ptr,  # [B, S, 4] float32 per-split softmax statistics
    cand_ptr,  # [B, S, 2] float32 per-split argmax candidates (GREEDY)
    cand_col_ptr,  # [B, S, 2] int32 their columns
    sums_ptr,  # [B, S, 4] float32 output: per-split (loss, sum(p_S g), jsd, teacher rank)
    s_tokens_ptr,  # [B] int64 student sample: written by the program whose chunk holds it, or given (STUDENT_GIVEN)
    t_tokens_ptr,  # [B] int64 output: teacher sample (written by the program whose chunk holds it)
    grad_ptr,  # [B, V] output: fkl gradient (written only when HAS_GRAD and KIND == FKL)
    s_stride, t_stride, grad_stride, V, chunk, position, seed_key, scale2, inv_temp, alpha, beta,
    TOPK: tl.constexpr, KIND: tl.constexpr, GREEDY: tl.constexpr, HAS_GRAD: tl.constexpr, STUDENT_GIVEN: tl.constexpr,
    POS_SCALAR: tl.constexpr, KEYS_ARANGE: tl.constexpr, SPLITS: tl.constexpr, BLOCK: tl.constexpr,
):
    """Phase 2. TOPK ranks the student token before the sweep, so it needs the token given (or GREEDY)."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, V)
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride
    grad_row = grad_ptr + row * grad_stride
    m_s, lz_s, m_t, lz_t, valid = _combine_stats(stats_ptr, row, n_splits, SPLITS)
    if STUDENT_GIVEN:
        tok_s = tl.load(s_tokens_ptr + row)
    if GREEDY:
        if not STUDENT_GIVEN:
            tok_s = _combine_candidates(cand_ptr, cand_col_ptr, row, n_splits, 0, SPLITS)
        if split == 0:
            if not STUDENT_GIVEN:
                tl.store(s_tokens_ptr + row, tok_s.to(tl.int64))
            tok_t = _combine_candidates(cand_ptr, cand_col_ptr, row, n_splits, 1, SPLITS)
            tl.store(t_tokens_ptr + row, tok_t.to(tl.int64))
    else:  # inverse CDF: each model's scan runs in the one program whose chunk holds its uniform
        pos = position if POS_SCALAR else tl.load(positions_ptr + row)
        row_key = row if KEYS_ARANGE else tl.load(row_keys_ptr + row)
        u_s = _row_uniform(seed_key, row_key, pos, 0)
        u_t = _row_uniform(seed_key, row_key, pos, 1)
        split_s, run_s = _cdf_split(stats_ptr, row, n_splits, 0, u_s, m_s, lz_s, SPLITS)
        split_t, run_t = _cdf_split(stats_ptr, row, n_splits, 1, u_t, m_t, lz_t, SPLITS)
        scan_s = (split == split_s) & (not STUDENT_GIVEN)
        scan_t = split == split_t
        found_s = tl.full([], NO_TOKEN, tl.int32)
        found_t = tl.full([], NO_TOKEN, tl.int32)
        last_s = tl.full([], NO_TOKEN, tl.int32)
        last_t = tl.full([], NO_TOKEN, tl.int32)
    if TOPK:
        t_at_student = tl.load(t_row + tok_s, mask=(tok_s >= 0) & (tok_s < V), other=-float("inf")).to(tl.float32)

    grad_scale = _nan_unless(valid, inv_temp)
    jsd_acc = tl.zeros([BLOCK], dtype=tl.float32)  # per column: each product fuses into its add
    loss_acc = tl.zeros([BLOCK], dtype=tl.float32)
    g_acc = tl.zeros([BLOCK // LANE_GROUP], dtype=tl.float32)
    rank_acc = tl.zeros([BLOCK // LANE_GROUP], dtype=tl.int32)
    n_tiles = tl.cdiv(hi - lo, BLOCK)
    s_tile, t_tile = _prefetch(s_row, t_row, 0, lo, hi, n_tiles, False, BLOCK, KIND == FKL)
    for i in range(0, n_tiles):
        t = t_tile.to(tl.float32)  # this trip's raw teacher logits, which topk ranks
        loss_acc, g_acc, s_tile, t_tile, cols, l2s, ps, l2t, pt = _loss_trip(
            s_row, t_row, grad_row, i, s_tile, t_tile, lo, hi, n_tiles, scale2, grad_scale, m_s, lz_s, m_t, lz_t, alpha,
            beta, loss_acc, g_acc, KIND, HAS_GRAD, False, BLOCK)
        jsd_acc = _jsd_sum(jsd_acc, l2s, ps, l2t, pt)
        if TOPK:  # on the raw logits, as the reference ranks them
            rank_acc += _fold((t > t_at_student).to(tl.int32), BLOCK)
        if not GREEDY:
            if scan_s & (found_s == NO_TOKEN):
                run_s, found_s, last_s = _cdf_tile(ps, cols, run_s, u_s, found_s, last_s)
            if scan_t & (found_t == NO_TOKEN):
                run_t, found_t, last_t = _cdf_tile(pt, cols, run_t, u_t, found_t, last_t)
    if not GREEDY:
        if scan_s:
            tl.store(s_tokens_ptr + row, _scan_result(found_s, last_s).to(tl.int64))
        if scan_t:
            tl.store(t_tokens_ptr + row, _scan_result(found_t, last_t).to(tl.int64))
    out = sums_ptr + (row * n_splits + split) * SUMS
    # NaN/+inf logits make a softmax sum NaN, an all -inf row makes it 0: such rows report NaN.
    tl.store(out, _nan_unless(valid, tl.sum(loss_acc, 0) * LN2))  # nats; the sweeps sum bits
    tl.store(out + 1, tl.sum(g_acc, 0))
    tl.store(out + 2, _nan_unless(valid, tl.sum(jsd_acc, 0) * (0.5 * LN2)))  # less JSD_CONSTANT: the finish adds it
    tl.store(out + 3, tl.sum(rank_acc, 0).to(tl.float32))


@triton.jit
def _switch_step_finish_kernel(
    positions_ptr,  # [B] int64 generated-token index (read unless POS_SCALAR)
    sums_ptr,  # [B, S, 4] float32 per-split partial sums
    s_tokens_ptr,  # [B] int64 student sample
    t_tokens_ptr,  # [B] int64 teacher sample
    tokens_ptr,  # [B] int64 output: kept token
    from_teacher_ptr,  # [B] uint8 output: 1 where the teacher's token is kept
    divergence_ptr,  # [B] float32 output: JSD(p_T, p_S), nats
    loss_ptr,  # [B] float32 output: per-row loss of kind KIND
    n_splits, position, thr_scale, thr_rate, thr_slope, thr_floor, top_k,
    TOPK: tl.constexpr, POS_SCALAR: tl.constexpr, SPLITS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    divergence = _sum_splits(sums_ptr, row, n_splits, 2, SPLITS) + JSD_CONSTANT * LN2
    if TOPK:
        switch = _sum_splits(sums_ptr, row, n_splits, 3, SPLITS) >= top_k
    else:  # the spec's threshold rule, from its coefficients; NaN rows never switch
        step = (position + 0.0) if POS_SCALAR else tl.load(positions_ptr + row).to(tl.float32)
        switch = divergence > tl.maximum(thr_scale * tl.exp(-thr_rate * step) - thr_slope * step, thr_floor)
    tok_s = tl.load(s_tokens_ptr + row)
    tok_t = tl.load(t_tokens_ptr + row)
    tl.store(tokens_ptr + row, tl.where(switch, tok_t, tok_s))
    tl.store(from_teacher_ptr + row, switch.to(tl.uint8))
    tl.store(divergence_ptr + row, divergence)
    tl.store(loss_ptr + row, _sum_splits(sums_ptr, row, n_splits, 0, SPLITS))
