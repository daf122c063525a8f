"""Fused token-level distillation loss: forward and gradient in one kernel per row block."""

import triton
import triton.language as tl

from .divergence import FKL, LOG2E, NEG_BIG, _loss_tile, _online_softmax, _write_grad


@triton.jit
def _kd_loss_kernel(
    s_ptr,  # [N, V] student logits
    t_ptr,  # [N, V] teacher logits
    labels_ptr,  # [N] int64 labels (read only when HAS_LABELS)
    loss_ptr,  # [N] float32 output: per-row loss (0 on ignored rows)
    grad_ptr,  # [N, V] output: d loss_row / d student logits (written only when HAS_GRAD)
    s_stride, t_stride, grad_stride,
    V, inv_temp, alpha, beta, ignore_index,
    KIND: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride
    grad_row = grad_ptr + row * grad_stride
    scale2 = inv_temp * LOG2E

    keep = True
    if HAS_LABELS:
        keep = tl.load(labels_ptr + row) != ignore_index
    if keep:
        # Sweep 1: running max and sum of both rows (keeps them in L2 for the next sweep).
        m_s = NEG_BIG
        z_s = 0.0
        m_t = NEG_BIG
        z_t = 0.0
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < V
            s2 = tl.load(s_row + cols, mask=mask, other=-float("inf"), eviction_policy="evict_last")
            t2 = tl.load(t_row + cols, mask=mask, other=-float("inf"), eviction_policy="evict_last")
            m_s, z_s = _online_softmax(s2.to(tl.float32) * scale2, m_s, z_s)
            m_t, z_t = _online_softmax(t2.to(tl.float32) * scale2, m_t, z_t)

        # Sweep 2: the loss, plus the fkl gradient or the centring term of the others.
        loss_acc = tl.zeros([BLOCK], dtype=tl.float32)
        g_acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < V
            s2 = tl.load(s_row + cols, mask=mask, other=-float("inf")).to(tl.float32)
            t2 = tl.load(t_row + cols, mask=mask, other=-float("inf")).to(tl.float32)
            loss_acc, g_acc, _, _, _, _ = _loss_tile(s2, t2, cols, mask, grad_row, scale2, inv_temp, m_s, z_s, m_t,
                                                     z_t, alpha, beta, loss_acc, g_acc, KIND, HAS_GRAD)
        # NaN/+inf logits make a softmax sum NaN, an all -inf row makes it 0: the loss is then NaN.
        tl.store(loss_ptr + row, tl.where((z_s > 0) & (z_t > 0), tl.sum(loss_acc, 0), float("nan")))

        # Sweep 3 (all kinds but fkl): p_S * (g - sum(p_S g)) / T.
        if HAS_GRAD and KIND != FKL:
            _write_grad(s_row, t_row, grad_row, V, scale2, inv_temp, m_s, z_s, m_t, z_t, tl.sum(g_acc, 0),
                        alpha, beta, KIND, BLOCK)
    else:
        tl.store(loss_ptr + row, 0.0)
        if HAS_GRAD:
            for start in range(0, V, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                tl.store(grad_row + cols, tl.zeros([BLOCK], dtype=grad_ptr.dtype.element_ty), mask=cols < V)

