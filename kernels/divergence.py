"""Triton building blocks shared by the switch-step and KD-loss kernels.

Rows are processed in base 2 (``x2 = logits * inv_temp * log2(e)``) so that the online softmax
uses ``exp2``; log-probabilities handed to the loss terms are natural (nats).
"""

import triton
import triton.language as tl

from switchkd.ops.spec import LOSS_CODES
from switchkd.ops.spec import triton_interpreted as interpreted

# Loss kinds as kernel constants (codes from the spec).
FKL: tl.constexpr = tl.constexpr(LOSS_CODES["fkl"])
RKL: tl.constexpr = tl.constexpr(LOSS_CODES["rkl"])
JSD: tl.constexpr = tl.constexpr(LOSS_CODES["jsd"])
SKL: tl.constexpr = tl.constexpr(LOSS_CODES["skl"])
SRKL: tl.constexpr = tl.constexpr(LOSS_CODES["srkl"])

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)
# Finite start for running maxima: keeps exp2(m_old - m_new) free of NaN on all -inf tiles.
NEG_BIG: tl.constexpr = tl.constexpr(-3.0e38)
# Floor of base-2 log-probabilities, reached only by -inf logits (masked or padded columns): it keeps every log
# finite, so a column of probability 0 contributes p * (log p - log q) = 0 * finite = 0 to every term and
# gradient with no per-column masks, while any finite log-probability (even one that exp2 rounds to 0) stays exact.
# Rows with NaN/+inf logits are reported by their softmax sums (``valid``), not per column.
LOG2P_FLOOR: tl.constexpr = tl.constexpr(-1.0e30)
FLT_MIN: tl.constexpr = tl.constexpr(1.1754943508222875e-38)  # floor of mixture probabilities: their log is finite
INTERPRETED: tl.constexpr = tl.constexpr(interpreted())
LANE_GROUP: tl.constexpr = tl.constexpr(8)  # adjacent columns one thread loads (16 B of bf16) and reduces alone


@triton.jit
def _log2_probs(x2, m, lz):
    """Base-2 log-probabilities (floored, see LOG2P_FLOOR) and probabilities of a tile of base-2 scores, given
    the row's base-2 statistics ``m`` (max) and ``lz = log2(sum 2^(x2 - m))``; one exp2 per logit. ``m`` and
    ``lz`` stay apart: folding them into one float would round ``lz`` to the precision of ``m``."""
    log2p = tl.maximum((x2 - m) - lz, LOG2P_FLOOR)
    return log2p, tl.exp2(log2p)


@triton.jit
def _lg2(x):
    """``log2(x)`` on the special-function unit (lg2.approx.ftz: absolute error below 2^-22, i.e. below 2^-22 bits
    per unit of probability in the terms); the interpreter, which has no inline PTX, uses tl.log2."""
    if INTERPRETED:
        return tl.log2(x)
    else:
        return tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)


@triton.jit
def _fast_rcp(x):
    """``1 / x`` on the special-function unit (rcp.approx.ftz: within 1 ulp, as close as the division it replaces);
    the interpreter divides."""
    if INTERPRETED:
        return 1.0 / x
    else:
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)


@triton.jit
def _nan_unless(valid, x):
    """``x``, or NaN for a row with NaN/+inf or all -inf logits: its gradient is NaN, as autograd's would be
    (the floored log-probabilities would otherwise make it 0)."""
    return tl.where(valid, x, float("nan"))


@triton.jit
def _loss_terms(l2s, ps, l2t, pt, alpha, beta, KIND: tl.constexpr):
    """Per-column loss terms in bits (sweeps multiply their sums by LN2 once) and ``g = dL/dp_S`` in nats (up to a
    per-row constant) for one tile, from base-2 log-probabilities ``l2s``, ``l2t`` (floored, so ``p * (l - l')``
    is 0 where ``p`` is) and probabilities. Mixtures are floored at FLT_MIN, which keeps their logs finite.

    The gradient w.r.t. the scaled student logits is then ``p_S * (g - sum(p_S * g))``; for
    ``fkl`` it is ``p_S - p_T`` directly and ``g`` is unused.
    """
    if KIND == FKL:
        terms = pt * (l2t - l2s)
        g = tl.zeros_like(ps)
    elif KIND == RKL:
        terms = ps * (l2s - l2t)
        g = (l2s - l2t) * LN2
    elif KIND == JSD:  # mixture (1 - beta) p_S + beta p_T
        wt = beta * pt
        ws = (1.0 - beta) * ps
        lm = _lg2(tl.maximum(ws + wt, FLT_MIN))
        terms = wt * (l2t - lm) + ws * (l2s - lm)
        g = (1.0 - beta) * LN2 * (l2s - lm)
    elif KIND == SKL:  # mixture alpha p_T + (1 - alpha) p_S
        m = tl.maximum(alpha * pt + (1.0 - alpha) * ps, FLT_MIN)
        terms = pt * (l2t - _lg2(m))
        g = -(1.0 - alpha) * pt * _fast_rcp(m)
    elif KIND == SRKL:  # mixture alpha p_S + (1 - alpha) p_T
        m = tl.maximum(alpha * ps + (1.0 - alpha) * pt, FLT_MIN)
        lm = _lg2(m)
        terms = ps * (l2s - lm)
        g = LN2 * (l2s - lm) - alpha * ps * _fast_rcp(m)
    else:  # tvd, in bits like the others
        terms = (0.5 * LOG2E) * tl.abs(ps - pt)
        g = tl.where(ps > pt, 0.5, tl.where(ps < pt, -0.5, 0.0))
    return terms, g


# The symmetric JSD's constant, in bits: 1/2 (sum p_S + sum p_T) = 1, which :func:`_jsd_sum` leaves out.
JSD_CONSTANT: tl.constexpr = tl.constexpr(1.0)


@triton.jit
def _jsd_sum(acc, l2s, ps, l2t, pt):
    """``acc`` plus one tile's terms of ``2 (JSD - JSD_CONSTANT)``, the symmetric JSD (the switching criterion) in
    bits: with ``q = p_S + p_T`` the mixture is ``q / 2``, so ``p log2(p / (q/2)) = p (log2 p - log2 q) + p``, and the
    ``+ p`` terms sum to 2, half of which is the 1 bit of JSD_CONSTANT. Each term stays ``p`` times a log-ratio, as
    exact as the direct form; the products fuse into their adds when ``acc`` is per column."""
    lq = _lg2(tl.maximum(ps + pt, FLT_MIN))
    return acc + ps * (l2s - lq) + pt * (l2t - lq)


@triton.jit
def _fold(x, BLOCK: tl.constexpr):
    """A tile's per-column values summed over each thread's LANE_GROUP adjacent columns (no cross-thread traffic):
    running sums kept this way take one register per group instead of one per column."""
    return tl.sum(tl.reshape(x, [BLOCK // LANE_GROUP, LANE_GROUP]), 1)


@triton.jit
def _accumulate(acc, x, BLOCK: tl.constexpr):
    """``acc + x`` for a running sum kept per column (``acc`` of BLOCK elements: a product in ``x`` and the add fuse
    into one FFMA) or per lane group (:func:`_fold`: fewer registers, one more add per column)."""
    if acc.shape[0] == BLOCK:
        return acc + x
    else:
        return acc + _fold(x, BLOCK)


# How a tile load marks its lines in L2: no hint, leave first (no later sweep reads them), stay (a later one does).
KEEP: tl.constexpr = tl.constexpr(0)
LAST_READ: tl.constexpr = tl.constexpr(1)
READ_AGAIN: tl.constexpr = tl.constexpr(2)


@triton.jit
def _load_tile(ptrs, mask, EVICT: tl.constexpr, FILL: tl.constexpr):
    """A raw tile; FILL: -inf where masked (a partial tile), else nothing is filled (a whole tile read or skipped as a
    unit: no register set up per column). EVICT (KEEP, LAST_READ, READ_AGAIN) is its L2 hint. With the statistics
    sweep's reads marked READ_AGAIN and the last reads and gradient stores marked to leave first, the later sweeps
    find more of a row in L2: on an H200, kd_loss jsd 8192 x 128256 bf16 took 3.567 ms instead of 3.608, and its
    255-register config 4.045 instead of 4.199 (benchmarks/RESULTS.md)."""
    if FILL:
        other = -float("inf")
    else:
        other = None
    if EVICT == LAST_READ:
        tile = tl.load(ptrs, mask=mask, other=other, eviction_policy="evict_first")
    elif EVICT == READ_AGAIN:
        tile = tl.load(ptrs, mask=mask, other=other, eviction_policy="evict_last")
    else:
        tile = tl.load(ptrs, mask=mask, other=other)
    return tile


@triton.jit
def _store_grad(ptrs, grad, mask):
    """Store a gradient tile (rounded to the buffer's dtype), marked to leave L2 first: nothing reads it here."""
    tl.store(ptrs, grad.to(ptrs.dtype.element_ty), mask=mask, eviction_policy="evict_first")


@triton.jit
def _evict(KIND: tl.constexpr):
    """The loss sweep's L2 hint: fkl has no gradient sweep, so the loss sweep is its last read of the logits."""
    if KIND == FKL:
        return LAST_READ
    else:
        return KEEP


@triton.jit
def _widen(words, BLOCK: tl.constexpr):
    """The ``BLOCK`` float32 columns, in order, of ``BLOCK // 2`` words of two bf16 (the lower half first).

    Packed rows: a row pointer to int32 holds bf16 logits as words of two columns each
    (``switchkd.ops.spec.kernel_rows``). Tiles start on even columns, and a word widens to its two columns with one
    shift and one AND, where a bf16 load takes about two instructions per column (sm_90 SASS: a byte permute, then
    the shift). The loaders below test the pointer's type inline: triton 3.6 does not fold a jit helper's result
    into a compile-time branch."""
    return tl.reshape(tl.join(_bf16_half(words, False), _bf16_half(words, True)), [BLOCK])


@triton.jit
def _bf16_half(words, HIGH):
    """The float32 value of each word's lower (or, HIGH, upper) bf16 half: the half moved to (or kept in) the top 16
    bits, one instruction. ``HIGH`` may be a tensor (a per-element choice)."""
    return tl.where(HIGH, words & -65536, words << 16).to(tl.float32, bitcast=True)


@triton.jit
def _tile_at(row, start, EVICT: tl.constexpr, BLOCK: tl.constexpr, first=None, end=None):
    """The whole raw tile at ``start`` (packed rows, :func:`_widen`, come back as float32). With ``first`` and ``end``
    it is read only when ``first <= start < end``: one predicate for the whole tile, so the loads stay 16-byte vectors
    with nothing filled. Without them there is no mask: a sweep's look-ahead load inside its loop, at a start that
    :func:`_ahead` keeps on the sweep's whole tiles. On the last trip that reloads a tile nobody uses, which costs
    less than building a predicate and zero-filling the registers on every trip (sm_90 SASS)."""
    packed: tl.constexpr = row.dtype.element_ty == tl.int32  # (:func:`_widen`)
    width: tl.constexpr = BLOCK // 2 if packed else BLOCK
    ptrs = row + ((start >> 1) if packed else start) + tl.arange(0, width)
    if first is None:
        tile = _load_tile(ptrs, None, EVICT, False)
    else:
        at = tl.full([width], start, tl.int32)
        tile = _load_tile(ptrs, (at >= first) & (at < end), EVICT, False)
    return _widen(tile, BLOCK) if packed else tile


@triton.jit
def _ahead(start, lo, end, BLOCK: tl.constexpr):
    """``start`` clamped to the whole tiles of ``[lo, end)``, of which there is at least one."""
    return tl.minimum(tl.maximum(start, lo), end - BLOCK)


@triton.jit
def _pair_ahead(s_row, t_row, start, lo, end, EVICT: tl.constexpr, BLOCK: tl.constexpr, PAIR: tl.constexpr = True):
    """Both rows' tiles at ``start`` for the next trip of a loop over the whole tiles of ``[lo, end)`` (:func:`_pair`,
    loaded with :func:`_tile_at`)."""
    at = _ahead(start, lo, end, BLOCK)
    s = _tile_at(s_row, at, EVICT, BLOCK)
    return s, _tile_at(t_row, at, EVICT, BLOCK) if PAIR else s


@triton.jit
def _partial_tile(row, start, hi, EVICT: tl.constexpr, BLOCK: tl.constexpr):
    """The raw tile at ``start``, -inf from column ``hi`` on (float32 for packed rows)."""
    cols = start + tl.arange(0, BLOCK)
    if row.dtype.element_ty == tl.int32:  # packed (:func:`_widen`)
        words = start // 2 + tl.arange(0, BLOCK // 2)
        return tl.where(cols < hi, _widen(_load_tile(row + words, words * 2 < hi, EVICT, False), BLOCK),
                        -float("inf"))
    else:
        return _load_tile(row + cols, cols < hi, EVICT, True)


@triton.jit
def _load_column(row, col, V):
    """Column ``col`` of a row as float32 (-inf outside ``[0, V)``)."""
    inside = (col >= 0) & (col < V)
    if row.dtype.element_ty == tl.int32:  # packed (:func:`_widen`)
        word = tl.load(row + col // 2, mask=inside, other=0)
        return tl.where(inside, _bf16_half(word, col % 2 == 1), -float("inf"))
    else:
        return tl.load(row + col, mask=inside, other=-float("inf")).to(tl.float32)


@triton.jit
def _pair(s_row, t_row, start, first, end, EVICT: tl.constexpr, BLOCK: tl.constexpr, PAIR: tl.constexpr = True):
    """Both rows' whole raw tiles at ``start``, read when ``first <= start < end`` (:func:`_tile_at`; without PAIR the
    student's, twice). Sweeps load the tile of their next trip before the math of this one, so each thread has a tile
    of loads in flight while it computes: without it every trip waits a full memory latency (measured on an H200: 16
    warps per SM, 0.43 instructions per cycle per scheduler)."""
    s = _tile_at(s_row, start, EVICT, BLOCK, first, end)
    return s, _tile_at(t_row, start, EVICT, BLOCK, first, end) if PAIR else s


@triton.jit
def _partial_pair(s_row, t_row, start, hi, EVICT: tl.constexpr, BLOCK: tl.constexpr):
    """Both rows' raw tiles at ``start``, -inf from ``hi`` on: the last, partial tile of a sweep."""
    return _partial_tile(s_row, start, hi, EVICT, BLOCK), _partial_tile(t_row, start, hi, EVICT, BLOCK)


@triton.jit
def _whole_span(lo, hi, REVERSE: tl.constexpr, BLOCK: tl.constexpr):
    """A sweep's whole tiles over ``[lo, hi)``: their count, the end of the last, the first one's start and the step
    (backwards when REVERSE: a sweep that follows another in the opposite direction starts on what is still in L2).
    The partial tile ``[end, hi)``, if any, comes last (first when REVERSE)."""
    n_whole = (hi - lo) // BLOCK
    end = lo + n_whole * BLOCK
    if REVERSE:
        start = end - BLOCK
        step = -BLOCK
    else:
        start = lo
        step = BLOCK
    return n_whole, end, start, step


@triton.jit
def _tile_probs(s_raw, t_raw, scale2, m_s, lz_s, m_t, lz_t):
    """Both models' base-2 log-probabilities and probabilities of one pair of raw tiles (-inf past the end: p = 0
    there, as is every term)."""
    l2s, ps = _log2_probs(s_raw.to(tl.float32) * scale2, m_s, lz_s)
    l2t, pt = _log2_probs(t_raw.to(tl.float32) * scale2, m_t, lz_t)
    return l2s, ps, l2t, pt


@triton.jit
def _loss_trip(grad_row, start, l2s, ps, l2t, pt, hi, grad_scale, alpha, beta, loss_acc, g_acc, KIND: tl.constexpr,
               HAS_GRAD: tl.constexpr, WHOLE: tl.constexpr, BLOCK: tl.constexpr):
    """One tile of a loss sweep, at column ``start``: accumulate the loss terms (bits) and either store the fkl
    gradient ``(p_S - p_T) * grad_scale`` (``1 / T`` times the reduction's weight; a WHOLE tile stores unmasked) or
    accumulate the centring term ``p_S * g``."""
    terms, g = _loss_terms(l2s, ps, l2t, pt, alpha, beta, KIND)
    loss_acc = _accumulate(loss_acc, terms, BLOCK)
    if HAS_GRAD:
        if KIND == FKL:
            cols = start + tl.arange(0, BLOCK)
            if WHOLE:
                _store_grad(grad_row + cols, (ps - pt) * grad_scale, None)
            else:
                _store_grad(grad_row + cols, (ps - pt) * grad_scale, cols < hi)
        else:
            g_acc += _fold(ps * g, BLOCK)
    return loss_acc, g_acc


@triton.jit
def _loss_partial(s_row, t_row, grad_row, end, hi, scale2, grad_scale, m_s, lz_s, m_t, lz_t, alpha, beta, loss_acc,
                  g_acc, KIND: tl.constexpr, HAS_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    """:func:`_loss_trip` on the partial tile ``[end, hi)`` of a loss sweep."""
    s_raw, t_raw = _partial_pair(s_row, t_row, end, hi, _evict(KIND), BLOCK)
    l2s, ps, l2t, pt = _tile_probs(s_raw, t_raw, scale2, m_s, lz_s, m_t, lz_t)
    return _loss_trip(grad_row, end, l2s, ps, l2t, pt, hi, grad_scale, alpha, beta, loss_acc, g_acc, KIND, HAS_GRAD,
                      False, BLOCK)


@triton.jit
def _loss_sweep(
    s_row,  # [V] student logits of this row
    t_row,  # [V] teacher logits of this row
    grad_row,  # [V] output: fkl gradient (written only when HAS_GRAD and KIND == FKL)
    lo, hi, scale2, grad_scale, m_s, lz_s, m_t, lz_t, alpha, beta,
    KIND: tl.constexpr, HAS_GRAD: tl.constexpr, REVERSE: tl.constexpr, BLOCK: tl.constexpr,
):
    """Loss (nats) and centring sum ``sum(p_S * g)`` over columns ``[lo, hi)``: two exp2 per logit pair,
    plus one log for the mixture kinds; whole tiles a trip ahead in flight (:func:`_pair`), then the partial one.
    fkl has no gradient sweep, so this is its last read of the logits."""
    loss_acc = tl.zeros([BLOCK // LANE_GROUP], dtype=tl.float32)
    g_acc = tl.zeros([BLOCK // LANE_GROUP], dtype=tl.float32)
    n_whole, end, start, step = _whole_span(lo, hi, REVERSE, BLOCK)
    if REVERSE:
        if end < hi:
            loss_acc, g_acc = _loss_partial(s_row, t_row, grad_row, end, hi, scale2, grad_scale, m_s, lz_s, m_t,
                                            lz_t, alpha, beta, loss_acc, g_acc, KIND, HAS_GRAD, BLOCK)
    s_next, t_next = _pair(s_row, t_row, start, lo, end, _evict(KIND), BLOCK)
    for _trip in range(0, n_whole):
        s_raw, t_raw = s_next, t_next
        s_next, t_next = _pair_ahead(s_row, t_row, start + step, lo, end, _evict(KIND), BLOCK)
        l2s, ps, l2t, pt = _tile_probs(s_raw, t_raw, scale2, m_s, lz_s, m_t, lz_t)
        loss_acc, g_acc = _loss_trip(grad_row, start, l2s, ps, l2t, pt, hi, grad_scale, alpha, beta, loss_acc, g_acc,
                                     KIND, HAS_GRAD, True, BLOCK)
        start += step
    if not REVERSE:
        if end < hi:
            loss_acc, g_acc = _loss_partial(s_row, t_row, grad_row, end, hi, scale2, grad_scale, m_s, lz_s, m_t,
                                            lz_t, alpha, beta, loss_acc, g_acc, KIND, HAS_GRAD, BLOCK)
    return tl.sum(loss_acc, 0) * LN2, tl.sum(g_acc, 0)


@triton.jit
def _grad_trip(grad_row, start, s_raw, t_raw, hi, scale2, grad_scale, m_s, lz_s, m_t, lz_t, g_mean, alpha, beta,
               KIND: tl.constexpr, WHOLE: tl.constexpr, BLOCK: tl.constexpr):
    """One tile of :func:`_grad_sweep`."""
    l2s, ps, l2t, pt = _tile_probs(s_raw, t_raw, scale2, m_s, lz_s, m_t, lz_t)
    _terms, g = _loss_terms(l2s, ps, l2t, pt, alpha, beta, KIND)
    cols = start + tl.arange(0, BLOCK)
    if WHOLE:
        _store_grad(grad_row + cols, ps * (g - g_mean) * grad_scale, None)
    else:
        _store_grad(grad_row + cols, ps * (g - g_mean) * grad_scale, cols < hi)


@triton.jit
def _grad_sweep(
    s_row,  # [V] student logits of this row
    t_row,  # [V] teacher logits of this row
    grad_row,  # [V] output: d loss / d student logits
    lo, hi, scale2, grad_scale, m_s, lz_s, m_t, lz_t, g_mean, alpha, beta,
    KIND: tl.constexpr, BLOCK: tl.constexpr,
):
    """Gradient sweep over ``[lo, hi)`` for kinds whose gradient needs ``g_mean = sum(p_S * g)``:
    ``p_S (g - g_mean) * grad_scale`` (``1 / T`` times the reduction's weight). Each tile is read (a trip ahead)
    before it is written, so ``grad_row`` may be ``s_row``."""
    n_whole, end, start, step = _whole_span(lo, hi, False, BLOCK)
    s_next, t_next = _pair(s_row, t_row, start, lo, end, LAST_READ, BLOCK)
    for _trip in range(0, n_whole):
        s_raw, t_raw = s_next, t_next
        s_next, t_next = _pair_ahead(s_row, t_row, start + step, lo, end, LAST_READ, BLOCK)
        _grad_trip(grad_row, start, s_raw, t_raw, hi, scale2, grad_scale, m_s, lz_s, m_t, lz_t, g_mean, alpha, beta,
                   KIND, True, BLOCK)
        start += step
    if end < hi:
        s_raw, t_raw = _partial_pair(s_row, t_row, end, hi, LAST_READ, BLOCK)
        _grad_trip(grad_row, end, s_raw, t_raw, hi, scale2, grad_scale, m_s, lz_s, m_t, lz_t, g_mean, alpha, beta,
                   KIND, False, BLOCK)


@triton.jit
def _zero_sweep(grad_row, lo, hi, BLOCK: tl.constexpr):
    """Zero gradient over ``[lo, hi)`` (ignored rows)."""
    for start in range(lo, hi, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        tl.store(grad_row + cols, tl.zeros([BLOCK], dtype=grad_row.dtype.element_ty), mask=cols < hi)
