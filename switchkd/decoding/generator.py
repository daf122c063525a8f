"""Interleaved teacher/student decoding with SWITCH, on paged KV caches.

Each sequence keeps one *pending* token: the last accepted token, not yet in either cache. A block
of ``k`` tokens runs ``k`` one-token student forwards (the student drafts ``d_0 .. d_{k-1}``, each
sampled with the noise that stepwise decoding would use at that position), then one teacher forward
over ``[pending, d_0 .. d_{k-2}]`` that scores all ``k`` positions. One ``fused_switch_step`` over
the ``B * k`` rows decides; a sequence keeps its drafts up to the first switch, takes the
teacher's token there, and both caches roll back to just before the new pending token. With
``k = 1`` this is exactly the stepwise algorithm, and every ``k`` yields the same tokens.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import torch

from ..ops.spec import DEFAULT_POLICY, SwitchPolicy
from ..ops.switch_step import fused_switch_step, sample
from .kvcache import ATTENTION_NAME, PagedKVCache


@dataclass
class SwitchOutput:
    """Result of :func:`switch_generate`; rows follow the order of the prompts."""

    sequences: torch.Tensor  # [B, T] int64 prompt + response, right-padded with pad_token_id
    prompt_lengths: torch.Tensor  # [B] int64
    response_lengths: torch.Tensor  # [B] int64
    from_teacher: torch.Tensor  # [B, max_new_tokens] bool, True where the teacher wrote the token
    divergence: torch.Tensor  # [B, max_new_tokens] float32 JSD (nats) at each generated token, NaN past the end
    responses: list[list[int]]  # the generated tokens of each row (EOS included when produced)
    student_forwards: int  # forward passes of each model over the whole request
    teacher_forwards: int
    bookkeeping_seconds: float  # host time spent in KV block bookkeeping (allocation, tables, rollback)

    @property
    def teacher_share(self) -> float:
        """Fraction of generated tokens written by the teacher."""
        total = int(self.response_lengths.sum())
        return float(self.from_teacher.sum()) / total if total else 0.0


def _context_length(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def _vocab_size(model) -> int:
    head = model.get_output_embeddings()
    return head.weight.shape[0] if head is not None else model.config.vocab_size


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
            m.set_attn_implementation(ATTENTION_NAME)
        yield
    finally:
        for m, training, impl in saved:
            m.set_attn_implementation(impl)
            m.train(training)


class SwitchGenerator:
    """Teacher/student SWITCH decoding with reusable paged KV pools (one pool per model).

    Args:
        teacher, student: Hugging Face causal LMs whose attention goes through ``AttentionInterface``
            and whose output vocabularies have the same size.
        block_size: tokens per KV block (flash-attn's paged kernel needs a multiple of 256).
        num_blocks: blocks per pool; ``None`` sizes the pools to each request (growing when needed).
            A fixed pool too small for a request is used in sub-batches; a prompt that alone needs
            more blocks than the pool holds raises ``ValueError``.

    Example::

        gen = SwitchGenerator(teacher, student, block_size=16, num_blocks=4096)
        out = gen.generate([[464, 3290], [40]], max_new_tokens=64, policy=SwitchPolicy("exp"))
        out.sequences, out.from_teacher, out.teacher_share
    """

    def __init__(self, teacher, student, *, block_size: int = 16, num_blocks: int | None = None):
        if _vocab_size(teacher) != _vocab_size(student):
            raise ValueError(f"vocabulary mismatch: teacher has {_vocab_size(teacher)} output tokens, student "
                             f"{_vocab_size(student)}; the models must share a tokenizer")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        if num_blocks is not None and (not isinstance(num_blocks, int) or num_blocks < 1):
            raise ValueError(f"num_blocks must be a positive int or None, got {num_blocks!r}")
        self.teacher, self.student = teacher, student
        self.block_size, self.num_blocks = block_size, num_blocks
        self.vocab_size = _vocab_size(student)
        self.caches: tuple[PagedKVCache, PagedKVCache] | None = None  # (teacher, student)

    # ------------------------------------------------------------------------------------ request
    def generate(self, prompts, attention_mask=None, *, policy: SwitchPolicy = DEFAULT_POLICY,
                 max_new_tokens: int = 256, temperature: float = 1.0, eos_token_id: int | list[int] | None = None,
                 seed: int = 0,
                 draft_len: int = 4, adaptive_draft: bool = True, pad_token_id: int | None = None,
                 row_keys: list[int] | None = None) -> SwitchOutput:
        """Generate up to ``max_new_tokens`` per prompt; see :func:`switch_generate`."""
        prompts = prompt_lists(prompts, attention_mask)
        eos_ids = self._check_request(prompts, policy, max_new_tokens, draft_len, eos_token_id)
        keys = self._row_keys(row_keys, len(prompts))
        needs = [self._blocks_for(len(p) + max_new_tokens + draft_len) for p in prompts]
        self._ensure_pools(needs)
        pool = self.caches[0].num_blocks
        results, counts = {}, [0, 0, 0.0]
        with torch.no_grad(), _paged_eval(self.teacher, self.student):
            for group in self._sub_batches(needs, pool):
                state = _Decode(self, [keys[i] for i in group], [prompts[i] for i in group], policy, max_new_tokens,
                                temperature, eos_ids, seed, draft_len, adaptive_draft)
                decoded = state.run()
                results.update({i: decoded[keys[i]] for i in group})
                counts[0] += state.student_forwards
                counts[1] += state.teacher_forwards
                counts[2] += state.bookkeeping_seconds
        return self._collect(prompts, results, max_new_tokens, pad_token_id, eos_ids, counts)

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

    def _check_request(self, prompts, policy, max_new_tokens, draft_len, eos_token_id):
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
        return frozenset(eos_ids)

    def _blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_size)

    def _ensure_pools(self, needs: list[int]):
        if self.caches is not None and self.caches[0].manager.num_used_blocks:
            raise RuntimeError("SwitchGenerator is already generating (its pools are in use)")
        size = self.num_blocks or sum(needs)
        if self.num_blocks is not None and max(needs) > size:
            raise ValueError(f"a prompt needs {max(needs)} KV blocks of {self.block_size} tokens (prompt + "
                             f"max_new_tokens + draft_len) but the pool has {size}: raise num_blocks")
        if self.caches is None or self.caches[0].num_blocks < size:
            self.caches = (PagedKVCache(size, self.block_size), PagedKVCache(size, self.block_size))

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

    def _collect(self, prompts, results, max_new_tokens, pad_token_id, eos_ids, counts) -> SwitchOutput:
        pad = pad_token_id if pad_token_id is not None else min(eos_ids, default=0)
        responses = [results[i][0] for i in range(len(prompts))]
        width = max(len(p) + len(r) for p, r in zip(prompts, responses, strict=True))
        sequences = torch.full((len(prompts), width), pad, dtype=torch.int64)
        from_teacher = torch.zeros(len(prompts), max_new_tokens, dtype=torch.bool)
        divergence = torch.full((len(prompts), max_new_tokens), float("nan"))
        for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
            sequences[i, : len(p) + len(r)] = torch.tensor(p + r)
            from_teacher[i, : len(r)] = torch.tensor(results[i][1], dtype=torch.bool)
            divergence[i, : len(r)] = torch.tensor(results[i][2])
        return SwitchOutput(
            sequences=sequences,
            prompt_lengths=torch.tensor([len(p) for p in prompts]),
            response_lengths=torch.tensor([len(r) for r in responses]),
            from_teacher=from_teacher,
            divergence=divergence,
            responses=responses,
            student_forwards=counts[0],
            teacher_forwards=counts[1],
            bookkeeping_seconds=counts[2],
        )


class _Decode:
    """State of one sub-batch: pending tokens, progress, the blocks and the draft length."""

    def __init__(self, gen: SwitchGenerator, ids, prompts, policy, max_new_tokens, temperature, eos, seed, draft_len,
                 adaptive):
        self.gen, self.ids, self.prompts = gen, list(ids), prompts
        self.policy, self.max_new, self.temperature = policy, max_new_tokens, temperature
        self.eos, self.seed = eos, seed
        self.draft_len, self.adaptive = draft_len, adaptive
        # Adaptive drafting: measured tokens/s per draft length (powers of two up to draft_len).
        self.candidates = sorted({min(2**i, draft_len) for i in range(draft_len.bit_length() + 1)}, reverse=True)
        self.rates: dict[int, float] = {}
        self.blocks = 0
        self.device = gen.student.device
        self.out = {i: ([], [], []) for i in ids}  # tokens, from_teacher, divergence
        self.pending = {i: p[-1] for i, p in zip(ids, prompts, strict=True)}
        self.student_forwards = self.teacher_forwards = 0
        self.bookkeeping_seconds = 0.0

    def run(self):
        teacher_cache, student_cache = self.gen.caches
        added = []
        try:
            for i in self.ids:
                for cache in (teacher_cache, student_cache):
                    cache.manager.add(i)
                added.append(i)
            prefix = {i: p[:-1] for i, p in zip(self.ids, self.prompts, strict=True) if len(p) > 1}
            if prefix:
                self._forward(self.gen.teacher, teacher_cache, prefix, last_only=True)
                self._forward(self.gen.student, student_cache, prefix, last_only=True)
            active = list(self.ids)
            while active:
                active = self._block(active)
        finally:
            for i in added:
                for cache in (teacher_cache, student_cache):
                    if i in cache.manager:
                        cache.manager.free(i)
        return self.out

    def _forward(self, model, cache, tokens: dict[int, list[int]], last_only: bool):
        """One forward of ``model`` over new tokens of several sequences; returns logits [B, q or 1, V]."""
        ids = list(tokens)
        counts = [len(tokens[i]) for i in ids]
        width = max(counts)
        rows = [tokens[i] + tokens[i][-1:] * (width - len(tokens[i])) for i in ids]  # pads repeat the last token
        start = time.perf_counter()
        batch = cache.prepare(ids, counts, self.device)
        self.bookkeeping_seconds += time.perf_counter() - start
        input_ids = torch.tensor(rows).to(self.device, non_blocking=True)
        out = model(input_ids=input_ids, position_ids=batch.positions, use_cache=False,
                    logits_to_keep=1 if last_only else 0, **{ATTENTION_NAME: batch})
        return out.logits

    def _sample_student(self, logits, ids, gen_index):
        keys = torch.tensor(ids, device=self.device)
        positions = torch.tensor(gen_index, device=self.device)
        return sample(logits, positions, temperature=self.temperature, seed=self.seed, row_keys=keys).tolist()

    def _draft_len(self, active) -> int:
        """Fixed ``draft_len``, or the candidate with the best measured token rate (each is tried
        first, and one is re-measured every 16 blocks, since the switch rate drifts with length)."""
        longest = max(self.max_new - len(self.out[i][0]) for i in active)
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

    def _record_rate(self, k: int, tokens: int, seconds: float):
        rate = tokens / max(seconds, 1e-9)
        self.rates[k] = rate if k not in self.rates else 0.7 * self.rates[k] + 0.3 * rate
        self.blocks += 1

    def _block(self, active: list[int]) -> list[int]:
        teacher_cache, student_cache = self.gen.caches
        block_start = time.perf_counter()
        k = self._draft_len(active)
        done = {i: len(self.out[i][0]) for i in active}  # tokens generated so far
        # Draft: k one-token student forwards; drafts d_0 .. d_{k-2} feed the next forward.
        feed = {i: [self.pending[i]] for i in active}
        drafts = {i: [] for i in active}
        student_logits = []
        for j in range(k):
            logits = self._forward(self.gen.student, student_cache, feed, last_only=True)[:, -1]
            self.student_forwards += 1
            student_logits.append(logits)
            if j < k - 1:
                tokens = self._sample_student(logits, active, [done[i] + j for i in active])
                feed = {i: [t] for i, t in zip(active, tokens, strict=True)}
                for i, t in zip(active, tokens, strict=True):
                    drafts[i].append(t)
        # Score: one teacher forward over [pending, d_0 .. d_{k-2}].
        teacher_logits = self._forward(self.gen.teacher, teacher_cache,
                                       {i: [self.pending[i]] + drafts[i] for i in active}, last_only=False)
        self.teacher_forwards += 1
        vocab = teacher_logits.shape[-1]
        step = fused_switch_step(
            torch.stack(student_logits, 1).reshape(-1, vocab), teacher_logits.reshape(-1, vocab),
            torch.tensor([done[i] + j for i in active for j in range(k)], device=self.device),
            policy=self.policy, temperature=self.temperature, seed=self.seed,
            row_keys=torch.tensor(active, device=self.device).repeat_interleave(k),
        )
        tokens = step.tokens.view(len(active), k).tolist()
        switched = step.from_teacher.view(len(active), k).tolist()
        divergence = step.divergence.view(len(active), k).tolist()
        start = time.perf_counter()
        still_active, kept, accepted = [], [], 0
        for row, i in enumerate(active):
            keep = min(k, self.max_new - done[i])  # tokens this sequence may still take
            if True in switched[row][:keep]:
                keep = switched[row].index(True) + 1
            stop = next((j for j, t in enumerate(tokens[row][:keep]) if t in self.eos), None)
            if stop is not None:
                keep = stop + 1
            accepted += keep
            out_tokens, out_teacher, out_div = self.out[i]
            out_tokens += tokens[row][:keep]
            out_teacher += switched[row][:keep]
            out_div += divergence[row][:keep]
            finished = len(out_tokens) >= self.max_new or out_tokens[-1] in self.eos
            if finished:
                teacher_cache.manager.free(i)
                student_cache.manager.free(i)
                continue
            self.pending[i] = out_tokens[-1]
            still_active.append(i)
            kept.append(keep)
        if still_active:
            # Both caches hold base + k tokens; keep the pending token and the accepted drafts.
            lengths = (teacher_cache.manager.lengths(still_active) - k + torch.tensor(kept)).tolist()
            teacher_cache.manager.truncate(still_active, lengths)
            student_cache.manager.truncate(still_active, lengths)
        self.bookkeeping_seconds += time.perf_counter() - start
        self._record_rate(k, accepted, time.perf_counter() - block_start)
        return still_active


def switch_generate(teacher, student, prompts, attention_mask=None, *, policy: SwitchPolicy = DEFAULT_POLICY,
                    max_new_tokens: int = 256, temperature: float = 1.0, eos_token_id: int | list[int] | None = None,
                    seed: int = 0, draft_len: int = 4, adaptive_draft: bool = True, pad_token_id: int | None = None,
                    row_keys: list[int] | None = None, block_size: int = 16,
                    num_blocks: int | None = None) -> SwitchOutput:
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
        block_size, num_blocks: KV pool geometry (see :class:`SwitchGenerator`).

    Returns:
        :class:`SwitchOutput` with ``sequences``, ``from_teacher``, ``divergence`` and counters.
    """
    generator = SwitchGenerator(teacher, student, block_size=block_size, num_blocks=num_blocks)
    return generator.generate(prompts, attention_mask, policy=policy, max_new_tokens=max_new_tokens,
                              temperature=temperature, eos_token_id=eos_token_id, seed=seed, draft_len=draft_len,
                              adaptive_draft=adaptive_draft, pad_token_id=pad_token_id, row_keys=row_keys)
