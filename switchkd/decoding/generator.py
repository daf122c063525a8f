"""SWITCH generation: :class:`SwitchGenerator` and :func:`switch_generate` on top of the decoding ladder.

The ladder itself (prefill, draft, score, decide, commit, rollback) is in ``ladder.py``, the per-row
state and the acceptance rule in ``state.py``, the static-shape (CUDA-graph) blocks in ``graphs.py``.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import torch

from ..ops.spec import DEFAULT_POLICY, SwitchPolicy
from .graphs import StaticDecoder
from .kvcache import DECODE_IMPLEMENTATION, PagedKVCache
from .ladder import EagerDecoder, ModelPair, prefill, rollback
from .state import DecodeState, DecodeStats, Request


@dataclass
class SwitchOutput:
    """Result of :func:`switch_generate`; rows follow the order of the prompts."""

    sequences: torch.Tensor  # [B, T] int64 prompt + response, right-padded with pad_token_id
    prompt_lengths: torch.Tensor  # [B] int64
    response_lengths: torch.Tensor  # [B] int64
    from_teacher: torch.Tensor  # [B, max_new_tokens] bool, True where the teacher wrote the token
    divergence: torch.Tensor  # [B, max_new_tokens] float32 JSD (nats) at each generated token, NaN past the end
    responses: list[list[int]]  # the generated tokens of each row (EOS included when produced)
    stats: DecodeStats  # forwards of each model, drafted blocks, host bookkeeping time
    # [B, max_new_tokens, H] (device, the teacher's dtype) with return_teacher_hidden: the teacher's last hidden
    # state at the position that predicts each generated token (its LM head's input), zeros past the end
    teacher_hidden: torch.Tensor | None = None

    @property
    def student_forwards(self) -> int:
        return self.stats.student_forwards

    @property
    def teacher_forwards(self) -> int:
        return self.stats.teacher_forwards

    @property
    def bookkeeping_seconds(self) -> float:
        """Host time spent in KV block bookkeeping (allocation, tables, rollback)."""
        return self.stats.bookkeeping_seconds

    @property
    def teacher_share(self) -> float:
        """Fraction of generated tokens written by the teacher."""
        total = int(self.response_lengths.sum())
        return float(self.from_teacher.sum()) / total if total else 0.0


def output_vocab_size(model) -> int:
    """Size of ``model``'s output vocabulary: the rows of its output head (the last dim of its logits)."""
    head = model.get_output_embeddings()
    return head.weight.shape[0] if head is not None else model.config.vocab_size


def _token_columns(teacher, student, vocab_size: int | None) -> int:
    """The sampled vocabulary: ``vocab_size`` (at most both models' output rows), else the shared row count."""
    teacher_rows, student_rows = output_vocab_size(teacher), output_vocab_size(student)
    if vocab_size is None:
        if teacher_rows != student_rows:
            raise ValueError(f"vocabulary mismatch: teacher has {teacher_rows} output tokens, student {student_rows}; "
                             "the models must share a tokenizer (pass vocab_size, the tokenizer's length, when "
                             "one of them has padded embedding rows)")
        return student_rows
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive int or None, got {vocab_size!r}")
    if vocab_size > min(teacher_rows, student_rows):
        raise ValueError(f"vocab_size={vocab_size} exceeds the output rows of the teacher ({teacher_rows}) or the "
                         f"student ({student_rows})")
    return vocab_size


def _context_length(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def prompt_lists(prompts, attention_mask=None) -> list[list[int]]:
    """Token-id lists from a list of lists or from padded ``input_ids`` + ``attention_mask``."""
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2 or prompts.dtype.is_floating_point:
            raise ValueError(f"prompts as a tensor must be integer input_ids [B, L], got {prompts.dtype} "
                             f"{tuple(prompts.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(prompts)
        if attention_mask.shape != prompts.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                             f"{tuple(prompts.shape)}")
        lists = [row[mask.bool()].tolist() for row, mask in zip(prompts.cpu(), attention_mask.cpu(), strict=True)]
    elif isinstance(prompts, (list, tuple)) and all(isinstance(p, (list, tuple)) for p in prompts):
        lists = [list(p) for p in prompts]
        for i, p in enumerate(lists):
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in p):
                raise TypeError(f"prompts[{i}] must be a list of int token ids")
    else:
        raise TypeError("prompts must be a list of token-id lists, or input_ids [B, L] with attention_mask")
    if not lists:
        raise ValueError("prompts is empty")
    for i, p in enumerate(lists):
        if not p:
            raise ValueError(f"prompts[{i}] is empty: every prompt needs at least one token")
    return lists


@contextlib.contextmanager
def _paged_eval(*models):
    """Run the models in eval mode with the paged attention function; restore both afterwards."""
    saved = [(m, m.training, m.config._attn_implementation) for m in models]
    try:
        for m in models:
            m.eval()
            m.set_attn_implementation(DECODE_IMPLEMENTATION)
        yield
    finally:
        for m, training, impl in saved:
            m.set_attn_implementation(impl)
            m.train(training)


class DraftLength:
    """The draft length of each block: fixed, or (adaptive) the power of two up to ``draft_len`` with the
    best measured token rate; each candidate is tried first, and one is re-measured every 16 blocks since
    the switch rate drifts with length."""

    def __init__(self, draft_len: int, adaptive: bool):
        self.draft_len, self.adaptive = draft_len, adaptive
        self.candidates = sorted({min(2**i, draft_len) for i in range(draft_len.bit_length() + 1)}, reverse=True)
        self.rates: dict[int, float] = {}
        self.blocks = 0

    def choose(self, longest: int) -> int:
        """The next block's length, at most ``longest`` (the largest remaining budget)."""
        if not self.adaptive:
            k = self.draft_len
        else:
            untried = [c for c in self.candidates if c not in self.rates]
            if untried:
                k = untried[0]
            elif self.blocks % 16 == 0:
                k = self.candidates[(self.blocks // 16) % len(self.candidates)]
            else:
                k = max(self.rates, key=self.rates.get)
        return max(1, min(k, longest))

    def record(self, k: int, tokens: int, seconds: float):
        rate = tokens / max(seconds, 1e-9)
        self.rates[k] = rate if k not in self.rates else 0.7 * self.rates[k] + 0.3 * rate
        self.blocks += 1


def decode(decoder, pair: ModelPair, ids: list[int], prompts: list[list[int]],
           request: Request) -> tuple[DecodeState, DecodeStats]:
    """Prefill one sub-batch, then run blocks until every row finishes; every KV block comes back."""
    stats, lengths = DecodeStats(), DraftLength(request.draft_len, request.adaptive_draft)
    state = decoder.new_state(ids, prompts)
    live = []
    try:
        live = list(range(len(prompts)))
        prefill(pair, ids, prompts, stats)
        while live:
            start = time.perf_counter()
            k = lengths.choose(max(request.max_new_tokens - state.cached[r] + len(prompts[r]) - 1 for r in live))
            flags = decoder.block(state, ids, live, k, stats)
            stats.blocks += 1
            live = rollback(pair, state, ids, live, flags, stats)
            if not getattr(decoder, "warming", False):
                lengths.record(k, sum(keep for keep, _ in flags), time.perf_counter() - start)
    finally:
        for cache in pair.caches:
            if cache.manager.num_sequences:
                cache.manager.free([ids[r] for r in live])
    return state, stats


class SwitchGenerator:
    """Teacher/student SWITCH decoding with reusable paged KV pools (one pool per model).

    Args:
        teacher, student: Hugging Face causal LMs whose attention goes through ``AttentionInterface``
            and whose output vocabularies have the same size (or at least ``vocab_size`` rows each).
        block_size: tokens per KV block (flash-attn's paged kernel needs a multiple of 256).
        num_blocks: blocks per pool; ``None`` sizes the pools to each request (growing when needed).
            A fixed pool too small for a request is used in sub-batches; a prompt that alone needs
            more blocks than the pool holds raises ``ValueError``.
        cuda_graphs: decode at static shapes (batch padded to a power of two, fixed-size block tables)
            and replay each step from a CUDA graph; ``None`` = on when the models are on CUDA. On CPU,
            ``True`` runs the same static-shape steps without capture. Models that cannot be captured
            fall back to eager steps with a warning.
        vocab_size: the tokenizer's length when an LM head has padded rows past it: sampling, the switch
            step and the divergence see only the first ``vocab_size`` logit columns (a view, also inside the
            captured steps), and prompts / EOS ids must lie below it. ``None``: every output row is a token.

    Example::

        gen = SwitchGenerator(teacher, student, block_size=16, num_blocks=4096)
        out = gen.generate([[464, 3290], [40]], max_new_tokens=64, policy=SwitchPolicy("exp"))
        out.sequences, out.from_teacher, out.teacher_share
    """

    def __init__(self, teacher, student, *, block_size: int = 16, num_blocks: int | None = None,
                 cuda_graphs: bool | None = None, vocab_size: int | None = None):
        self.vocab_size = _token_columns(teacher, student, vocab_size)
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        if num_blocks is not None and (not isinstance(num_blocks, int) or num_blocks < 1):
            raise ValueError(f"num_blocks must be a positive int or None, got {num_blocks!r}")
        if cuda_graphs not in (None, True, False):
            raise ValueError(f"cuda_graphs must be True, False or None (auto), got {cuda_graphs!r}")
        self.teacher, self.student = teacher, student
        self.block_size, self.num_blocks = block_size, num_blocks
        # Logit columns past vocab_size (padded LM-head rows) are sliced off; None: both models' rows are tokens.
        self._columns = None if vocab_size is None else self.vocab_size
        self.cuda_graphs = student.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self.caches: tuple[PagedKVCache, PagedKVCache] | None = None  # (teacher, student)
        self.static: StaticDecoder | None = None  # its buffers and graphs, kept across requests

    def generate(self, prompts, attention_mask=None, *, policy: SwitchPolicy = DEFAULT_POLICY,
                 max_new_tokens: int = 256, temperature: float = 1.0, eos_token_id: int | list[int] | None = None,
                 seed: int = 0, draft_len: int = 4, adaptive_draft: bool = True, pad_token_id: int | None = None,
                 row_keys: list[int] | None = None, return_teacher_hidden: bool = False) -> SwitchOutput:
        """Generate up to ``max_new_tokens`` per prompt; see :func:`switch_generate`."""
        prompts = prompt_lists(prompts, attention_mask)
        eos = self._check_request(prompts, policy, max_new_tokens, draft_len, eos_token_id)
        if return_teacher_hidden not in (True, False):
            raise ValueError(f"return_teacher_hidden must be True or False, got {return_teacher_hidden!r}")
        request = Request(policy, max_new_tokens, float(temperature), seed, eos, draft_len, adaptive_draft,
                          return_teacher_hidden)
        keys = self._row_keys(row_keys, len(prompts))
        needs = [self._blocks_for(len(p) + max_new_tokens + draft_len) for p in prompts]
        pair = self._pair(needs)
        decoder = self._decoder(pair, request)
        rows, stats = [None] * len(prompts), DecodeStats()
        with torch.no_grad(), _paged_eval(self.teacher, self.student):
            for group in self._sub_batches(needs, pair.teacher_cache.num_blocks):
                group_prompts = [prompts[i] for i in group]
                state, group_stats = decode(decoder, pair, [keys[i] for i in group], group_prompts, request)
                stats += group_stats
                for i, row in zip(group, _rows_of(state, group_prompts), strict=True):
                    rows[i] = row
        return _collect(prompts, rows, max_new_tokens, pad_token_id, eos, stats)

    def _decoder(self, pair: ModelPair, request: Request):
        if not self.cuda_graphs or (self.static is not None and self.static.failed):
            return EagerDecoder(pair, request)
        if self.static is None or self.static.pair is not pair:
            self.static = StaticDecoder(pair)
        self.static.start(request)
        return self.static

    @staticmethod
    def _row_keys(row_keys, batch: int) -> list[int]:
        if row_keys is None:
            return list(range(batch))
        keys = list(row_keys)
        if len(keys) != batch or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in keys):
            raise ValueError(f"row_keys must be {batch} non-negative ints, one per prompt")
        if len(set(keys)) != batch:
            raise ValueError("row_keys must be unique")
        return keys

    def _check_request(self, prompts, policy, max_new_tokens, draft_len, eos_token_id) -> tuple[int, ...]:
        if not isinstance(policy, SwitchPolicy):
            raise TypeError(f"policy must be a switchkd.SwitchPolicy, got {type(policy).__name__}")
        for name, value in (("max_new_tokens", max_new_tokens), ("draft_len", draft_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        eos_ids = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id
        if not all(isinstance(e, int) and 0 <= e < self.vocab_size for e in eos_ids):
            raise ValueError(f"eos_token_id must be an int or a list of ints in [0, {self.vocab_size}), got "
                             f"{eos_token_id!r}")
        for i, p in enumerate(prompts):
            if min(p) < 0 or max(p) >= self.vocab_size:
                raise ValueError(f"prompts[{i}] has token ids outside [0, {self.vocab_size})")
            for name, model in (("teacher", self.teacher), ("student", self.student)):
                context = _context_length(model)
                if context is not None and len(p) + max_new_tokens > context:
                    raise ValueError(f"prompts[{i}] has {len(p)} tokens; with max_new_tokens={max_new_tokens} it "
                                     f"passes the {name}'s context of {context} positions")
        return tuple(sorted(set(eos_ids)))

    def _blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_size)

    def _pair(self, needs: list[int]) -> ModelPair:
        """The models and their pools, (re)allocated when a request needs more blocks than they hold."""
        if self.caches is not None and self.caches[0].manager.num_sequences:
            raise RuntimeError("SwitchGenerator is already generating (its pools are in use)")
        size = self.num_blocks or sum(needs)
        if self.num_blocks is not None and max(needs) > size:
            raise ValueError(f"a prompt needs {max(needs)} KV blocks of {self.block_size} tokens (prompt + "
                             f"max_new_tokens + draft_len) but the pool has {size}: raise num_blocks")
        if self.caches is None or self.caches[0].num_blocks < size:
            self.caches = (PagedKVCache(size, self.block_size), PagedKVCache(size, self.block_size))
            self._model_pair = ModelPair(self.teacher, self.student, *self.caches, vocab_size=self._columns)
        return self._model_pair

    @staticmethod
    def _sub_batches(needs: list[int], pool: int) -> list[list[int]]:
        groups, current, used = [], [], 0
        for i, need in enumerate(needs):
            if current and used + need > pool:
                groups.append(current)
                current, used = [], 0
            current.append(i)
            used += need
        return groups + [current]


def _rows_of(state: DecodeState, prompts: list[list[int]]):
    """(tokens, from_teacher, divergence, teacher hidden states or None) of each row of a finished sub-batch; the
    hidden states stay on the device (copied: a static workspace is reused by the next sub-batch)."""
    counts = [state.cached[r] - len(p) + 1 for r, p in enumerate(prompts)]
    tokens, switched, divergence = (x[: len(prompts)].cpu() for x in (state.tokens, state.from_teacher,
                                                                       state.divergence))
    hidden = state.teacher_hidden
    return [(tokens[r, :n].tolist(), switched[r, :n], divergence[r, :n],
             None if hidden is None else hidden[r, :n].clone()) for r, n in enumerate(counts)]


def _collect(prompts, rows, max_new_tokens, pad_token_id, eos, stats: DecodeStats) -> SwitchOutput:
    pad = pad_token_id if pad_token_id is not None else min(eos, default=0)
    responses = [r[0] for r in rows]
    width = max(len(p) + len(r) for p, r in zip(prompts, responses, strict=True))
    sequences = torch.full((len(prompts), width), pad, dtype=torch.int64)
    from_teacher = torch.zeros(len(prompts), max_new_tokens, dtype=torch.bool)
    divergence = torch.full((len(prompts), max_new_tokens), float("nan"))
    first = rows[0][3]
    hidden = None if first is None else first.new_zeros(len(prompts), max_new_tokens, first.shape[-1])
    for i, (p, (r, switched, div, h)) in enumerate(zip(prompts, rows, strict=True)):
        sequences[i, : len(p) + len(r)] = torch.tensor(p + r)
        from_teacher[i, : len(r)] = switched
        divergence[i, : len(r)] = div
        if hidden is not None:
            hidden[i, : len(r)] = h
    return SwitchOutput(
        sequences=sequences,
        prompt_lengths=torch.tensor([len(p) for p in prompts]),
        response_lengths=torch.tensor([len(r) for r in responses]),
        from_teacher=from_teacher,
        divergence=divergence,
        responses=responses,
        stats=stats,
        teacher_hidden=hidden,
    )


def switch_generate(teacher, student, prompts, attention_mask=None, *, policy: SwitchPolicy = DEFAULT_POLICY,
                    max_new_tokens: int = 256, temperature: float = 1.0, eos_token_id: int | list[int] | None = None,
                    seed: int = 0, draft_len: int = 4, adaptive_draft: bool = True, pad_token_id: int | None = None,
                    row_keys: list[int] | None = None, block_size: int = 16, num_blocks: int | None = None,
                    cuda_graphs: bool | None = None, vocab_size: int | None = None,
                    return_teacher_hidden: bool = False) -> SwitchOutput:
    """Generate with SWITCH: the student writes, the teacher takes over tokens the policy picks.

    Args:
        teacher, student: Hugging Face causal LMs sharing a vocabulary (GPT-2, OPT, Llama, Qwen2, ...).
        prompts: list of token-id lists, or padded ``input_ids [B, L]`` with ``attention_mask``.
        policy: :class:`SwitchPolicy` (``exp`` = SWITCH, ``never`` = student only, ``always`` = teacher).
        max_new_tokens, eos_token_id: per-sequence stopping; ``eos_token_id`` is an id or a list of ids
            (the EOS token is kept in the response).
        temperature, seed, row_keys: sampling (0 = greedy); tokens are a pure function of the logits
            and ``(seed, row key, position)``, so they do not depend on batch composition or draft length.
            ``row_keys`` are unique non-negative ints, one per prompt (default: the prompt indices).
        draft_len: the most tokens the student drafts per teacher forward (1 = stepwise). With
            ``adaptive_draft`` the generator measures the token rate of each power-of-two length up to
            ``draft_len`` and keeps the fastest (it falls to 1 when most tokens switch).
        block_size, num_blocks, cuda_graphs: KV pool geometry and step path (see :class:`SwitchGenerator`).
        vocab_size: the tokenizer's length when a model's LM head has padded rows (never sampled); see
            :class:`SwitchGenerator`.
        return_teacher_hidden: also return the teacher's last hidden state at the position that predicts each
            generated token (``SwitchOutput.teacher_hidden``; its LM head gives the teacher's logits there), so
            that a training step's loss needs no teacher forward.

    Returns:
        :class:`SwitchOutput` with ``sequences``, ``from_teacher``, ``divergence`` and counters.
    """
    generator = SwitchGenerator(teacher, student, block_size=block_size, num_blocks=num_blocks,
                                cuda_graphs=cuda_graphs, vocab_size=vocab_size)
    return generator.generate(prompts, attention_mask, policy=policy, max_new_tokens=max_new_tokens,
                              temperature=temperature, eos_token_id=eos_token_id, seed=seed, draft_len=draft_len,
                              adaptive_draft=adaptive_draft, pad_token_id=pad_token_id, row_keys=row_keys,
                              return_teacher_hidden=return_teacher_hidden)
