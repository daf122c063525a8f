"""Fused SWITCH decoding step over vocabulary splits: divergence, decision, both samples and the KD loss.

A ``[B, V]`` pair is cut into ``S`` column chunks (``switchkd.kernels.split``); each chunk goes through

1. phase 1 (``split._stats_chunk``): both models' softmax statistics (and, greedy, their argmax candidates);
2. phase 2 (:func:`_step_chunk`): combine the row's statistics, then one sweep of the chunk for the JSD, the loss,
   the fkl gradient or the centring sum, and the teacher rank of the student token (topk). Sampling is by
   inverse CDF: each model's uniform falls in one chunk (known from the statistics), and only that chunk's
   program sums its tiles' probabilities until the running sum passes the uniform (``kernels.sampling``);
3. the finish (:func:`_finish_row`): sum the row's partials, take the decision, write the outputs;

then ``_grad_kernel``, only with a gradient of a kind other than fkl. Either as three launches
(``_stats_kernel``, ``_switch_step_kernel`` over a ``(B, S)`` grid, ``_switch_step_finish_kernel`` over ``B``), or
as one, ``_switch_step_fused_kernel``: ``B * S`` programs, the ``S`` of a row adjacent, each running phase 1, meeting
the row's others on a counter, running phase 2 while its chunk is still in L2 (the row's programs run together, so
few rows are in flight), and the row's last program out running the finish.
"""

import triton
import triton.language as tl

from .divergence import (
    JSD_CONSTANT,
    LANE_GROUP,
    LN2,
    NEG_BIG,
    _evict,
    _fold,
    _jsd_sum,
    _load_column,
    _loss_trip,
    _nan_unless,
    _pair,
    _pair_ahead,
    _partial_pair,
    _tile_probs,
    _whole_span,
)
from .sampling import NO_TOKEN, _cdf_tile, _row_uniform, _scan_result
from .split import STATS, SUMS, _combine_stats, _stats_chunk, _sum_splits, autotuned, switch_step_configs


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


@triton.jit
def _step_trip(grad_row, start, s_raw, t_raw, hi, scale2, grad_scale, m_s, lz_s, m_t, lz_t, alpha, beta, loss_acc,
               g_acc, jsd_acc, rank_acc, t_at_student, scan_s, u_s, run_s, found_s, last_s, scan_t, u_t, run_t, found_t,
               last_t, TOPK: tl.constexpr, KIND: tl.constexpr, GREEDY: tl.constexpr, HAS_GRAD: tl.constexpr,
               WHOLE: tl.constexpr, BLOCK: tl.constexpr):
    """One tile of phase 2 at column ``start``: loss terms and gradient (:func:`_loss_trip`), JSD terms, the teacher
    rank of the student token, and each model's inverse-CDF scan while it runs (in its one program per row)."""
    l2s, ps, l2t, pt = _tile_probs(s_raw, t_raw, scale2, m_s, lz_s, m_t, lz_t)
    loss_acc, g_acc = _loss_trip(grad_row, start, l2s, ps, l2t, pt, hi, grad_scale, alpha, beta, loss_acc, g_acc, KIND,
                                 HAS_GRAD, WHOLE, BLOCK)
    jsd_acc = _jsd_sum(jsd_acc, l2s, ps, l2t, pt)
    if TOPK:  # on the raw logits, as the reference ranks them
        rank_acc += _fold((t_raw.to(tl.float32) > t_at_student).to(tl.int32), BLOCK)
    if not GREEDY:
        if scan_s & (found_s == NO_TOKEN):
            run_s, found_s, last_s = _cdf_tile(ps, start, run_s, u_s, found_s, last_s, BLOCK)
        if scan_t & (found_t == NO_TOKEN):
            run_t, found_t, last_t = _cdf_tile(pt, start, run_t, u_t, found_t, last_t, BLOCK)
    return loss_acc, g_acc, jsd_acc, rank_acc, run_s, found_s, last_s, run_t, found_t, last_t


@triton.jit
def _step_chunk(s_ptr, t_ptr, positions_ptr, row_keys_ptr, stats_ptr, cand_ptr, cand_col_ptr, sums_ptr, s_tokens_ptr,
                t_tokens_ptr, grad_ptr, row, split, n_splits, s_stride, t_stride, grad_stride, V, chunk, position,
                seed_key, scale2, inv_temp, alpha, beta, TOPK: tl.constexpr, KIND: tl.constexpr, GREEDY: tl.constexpr,
                HAS_GRAD: tl.constexpr, STUDENT_GIVEN: tl.constexpr, POS_SCALAR: tl.constexpr,
                KEYS_ARANGE: tl.constexpr, SPLITS: tl.constexpr, BLOCK: tl.constexpr):
    """Phase 2 of one chunk of one row; stores its partial sums. TOPK ranks the student token before the sweep, so it
    needs the token given (or GREEDY)."""
    lo = split * chunk
    hi = tl.minimum(lo + chunk, V)
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride
    grad_row = grad_ptr + row * grad_stride
    m_s, lz_s, m_t, lz_t, valid = _combine_stats(stats_ptr, row, n_splits, SPLITS)
    # inverse-CDF scans: off unless sampling puts a model's uniform in this chunk
    scan_s = False
    scan_t = False
    u_s = 0.0
    u_t = 0.0
    run_s = 0.0
    run_t = 0.0
    found_s = tl.full([], NO_TOKEN, tl.int32)
    found_t = tl.full([], NO_TOKEN, tl.int32)
    last_s = tl.full([], NO_TOKEN, tl.int32)
    last_t = tl.full([], NO_TOKEN, tl.int32)
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
    t_at_student = 0.0
    if TOPK:
        t_at_student = _load_column(t_row, tok_s, V)

    grad_scale = _nan_unless(valid, inv_temp)
    jsd_acc = tl.zeros([BLOCK], dtype=tl.float32)  # per column: each product fuses into its add
    loss_acc = tl.zeros([BLOCK], dtype=tl.float32)
    g_acc = tl.zeros([BLOCK // LANE_GROUP], dtype=tl.float32)
    rank_acc = tl.zeros([BLOCK // LANE_GROUP], dtype=tl.int32)
    n_whole, end, start, step = _whole_span(lo, hi, False, BLOCK)
    s_next, t_next = _pair(s_row, t_row, start, lo, end, _evict(KIND), BLOCK)
    for _trip in range(0, n_whole):
        s_raw, t_raw = s_next, t_next
        s_next, t_next = _pair_ahead(s_row, t_row, start + step, lo, end, _evict(KIND), BLOCK)
        loss_acc, g_acc, jsd_acc, rank_acc, run_s, found_s, last_s, run_t, found_t, last_t = _step_trip(
            grad_row, start, s_raw, t_raw, hi, scale2, grad_scale, m_s, lz_s, m_t, lz_t, alpha, beta, loss_acc, g_acc,
            jsd_acc, rank_acc, t_at_student, scan_s, u_s, run_s, found_s, last_s, scan_t, u_t, run_t, found_t, last_t,
            TOPK, KIND, GREEDY, HAS_GRAD, True, BLOCK)
        start += step
    if end < hi:
        s_raw, t_raw = _partial_pair(s_row, t_row, end, hi, _evict(KIND), BLOCK)
        loss_acc, g_acc, jsd_acc, rank_acc, run_s, found_s, last_s, run_t, found_t, last_t = _step_trip(
            grad_row, end, s_raw, t_raw, hi, scale2, grad_scale, m_s, lz_s, m_t, lz_t, alpha, beta, loss_acc, g_acc,
            jsd_acc, rank_acc, t_at_student, scan_s, u_s, run_s, found_s, last_s, scan_t, u_t, run_t, found_t, last_t,
            TOPK, KIND, GREEDY, HAS_GRAD, False, BLOCK)
    if scan_s:
        tl.store(s_tokens_ptr + row, _scan_result(found_s, last_s).to(tl.int64))
    if scan_t:
        tl.store(t_tokens_ptr + row, _scan_result(found_t, last_t).to(tl.int64))
    # the four sums side by side in one block reduction (one exchange through shared memory)
    sums = tl.sum(tl.join(tl.join(_fold(loss_acc, BLOCK), _fold(jsd_acc, BLOCK)),
                          tl.join(g_acc, rank_acc.to(tl.float32))), 0)
    loss_jsd, g_rank = tl.split(sums)
    loss_bits, jsd_bits = tl.split(loss_jsd)
    g_sum, rank = tl.split(g_rank)
    out = sums_ptr + (row * n_splits + split) * SUMS
    # NaN/+inf logits make a softmax sum NaN, an all -inf row makes it 0: such rows report NaN.
    tl.store(out, _nan_unless(valid, loss_bits * LN2))  # nats; the sweeps sum bits
    tl.store(out + 1, g_sum)
    tl.store(out + 2, _nan_unless(valid, jsd_bits * (0.5 * LN2)))  # less JSD_CONSTANT: the finish adds it
    tl.store(out + 3, rank)


@autotuned(key=["V", "chunk", "KIND"], gpu_configs=switch_step_configs)
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
    """Phase 2 over a ``(B, S)`` grid (:func:`_step_chunk`). Programs start in grid order, rows fastest, so phase 1
    read the last split of every row last: phase 2 takes the splits in reverse, starting on what is still in L2."""
    n_splits = tl.num_programs(1)
    split = n_splits - 1 - tl.program_id(1)
    _step_chunk(s_ptr, t_ptr, positions_ptr, row_keys_ptr, stats_ptr, cand_ptr, cand_col_ptr, sums_ptr, s_tokens_ptr,
                t_tokens_ptr, grad_ptr, tl.program_id(0).to(tl.int64), split, n_splits, s_stride, t_stride,
                grad_stride, V, chunk, position, seed_key, scale2, inv_temp, alpha, beta, TOPK, KIND, GREEDY,
                HAS_GRAD, STUDENT_GIVEN, POS_SCALAR, KEYS_ARANGE, SPLITS, BLOCK)


@triton.jit
def _finish_row(positions_ptr, sums_ptr, s_tokens_ptr, t_tokens_ptr, tokens_ptr, from_teacher_ptr, divergence_ptr,
                loss_ptr, row, n_splits, position, thr_scale, thr_rate, thr_slope, thr_floor, top_k,
                TOPK: tl.constexpr, POS_SCALAR: tl.constexpr, SPLITS: tl.constexpr):
    """Sum one row's partials, take the decision and write its outputs."""
    divergence = _sum_splits(sums_ptr, row, n_splits, 2, SPLITS) + JSD_CONSTANT * LN2
    divergence = tl.where(divergence < 0.0, 0.0, divergence)  # rounding below 0 on equal rows; NaN stays NaN
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
    _finish_row(positions_ptr, sums_ptr, s_tokens_ptr, t_tokens_ptr, tokens_ptr, from_teacher_ptr, divergence_ptr,
                loss_ptr, tl.program_id(0).to(tl.int64), n_splits, position, thr_scale, thr_rate, thr_slope, thr_floor,
                top_k, TOPK, POS_SCALAR, SPLITS)


@triton.jit
def _arrive(counter_ptr):
    """Count this program in at its row's counter once all its threads' stores are done (the atomic releases them
    and acquires the others'); returns the count before."""
    tl.debug_barrier()
    return tl.atomic_add(counter_ptr, 1, sem="acq_rel")


@triton.jit
def _wait(counter_ptr, target):
    """Spin until the row's counter reaches ``target``; every thread then sees the stores it counts."""
    while tl.atomic_add(counter_ptr, 0, sem="acquire") < target:
        pass
    tl.debug_barrier()


@autotuned(key=["V", "chunk", "KIND"], gpu_configs=switch_step_configs, reset_to_zero=["sync_ptr"])
@triton.jit
def _switch_step_fused_kernel(
    s_ptr,  # [B, V] student logits
    t_ptr,  # [B, V] teacher logits
    positions_ptr,  # [B] int64 generated-token index (read unless POS_SCALAR)
    row_keys_ptr,  # [B] int64 stable sequence ids (read unless KEYS_ARANGE)
    stats_ptr,  # [B, S, 4] float32 per-split softmax statistics (written, then read by the row's programs)
    cand_ptr,  # [B, S, 2] float32 per-split argmax candidates (GREEDY)
    cand_col_ptr,  # [B, S, 2] int32 their columns
    sums_ptr,  # [B, S, 4] float32 per-split partial sums
    sync_ptr,  # [B] int32 zeros: arrivals per row (S after phase 1, 2 S at the end)
    s_tokens_ptr,  # [B] int64 student sample (or given: STUDENT_GIVEN)
    t_tokens_ptr,  # [B] int64 output: teacher sample
    grad_ptr,  # [B, V] output: fkl gradient (written only when HAS_GRAD and KIND == FKL)
    tokens_ptr,  # [B] int64 output: kept token
    from_teacher_ptr,  # [B] uint8 output: 1 where the teacher's token is kept
    divergence_ptr,  # [B] float32 output: JSD(p_T, p_S), nats
    loss_ptr,  # [B] float32 output: per-row loss of kind KIND
    s_stride, t_stride, grad_stride, V, chunk, n_splits, position, seed_key, scale2, inv_temp, alpha, beta, thr_scale,
    thr_rate, thr_slope, thr_floor, top_k,
    SAMPLE: tl.constexpr, SAMPLE_S: tl.constexpr, TOPK: tl.constexpr, KIND: tl.constexpr, GREEDY: tl.constexpr,
    HAS_GRAD: tl.constexpr, STUDENT_GIVEN: tl.constexpr, POS_SCALAR: tl.constexpr, KEYS_ARANGE: tl.constexpr,
    SPLITS: tl.constexpr, PHASE: tl.constexpr, BLOCK: tl.constexpr,
):
    """The whole step in one launch: program ``row * S + split`` runs phase 1 of its chunk, waits for the row's other
    programs, runs phase 2, and the row's last program out runs the finish. A program waits only for the others of
    its row, which come right after it in launch order, so the row's programs need only be resident together (the
    GPU starts programs in order; the plan keeps ``S`` within what the GPU holds at once, ``split.resident_splits``).
    PHASE 1 / 2 runs only that half (the interpreter, which runs programs one after
    another, launches twice); PHASE 0 both."""
    pid = tl.program_id(0)
    row = (pid // n_splits).to(tl.int64)
    split = pid % n_splits
    counter = sync_ptr + row
    if PHASE != 2:
        # phase 2 sets the registers, so few warps share an SM: phase 1 keeps two trips of loads in flight
        _stats_chunk(s_ptr, t_ptr, stats_ptr, cand_ptr, cand_col_ptr, row, split, n_splits, s_stride, t_stride, V,
                     chunk, scale2, SAMPLE, SAMPLE_S, BLOCK, 2)
        _arrive(counter)
    if PHASE != 1:
        _wait(counter, n_splits)
        _step_chunk(s_ptr, t_ptr, positions_ptr, row_keys_ptr, stats_ptr, cand_ptr, cand_col_ptr, sums_ptr,
                    s_tokens_ptr, t_tokens_ptr, grad_ptr, row, split, n_splits, s_stride, t_stride, grad_stride, V,
                    chunk, position, seed_key, scale2, inv_temp, alpha, beta, TOPK, KIND, GREEDY, HAS_GRAD,
                    STUDENT_GIVEN, POS_SCALAR, KEYS_ARANGE, SPLITS, BLOCK)
        if _arrive(counter) == 2 * n_splits - 1:
            _finish_row(positions_ptr, sums_ptr, s_tokens_ptr, t_tokens_ptr, tokens_ptr, from_teacher_ptr,
                        divergence_ptr, loss_ptr, row, n_splits, position, thr_scale, thr_rate, thr_slope, thr_floor,
                        top_k, TOPK, POS_SCALAR, SPLITS)
