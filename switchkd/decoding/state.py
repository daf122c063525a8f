"""Per-row decoding state, the request's settings, the statistics record, and the pure acceptance rule.

Everything here works on device tensors without host syncs, so both the eager and the static-shape
(CUDA-graph) paths share it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..ops.spec import SwitchPolicy, SwitchStep


@dataclass(frozen=True)
class Request:
    """The settings of one ``generate`` call."""

    policy: SwitchPolicy
    max_new_tokens: int
    temperature: float
    seed: int
    eos: tuple[int, ...]  # EOS token ids (empty: none)
    draft_len: int
    adaptive_draft: bool
    teacher_hidden: bool = False  # keep the teacher's last hidden state at every generated token


@dataclass
class DecodeStats:
    """Counters of one request, summed over its sub-batches (``SwitchOutput.stats``)."""

    student_forwards: int = 0
    teacher_forwards: int = 0
    bookkeeping_seconds: float = 0.0  # host time in KV block bookkeeping (allocation, tables, rollback)
    blocks: int = 0  # drafted blocks (one teacher scoring forward each)

    def __iadd__(self, other: DecodeStats) -> DecodeStats:
        self.student_forwards += other.student_forwards
        self.teacher_forwards += other.teacher_forwards
        self.bookkeeping_seconds += other.bookkeeping_seconds
        self.blocks += other.blocks
        return self


@dataclass
class DecodeState:
    """Per-row state of one sub-batch, as device tensors (row ``r`` is sequence ``keys[r]``).

    Each row keeps one *pending* token: the last accepted token, not yet in either cache, so both
    caches hold ``prompt_length - 1 + generated`` tokens of the row between blocks.
    """

    keys: torch.Tensor  # [R] int64 row keys: the noise stream and the KV sequence id
    pending: torch.Tensor  # [R] int64
    generated: torch.Tensor  # [R] int64 tokens generated so far
    remaining: torch.Tensor  # [R] int64 tokens the row may still take; 0 once finished (EOS or budget)
    tokens: torch.Tensor  # [R, W] int64 generated tokens (W = max_new_tokens + draft_len)
    from_teacher: torch.Tensor  # [R, W] bool
    divergence: torch.Tensor  # [R, W] float32, NaN where nothing was generated
    eos: torch.Tensor  # [E] int64 EOS ids
    cached: list[int] = field(default_factory=list)  # host: tokens in each row's caches
    # [R, W, H] the teacher's last hidden state at the position that predicts each generated token, or None
    teacher_hidden: torch.Tensor | None = None

    @classmethod
    def empty(cls, rows: int, request: Request, device, teacher_head: torch.Tensor) -> DecodeState:
        """Zeroed state for ``rows`` rows of ``request`` (room for its tokens and one draft block); ``teacher_head``:
        the teacher's LM-head weight ``[V, H]``, the size and dtype of the hidden states the request may keep."""
        width = request.max_new_tokens + request.draft_len

        def ints(*shape):
            return torch.zeros(shape, dtype=torch.int64, device=device)

        teacher_hidden = None
        if request.teacher_hidden:
            teacher_hidden = teacher_head.new_zeros(rows, width, teacher_head.shape[1], device=device)
        return cls(ints(rows), ints(rows), ints(rows), ints(rows), ints(rows, width),
                   torch.zeros(rows, width, dtype=torch.bool, device=device),
                   torch.full((rows, width), float("nan"), device=device), ints(len(request.eos)),
                   teacher_hidden=teacher_hidden)

    def load_(self, keys: list[int], prompts: list[list[int]], request: Request):
        """Reset in place for a new sub-batch (rows past ``len(prompts)`` are padding, finished from the start)."""
        n = len(prompts)
        host = torch.zeros(3, self.keys.shape[0], dtype=torch.int64)
        host[0, :n] = torch.tensor(keys)
        host[1, :n] = torch.tensor([p[-1] for p in prompts])
        host[2, :n] = request.max_new_tokens
        self.keys.copy_(host[0])
        self.pending.copy_(host[1])
        self.remaining.copy_(host[2])
        self.generated.zero_()
        self.tokens.zero_()
        self.from_teacher.zero_()
        self.divergence.fill_(float("nan"))
        self.eos.copy_(torch.tensor(request.eos, dtype=torch.int64))
        self.cached = [len(p) - 1 for p in prompts]


def first_true(mask: torch.Tensor) -> torch.Tensor:
    """``[R]`` index of the first True of each row of ``mask [R, k]``, ``k`` where there is none."""
    k = mask.shape[1]
    index = torch.arange(k, device=mask.device).expand_as(mask)
    return torch.where(mask, index, k).amin(1)


def accept(tokens: torch.Tensor, from_teacher: torch.Tensor, remaining: torch.Tensor,
           eos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """How many of each row's ``k`` decided tokens to keep, and whether the row is then finished.

    A row keeps its tokens up to and including the first teacher token (the drafts after it were
    conditioned on a student token that was not taken), the first EOS, or its remaining budget.

    Args:
        tokens: ``[R, k]`` int64 decided tokens; from_teacher: ``[R, k]`` bool;
        remaining: ``[R]`` int64 budget (0 = finished row: keeps nothing); eos: ``[E]`` int64 ids.

    Returns:
        ``(keep [R] int64, finished [R] bool)``.
    """
    k = tokens.shape[1]
    eos_at = first_true((tokens[..., None] == eos).any(-1))
    keep = (torch.minimum(first_true(from_teacher), eos_at) + 1).clamp_max(k)
    keep = torch.minimum(keep, remaining)
    finished = (remaining > 0) & ((keep == remaining) | (eos_at < keep))
    return keep, finished


def commit(state: DecodeState, rows: torch.Tensor, step: SwitchStep, k: int,
           hidden: torch.Tensor | None = None) -> torch.Tensor:
    """Write the decided tokens of ``rows`` into ``state`` and advance the rows by the kept ones (in place,
    no host sync).

    Returns ``[R + 1, 2]`` int64: (tokens kept, finished 0/1) per row, then a row whose first entry is 1
    when a kept token's divergence is NaN (non-finite logits): the block's one host read.
    """
    tokens, switched, divergence = (x.view(-1, k) for x in (step.tokens, step.from_teacher, step.divergence))
    remaining = state.remaining[rows]
    keep, finished = accept(tokens, switched, remaining, state.eos)
    generated = state.generated[rows]
    # Columns past the kept tokens (or past a finished row's end) get overwritten later or masked on collection.
    columns = generated[:, None] + torch.arange(k, device=rows.device)
    row_index = rows[:, None].expand_as(columns)
    for out, new in ((state.tokens, tokens), (state.from_teacher, switched), (state.divergence, divergence)):
        out.index_put_((row_index, columns), new)
    if hidden is not None:  # [R, k, H]: the teacher's hidden state at the input that predicts each column
        state.teacher_hidden.index_put_((row_index, columns), hidden.to(state.teacher_hidden.dtype))
    last = tokens.gather(1, (keep - 1).clamp_min(0)[:, None])[:, 0]
    state.pending[rows] = torch.where(keep > 0, last, state.pending[rows])
    state.generated[rows] = generated + keep
    state.remaining[rows] = torch.where(finished, 0, remaining - keep)
    kept = torch.arange(k, device=rows.device) < keep[:, None]
    bad = (divergence.isnan() & kept).any().long()
    flags = torch.stack([keep, finished.long()], 1)
    return torch.cat([flags, torch.stack([bad, torch.zeros_like(bad)])[None]])
