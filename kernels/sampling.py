"""Counter-based sampling noise and the exponential race, bit-identical noise to ``switchkd.reference``.

A token is drawn as ``argmax_i p_i / E_i`` with ``E_i = -log2(u_i)`` (an exponential variate up to the
factor ln 2, which does not move the argmax): the exponential race, which is Gumbel-max
``argmax_i log p_i - log(-log u_i)`` written without its second logarithm. ``p_i`` up to the row's
normaliser is the ``exp2`` the online softmax computes anyway, so sampling adds one ``log2`` and one
reciprocal per logit and model.
"""

import triton
import triton.language as tl

from .divergence import _fast_rcp


@triton.jit
def _mix32(x):
    """'lowbias32' finaliser on uint32 (multiplications wrap mod 2**32)."""
    x = x ^ (x >> 16)
    x = x * tl.full([], 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full([], 0x846CA68B, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def _row_hash(seed_key, row_key, position, model):
    """Per-row noise key from the pre-hashed seed, the row key and position (int64) and the model id."""
    k = _mix32(tl.cast(seed_key, tl.uint32) ^ tl.cast(row_key, tl.uint32))  # tl.cast: also for int constants
    k = _mix32(k ^ tl.cast(position, tl.uint32))
    return _mix32(k ^ (model + 1))


@triton.jit
def _exp_noise2(key, cols):
    """``-log2(u)`` for vocabulary columns ``cols``: u = (2j + 1) / 2**24 with 23 random bits, in (0, 1)."""
    h = _mix32(key ^ (cols.to(tl.uint32) * tl.full([], 0x9E3779B9, tl.uint32)))
    u = ((h >> 9).to(tl.float32) * 2.0 + 1.0) * 5.9604644775390625e-08
    return -tl.log2(u)


@triton.jit
def _race_score(e, noise):
    """``e / noise``: a reciprocal on the special-function unit and a multiply (see ``_fast_rcp``)."""
    return e * _fast_rcp(noise)


@triton.jit
def _argmax_update(score, start, best, best_col):
    """Fold the tile starting at column ``start`` into a running (max, argmax); ties keep the lowest column."""
    tile_best, tile_arg = tl.max(score, 0, return_indices=True, return_indices_tie_break_left=True)
    take = tile_best > best
    return tl.where(take, tile_best, best), tl.where(take, start + tile_arg, best_col)


@triton.jit
def _sample_kernel(
    x_ptr,  # [B, V] logits
    positions_ptr,  # [B] int64 generated-token index (read unless POS_SCALAR)
    row_keys_ptr,  # [B] int64 stable sequence ids (read unless KEYS_ARANGE)
    tokens_ptr,  # [B] int64 output: sampled token
    x_stride, V, position, seed_key, scale2,
    MODEL: tl.constexpr, POS_SCALAR: tl.constexpr, KEYS_ARANGE: tl.constexpr, GREEDY: tl.constexpr, BLOCK: tl.constexpr,
):
    """One exponential-race sample per row with the noise of ``switchkd.reference.sample`` (argmax when GREEDY).

    Scores are ``2^(x2 - m) / E`` against the running maximum ``m``; when ``m`` moves, the best score so
    far is rescaled by ``2^(m_old - m_new)`` (one exp2 per tile).
    """
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_stride
    pos = position if POS_SCALAR else tl.load(positions_ptr + row)
    key = _row_hash(seed_key, row if KEYS_ARANGE else tl.load(row_keys_ptr + row), pos, MODEL)
    m = -3.0e38
    best = -float("inf") if GREEDY else -1.0
    tok = 0
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(x_row + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
        if GREEDY:
            best, tok = _argmax_update(x, start, best, tok)
        else:
            x2 = x * scale2
            m_new = tl.maximum(m, tl.max(x2, 0))
            score = _race_score(tl.exp2(x2 - m_new), _exp_noise2(key, cols))
            best, tok = _argmax_update(score, start, best * tl.exp2(m - m_new), tok)
            m = m_new
    tl.store(tokens_ptr + row, tok.to(tl.int64))
