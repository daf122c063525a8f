"""Pure-PyTorch reference of every switchkd op: the executable spec.

Everything here is differentiable with autograd and runs in float64 when given float64 inputs
(lower precisions are computed in float32). The Triton kernels in ``switchkd.kernels`` must agree
with these functions; the tests hold them to it.

Conventions (natural log throughout, ``p_S = softmax(s / T)``, ``p_T = softmax(t / T)``):

- ``fkl``  KL(p_T || p_S);  ``rkl`` KL(p_S || p_T)
- ``jsd``  beta * KL(p_T || m) + (1 - beta) * KL(p_S || m), m = (1 - beta) p_S + beta p_T
           (TRL/GKD convention: beta = 0 is ``fkl``, beta = 1 is ``rkl``)
- ``skl``  KL(p_T || alpha p_T + (1 - alpha) p_S);  ``srkl`` KL(p_S || alpha p_S + (1 - alpha) p_T)
- ``tvd``  0.5 * sum |p_S - p_T|
"""

from __future__ import annotations

import math

import torch

from .spec import DEFAULT_POLICY, LOSS_KINDS, SwitchStep, canonical_kind

STUDENT, TEACHER = 0, 1  # the `model` field of the sampling noise

_MASK32 = 0xFFFFFFFF
_SEED_SALT = 0x243F6A88


# ----------------------------------------------------------------------------------- sampling noise
def mul32(x, c: int):
    """``x * c mod 2**32`` for uint32 values held in Python ints or int64 tensors (no overflow)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK32


def mix32(x):
    """The 'lowbias32' integer finaliser: a bijection on uint32 with good avalanche."""
    x = x ^ (x >> 16)
    x = mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def seed_hash(seed: int) -> int:
    """The seed's contribution to the noise, computed once on the host."""
    return mix32((seed & _MASK32) ^ _SEED_SALT)


def row_hash(seed: int, row_keys: torch.Tensor, positions: torch.Tensor, model: int) -> torch.Tensor:
    """Per-row key of the noise: ``mix(mix(mix(seed_hash ^ row_key) ^ position) ^ (model + 1))``."""
    k = mix32(seed_hash(seed) ^ (row_keys.to(torch.int64) & _MASK32))
    k = mix32(k ^ (positions.to(torch.int64) & _MASK32))
    return mix32(k ^ (model + 1))


def row_uniform(seed: int, row_keys: torch.Tensor, positions: torch.Tensor, model: int) -> torch.Tensor:
    """``[B]`` float64 uniforms ``(2j + 1) / 2**24`` (23 random bits of the row's key, exact in float32), one per
    (seed, row key, position, model)."""
    return ((row_hash(seed, row_keys, positions, model) >> 9) * 2 + 1).to(torch.float64) * 2.0**-24


def _rows_and_keys(batch: int, device, positions, row_keys):
    """``[B]`` int64 positions (an int broadcasts) and row keys (default ``arange(B)``)."""
    positions = torch.as_tensor(positions, device=device).to(torch.int64).expand(batch)
    return positions, torch.arange(batch, device=device) if row_keys is None else row_keys


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row of ``probs [B, V]``, the first column whose cumulative sum passes ``u[b]`` (a column of ``p > 0``:
    the sum only grows there), i.e. the number of columns whose sum stays at or below ``u``; the last column with
    ``p > 0`` when rounding leaves the total at or below ``u``; 0 when no ``p`` is positive (NaN). Written as
    sums and maxima, which ``torch.compile`` fuses (its argmax over a scan does not build on CUDA)."""
    vocab = probs.shape[-1]
    first = (probs.cumsum(-1) <= u[:, None]).sum(-1)
    columns = torch.arange(vocab, device=probs.device)
    last = torch.where(probs > 0, columns, 0).amax(-1)
    return torch.where(first < vocab, first, last)


def sample(logits, positions=0, *, temperature=1.0, seed=0, row_keys=None, model=STUDENT):
    """Inverse-CDF sample from ``softmax(logits / temperature)`` over ``[B, V]``; ``temperature == 0`` is argmax.

    One uniform ``u`` per row (:func:`row_uniform`) picks the first token whose cumulative probability, in
    vocabulary order, passes ``u``. ``model`` picks the noise stream (``STUDENT`` = 0, ``TEACHER`` = 1), as in
    :func:`switch_step`. Computed in float64; the kernels sum in float32, so a token can differ only when ``u``
    lies within rounding of a cumulative-sum boundary (about 1e-6 of the rows at most).
    """
    if temperature == 0:
        return logits.argmax(-1)
    positions, row_keys = _rows_and_keys(logits.shape[0], logits.device, positions, row_keys)
    probs = torch.softmax(logits.to(torch.float64) / temperature, -1)
    return inverse_cdf(probs, row_uniform(seed, row_keys, positions, model))


# -------------------------------------------------------------------------------------- divergences
def _kl_terms(log_p, log_q):
    """Elementwise p * (log p - log q), with 0 where p = 0 (and no NaN gradient there)."""
    live = log_p > -math.inf
    log_p = torch.where(live, log_p, 0.0)
    log_q = torch.where(live, log_q, 0.0)
    return torch.where(live, log_p.exp() * (log_p - log_q), 0.0)


def _log_mix(log_a, log_b, weight_a: float):
    """log(weight_a * a + (1 - weight_a) * b) from log a and log b."""
    if weight_a == 0.0:
        return log_b
    if weight_a == 1.0:
        return log_a
    # Where both are -inf (masked vocabulary) logaddexp's gradient is NaN: mix zeros there instead.
    dead = (log_a == -math.inf) & (log_b == -math.inf)
    log_a, log_b = torch.where(dead, 0.0, log_a), torch.where(dead, 0.0, log_b)
    mixed = torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))
    return torch.where(dead, -math.inf, mixed)


def row_divergence(log_ps, log_pt, kind: str, alpha: float = 0.1, beta: float = 0.5):
    """Per-row divergence ``[...]`` from student/teacher log-probabilities ``[..., V]``."""
    kind = canonical_kind(kind, beta)
    if kind == "fkl":
        terms = _kl_terms(log_pt, log_ps)
    elif kind == "rkl":
        terms = _kl_terms(log_ps, log_pt)
    elif kind == "jsd":
        log_m = _log_mix(log_ps, log_pt, 1.0 - beta)
        terms = beta * _kl_terms(log_pt, log_m) + (1.0 - beta) * _kl_terms(log_ps, log_m)
    elif kind == "skl":
        terms = _kl_terms(log_pt, _log_mix(log_pt, log_ps, alpha))
    elif kind == "srkl":
        terms = _kl_terms(log_ps, _log_mix(log_ps, log_pt, alpha))
    elif kind == "tvd":
        terms = 0.5 * (log_ps.exp() - log_pt.exp()).abs()
    else:
        raise ValueError(f"loss kind must be one of {LOSS_KINDS}, got {kind!r}")
    return terms.sum(-1)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def log_probs(logits, temperature: float):
    return torch.log_softmax(logits.to(_compute_dtype(logits.dtype)) / temperature, dim=-1)


# ---------------------------------------------------------------------------------------------- ops
def kd_loss(student_logits, teacher_logits, labels=None, *, kind="srkl", alpha=0.1, beta=0.5,
            temperature=1.0, ignore_index=-100, reduction="mean"):
    """Token-level distillation loss; see ``switchkd.kd_loss`` for the contract."""
    log_ps = log_probs(student_logits, temperature)
    log_pt = log_probs(teacher_logits, temperature).detach()
    rows = row_divergence(log_ps, log_pt, kind, alpha, beta)
    if labels is None:
        keep = torch.ones_like(rows, dtype=torch.bool)
    else:
        keep = labels.reshape(rows.shape) != ignore_index
    rows = torch.where(keep, rows, 0.0)
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / keep.sum().clamp_min(1)


def switch_step(student_logits, teacher_logits, positions, *, policy=DEFAULT_POLICY, temperature=1.0,
                seed=0, row_keys=None, loss="fkl", alpha=0.1, beta=0.5, student_tokens=None) -> SwitchStep:
    """One SWITCH decoding step over ``[B, V]`` logits; see ``switchkd.fused_switch_step``."""
    positions, row_keys = _rows_and_keys(student_logits.shape[0], student_logits.device, positions, row_keys)
    div_temperature = temperature if temperature > 0 else 1.0
    log_ps = log_probs(student_logits, div_temperature)
    log_pt = log_probs(teacher_logits, div_temperature).detach()
    divergence = row_divergence(log_ps.detach(), log_pt, "jsd")
    rows = row_divergence(log_ps, log_pt, loss, alpha, beta)

    noise = {"temperature": temperature, "seed": seed, "row_keys": row_keys}
    if student_tokens is None:
        student_tokens = sample(student_logits.detach(), positions, model=STUDENT, **noise)
    teacher_tokens = sample(teacher_logits, positions, model=TEACHER, **noise)
    if policy.kind == "topk":
        t = teacher_logits.detach()
        rank = (t > t.gather(-1, student_tokens[:, None])).sum(-1)
        from_teacher = rank >= policy.top_k
    else:
        from_teacher = divergence.to(torch.float64) > policy.thresholds(positions).to(student_logits.device)
    tokens = torch.where(from_teacher, teacher_tokens, student_tokens)
    return SwitchStep(tokens, from_teacher, divergence.float(), student_tokens, teacher_tokens, rows)
