"""Triton building blocks shared by the switch-step and KD-loss kernels.

Rows are processed in base 2 (``x2 = logits * inv_temp * log2(e)``) so that the online softmax
uses ``exp2``; log-probabilities handed to the loss terms are natural (nats).
"""

import triton
import triton.language as tl

from switchkd.ops.spec import LOSS_CODES

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


@triton.jit
def _log_probs(x2, m, lz):
    """Natural log-probabilities and probabilities of a tile of base-2 scores, given the row's base-2
    statistics ``m`` (max) and ``lz = log2(sum 2^(x2 - m))``; one exp2 per logit. ``m`` and ``lz`` stay
    apart: folding them into one float would round ``lz`` to the precision of ``m``."""
    log2p = (x2 - m) - lz
    return log2p * LN2, tl.exp2(log2p)


@triton.jit
def _kl_terms(p, log_p, log_q):
    """p * (log p - log q), 0 where p = 0."""
    return tl.where(p > 0, p * (log_p - log_q), 0.0)


@triton.jit
def _log_mix(m):
    """log of a mixture that contains p with positive weight; -inf only where it underflowed, and then
    p's own term is below float32's range, so callers count it as 0."""
    return tl.where(m > 0, tl.log(m), 0.0)


@triton.jit
def _loss_terms(log_ps, ps, log_pt, pt, alpha, beta, KIND: tl.constexpr):
    """Per-column loss terms and ``g = dL/dp_S`` (up to a per-row constant) for one tile.

    The gradient w.r.t. the scaled student logits is then ``p_S * (g - sum(p_S * g))``; for
    ``fkl`` it is ``p_S - p_T`` directly and ``g`` is unused.
    """
    if KIND == FKL:
        terms = _kl_terms(pt, log_pt, log_ps)
        g = tl.zeros_like(ps)
    elif KIND == RKL:
        terms = _kl_terms(ps, log_ps, log_pt)
        g = tl.where(ps > 0, log_ps - log_pt, 0.0)
    elif KIND == JSD:  # mixture (1 - beta) p_S + beta p_T
        m = (1.0 - beta) * ps + beta * pt
        live, log_m = m > 0, _log_mix(m)
        terms = tl.where(live, beta * _kl_terms(pt, log_pt, log_m) + (1.0 - beta) * _kl_terms(ps, log_ps, log_m), 0.0)
        g = tl.where(live & (ps > 0), (1.0 - beta) * (log_ps - log_m), 0.0)
    elif KIND == SKL:  # mixture alpha p_T + (1 - alpha) p_S
        m = alpha * pt + (1.0 - alpha) * ps
        live = m > 0
        terms = tl.where(live, _kl_terms(pt, log_pt, _log_mix(m)), 0.0)
        g = tl.where(live, -(1.0 - alpha) * pt / m, 0.0)
    elif KIND == SRKL:  # mixture alpha p_S + (1 - alpha) p_T
        m = alpha * ps + (1.0 - alpha) * pt
        live, log_m = m > 0, _log_mix(m)
        terms = tl.where(live, _kl_terms(ps, log_ps, log_m), 0.0)
        g = tl.where(live & (ps > 0), log_ps - log_m - alpha * ps / m, 0.0)
    else:  # tvd
        terms = 0.5 * tl.abs(ps - pt)
        g = tl.where(ps > pt, 0.5, tl.where(ps < pt, -0.5, 0.0))
    return terms, g


@triton.jit
def _jsd_terms(log_ps, ps, log_pt, pt):
    """Symmetric JSD terms (the switching criterion), nats."""
    m = 0.5 * ps + 0.5 * pt
    log_m = _log_mix(m)
    return tl.where(m > 0, 0.5 * _kl_terms(pt, log_pt, log_m) + 0.5 * _kl_terms(ps, log_ps, log_m), 0.0)


@triton.jit
def _tile_start(i, lo, n_tiles, REVERSE: tl.constexpr, BLOCK: tl.constexpr):
    """First column of the ``i``-th tile of ``[lo, lo + n_tiles * BLOCK)``, last tile first when REVERSE
    (a sweep that follows another in the opposite direction starts on what is still in L2)."""
    if REVERSE:
        return lo + (n_tiles - 1 - i) * BLOCK
    return lo + i * BLOCK


@triton.jit
def _load2(s_row, t_row, cols, mask, scale2):
    """Both models' base-2 scores of a tile (-inf outside ``mask``), in float32."""
    s2 = tl.load(s_row + cols, mask=mask, other=-float("inf")).to(tl.float32) * scale2
    t2 = tl.load(t_row + cols, mask=mask, other=-float("inf")).to(tl.float32) * scale2
    return s2, t2


@triton.jit
def _loss_tile(s2, t2, cols, mask, grad_row, grad_scale, m_s, lz_s, m_t, lz_t, alpha, beta, loss_acc, g_acc,
               KIND: tl.constexpr, HAS_GRAD: tl.constexpr):
    """One tile of the loss sweep: accumulate the loss terms and either store the fkl gradient
    ``(p_S - p_T) * grad_scale`` (``1 / T`` times the reduction's weight) or accumulate the centring term
    ``p_S * g``. Returns the tile's probabilities too."""
    log_ps, ps = _log_probs(s2, m_s, lz_s)
    log_pt, pt = _log_probs(t2, m_t, lz_t)
    terms, g = _loss_terms(log_ps, ps, log_pt, pt, alpha, beta, KIND)
    loss_acc += tl.where(mask, terms, 0.0)
    if HAS_GRAD:
        if KIND == FKL:
            tl.store(grad_row + cols, ((ps - pt) * grad_scale).to(grad_row.dtype.element_ty), mask=mask)
        else:
            g_acc += tl.where(mask, ps * g, 0.0)
    return loss_acc, g_acc, log_ps, ps, log_pt, pt


@triton.jit
def _loss_sweep(
    s_row,  # [V] student logits of this row
    t_row,  # [V] teacher logits of this row
    grad_row,  # [V] output: fkl gradient (written only when HAS_GRAD and KIND == FKL)
    lo, hi, scale2, grad_scale, m_s, lz_s, m_t, lz_t, alpha, beta,
    KIND: tl.constexpr, HAS_GRAD: tl.constexpr, REVERSE: tl.constexpr, BLOCK: tl.constexpr,
):
    """Loss terms and centring sum ``sum(p_S * g)`` over columns ``[lo, hi)``: two exp2 per logit pair,
    plus one log for the mixture kinds."""
    loss_acc = tl.zeros([BLOCK], dtype=tl.float32)
    g_acc = tl.zeros([BLOCK], dtype=tl.float32)
    n_tiles = tl.cdiv(hi - lo, BLOCK)
    for i in range(0, n_tiles):
        cols = _tile_start(i, lo, n_tiles, REVERSE, BLOCK) + tl.arange(0, BLOCK)
        mask = cols < hi
        s2, t2 = _load2(s_row, t_row, cols, mask, scale2)
        loss_acc, g_acc, _, _, _, _ = _loss_tile(s2, t2, cols, mask, grad_row, grad_scale, m_s, lz_s, m_t, lz_t,
                                                 alpha, beta, loss_acc, g_acc, KIND, HAS_GRAD)
    return tl.sum(loss_acc, 0), tl.sum(g_acc, 0)


@triton.jit
def _grad_sweep(
    s_row,  # [V] student logits of this row
    t_row,  # [V] teacher logits of this row
    grad_row,  # [V] output: d loss / d student logits
    lo, hi, scale2, grad_scale, m_s, lz_s, m_t, lz_t, g_mean, alpha, beta,
    KIND: tl.constexpr, BLOCK: tl.constexpr,
):
    """Gradient sweep over ``[lo, hi)`` for kinds whose gradient needs ``g_mean = sum(p_S * g)``:
    ``p_S (g - g_mean) * grad_scale`` (``1 / T`` times the reduction's weight)."""
    for start in range(lo, hi, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < hi
        s2, t2 = _load2(s_row, t_row, cols, mask, scale2)
        log_ps, ps = _log_probs(s2, m_s, lz_s)
        log_pt, pt = _log_probs(t2, m_t, lz_t)
        _, g = _loss_terms(log_ps, ps, log_pt, pt, alpha, beta, KIND)
        tl.store(grad_row + cols, (ps * (g - g_mean) * grad_scale).to(grad_row.dtype.element_ty), mask=mask)


@triton.jit
def _zero_sweep(grad_row, lo, hi, BLOCK: tl.constexpr):
    """Zero gradient over ``[lo, hi)`` (ignored rows)."""
    for start in range(lo, hi, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        tl.store(grad_row + cols, tl.zeros([BLOCK], dtype=grad_row.dtype.element_ty), mask=cols < hi)
