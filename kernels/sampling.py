"""Counter-based inverse-CDF sampling, the same tokens as ``switchkd.reference.sample``.

One uniform ``u`` per row and model comes from an integer hash of (seed, row key, position, model); the token
is the first column, in vocabulary order, whose cumulative probability passes ``u``. The probabilities are the
``exp2`` the softmax computes anyway, so sampling costs no transcendental and no hash per logit: only the
program whose column range holds ``u`` sums its tiles, and only the tile holding ``u`` takes a prefix sum.
"""

import triton
import triton.language as tl

from .divergence import KEEP, _log2_probs, _partial_tile
from .split import NO_SAMPLE, _row_stats

NO_TOKEN: tl.constexpr = tl.constexpr(-1)  # a scan's token before it is found


@triton.jit
def _mix32(x):
    """'lowbias32' finaliser on uint32 (multiplications wrap mod 2**32)."""
    x = x ^ (x >> 16)
    x = x * tl.full([], 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full([], 0x846CA68B, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def _row_uniform(seed_key, row_key, position, model):
    """The row's uniform ``(2j + 1) / 2**24`` (23 bits of the hash of the pre-hashed seed, the row key and
    position (int64) and the model id), exact in float32: ``switchkd.reference.row_uniform``."""
    k = _mix32(tl.cast(seed_key, tl.uint32) ^ tl.cast(row_key, tl.uint32))  # tl.cast: also for int constants
    k = _mix32(k ^ tl.cast(position, tl.uint32))
    k = _mix32(k ^ (model + 1))
    return ((k >> 9).to(tl.float32) * 2.0 + 1.0) * 5.9604644775390625e-08


@triton.jit
def _cdf_tile(p, start, running, u, token, last, BLOCK: tl.constexpr):
    """One tile of an inverse-CDF scan, at column ``start``. ``running`` is the probability before the tile; returns
    it after the tile, the token (the first column with ``p > 0`` where the running sum passes ``u``, or ``token``
    when no column of the tile does) and the last column with ``p > 0`` so far (the token when rounding leaves the
    whole scan at or below ``u``)."""
    cols = start + tl.arange(0, BLOCK)
    tile = tl.sum(p, 0)
    last = tl.maximum(last, tl.max(tl.where(p > 0, cols, NO_TOKEN), 0))
    if running + tile > u:
        passed = (tl.cumsum(p, 0) + running > u) & (p > 0)
        hit = tl.min(tl.where(passed, cols, 2147483647), 0)
        token = tl.where(hit < 2147483647, hit, token)
    return running + tile, token, last


@triton.jit
def _scan_result(token, last):
    """The scan's column: its token, else its last column with ``p > 0``, else 0 (a row without probability)."""
    return tl.maximum(tl.where(token == NO_TOKEN, last, token), 0)


@triton.jit
def _argmax_update(score, start, best, best_col):
    """Fold the tile starting at column ``start`` into a running (max, argmax); ties keep the lowest column."""
    tile_best, tile_arg = tl.max(score, 0, return_indices=True, return_indices_tie_break_left=True)
    take = tile_best > best
    return tl.where(take, tile_best, best), tl.where(take, start + tile_arg, best_col)


@triton.jit
def _sample_kernel(
    x_ptr,  # [B, V] logits (bf16 ones maybe as int32 words: ``switchkd.ops.spec.kernel_rows``)
    positions_ptr,  # [B] int64 generated-token index (read unless POS_SCALAR)
    row_keys_ptr,  # [B] int64 stable sequence ids (read unless KEYS_ARANGE)
    tokens_ptr,  # [B] int64 output: sampled token
    x_stride, V, position, seed_key, scale2,
    MODEL: tl.constexpr, POS_SCALAR: tl.constexpr, KEYS_ARANGE: tl.constexpr, GREEDY: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One inverse-CDF sample per row with the uniform of ``switchkd.reference.sample`` (argmax when GREEDY):
    a sweep for the softmax statistics, then a scan that stops loading once the token is found."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_stride
    if GREEDY:
        best = -float("inf")
        token = 0
        for start in range(0, V, BLOCK):
            best, token = _argmax_update(_partial_tile(x_row, start, V, KEEP, BLOCK).to(tl.float32), start, best,
                                         token)
    else:
        pos = position if POS_SCALAR else tl.load(positions_ptr + row)
        u = _row_uniform(seed_key, row if KEYS_ARANGE else tl.load(row_keys_ptr + row), pos, MODEL)
        m, z, _top, _col, _m, _z, _best, _best_col = _row_stats(x_row, x_row, 0, V, scale2, NO_SAMPLE, NO_SAMPLE, False,
                                                                BLOCK)
        lz = tl.log2(z)
        running = tl.zeros([], tl.float32)
        token = tl.full([], NO_TOKEN, tl.int32)
        last = tl.full([], NO_TOKEN, tl.int32)
        for start in range(0, V, BLOCK):
            if token == NO_TOKEN:
                x2 = _partial_tile(x_row, start, V, KEEP, BLOCK).to(tl.float32) * scale2
                _l2p, p = _log2_probs(x2, m, lz)
                running, token, last = _cdf_tile(p, start, running, u, token, last, BLOCK)
        token = _scan_result(token, last)
    tl.store(tokens_ptr + row, token.to(tl.int64))
