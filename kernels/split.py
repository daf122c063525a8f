"""Split-vocabulary machinery shared by the switch step and kd_loss (flash-decoding's split-KV idea).

A ``[R, V]`` pair of logit rows is cut into ``S`` column chunks; the grid is ``(R, S)`` so that one row
fills the GPU. Phase 1 (:func:`_stats_kernel`) writes each chunk's base-2 softmax statistics ``(m, z)``
(and, for greedy decoding, its argmax); later phases combine the ``S`` entries of
their row in registers (:func:`_combine_stats`) and sweep their own chunk again. No host sync: every
combine happens on the device, at the start of the next launch.

Tile size, warps and stages come from ``triton.autotune`` (keyed on V, the chunk, the loss kind or
sampling mode, and the dtypes); in the CPU interpreter there is a single config. The number of splits
is chosen on the host (:func:`split_plan`) because every phase must agree on it.
"""

from __future__ import annotations

import functools
import os

import triton
import triton.language as tl

from switchkd.ops.spec import ceil_div, next_pow2
from switchkd.ops.spec import triton_interpreted as interpreted

from .divergence import (
    KEEP,
    LANE_GROUP,
    NEG_BIG,
    READ_AGAIN,
    _grad_sweep,
    _nan_unless,
    _pair,
    _pair_ahead,
    _partial_tile,
    _zero_sweep,
)

# Modes of the statistics sweep: statistics only, or also each chunk's argmax (greedy decoding).
NO_SAMPLE: tl.constexpr = tl.constexpr(0)
GREEDY: tl.constexpr = tl.constexpr(2)

STATS: tl.constexpr = tl.constexpr(4)  # per split: m_s, z_s, m_t, z_t (base 2)
SUMS: tl.constexpr = tl.constexpr(4)  # per split: loss, sum(p_S g), jsd, teacher rank of the student token
MAX_SPLITS = 128
COL_ALIGN = 128  # chunk boundaries fall on multiples of this many columns
TRIP_ALIGN = 2048  # or of this many, where that keeps the split count: whole trips of every sweep (split_plan)


def gpu_tile_configs():
    """Every config the autotuner may pick on a GPU (the ahead-of-time compile builds all of them): 8 or 4
    columns per thread. ``maxnreg`` lets ptxas use the registers a tile needs (left alone, it spills a
    few bytes to save registers), up to what the block's threads can get on one SM."""
    return [
        triton.Config({"BLOCK": 1024}, num_warps=4, num_stages=2, maxnreg=255),
        triton.Config({"BLOCK": 2048}, num_warps=8, num_stages=2, maxnreg=255),
        triton.Config({"BLOCK": 1024}, num_warps=8, num_stages=2, maxnreg=128),
        triton.Config({"BLOCK": 2048}, num_warps=16, num_stages=2, maxnreg=128),
    ]


def row_kernel_configs():
    """Configs of the per-row kd_loss kernel: the first two as :func:`gpu_tile_configs`, then two capped at 64 and
    80 registers, so that 24–32 warps per SM keep more loads in flight. On an H200 (kd_loss jsd 8192 x 128256 bf16,
    benchmarks/RESULTS.md) they took 3.57 and 3.59 ms against 4.04 at 255; persistent grids and programs sharing a
    row took 4.5–6.6 ms and are gone. The capped ones need the JIT's 16-byte vector loads (:func:`needs_alignment`)."""
    return gpu_tile_configs()[:2] + [triton.Config({"BLOCK": 2048}, num_warps=8, num_stages=2, maxnreg=cap)
                                     for cap in (64, 80)]


def switch_step_configs():
    """Configs of the switch step's phase 2 and of its one launch: those of :func:`gpu_tile_configs` that leave an SM
    room for more than one program (a 16-warp program at 128 registers takes the whole register file, and spilled
    8 bytes for srkl with triton 3.6)."""
    return gpu_tile_configs()[:3]


ALIGNED_ARGS = ("V", "s_stride", "t_stride", "grad_stride")  # integers a capped config needs divisible by 16


def needs_alignment(config) -> bool:
    """Whether ``config`` is capped below 128 registers: it fits them only with 16-byte vector loads, which the JIT
    emits when the pointers, V and the row strides are multiples of 16 (its divisibility specialisation); otherwise
    it would spill, so the autotuner leaves it out there (:func:`prune_tiles`)."""
    return config.maxnreg is not None and config.maxnreg < 128


def _aligned(args) -> bool:
    return (all(args[name] % 16 == 0 for name in ALIGNED_ARGS if name in args)
            and all(value.data_ptr() % 16 == 0 for value in args.values() if hasattr(value, "data_ptr")))


def tile_configs(gpu_configs=gpu_tile_configs):
    """The autotuner's configs: the GPU list; one config in the interpreter (tests swap in each GPU one)
    and with ``SWITCHKD_AUTOTUNE=0`` (GPU test runs: no tuning pass per new shape)."""
    configs = gpu_configs()
    if interpreted():
        return [triton.Config(configs[0].kwargs, num_warps=4)]
    if os.environ.get("SWITCHKD_AUTOTUNE", "1") == "0":
        return configs[1:2]
    return configs


def prune_tiles(configs, nargs, **kwargs):
    """Drop tiles wider than the chunk (keeping the narrowest when all are), and the register-capped configs
    when the arguments are not aligned for 16-byte vector loads (:func:`needs_alignment`)."""
    args = {**nargs, **kwargs}
    if not _aligned(args):
        configs = [c for c in configs if not needs_alignment(c)] or configs
    width = max(1024, next_pow2(args.get("chunk", 1)))
    kept = [c for c in configs if c.kwargs["BLOCK"] <= width]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK"])]


class InPlaceGradGuard:
    """Autotuner hooks for a kernel that may write its gradient over the student logits (``grad_ptr`` is
    ``s_ptr``, as ``fused_linear_kd_loss`` does): the logits are saved before each timing run and put back
    after it, so every config is timed, and the chosen one run, on the real logits. No copy otherwise."""

    def __init__(self):
        self.saved = None

    def before(self, kwargs, reset_only=False):
        logits, grad = kwargs["s_ptr"], kwargs["grad_ptr"]
        if not reset_only and grad.data_ptr() == logits.data_ptr():
            self.saved = logits.clone()

    def after(self, kwargs, exception=None):
        if self.saved is not None:
            kwargs["s_ptr"].copy_(self.saved)
            self.saved = None


def autotuned(key, writes_grad=False, gpu_configs=gpu_tile_configs, reset_to_zero=None):
    """``triton.autotune`` with switchkd's tile configs and pruning, keyed on ``key`` (+ dtypes);
    ``writes_grad``: the kernel may write ``grad_ptr`` in place of ``s_ptr`` (see :class:`InPlaceGradGuard`);
    ``reset_to_zero``: arguments zeroed before each timing run and after the tuning (barrier counters)."""
    hooks = {}
    if writes_grad:
        guard = InPlaceGradGuard()
        hooks = {"pre_hook": guard.before, "post_hook": guard.after}
    return triton.autotune(configs=tile_configs(gpu_configs), key=key, reset_to_zero=reset_to_zero,
                           prune_configs_by={"early_config_prune": prune_tiles}, **hooks)


@functools.cache
def _sm_count(index: int) -> int:
    import torch

    return torch.cuda.get_device_properties(index).multi_processor_count


def _is_cuda(device) -> bool:
    return getattr(device, "type", device) == "cuda"


def multiprocessors(device) -> int:
    """The device's multiprocessors (4 stand-ins in the interpreter)."""
    if _is_cuda(device):
        return _sm_count(device.index if device.index is not None else 0)
    return 4


def resident_splits(device) -> int:
    """Most programs per row for a kernel whose programs of a row wait for one another (the switch step in one
    launch): they must all be resident at once, and one per multiprocessor is what every config leaves room for (the
    widest takes 250 registers x 8 warps when V is not a multiple of 16, tests/aot_compile.py). No bound in the
    interpreter, which runs such a kernel's halves as two launches."""
    return multiprocessors(device) if _is_cuda(device) else MAX_SPLITS


def split_plan(rows: int, vocab: int, device, splits: int | None = None, programs_per_sm: int = 2,
               max_splits: int = MAX_SPLITS) -> tuple[int, int]:
    """``(n_splits, chunk)``: enough programs for two per multiprocessor (8 in the interpreter), each chunk at least
    1024 columns (256 interpreted) and a multiple of 128, or of TRIP_ALIGN where that leaves the count unchanged (at
    V = 128256 and B = 256: 16384 columns, 16 whole tiles, instead of 16128, 15.75); with ``programs_per_sm`` above 2,
    more splits (a power of 2), up to that many programs per multiprocessor, as long as chunks keep 4 times the
    minimum; never more than ``max_splits``. ``splits`` overrides the count (tests), which the cap and the 128-column
    alignment may then lower.

    The switch step asks for 8, its fastest on an H200 at B = 32 and 256 (benchmarks/RESULTS.md, probe F); kd_loss
    keeps 2, so that its per-row kernel takes every batch of two rows per multiprocessor or more."""
    if splits is None:
        target = multiprocessors(device)
        min_chunk = 1024 if _is_cuda(device) else 256
        splits = min(next_pow2(ceil_div(2 * target, max(rows, 1))), vocab // min_chunk)
        many = next_pow2(ceil_div(programs_per_sm * target, max(rows, 1)))
        longest = next_pow2(vocab // (4 * min_chunk) + 1) // 2  # a power of 2: whole tiles per chunk
        splits = max(splits, min(many, longest))
    splits = max(1, min(splits, max_splits, MAX_SPLITS))
    per_split = ceil_div(vocab, splits)
    chunk = ceil_div(per_split, COL_ALIGN) * COL_ALIGN
    whole_trips = ceil_div(per_split, TRIP_ALIGN) * TRIP_ALIGN
    if ceil_div(vocab, whole_trips) == ceil_div(vocab, chunk):
        chunk = whole_trips  # as many programs, and only a row's last chunk ends in a partial trip
    return ceil_div(vocab, chunk), chunk


@triton.jit
def _stats_start(lo, BLOCK: tl.constexpr):
    """Empty running statistics: per group max and sum, per column best logit and its column."""
    return (tl.full([BLOCK // LANE_GROUP], NEG_BIG, tl.float32), tl.zeros([BLOCK // LANE_GROUP], dtype=tl.float32),
            tl.full([BLOCK], -float("inf"), tl.float32), tl.zeros([BLOCK], dtype=tl.int32) + lo)


@triton.jit
def _stats_tile(x, cols, scale2, m, z, best, col, SAMPLE: tl.constexpr, BLOCK: tl.constexpr, x2=None):
    """Fold one tile of raw logits ``x`` (-inf past the end) into running statistics, or two with ``x2`` (at ``cols +
    BLOCK``): a thread's group then takes its columns of both, so the rescale is one exp2 per group and trip, not per
    tile (MUFU per logit pair 2.25 -> 2.125). The max is taken on the raw logits (``scale2 > 0``), so each column
    costs one fused multiply-add, one exp2 and one add."""
    x = x.to(tl.float32)
    if x2 is None:
        groups = tl.reshape(x, [BLOCK // LANE_GROUP, LANE_GROUP])
    else:
        x2 = x2.to(tl.float32)
        groups = tl.reshape(tl.join(x, x2), [BLOCK // LANE_GROUP, 2 * LANE_GROUP])
    m, z = _fold_groups(groups, scale2, m, z)
    if SAMPLE == GREEDY:
        best, col = _best_update(x, cols, best, col)
        if x2 is not None:
            best, col = _best_update(x2, cols + BLOCK, best, col)
    return m, z, best, col


@triton.jit
def _fold_groups(groups, scale2, m, z):
    """Running per-group ``(max, sum)`` after the raw columns ``groups`` (one row per group)."""
    m_new = tl.maximum(m, tl.max(groups, 1) * scale2)
    return m_new, z * tl.exp2(m - m_new) + tl.sum(tl.exp2(groups * scale2 - m_new[:, None]), 1)


@triton.jit
def _best_update(x, cols, best, col):
    """Per-column running best logit and its column (the earlier tile keeps ties)."""
    take = x > best
    return tl.where(take, x, best), tl.where(take, cols, col)


@triton.jit
def _stats_end(m_s, z_s, best_s, col_s, m_t, z_t, best_t, col_t, hi, GREEDY: tl.constexpr, BLOCK: tl.constexpr):
    """Both rows' ``(m, z, best logit, its column)`` from running statistics, the two rows side by side (``tl.join``)
    in each block reduction: the maxima, then the rescaled sums, so two exchanges through shared memory instead of
    one per row and value; with GREEDY two more for the best logits and their lowest column (ties go to it; ``hi``
    where none matches, a NaN row), else placeholders. Built-in reductions only: a custom combine runs element by
    element in the CPU interpreter."""
    m = tl.join(m_s, m_t)  # [groups, 2]
    m_all = tl.max(m, 0)
    b_s = 0.0
    b_t = 0.0
    c_s = 0
    c_t = 0
    if GREEDY:
        groups: tl.constexpr = BLOCK // LANE_GROUP
        best = tl.join(tl.reshape(best_s, [groups, LANE_GROUP]), tl.reshape(best_t, [groups, LANE_GROUP]))
        col = tl.join(tl.reshape(col_s, [groups, LANE_GROUP]), tl.reshape(col_t, [groups, LANE_GROUP]))
        top = tl.max(tl.max(best, 1), 0)  # [2]
        first = tl.min(tl.min(tl.where(best == top[None, None, :], col, hi), 1), 0)
        b_s, b_t = tl.split(top)
        c_s, c_t = tl.split(first)
    z = tl.sum(tl.join(z_s, z_t) * tl.exp2(m - m_all[None, :]), 0)
    m_s, m_t = tl.split(m_all)
    z_s, z_t = tl.split(z)
    return m_s, z_s, b_s, c_s, m_t, z_t, b_t, c_t


@triton.jit
def _stats_trip(s, t, cols, scale2, m_s, z_s, best_s, col_s, m_t, z_t, best_t, col_t,
                SAMPLE_S: tl.constexpr, SAMPLE_T: tl.constexpr, PAIR: tl.constexpr, BLOCK: tl.constexpr, s2=None,
                t2=None):
    """One trip of :func:`_row_stats` over loaded raw tiles: one per row, or two with ``s2``, ``t2``."""
    m_s, z_s, best_s, col_s = _stats_tile(s, cols, scale2, m_s, z_s, best_s, col_s, SAMPLE_S, BLOCK, s2)
    if PAIR:
        m_t, z_t, best_t, col_t = _stats_tile(t, cols, scale2, m_t, z_t, best_t, col_t, SAMPLE_T, BLOCK, t2)
    return m_s, z_s, best_s, col_s, m_t, z_t, best_t, col_t


@triton.jit
def _row_stats(s_row, t_row, lo, hi, scale2, SAMPLE_S: tl.constexpr, SAMPLE_T: tl.constexpr, PAIR: tl.constexpr,
               BLOCK: tl.constexpr, AHEAD: tl.constexpr = 1):
    """Base-2 softmax statistics ``(m, z = sum 2^(x2 - m))`` of columns ``[lo, hi)`` of the student row and, with
    PAIR, of the teacher row in the same sweep, and with GREEDY the best raw logit and its column (ties go to the
    lowest column; NO_SAMPLE returns placeholders). Returns the student's four values, then the teacher's
    (placeholders without PAIR).

    Columns go in groups of LANE_GROUP adjacent ones, which one thread holds (its vector load): each group keeps
    a running max and sum, rescaled by ``2^(m_old - m_new)`` once per group and tile (not per column), so the loop
    has no cross-thread reduction; the groups are combined once at the end. Whole tiles load a trip ahead of their
    math, both rows at once (AHEAD = 2: two tiles per trip, so two tiles of loads in flight, for a kernel whose other
    phase holds so many registers that few warps share an SM): the sweep would otherwise wait a memory latency per
    trip.
    """
    m_s, z_s, best_s, col_s = _stats_start(lo, BLOCK)
    m_t, z_t, best_t, col_t = _stats_start(lo, BLOCK)
    whole = lo + (hi - lo) // BLOCK * BLOCK
    # the next sweep reads these tiles again: READ_AGAIN keeps them in L2
    s_next, t_next = _pair(s_row, t_row, lo, lo, whole, READ_AGAIN, BLOCK, PAIR)
    if AHEAD == 2:  # two tiles per trip, both loaded a trip ahead: their registers free up as they convert
        s_second, t_second = _pair(s_row, t_row, lo + BLOCK, lo, whole, READ_AGAIN, BLOCK, PAIR)
        pairs_end = lo + (whole - lo) // (2 * BLOCK) * (2 * BLOCK)
        for start in range(lo, pairs_end, 2 * BLOCK):
            s, t, s2, t2 = s_next, t_next, s_second, t_second
            s_next, t_next = _pair_ahead(s_row, t_row, start + 2 * BLOCK, lo, whole, READ_AGAIN, BLOCK, PAIR)
            s_second, t_second = _pair_ahead(s_row, t_row, start + 3 * BLOCK, lo, whole, READ_AGAIN, BLOCK, PAIR)
            m_s, z_s, best_s, col_s, m_t, z_t, best_t, col_t = _stats_trip(
                s, t, start + tl.arange(0, BLOCK), scale2, m_s, z_s, best_s, col_s, m_t, z_t, best_t, col_t,
                SAMPLE_S, SAMPLE_T, PAIR, BLOCK, s2, t2)
        if pairs_end < whole:  # an odd whole tile, already loaded
            m_s, z_s, best_s, col_s, m_t, z_t, best_t, col_t = _stats_trip(
                s_next, t_next, pairs_end + tl.arange(0, BLOCK), scale2, m_s, z_s, best_s, col_s, m_t, z_t, best_t,
                col_t, SAMPLE_S, SAMPLE_T, PAIR, BLOCK)
    else:
        for start in range(lo, whole, BLOCK):
            s, t = s_next, t_next
            s_next, t_next = _pair_ahead(s_row, t_row, start + BLOCK, lo, whole, READ_AGAIN, BLOCK, PAIR)
            m_s, z_s, best_s, col_s, m_t, z_t, best_t, col_t = _stats_trip(
                s, t, start + tl.arange(0, BLOCK), scale2, m_s, z_s, best_s, col_s, m_t, z_t, best_t, col_t,
                SAMPLE_S, SAMPLE_T, PAIR, BLOCK)
    if whole < hi:
        s = _partial_tile(s_row, whole, hi, KEEP, BLOCK)
        t = _partial_tile(t_row, whole, hi, KEEP, BLOCK) if PAIR else s
        m_s, z_s, best_s, col_s, m_t, z_t, best_t, col_t = _stats_trip(
            s, t, whole + tl.arange(0, BLOCK), scale2, m_s, z_s, best_s, col_s, m_t, z_t, best_t, col_t, SAMPLE_S,
            SAMPLE_T, PAIR, BLOCK)
    return _stats_end(m_s, z_s, best_s, col_s, m_t, z_t, best_t, col_t, hi,
                      (SAMPLE_S == GREEDY) or (SAMPLE_T == GREEDY), BLOCK)


@triton.jit
def _merge(m, z):
    """Row statistics ``(max, log2 of the sum)`` from per-split ``(m, z)`` vectors, and whether the row is
    finite and non-empty."""
    m_all = tl.max(m, 0)
    z_all = tl.sum(z * tl.exp2(m - m_all), 0)
    return m_all, tl.log2(z_all), z_all > 0


@triton.jit
def _combine_stats(
    stats_ptr,  # [R, S, 4] float32 per-split (m_s, z_s, m_t, z_t)
    row, n_splits, SPLITS: tl.constexpr,
):
    """The row's base-2 log-normalisers ``m_s, lz_s, m_t, lz_t`` and validity (False for NaN/+inf or all -inf rows)."""
    k = tl.arange(0, SPLITS)
    mask = k < n_splits
    base = stats_ptr + (row * n_splits + k) * STATS
    m_s, lz_s, ok_s = _merge(tl.load(base, mask=mask, other=NEG_BIG), tl.load(base + 1, mask=mask, other=0.0))
    m_t, lz_t, ok_t = _merge(tl.load(base + 2, mask=mask, other=NEG_BIG), tl.load(base + 3, mask=mask, other=0.0))
    return m_s, lz_s, m_t, lz_t, ok_s & ok_t


@triton.jit
def _sum_splits(sums_ptr, row, n_splits, field, SPLITS: tl.constexpr):
    """Sum over the row's splits of one field of the ``[R, S, 4]`` partial sums."""
    k = tl.arange(0, SPLITS)
    return tl.sum(tl.load(sums_ptr + (row * n_splits + k) * SUMS + field, mask=k < n_splits, other=0.0), 0)


@triton.jit
def _stats_chunk(s_ptr, t_ptr, stats_ptr, cand_ptr, cand_col_ptr, row, split, n_splits, s_stride, t_stride, V, chunk,
                 scale2, SAMPLE: tl.constexpr, SAMPLE_S: tl.constexpr, BLOCK: tl.constexpr, AHEAD: tl.constexpr = 1):
    """Phase 1 of one chunk of one row: store its softmax statistics (one exp2 per logit) and, for greedy decoding,
    each model's argmax candidate (``SAMPLE`` for the teacher, ``SAMPLE_S`` for the student: NO_SAMPLE when its tokens
    are given); AHEAD: tiles loaded ahead (:func:`_row_stats`). Sampled tokens are drawn in the next phase, by inverse
    CDF over these statistics."""
    lo = split * chunk
    hi = tl.minimum(lo + chunk, V)
    m_s, z_s, best_s, col_s, m_t, z_t, best_t, col_t = _row_stats(s_ptr + row * s_stride, t_ptr + row * t_stride, lo,
                                                                   hi, scale2, SAMPLE_S, SAMPLE, True, BLOCK, AHEAD)
    out = row * n_splits + split
    tl.store(stats_ptr + out * STATS, m_s)
    tl.store(stats_ptr + out * STATS + 1, z_s)
    tl.store(stats_ptr + out * STATS + 2, m_t)
    tl.store(stats_ptr + out * STATS + 3, z_t)
    if SAMPLE == GREEDY:
        tl.store(cand_ptr + out * 2, best_s)
        tl.store(cand_ptr + out * 2 + 1, best_t)
        tl.store(cand_col_ptr + out * 2, col_s)
        tl.store(cand_col_ptr + out * 2 + 1, col_t)


@autotuned(key=["V", "chunk", "SAMPLE", "SAMPLE_S"])
@triton.jit
def _stats_kernel(
    s_ptr,  # [R, V] student logits
    t_ptr,  # [R, V] teacher logits
    stats_ptr,  # [R, S, 4] float32 output: per-split (m_s, z_s, m_t, z_t), base 2
    cand_ptr,  # [R, S, 2] float32 output: per-split best logit (student, teacher) when SAMPLE == GREEDY
    cand_col_ptr,  # [R, S, 2] int32 output: its column
    s_stride, t_stride, V, chunk, scale2,
    SAMPLE: tl.constexpr, SAMPLE_S: tl.constexpr, BLOCK: tl.constexpr,
):
    """Phase 1 over a ``(R, S)`` grid (:func:`_stats_chunk`)."""
    _stats_chunk(s_ptr, t_ptr, stats_ptr, cand_ptr, cand_col_ptr, tl.program_id(0).to(tl.int64), tl.program_id(1),
                 tl.num_programs(1), s_stride, t_stride, V, chunk, scale2, SAMPLE, SAMPLE_S, BLOCK)


@autotuned(key=["V", "chunk", "KIND"], writes_grad=True)
@triton.jit
def _grad_kernel(
    s_ptr,  # [R, V] student logits
    t_ptr,  # [R, V] teacher logits
    labels_ptr,  # [R] int64 labels (read only when HAS_LABELS)
    weight_ptr,  # [] float32 gradient scale (read only when HAS_WEIGHT)
    stats_ptr,  # [R, S, 4] float32 per-split softmax statistics
    sums_ptr,  # [R, S, 4] float32 per-split partial sums (field 1: sum(p_S g) in nats)
    grad_ptr,  # [R, V] output: d loss_row / d student logits (may be s_ptr: each tile is read before written)
    s_stride, t_stride, grad_stride, V, chunk, scale2, inv_temp, alpha, beta, ignore_index,
    KIND: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_WEIGHT: tl.constexpr, SPLITS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Last phase for every kind but fkl: ``p_S (g - sum(p_S g)) / T`` over one chunk (zero on ignored rows)."""
    row = tl.program_id(0).to(tl.int64)
    n_splits = tl.num_programs(1)
    lo = tl.program_id(1) * chunk
    hi = tl.minimum(lo + chunk, V)
    grad_row = grad_ptr + row * grad_stride
    keep = True
    if HAS_LABELS:
        keep = tl.load(labels_ptr + row) != ignore_index
    if keep:
        m_s, lz_s, m_t, lz_t, valid = _combine_stats(stats_ptr, row, n_splits, SPLITS)
        g_mean = _sum_splits(sums_ptr, row, n_splits, 1, SPLITS)
        scale = _nan_unless(valid, inv_temp * tl.load(weight_ptr) if HAS_WEIGHT else inv_temp)
        _grad_sweep(s_ptr + row * s_stride, t_ptr + row * t_stride, grad_row, lo, hi, scale2, scale, m_s,
                    lz_s, m_t, lz_t, g_mean, alpha, beta, KIND, BLOCK)
    else:
        _zero_sweep(grad_row, lo, hi, BLOCK)

