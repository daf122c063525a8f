"""fused_switch_step (one SWITCH decoding step over vocabulary splits) and sample (plain sampling, same noise)."""

from __future__ import annotations

import os

import torch

from . import reference
from .spec import (
    DEFAULT_POLICY,
    LOSS_CODES,
    SwitchPolicy,
    SwitchStep,
    canonical_kind,
    check_int,
    check_int_rows,
    check_logits,
    check_loss_args,
    check_pair,
    check_positions,
    check_temperature,
    kernel_rows,
    next_pow2,
    resolve_backend,
    rows_2d,
    triton_interpreted,
)
from .stored_grad import attach_grad

LOG2E = 1.4426950408889634


def _scale2(temperature: float) -> float:
    """``log2(e) / T``: logits to base-2 scores (T = 1 for greedy, whose divergences are at T = 1)."""
    return LOG2E / temperature if temperature > 0 else LOG2E


def _row_inputs(positions, row_keys, fallback: torch.Tensor) -> dict:
    """Kernel arguments for ``positions`` (int or ``[B]``) and ``row_keys`` (``[B]`` or None = arange)."""
    scalar = isinstance(positions, int)
    return {
        "positions_ptr": fallback if scalar else positions,
        "position": positions if scalar else 0,
        "row_keys_ptr": fallback if row_keys is None else row_keys,
        "POS_SCALAR": scalar,
        "KEYS_ARANGE": row_keys is None,
    }


def _workspace(batch: int, n_splits: int, device, greedy: bool) -> dict:
    """Per-split buffers the first launch hands to the second: statistics and, for greedy decoding, each split's
    argmax candidate (sampling reads none: the statistics buffer stands in)."""
    stats = torch.empty(batch, n_splits, 4, device=device, dtype=torch.float32)
    if not greedy:
        return {"stats_ptr": stats, "cand_ptr": stats, "cand_col_ptr": stats}
    return {"stats_ptr": stats, "cand_ptr": torch.empty(batch, n_splits, 2, device=device, dtype=torch.float32),
            "cand_col_ptr": torch.empty(batch, n_splits, 2, device=device, dtype=torch.int32)}


def fused_step_enabled() -> bool:
    """Whether the switch step runs as one launch (``_switch_step_fused_kernel``) instead of three:
    ``SWITCHKD_FUSED_STEP=1``. Off by default: on an H200 it was slower than three launches at every batch size
    (10.2 / 25.5 / 101.5 against 9.3 / 16.8 / 91.6 µs at B = 1 / 32 / 256, V = 128256; benchmarks/RESULTS.md)."""
    return os.environ.get("SWITCHKD_FUSED_STEP", "0") == "1"


def _output_args(step: SwitchStep, policy: SwitchPolicy) -> dict:
    """The finish's arguments: the step's outputs and the policy's threshold coefficients."""
    thr = policy.coefficients()
    return {"tokens_ptr": step.tokens, "from_teacher_ptr": step.from_teacher.view(torch.uint8),
            "divergence_ptr": step.divergence, "loss_ptr": step.loss, "thr_scale": thr.scale, "thr_rate": thr.rate,
            "thr_slope": thr.slope, "thr_floor": thr.floor, "top_k": policy.top_k}


def _launch(fused: bool, batch: int, n_splits: int, logits: dict, sampling: dict, step_args: dict, outputs: dict):
    """Phase 1, phase 2 and the finish (``kernels.switch_step``): one launch, or three."""
    from ..kernels.split import _stats_kernel
    from ..kernels.switch_step import _switch_step_finish_kernel, _switch_step_fused_kernel, _switch_step_kernel

    if fused:
        sync = torch.zeros(batch, device=logits["s_ptr"].device, dtype=torch.int32)
        # The interpreter runs programs one after another: a program waiting for the next would wait forever.
        for phase in (1, 2) if triton_interpreted() else (0,):
            _switch_step_fused_kernel[(batch * n_splits,)](**step_args, **sampling, **outputs, sync_ptr=sync,
                                                           n_splits=n_splits, PHASE=phase)
        return
    work = {name: step_args[name] for name in ("stats_ptr", "cand_ptr", "cand_col_ptr")}
    _stats_kernel[(batch, n_splits)](**logits, **work, **sampling)
    _switch_step_kernel[(batch, n_splits)](**step_args)
    finish = ("positions_ptr", "sums_ptr", "s_tokens_ptr", "t_tokens_ptr", "position", "TOPK", "POS_SCALAR", "SPLITS")
    _switch_step_finish_kernel[(batch,)](**{name: step_args[name] for name in finish}, n_splits=n_splits, **outputs)


def switch_step_triton(student_logits, teacher_logits, positions, row_keys, *, policy, temperature, seed, kind,
                       alpha, beta, need_grad, splits=None, student_tokens=None, fused=None):
    """Run the switch step's kernels over ``[B, V]`` logits (last dim contiguous) on a ``(B, S)`` grid.

    Returns a :class:`SwitchStep` whose ``loss`` carries no graph, and the per-row gradient
    ``d loss[b] / d student_logits[b]`` ``[B, V]`` (or None). ``splits`` overrides the split count (tests);
    ``student_tokens`` (int64 ``[B]``) skips the student's sampling scan; ``fused`` picks one launch or three
    (None: :func:`fused_step_enabled`); one launch caps the splits at what the GPU holds at once (a row's programs
    wait for one another: ``split.resident_splits``).
    """
    from ..kernels.split import GREEDY, MAX_SPLITS, NO_SAMPLE, _grad_kernel, resident_splits, split_plan

    (batch, vocab), device = student_logits.shape, student_logits.device
    greedy, topk = temperature == 0, policy.kind == "topk"
    if topk and student_tokens is None and not greedy:  # topk ranks the student's token during the sweep
        student_tokens = sample_triton(student_logits, positions, row_keys, temperature=temperature, seed=seed,
                                       model=reference.STUDENT)
    t_tokens = torch.empty(batch, device=device, dtype=torch.int64)
    s_tokens = torch.empty_like(t_tokens) if student_tokens is None else student_tokens
    step = SwitchStep(torch.empty_like(s_tokens), torch.empty(batch, device=device, dtype=torch.bool),
                      torch.empty(batch, device=device, dtype=torch.float32), s_tokens, t_tokens,
                      torch.empty(batch, device=device, dtype=torch.float32))
    grad = torch.empty_like(student_logits) if need_grad else None
    if batch == 0:
        return step, grad
    fused = fused_step_enabled() if fused is None else fused
    n_splits, chunk = split_plan(batch, vocab, device, splits, programs_per_sm=8,
                                 max_splits=resident_splits(device) if fused else MAX_SPLITS)
    work, rows = _workspace(batch, n_splits, device, greedy), _row_inputs(positions, row_keys, s_tokens)
    sums = torch.empty(batch, n_splits, 4, device=device, dtype=torch.float32)
    inv_temp = 1.0 / temperature if temperature > 0 else 1.0
    # one rounding of the base-2 scale, shared by every phase (and by ``sample``)
    (s_rows, s_stride), (t_rows, t_stride) = kernel_rows(student_logits), kernel_rows(teacher_logits)
    logits = {"s_ptr": s_rows, "t_ptr": t_rows, "s_stride": s_stride, "t_stride": t_stride, "V": vocab, "chunk": chunk,
              "scale2": _scale2(temperature)}
    grads = {"grad_ptr": grad if need_grad else sums, "grad_stride": grad.stride(0) if need_grad else 0,
             "inv_temp": inv_temp, "alpha": float(alpha), "beta": float(beta), "KIND": LOSS_CODES[kind],
             "SPLITS": next_pow2(n_splits), **work}
    argmax = GREEDY if greedy else NO_SAMPLE  # sampled tokens are drawn in phase 2
    sampling = {"SAMPLE": argmax, "SAMPLE_S": argmax if student_tokens is None else NO_SAMPLE}
    step_args = {**logits, **grads, **rows, "sums_ptr": sums, "s_tokens_ptr": s_tokens, "t_tokens_ptr": t_tokens,
                 "seed_key": reference.seed_hash(seed), "TOPK": topk, "GREEDY": greedy, "HAS_GRAD": need_grad,
                 "STUDENT_GIVEN": student_tokens is not None}
    outputs = _output_args(step, policy)
    _launch(fused, batch, n_splits, logits, sampling, step_args, outputs)
    if need_grad and kind != "fkl":
        del grads["cand_ptr"], grads["cand_col_ptr"]
        _grad_kernel[(batch, n_splits)](**logits, **grads, labels_ptr=sums, weight_ptr=sums, sums_ptr=sums,
                                        ignore_index=0, HAS_LABELS=False, HAS_WEIGHT=False)
    return step, grad


def fused_switch_step(student_logits, teacher_logits, positions, *, policy=DEFAULT_POLICY, temperature=1.0, seed=0,
                      row_keys=None, loss="fkl", alpha=0.1, beta=0.5, backend="auto",
                      check_finite=True, student_tokens=None) -> SwitchStep:
    """One SWITCH decoding step over a batch of next-token logits: three launches over vocabulary splits.

    Per row: ``p_S = softmax(student / T)``, ``p_T = softmax(teacher / T)``, ``d = JSD(p_T, p_S)``
    (nats), an inverse-CDF sample from each model (one counter-based uniform per row and model), and
    the teacher's sample is kept when ``policy`` says so (e.g. ``d > tau0 * exp(-decay * t)``).
    Also returns the per-row loss of kind ``loss``, differentiable w.r.t. ``student_logits``: with
    ``z = s / T``, ``p_S = softmax(z)`` and ``g = dL/dp_S``, the kernels write
    ``dL/ds = p_S * (g - sum(p_S * g)) / T`` (``(p_S - p_T) / T`` for ``fkl``) in the same pass,
    and backward only scales it.

    Args:
        student_logits, teacher_logits: ``[B, V]`` float32/bfloat16/float16 (float64 runs the reference).
        positions: int or ``[B]`` ints: index of the generated token (0 = first), drives the threshold.
        policy: :class:`SwitchPolicy`.
        temperature: sampling and divergence temperature; 0 = greedy (divergences then at T = 1).
        seed, row_keys: each row's uniform is a pure function of (seed, row_keys[b], positions[b], model),
            so the same logits and seed give the same tokens in every decoding mode and on every backend, up
            to float32 rounding where the uniform falls on a cumulative-probability boundary (there the batch
            size and launch mode, which set how a row is cut, can pick the neighbouring token; README).
            ``row_keys`` ``[B]`` ints, default ``arange(B)``.
        loss, alpha, beta: the loss kind (``fkl rkl jsd skl srkl tvd``) and its parameters.
        backend: ``auto`` | ``triton`` | ``reference``.
        check_finite: raise ``ValueError`` for rows whose logits hold NaN/+inf (or are all -inf);
            costs one host sync on a ``[B]`` tensor. Without it such rows come back with a NaN
            ``divergence`` and ``loss`` and are never switched (see :func:`raise_on_bad_rows`).
        student_tokens: ``[B]`` ints in ``[0, V)`` already sampled from the student (a decoder's drafts, drawn
            with :func:`sample`): kept where the policy does not switch, returned as ``student_tokens``, and the
            student's sampling is skipped (half of the first launch's work).

    Returns:
        ``SwitchStep(tokens, from_teacher, divergence, student_tokens, teacher_tokens, loss)``, each ``[B]``.

    Example::

        step = switchkd.fused_switch_step(student_logits, teacher_logits, positions=t,
                                          policy=switchkd.SwitchPolicy("exp", tau0=0.3, decay=0.01))
        next_tokens = step.tokens            # int64 [B]
        step.loss.mean().backward()          # gradient flows to student_logits
    """
    check_pair(student_logits, teacher_logits, max_dim=2)
    if not isinstance(policy, SwitchPolicy):
        raise TypeError(f"policy must be a switchkd.SwitchPolicy, got {type(policy).__name__}")
    check_temperature(temperature, allow_zero=True)
    check_loss_args(loss, alpha, beta)
    check_int("seed", seed)
    batch, device = student_logits.shape[0], student_logits.device
    positions = check_positions(positions, batch, device)
    if row_keys is not None:
        row_keys = check_int_rows("row_keys", row_keys, batch, device)
    if student_tokens is not None:
        student_tokens = check_int_rows("student_tokens", student_tokens, batch, device)
    options = {"policy": policy, "temperature": temperature, "seed": seed, "row_keys": row_keys,
               "loss": canonical_kind(loss, beta), "alpha": alpha, "beta": beta, "student_tokens": student_tokens}

    if resolve_backend(student_logits, backend) == "reference":
        step = reference.switch_step(student_logits, teacher_logits, positions, **options)
    else:
        s, t = rows_2d(student_logits), rows_2d(teacher_logits.detach())
        options["kind"] = options.pop("loss")
        step, grad = switch_step_triton(s, t, positions, need_grad=s.requires_grad, **options)
        step = step._replace(loss=attach_grad(s, step.loss, grad))
    if check_finite:
        raise_on_bad_rows(step.divergence, student_logits, teacher_logits)
    return step


def raise_on_bad_rows(divergence, student_logits, teacher_logits):
    """``ValueError`` naming the argument and rows whose divergence is NaN (NaN/+inf logits, or an all -inf
    row); one host sync. Decoding loops pass ``check_finite=False`` per step and call this only when the
    divergences they copy to the host anyway hold a NaN."""
    bad = torch.isnan(divergence)
    if not bool(bad.any()):
        return
    rows = bad.nonzero().flatten()[:8].tolist()
    for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        x = x.detach()[bad]
        if bool((x.isnan() | x.isposinf()).any() | (x == float("-inf")).all(-1).any()):
            raise ValueError(f"{name} has NaN/+inf values or an all -inf row in row(s) {rows}")
    raise ValueError(f"the divergence is NaN in row(s) {rows}")


def sample(logits, positions=0, *, temperature=1.0, seed=0, row_keys=None, model=reference.STUDENT,
           backend="auto") -> torch.Tensor:
    """Sample one token per row from ``softmax(logits / temperature)`` with switchkd's counter-based noise.

    The tokens are those :func:`fused_switch_step` would draw for the same model: ``model=0`` is the
    student's noise stream (``student_tokens``), ``model=1`` the teacher's. A pure function of
    ``(seed, row_keys[b], positions[b], model)`` and the logits; no host sync.

    Args:
        logits: ``[B, V]`` float32/bfloat16/float16/float64.
        positions: int or ``[B]`` ints (the generated-token index of each row).
        temperature: > 0, or 0 for argmax.
        seed, row_keys: as in :func:`fused_switch_step`.

    Returns:
        int64 ``[B]`` token ids.

    Example::

        next_tokens = switchkd.sample(logits[:, -1], positions=t, temperature=0.8, seed=0)
    """
    check_logits("logits", logits, max_dim=2)
    check_temperature(temperature, allow_zero=True)
    check_int("seed", seed)
    if model not in (reference.STUDENT, reference.TEACHER):
        raise ValueError(f"model must be 0 (student noise) or 1 (teacher noise), got {model!r}")
    batch, device = logits.shape[0], logits.device
    positions = check_positions(positions, batch, device)
    if row_keys is not None:
        row_keys = check_int_rows("row_keys", row_keys, batch, device)
    if resolve_backend(logits, backend) == "reference":
        return reference.sample(logits, positions, temperature=temperature, seed=seed, row_keys=row_keys,
                                model=model)
    return sample_triton(rows_2d(logits), positions, row_keys, temperature=temperature, seed=seed, model=model)


def sample_triton(logits, positions, row_keys, *, temperature, seed, model):
    """Launch ``_sample_kernel`` over ``[B, V]`` logits (last dim contiguous); returns int64 ``[B]`` tokens."""
    from ..kernels.sampling import _sample_kernel

    batch, vocab = logits.shape
    block = min(4096, next_pow2(max(vocab, 16)))
    tokens = logits.new_empty(batch, dtype=torch.int64)
    if batch > 0:
        rows, stride = kernel_rows(logits)
        _sample_kernel[(batch,)](
            x_ptr=rows, tokens_ptr=tokens, x_stride=stride, V=vocab, seed_key=reference.seed_hash(seed),
            scale2=_scale2(temperature), MODEL=model, GREEDY=temperature == 0,
            **_row_inputs(positions, row_keys, tokens), BLOCK=block, num_warps=8 if block >= 2048 else 4,
        )
    return tokens
