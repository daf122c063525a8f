"""Fused SWITCH decoding step: divergence, switching decision, both samples and the KD loss."""

import triton
import triton.language as tl

from .divergence import FKL, LOG2E, NEG_BIG, _jsd_terms, _loss_tile, _online_softmax, _write_grad
from .sampling import _argmax_update, _gumbel2, _row_hash


@triton.jit
def _switch_step_kernel(
    s_ptr,  # [B, V] student logits
    t_ptr,  # [B, V] teacher logits
    positions_ptr,  # [B] int64 generated-token index (read unless POS_SCALAR)
    row_keys_ptr,  # [B] int64 stable sequence ids (read unless KEYS_ARANGE)
    tokens_ptr,  # [B] int64 output: kept token
    from_teacher_ptr,  # [B] uint8 output: 1 where the teacher's token is kept
    divergence_ptr,  # [B] float32 output: JSD(p_T, p_S), nats
    s_tokens_ptr,  # [B] int64 output: student sample
    t_tokens_ptr,  # [B] int64 output: teacher sample
    loss_ptr,  # [B] float32 output: per-row loss of kind KIND
    grad_ptr,  # [B, V] output: d loss_row / d student logits (written only when HAS_GRAD)
    s_stride, t_stride, grad_stride,
    V, position, seed_key, inv_temp, thr_scale, thr_rate, thr_slope, thr_floor, top_k, alpha, beta,
    TOPK: tl.constexpr, KIND: tl.constexpr, POS_SCALAR: tl.constexpr, KEYS_ARANGE: tl.constexpr,
    GREEDY: tl.constexpr, HAS_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride
    grad_row = grad_ptr + row * grad_stride
    scale2 = inv_temp * LOG2E
    if POS_SCALAR:
        pos = position
    else:
        pos = tl.load(positions_ptr + row)
    if KEYS_ARANGE:
        key = row
    else:
        key = tl.load(row_keys_ptr + row)
    key_s = _row_hash(seed_key, key, pos, 0)
    key_t = _row_hash(seed_key, key, pos, 1)

    # Sweep 1: softmax statistics and Gumbel-max samples of both models.
    m_s = NEG_BIG
    z_s = 0.0
    m_t = NEG_BIG
    z_t = 0.0
    best_s = -float("inf")
    best_t = -float("inf")
    tok_s = 0
    tok_t = 0
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < V
        s = tl.load(s_row + cols, mask=mask, other=-float("inf"), eviction_policy="evict_last").to(tl.float32)
        t = tl.load(t_row + cols, mask=mask, other=-float("inf"), eviction_policy="evict_last").to(tl.float32)
        m_s, z_s = _online_softmax(s * scale2, m_s, z_s)
        m_t, z_t = _online_softmax(t * scale2, m_t, z_t)
        if GREEDY:
            best_s, tok_s = _argmax_update(s, start, best_s, tok_s)
            best_t, tok_t = _argmax_update(t, start, best_t, tok_t)
        else:
            best_s, tok_s = _argmax_update(s * scale2 + _gumbel2(key_s, cols), start, best_s, tok_s)
            best_t, tok_t = _argmax_update(t * scale2 + _gumbel2(key_t, cols), start, best_t, tok_t)
    if TOPK:
        t_at_student = tl.load(t_row + tok_s).to(tl.float32)

    # Sweep 2 (from L2): JSD, loss, fkl gradient or the centring term, teacher rank of the student token.
    jsd_acc = tl.zeros([BLOCK], dtype=tl.float32)
    loss_acc = tl.zeros([BLOCK], dtype=tl.float32)
    g_acc = tl.zeros([BLOCK], dtype=tl.float32)
    rank_acc = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < V
        s = tl.load(s_row + cols, mask=mask, other=-float("inf")).to(tl.float32)
        t = tl.load(t_row + cols, mask=mask, other=-float("inf")).to(tl.float32)
        loss_acc, g_acc, log_ps, ps, log_pt, pt = _loss_tile(s, t, cols, mask, grad_row, scale2, inv_temp, m_s, z_s,
                                                             m_t, z_t, alpha, beta, loss_acc, g_acc, KIND, HAS_GRAD)
        jsd_acc += tl.where(mask, _jsd_terms(log_ps, ps, log_pt, pt), 0.0)
        if TOPK:
            rank_acc += (t > t_at_student).to(tl.int32)
    # NaN/+inf logits make a softmax sum NaN, an all -inf row makes it 0: report such rows as NaN.
    valid = (z_s > 0) & (z_t > 0)
    divergence = tl.where(valid, tl.sum(jsd_acc, 0), float("nan"))

    if TOPK:
        switch = tl.sum(rank_acc, 0) >= top_k
    else:  # the spec's threshold rule, from its coefficients; NaN rows never switch
        step = pos.to(tl.float32)
        switch = divergence > tl.maximum(thr_scale * tl.exp(-thr_rate * step) - thr_slope * step, thr_floor)
    tl.store(tokens_ptr + row, tl.where(switch, tok_t, tok_s).to(tl.int64))
    tl.store(from_teacher_ptr + row, switch.to(tl.uint8))
    tl.store(divergence_ptr + row, divergence)
    tl.store(s_tokens_ptr + row, tok_s.to(tl.int64))
    tl.store(t_tokens_ptr + row, tok_t.to(tl.int64))
    tl.store(loss_ptr + row, tl.where(valid, tl.sum(loss_acc, 0), float("nan")))

    # Sweep 3 (all kinds but fkl): p_S * (g - sum(p_S g)) / T.
    if HAS_GRAD and KIND != FKL:
        _write_grad(s_row, t_row, grad_row, V, scale2, inv_temp, m_s, z_s, m_t, z_t, tl.sum(g_acc, 0),
                    alpha, beta, KIND, BLOCK)

