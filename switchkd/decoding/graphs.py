"""Static-shape decoding blocks, replayed from CUDA graphs on CUDA.

Every step of a block reads fixed-shape device buffers: the batch is padded to a power of two
(padding rows and finished rows write their keys/values into each pool's scratch block and keep
nothing), block tables have a fixed width, and the block managers' ``prepare`` output for the whole
block (``k`` slots and positions per row, the block table) is copied into preallocated buffers once
per block. Three kinds of step, each one CUDA graph:

- ``student``: one student token (forward, logits into the block's buffer, the draft sampled with
  ``switchkd.sample``); a device cursor says which of the ``k`` columns it fills.
- ``score`` (one per draft length ``k``): the teacher forward over ``[pending, d_0 .. d_{k-2}]``, the
  fused switch step, and the commit that writes the kept tokens into the per-row state.

The host waits once per block, to read how many tokens each row kept. On CPU the same steps run
without capture (this is how the tests check them against the eager path).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch

from ..ops.switch_step import sample
from .kvcache import ATTENTION_NAME, PagedBatch, PagedKVCache
from .ladder import ModelPair, decide, read_flags
from .state import DecodeState, DecodeStats, Request, commit


def bucket(n: int) -> int:
    """The padded batch size: the next power of two."""
    return 1 << (n - 1).bit_length()


class BlockMeta:
    """One cache's metadata for a block, at fixed shapes: a pinned host copy and the device buffers."""

    def __init__(self, cache: PagedKVCache, rows: int, k: int, width: int, device):
        self.cache, self.k = cache, k
        sizes = (rows * k, rows * k, rows * width)
        self.defaults = torch.cat([  # padding: the scratch block's slots, position 0
            (cache.scratch_block * cache.block_size + torch.arange(k) % cache.block_size).repeat(rows),
            torch.zeros(rows * k, dtype=torch.int64), torch.full((rows * width,), cache.scratch_block)])
        self.host = torch.empty(self.defaults.shape, dtype=torch.int64, pin_memory=torch.device(device).type == "cuda")
        self.device = torch.empty_like(self.defaults, device=device)
        shapes = ((rows, k), (rows, k), (rows, width))
        self.host_views = [x.view(s) for x, s in zip(self.host.split(sizes), shapes, strict=True)]
        self.slots, self.positions, self.table = (x.view(s) for x, s in zip(self.device.split(sizes), shapes,
                                                                             strict=True))

    def stage(self, ids: list[int], active: list[int], k: int):
        """Append ``k`` tokens to each active row's sequence and copy the metadata to the device (no sync)."""
        manager = self.cache.manager
        slots, _, positions, table, _ = manager.prepare([ids[r] for r in active], [k] * len(active),
                                                        table_width=self.table.shape[1],
                                                        pad_block=self.cache.scratch_block)
        self.host.copy_(self.defaults)
        rows = torch.tensor(active)
        host_slots, host_positions, host_table = self.host_views
        host_slots[rows, :k] = torch.from_numpy(slots).view(len(active), k)
        host_positions[rows, :k] = torch.from_numpy(positions)
        host_table[rows] = torch.from_numpy(table)
        self.device.copy_(self.host, non_blocking=True)

    def batch(self, columns) -> PagedBatch:
        """Metadata of a forward over the block's ``columns`` (a slice, or a ``[1]`` index tensor)."""
        if isinstance(columns, torch.Tensor):
            slots, positions = self.slots.index_select(1, columns), self.positions.index_select(1, columns)
        else:
            slots, positions = self.slots[:, columns], self.positions[:, columns]
        lengths = (positions[:, -1] + 1).to(torch.int32)
        return PagedBatch(self.cache, slots.reshape(-1), None, positions, self.table, lengths)


@dataclass
class Workspace:
    """The fixed-shape buffers and graphs of one (padded batch, table width, request) combination."""

    state: DecodeState
    teacher: BlockMeta
    student: BlockMeta
    rows: torch.Tensor  # [R] arange: every row takes part in every step
    feed: torch.Tensor  # [R] int64 the token the next student step reads
    cursor: torch.Tensor  # [1] int64 the block column the next student step fills
    drafts: torch.Tensor  # [R, k_max] int64
    flags: torch.Tensor  # [R + 1, 2] int64 commit's output (see state.commit)
    student_logits: torch.Tensor | None = None  # [R, k_max, V], allocated by the first student step
    graphs: dict = field(default_factory=dict)


class StaticDecoder:
    """Runs decoding blocks at static shapes; captures and replays them as CUDA graphs on CUDA."""

    def __init__(self, pair: ModelPair):
        self.pair = pair
        self.device = pair.student.device
        self.capture = self.device.type == "cuda" and pair.teacher.device == self.device
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None
        self.workspaces: dict[tuple, Workspace] = {}
        self.request: Request | None = None
        self.ws: Workspace | None = None
        self.warming = False  # the last block captured a graph (its time says nothing about the draft length)
        self.failed = False  # a capture failed: this request ends uncaptured, later ones take the eager path

    def start(self, request: Request):
        self.request = request

    def new_state(self, ids: list[int], prompts: list[list[int]]) -> DecodeState:
        """Pick (or build) the workspace for this sub-batch and load its state."""
        request, block_size = self.request, self.pair.student_cache.block_size
        width = 1 << (math.ceil((max(map(len, prompts)) + request.max_new_tokens + request.draft_len)
                                / block_size) - 1).bit_length()
        key = (bucket(len(prompts)), width, request)
        if key not in self.workspaces:
            if len(self.workspaces) >= 8:
                self.workspaces.clear()
            self.workspaces[key] = self._workspace(key[0], width)
        self.ws = self.workspaces[key]
        self.ws.state.load_(ids, prompts, request)
        return self.ws.state

    def _workspace(self, rows: int, width: int) -> Workspace:
        request, device, k = self.request, self.device, self.request.draft_len
        state = DecodeState.empty(rows, request.max_new_tokens + k, len(request.eos), device)

        def ints(*shape):
            return torch.zeros(shape, dtype=torch.int64, device=device)

        return Workspace(state, BlockMeta(self.pair.teacher_cache, rows, k, width, device),
                         BlockMeta(self.pair.student_cache, rows, k, width, device),
                         torch.arange(rows, device=device), ints(rows), ints(1), ints(rows, k), ints(rows + 1, 2))

    def block(self, state: DecodeState, ids: list[int], active: list[int], k: int,
              stats: DecodeStats) -> list[list[int]]:
        """Stage the block's metadata, replay ``k`` student steps and one scoring step; one host sync."""
        ws, self.warming = self.ws, False
        for meta in (ws.teacher, ws.student):
            meta.stage(ids, active, k)
        ws.feed.copy_(state.pending)
        ws.cursor.zero_()
        for _ in range(k):
            self._run("student", self._student_step)
        self._run(("score", k), lambda: self._score_step(k))
        stats.student_forwards += k
        stats.teacher_forwards += 1
        flags = read_flags(ws.flags)
        return [flags[r] for r in active]

    def _student_step(self):
        ws, request = self.ws, self.request
        batch = ws.student.batch(ws.cursor)
        out = self.pair.student(input_ids=ws.feed[:, None], position_ids=batch.positions, use_cache=False,
                                logits_to_keep=1, **{ATTENTION_NAME: batch})
        logits = out.logits[:, -1]
        if ws.student_logits is None:
            ws.student_logits = logits.new_empty(ws.drafts.shape + logits.shape[-1:])
        ws.student_logits.index_copy_(1, ws.cursor, logits[:, None])
        draft = sample(logits, ws.state.generated + ws.cursor, temperature=request.temperature, seed=request.seed,
                       row_keys=ws.state.keys)
        ws.drafts.index_copy_(1, ws.cursor, draft[:, None])
        ws.feed.copy_(draft)
        ws.cursor.add_(1)

    def _score_step(self, k: int):
        ws = self.ws
        batch = ws.teacher.batch(slice(0, k))
        inputs = torch.cat([ws.state.pending[:, None], ws.drafts[:, : k - 1]], 1)
        logits = self.pair.teacher(input_ids=inputs, position_ids=batch.positions, use_cache=False,
                                   logits_to_keep=0, **{ATTENTION_NAME: batch}).logits
        step = decide(ws.student_logits[:, :k], logits, ws.state, ws.rows, self.request)
        ws.flags.copy_(commit(ws.state, ws.rows, step, k))

    def _run(self, key, step):
        """Replay ``key``'s graph; on its first use run ``step`` eagerly (warm-up), then capture it."""
        graphs = self.ws.graphs
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
        torch.cuda.current_stream().wait_stream(side)
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                step()
        except Exception as err:  # a model or op that cannot be captured: keep stepping eagerly
            warnings.warn(f"switchkd: CUDA-graph capture failed ({type(err).__name__}: {err}); "
                          "decoding continues with eager steps", stacklevel=2)
            self.capture, self.failed = False, True
            return
        graphs[key] = graph
