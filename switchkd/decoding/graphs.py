"""Static-shape decoding blocks, replayed from CUDA graphs on CUDA.

Every step of a block reads fixed-shape device buffers. The active rows of a block run in ``L``
*lanes*, ``L`` the next power of two (padding lanes run a dummy row that keeps nothing and writes
its keys/values into each pool's scratch block), so the batch shrinks as rows finish; block tables
have a fixed width; the block managers' ``prepare`` output for the whole block (``k`` slots and
positions per lane, the block table) and the lanes' row map are copied into preallocated device
buffers once per block. Two kinds of step, each one CUDA graph per lane count:

- ``student``: one student token (forward, logits into the block's buffer, the draft sampled with
  ``switchkd.sample``); a device cursor says which of the ``k`` columns it fills.
- ``score`` (one per draft length ``k``): the teacher forward over ``[pending, d_0 .. d_{k-2}]``, the
  fused switch step, and the commit that writes the chosen tokens into the per-row state.

The host waits once per block, to read how many tokens each row kept. On CPU the same steps run
without capture (this is how the tests check them against the eager path).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field

import torch

from ..ops.switch_step import sample
from .kvcache import ATTENTION_NAME, PagedBatch, PagedKVCache
from .ladder import ModelPair, decide, read_flags
from .state import DecodeState, DecodeStats, Request, commit


def bucket(n: int) -> int:
    """The next power of two: lane counts and block-table widths come in these sizes."""
    return 1 << (n - 1).bit_length()


class BlockMeta:
    """One cache's metadata for a block, at fixed shapes: a pinned host copy and the device buffers."""

    def __init__(self, cache: PagedKVCache, lanes: int, k: int, width: int, device):
        self.cache = cache
        sizes = (lanes * k, lanes * k, lanes * width)
        self.defaults = torch.cat([  # padding: the scratch block's slots, position 0
            (cache.scratch_block * cache.block_size + torch.arange(k) % cache.block_size).repeat(lanes),
            torch.zeros(lanes * k, dtype=torch.int64), torch.full((lanes * width,), cache.scratch_block)])
        self.host = torch.empty(self.defaults.shape, dtype=torch.int64, pin_memory=torch.device(device).type == "cuda")
        self.device = torch.empty_like(self.defaults, device=device)
        shapes = ((lanes, k), (lanes, k), (lanes, width))
        self.host_views = [x.view(s) for x, s in zip(self.host.split(sizes), shapes, strict=True)]
        self.slots, self.positions, self.table = (x.view(s) for x, s in zip(self.device.split(sizes), shapes,
                                                                             strict=True))

    def stage(self, ids: list[int], k: int):
        """Append ``k`` tokens to sequence ``ids[i]`` (lane ``i``) and copy the metadata to the device (no sync)."""
        slots, _, positions, table, _ = self.cache.manager.prepare(ids, [k] * len(ids), table_width=self.table.shape[1],
                                                                   pad_block=self.cache.scratch_block)
        self.host.copy_(self.defaults)
        host_slots, host_positions, host_table = self.host_views
        host_slots[: len(ids), :k] = torch.from_numpy(slots).view(len(ids), k)
        host_positions[: len(ids), :k] = torch.from_numpy(positions)
        host_table[: len(ids)] = torch.from_numpy(table)
        self.device.copy_(self.host, non_blocking=True)

    def batch(self, columns) -> PagedBatch:
        """Metadata of a forward over the block's ``columns`` (a slice, or a ``[1]`` index tensor)."""
        if isinstance(columns, torch.Tensor):
            slots, positions = self.slots.index_select(1, columns), self.positions.index_select(1, columns)
        else:
            slots, positions = self.slots[:, columns], self.positions[:, columns]
        lengths = (positions[:, -1] + 1).to(torch.int32)
        return PagedBatch(self.cache, slots.reshape(-1), None, positions, self.table, lengths)


class Lanes:
    """The buffers and graphs of steps over ``L`` lanes; lane ``i`` runs state row ``rows[i]``."""

    def __init__(self, pair: ModelPair, lanes: int, k: int, width: int, device):
        def ints(*shape):
            return torch.zeros(shape, dtype=torch.int64, device=device)

        self.rows_host = torch.empty(lanes, dtype=torch.int64, pin_memory=torch.device(device).type == "cuda")
        self.rows = ints(lanes)
        self.teacher = BlockMeta(pair.teacher_cache, lanes, k, width, device)
        self.student = BlockMeta(pair.student_cache, lanes, k, width, device)
        self.feed = ints(lanes)  # the token the next student step reads
        self.cursor = ints(1)  # the block column the next student step fills
        self.drafts = ints(lanes, k)
        self.flags = ints(lanes + 1, 2)  # commit's output (see state.commit)
        self.student_logits: torch.Tensor | None = None  # [L, k, V], allocated by the first student step
        self.graphs: dict = {}

    def stage(self, active: list[int], dummy: int):
        """Map lanes to the active rows (the rest to ``dummy``); copy the map to the device (no sync)."""
        self.rows_host.fill_(dummy)
        self.rows_host[: len(active)] = torch.tensor(active)
        self.rows.copy_(self.rows_host, non_blocking=True)


@dataclass
class Workspace:
    """The per-row state of one (batch bucket, table width, request) combination and its lanes."""

    state: DecodeState  # rows: the bucket, then one dummy row
    width: int  # block-table width
    lanes: dict[int, Lanes] = field(default_factory=dict)


class StaticDecoder:
    """Runs decoding blocks at static shapes; captures and replays them as CUDA graphs on CUDA."""

    def __init__(self, pair: ModelPair):
        self.pair = pair
        self.device = pair.student.device
        self.capture = self.device.type == "cuda" and pair.teacher.device == self.device
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None
        self.workspaces: dict[tuple, Workspace] = {}  # least recently used first
        self.weights: tuple[int, ...] = ()  # the addresses the graphs read the models' tensors from
        self.request: Request | None = None
        self.ws: Workspace | None = None
        self.lanes: Lanes | None = None  # the current block's
        self.warming = False  # the last block captured a graph (its time says nothing about the draft length)
        self.failed = False  # a capture failed: this request ends uncaptured, later ones take the eager path

    def start(self, request: Request):
        """Begin a request; graphs captured over weights that have since moved (``.to()``, a reloaded or
        re-tied tensor) would read freed memory, so they are dropped and captured again. Parameters only: some
        rotary embeddings reassign a buffer on every forward."""
        self.request = request
        weights = tuple(p.data_ptr() for model in (self.pair.teacher, self.pair.student) for p in model.parameters())
        if weights != self.weights:
            self.workspaces.clear()
            self.weights = weights

    def new_state(self, ids: list[int], prompts: list[list[int]]) -> DecodeState:
        """Pick (or build) the workspace for this sub-batch and load its state."""
        request, block_size = self.request, self.pair.student_cache.block_size
        width = bucket(math.ceil((max(map(len, prompts)) + request.max_new_tokens + request.draft_len) / block_size))
        device = self.device.type
        autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None  # baked in too
        key = (bucket(len(prompts)), width, request, autocast)
        ws = self.workspaces.pop(key, None)
        if ws is None:
            if len(self.workspaces) >= 8:  # evict the least recently used, not every captured graph
                del self.workspaces[next(iter(self.workspaces))]
            ws = self._workspace(key[0], width)
        self.ws = self.workspaces[key] = ws
        self.ws.state.load_(ids, prompts, request)
        return self.ws.state

    def _workspace(self, rows: int, width: int) -> Workspace:
        return Workspace(DecodeState.empty(rows + 1, self.request, self.device, self.pair.teacher_head()), width)

    def block(self, state: DecodeState, ids: list[int], active: list[int], k: int,
              stats: DecodeStats) -> list[list[int]]:
        """Stage the block's metadata, replay ``k`` student steps and one scoring step; one host sync."""
        ws, self.warming = self.ws, False
        count = bucket(len(active))
        if count not in ws.lanes:
            ws.lanes[count] = Lanes(self.pair, count, self.request.draft_len, ws.width, self.device)
        lanes = self.lanes = ws.lanes[count]
        start = time.perf_counter()
        lanes.stage(active, dummy=state.keys.shape[0] - 1)
        for meta in (lanes.teacher, lanes.student):
            meta.stage([ids[r] for r in active], k)
        stats.bookkeeping_seconds += time.perf_counter() - start
        torch.index_select(state.pending, 0, lanes.rows, out=lanes.feed)
        lanes.cursor.zero_()
        for _ in range(k):
            self._run("student", self._student_step)
        self._run(("score", k), lambda: self._score_step(k))
        stats.student_forwards += k
        stats.teacher_forwards += 1
        return read_flags(lanes.flags)[: len(active)]

    def _student_step(self):
        lanes, state, request = self.lanes, self.ws.state, self.request
        batch = lanes.student.batch(lanes.cursor)
        out = self.pair.student(input_ids=lanes.feed[:, None], position_ids=batch.positions, use_cache=False,
                                logits_to_keep=1, **{ATTENTION_NAME: batch})
        logits = self.pair.tokens_only(out.logits[:, -1])  # a view: the graph slices at a fixed shape
        if lanes.student_logits is None:
            lanes.student_logits = logits.new_empty(lanes.drafts.shape + logits.shape[-1:])
        lanes.student_logits.index_copy_(1, lanes.cursor, logits[:, None])
        draft = sample(logits, state.generated[lanes.rows] + lanes.cursor, temperature=request.temperature,
                       seed=request.seed, row_keys=state.keys[lanes.rows])
        lanes.drafts.index_copy_(1, lanes.cursor, draft[:, None])
        lanes.feed.copy_(draft)
        lanes.cursor.add_(1)

    def _score_step(self, k: int):
        lanes, state = self.lanes, self.ws.state
        batch = lanes.teacher.batch(slice(0, k))
        inputs = torch.cat([state.pending[lanes.rows, None], lanes.drafts[:, : k - 1]], 1)
        keep = state.teacher_hidden is not None
        out = self.pair.teacher(input_ids=inputs, position_ids=batch.positions, use_cache=False, logits_to_keep=0,
                                output_hidden_states=keep, **{ATTENTION_NAME: batch})
        logits = self.pair.tokens_only(out.logits)
        step = decide(lanes.student_logits[:, :k], logits, lanes.drafts[:, :k], state, lanes.rows, self.request)
        lanes.flags.copy_(commit(state, lanes.rows, step, k, out.hidden_states[-1] if keep else None))

    def _run(self, key, step):
        """Replay ``key``'s graph; on its first use run ``step`` eagerly (warm-up), then capture it."""
        graphs = self.lanes.graphs
        if key in graphs:
            graphs[key].replay()
            return
        if not self.capture:
            step()
            return
        self.warming = True
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        stream = torch.cuda.current_stream()
        stream.wait_stream(side)
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                step()
        except Exception as err:  # a model or op that cannot be captured: keep stepping eagerly
            # A failing capture_end skips restoring the stream (later work would run on the capture stream) and
            # leaves the CUDA generators in capture mode (every later random op would raise).
            torch.cuda.set_stream(stream)
            _leave_rng_capture_mode(self.device)
            warnings.warn(f"switchkd: CUDA-graph capture failed ({type(err).__name__}: {err}); "
                          "decoding continues with eager steps", stacklevel=2)
            self.capture, self.failed = False, True
            return
        graphs[key] = graph


def _leave_rng_capture_mode(device: torch.device) -> None:
    """Take the CUDA generators out of the capture mode a failed capture left them in: a trivial capture runs
    the capture_begin / capture_end pair that the failed one did not finish (same generator state, so graphs
    captured earlier stay in step with eager random ops)."""
    with torch.cuda.device(device):
        graph, side = torch.cuda.CUDAGraph(), torch.cuda.Stream()
        with torch.cuda.graph(graph, stream=side):  # capture on (and make current) a fresh side stream
            torch.zeros(1, device=device).add_(1)
        del graph
