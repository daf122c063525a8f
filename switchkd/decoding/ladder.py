"""The decoding ladder: prefill, draft, score, decide, commit and rollback over paged KV caches.

Each sequence keeps one *pending* token: the last accepted token, not yet in either cache. A block
of ``k`` tokens runs ``k`` one-token student forwards (the student drafts ``d_0 .. d_{k-1}``, each
sampled with the noise that stepwise decoding would use at that position), then one teacher forward
over ``[pending, d_0 .. d_{k-2}]`` that scores all ``k`` positions. One ``fused_switch_step`` over
the ``B * k`` rows, given the drafts as the student's tokens, decides; a sequence keeps its drafts up
to the first switch, takes the teacher's token there, and both caches roll back to just before the
new pending token. With ``k = 1`` this is exactly the stepwise algorithm, and every ``k`` yields the
same tokens.

:class:`EagerDecoder` runs each block on the sequences still active, with per-forward metadata
from the block managers; ``graphs.StaticDecoder`` runs the same blocks at fixed shapes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..ops.switch_step import fused_switch_step, sample
from .kvcache import ATTENTION_NAME, PagedKVCache
from .state import DecodeState, DecodeStats, Request, commit


@dataclass
class ModelPair:
    """The two models and their KV caches."""

    teacher: torch.nn.Module
    student: torch.nn.Module
    teacher_cache: PagedKVCache
    student_cache: PagedKVCache
    vocab_size: int | None = None  # the real tokens: logit columns past it (padded LM-head rows) are dropped

    @property
    def caches(self) -> tuple[PagedKVCache, PagedKVCache]:
        return self.teacher_cache, self.student_cache

    def teacher_head(self) -> torch.Tensor:
        """The teacher's LM-head weight ``[V, H]`` (the size and dtype of its last hidden states)."""
        return self.teacher.get_output_embeddings().weight

    def tokens_only(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits[..., :vocab_size]`` (a view): padded rows are never sampled nor in the divergence."""
        return logits if self.vocab_size is None else logits[..., : self.vocab_size]


def forward(model, cache: PagedKVCache, ids: list[int], counts: list[int], input_ids: torch.Tensor,
            stats: DecodeStats, last_only: bool, hidden: bool = False):
    """One forward of ``model`` over ``counts[b]`` new tokens of sequence ``ids[b]``: its output, with logits
    ``[B, q or 1, rows]`` (and, with ``hidden``, every layer's hidden states)."""
    start = time.perf_counter()
    batch = cache.prepare(ids, counts, input_ids.device)
    stats.bookkeeping_seconds += time.perf_counter() - start
    return model(input_ids=input_ids, position_ids=batch.positions, use_cache=False,
                 logits_to_keep=1 if last_only else 0, output_hidden_states=hidden, **{ATTENTION_NAME: batch})


def prefill(pair: ModelPair, ids: list[int], prompts: list[list[int]], stats: DecodeStats):
    """Register the sequences and cache every prompt token but the last (which becomes pending)."""
    for cache in pair.caches:
        for i in ids:
            cache.manager.add(i)
    rows = [(i, p[:-1]) for i, p in zip(ids, prompts, strict=True) if len(p) > 1]
    if not rows:
        return
    counts = [len(p) for _, p in rows]
    width = max(counts)
    padded = [p + p[-1:] * (width - len(p)) for _, p in rows]  # pads repeat the last token, never cached
    input_ids = torch.tensor(padded, device=pair.student.device)
    for model, cache in ((pair.teacher, pair.teacher_cache), (pair.student, pair.student_cache)):
        forward(model, cache, [i for i, _ in rows], counts, input_ids, stats, last_only=True)


def draft(pair: ModelPair, state: DecodeState, rows: torch.Tensor, ids: list[int], k: int, request: Request,
          stats: DecodeStats) -> tuple[torch.Tensor, torch.Tensor]:
    """``k`` one-token student forwards from the pending tokens, each followed by its sample: (logits
    ``[R, k, V]``, drafts ``[R, k]``); the models read ``d_0 .. d_{k-2}``, ``d_{k-1}`` is the last position's
    student token."""
    feed, keys, generated = state.pending[rows], state.keys[rows], state.generated[rows]
    logits, drafts = [], []
    for j in range(k):
        if j:
            feed = drafts[-1]
        out = forward(pair.student, pair.student_cache, ids, [1] * len(ids), feed[:, None], stats, last_only=True)
        logits.append(pair.tokens_only(out.logits[:, -1]))
        stats.student_forwards += 1
        drafts.append(sample(logits[-1], generated + j, temperature=request.temperature, seed=request.seed,
                             row_keys=keys))
    return torch.stack(logits, 1), torch.stack(drafts, 1)


def score(pair: ModelPair, state: DecodeState, rows: torch.Tensor, ids: list[int], drafts: torch.Tensor,
          stats: DecodeStats) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One teacher forward over ``[pending, d_0 .. d_{k-2}]`` (``drafts [R, k]``): logits ``[R, k, V]``, and the
    last hidden states ``[R, k, H]`` when the state keeps them."""
    inputs = torch.cat([state.pending[rows, None], drafts[:, :-1]], 1)
    stats.teacher_forwards += 1
    keep = state.teacher_hidden is not None
    out = forward(pair.teacher, pair.teacher_cache, ids, [inputs.shape[1]] * len(ids), inputs, stats,
                  last_only=False, hidden=keep)
    return pair.tokens_only(out.logits), out.hidden_states[-1] if keep else None


def decide(student_logits: torch.Tensor, teacher_logits: torch.Tensor, drafts: torch.Tensor, state: DecodeState,
           rows: torch.Tensor, request: Request):
    """The fused switch step over the ``R * k`` scored positions (no host sync). The drafts are the student's
    tokens: where the policy does not switch, the token kept is the one both models read next, whatever the
    kernels' rounding."""
    k, vocab = teacher_logits.shape[1:]
    positions = state.generated[rows, None] + torch.arange(k, device=rows.device)
    return fused_switch_step(student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab),
                             positions.reshape(-1), policy=request.policy, temperature=request.temperature,
                             seed=request.seed, row_keys=state.keys[rows].repeat_interleave(k), check_finite=False,
                             student_tokens=drafts.reshape(-1))


def read_flags(flags: torch.Tensor) -> list[list[int]]:
    """The one host sync of a block: tokens kept and finished per row; raises on non-finite logits."""
    host = flags.tolist()
    if host[-1][0]:
        raise ValueError("teacher or student logits hold NaN/+inf values (or an all -inf row) during generation")
    return host[:-1]


def rollback(pair: ModelPair, state: DecodeState, ids: list[int], active: list[int], flags: list[list[int]],
             stats: DecodeStats) -> list[int]:
    """Free finished rows; roll both caches back to just before each remaining row's pending token.

    ``flags[r]`` holds (kept, finished) of ``active[r]``; both caches hold ``k`` uncommitted tokens per row.
    Returns the rows still active.
    """
    start = time.perf_counter()
    still, done = [], []
    for row, (keep, finished) in zip(active, flags, strict=True):
        state.cached[row] += keep
        (done if finished else still).append(row)
    for cache in pair.caches:
        if done:
            cache.manager.free([ids[r] for r in done])
        if still:
            cache.manager.truncate([ids[r] for r in still], [state.cached[r] for r in still])
    stats.bookkeeping_seconds += time.perf_counter() - start
    return still


class EagerDecoder:
    """Runs each block on the active rows only, with metadata built per forward."""

    def __init__(self, pair: ModelPair, request: Request):
        self.pair, self.request = pair, request
        self.device = pair.student.device

    def new_state(self, keys: list[int], prompts: list[list[int]]) -> DecodeState:
        state = DecodeState.empty(len(prompts), self.request, self.device, self.pair.teacher_head())
        state.load_(keys, prompts, self.request)
        return state

    def block(self, state: DecodeState, ids: list[int], active: list[int], k: int,
              stats: DecodeStats) -> list[list[int]]:
        """Draft, score, decide and commit ``k`` tokens of the active rows; returns their (kept, finished)."""
        rows = torch.tensor(active, device=self.device)
        active_ids = [ids[r] for r in active]
        student_logits, drafts = draft(self.pair, state, rows, active_ids, k, self.request, stats)
        teacher_logits, hidden = score(self.pair, state, rows, active_ids, drafts, stats)
        step = decide(student_logits, teacher_logits, drafts, state, rows, self.request)
        return read_flags(commit(state, rows, step, k, hidden))
