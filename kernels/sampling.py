"""Counter-based Gumbel noise, bit-identical to ``switchkd.reference.uniform_noise``."""

import triton
import triton.language as tl


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
    k = _mix32(seed_key.to(tl.uint32) ^ row_key.to(tl.uint32))
    k = _mix32(k ^ position.to(tl.uint32))
    return _mix32(k ^ (model + 1))


@triton.jit
def _gumbel2(key, cols):
    """Base-2 Gumbel noise ``-log2(-log2(u))`` for vocabulary columns ``cols``; u has 23 random bits."""
    h = _mix32(key ^ (cols.to(tl.uint32) * tl.full([], 0x9E3779B9, tl.uint32)))
    u = ((h >> 9).to(tl.float32) * 2.0 + 1.0) * 5.9604644775390625e-08  # (2j + 1) / 2**24
    return -tl.log2(-tl.log2(u))

