"""Public ops: input validation, backend dispatch and autograd around the Triton kernels."""

from __future__ import annotations

import os

import torch

from . import reference
from .policy import DEFAULT_POLICY, SwitchPolicy
from .reference import LOSS_KINDS, SwitchStep

BACKENDS = ("auto", "triton", "reference")
REDUCTIONS = ("mean", "sum", "none")
_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# ------------------------------------------------------------------------------------- validation
def _check_logits(name: str, x, min_dim: int = 1, max_dim: int | None = None):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _LOGIT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {x.dtype}")
    if x.dim() < min_dim or (max_dim is not None and x.dim() > max_dim):
        form = "[B, V]" if max_dim == 2 else "[..., V]"
        raise ValueError(f"{name} must have shape {form}, got {tuple(x.shape)}")
    if x.shape[-1] < 1:
        raise ValueError(f"{name} has an empty vocabulary dimension: shape {tuple(x.shape)}")


def _check_pair(student_logits, teacher_logits, max_dim=None):
    _check_logits("student_logits", student_logits, max_dim=max_dim)
    _check_logits("teacher_logits", teacher_logits, max_dim=max_dim)
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(
            f"vocabulary mismatch: student_logits has V={student_logits.shape[-1]}, "
            f"teacher_logits has V={teacher_logits.shape[-1]} (the models must share a tokenizer)"
        )
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"teacher_logits shape {tuple(teacher_logits.shape)} != student_logits shape {tuple(student_logits.shape)}"
        )
    if student_logits.device != teacher_logits.device:
        raise ValueError(
            f"teacher_logits is on {teacher_logits.device} but student_logits is on {student_logits.device}"
        )


def _check_unit_interval(name: str, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def _check_temperature(temperature, allow_zero: bool):
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not (temperature > 0 or (allow_zero and temperature == 0)) or temperature == float("inf"):
        bound = ">= 0 (0 = greedy)" if allow_zero else "> 0"
        raise ValueError(f"temperature must be finite and {bound}, got {temperature}")


def _check_loss_args(kind, alpha, beta):
    if kind not in LOSS_KINDS:
        raise ValueError(f"loss kind must be one of {LOSS_KINDS}, got {kind!r}")
    _check_unit_interval("alpha", alpha)
    _check_unit_interval("beta", beta)


def _check_int_rows(name: str, value, batch: int, device):
    """An int64 ``[B]`` tensor on ``device`` from an integer tensor."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be an int or a [B] integer tensor, got {type(value).__name__}")
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise TypeError(f"{name} must have an integer dtype, got {value.dtype}")
    if value.shape != (batch,):
        raise ValueError(f"{name} must have shape [B] = [{batch}], got {tuple(value.shape)}")
    return value.to(device=device, dtype=torch.int64).contiguous()


def _check_labels(labels, lead_shape, device):
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must have an integer dtype, got {labels.dtype}")
    if labels.shape != lead_shape:
        raise ValueError(f"labels must have shape {tuple(lead_shape)} (the inputs' without the last dim), got "
                         f"{tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels is on {labels.device} but the inputs are on {device}")


def _rows_2d(x):
    """``[..., V]`` → ``[N, V]`` with a contiguous last dimension (a view where possible)."""
    x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


# --------------------------------------------------------------------------------------- dispatch
def resolve_backend(x: torch.Tensor, backend: str) -> str:
    """``auto``: Triton on CUDA; on CPU the Triton interpreter when TRITON_INTERPRET=1, else reference.

    float64 always runs on the reference (the kernels accumulate in float32).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return "reference"
    if x.dtype == torch.float64:
        if backend == "triton":
            raise ValueError("backend='triton' does not take float64 logits; use backend='reference'")
        return "reference"
    if x.is_cuda:
        return "triton"
    interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if backend == "triton" and not interpreted:
        raise ValueError(
            "backend='triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 before "
            "triton is imported"
        )
    return "triton" if interpreted else "reference"


def _take_scaled_grad(ctx, scale):
    """The gradient stored by a fused forward, scaled in place; it can be taken once."""
    if ctx.grad is None:
        raise RuntimeError(
            "switchkd: this graph was already back-propagated; the fused gradient is consumed by the first "
            "backward (retain_graph is not supported)"
        )
    grad, ctx.grad = ctx.grad, None
    return grad.mul_(scale)


class SwitchStepFunction(torch.autograd.Function):
    """One fused SWITCH step; the loss gradient w.r.t. the student logits comes from the same pass.

    With ``z = s / T``, ``p_S = softmax(z)`` and ``g = dL/dp_S``:
    ``dL/ds = p_S * (g - sum(p_S * g)) / T``, which is ``(p_S - p_T) / T`` for ``fkl``.
    """

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, positions, row_keys, policy, temperature, seed_key, kind,
                alpha, beta):
        from .kernels.switch_step import switch_step_triton

        need_grad = student_logits.requires_grad
        *outputs, grad = switch_step_triton(
            student_logits, teacher_logits, positions, row_keys, policy=policy, temperature=temperature,
            seed_key=seed_key, kind=kind, alpha=alpha, beta=beta, need_grad=need_grad,
        )
        ctx.grad = grad
        ctx.mark_non_differentiable(*outputs[:5])
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grad_outputs):
        grad_loss = grad_outputs[5]
        return (_take_scaled_grad(ctx, grad_loss[:, None]),) + (None,) * 9


class KDLossFunction(torch.autograd.Function):
    """Per-row KD loss over ``[N, V]`` logits with its gradient computed in the forward pass.

    Same gradient as :class:`SwitchStepFunction`; the reduction's scale (1 for sum, 1/#kept rows
    for mean, the upstream gradient) multiplies the stored gradient in backward.
    """

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, labels, kind, alpha, beta, temperature, ignore_index,
                reduction):
        from .kernels.kd_loss import kd_loss_triton

        rows, grad = kd_loss_triton(
            student_logits, teacher_logits, labels, kind=kind, alpha=alpha, beta=beta, temperature=temperature,
            ignore_index=ignore_index, need_grad=student_logits.requires_grad,
        )
        ctx.grad = grad
        ctx.reduction = reduction
        if reduction == "none":
            return rows
        if reduction == "sum":
            ctx.scale = torch.ones((), device=rows.device)
            return rows.sum()
        kept = rows.new_tensor(rows.shape[0]) if labels is None else (labels != ignore_index).sum()
        ctx.scale = 1.0 / kept.clamp_min(1).float()
        return rows.sum() * ctx.scale

    @staticmethod
    def backward(ctx, grad_output):
        scale = grad_output[:, None] if ctx.reduction == "none" else grad_output * ctx.scale
        return (_take_scaled_grad(ctx, scale),) + (None,) * 8


# ----------------------------------------------------------------------------------------- public
def fused_switch_step(student_logits, teacher_logits, positions, *, policy=DEFAULT_POLICY, temperature=1.0, seed=0,
                      row_keys=None, loss="fkl", alpha=0.1, beta=0.5, backend="auto",
                      check_finite=True) -> SwitchStep:
    """One SWITCH decoding step over a batch of next-token logits, fused in one kernel launch.

    Per row: ``p_S = softmax(student / T)``, ``p_T = softmax(teacher / T)``, ``d = JSD(p_T, p_S)``
    (nats), a Gumbel-max sample from each model, and the teacher's sample is kept when ``policy``
    says so (e.g. ``d > tau0 * exp(-decay * t)``). Also returns the per-row loss of kind ``loss``,
    differentiable w.r.t. ``student_logits`` (the gradient is computed in the same pass).

    Args:
        student_logits, teacher_logits: ``[B, V]`` float32/bfloat16/float16 (float64 runs the reference).
        positions: int or ``[B]`` ints: index of the generated token (0 = first), drives the threshold.
        policy: :class:`SwitchPolicy`.
        temperature: sampling and divergence temperature; 0 = greedy (divergences then at T = 1).
        seed, row_keys: the noise is a pure function of (seed, row_keys[b], positions[b], model, token),
            so the same logits and seed give the same tokens on every backend and decoding mode.
            ``row_keys`` ``[B]`` ints, default ``arange(B)``.
        loss, alpha, beta: the loss kind (``fkl rkl jsd skl srkl tvd``) and its parameters.
        backend: ``auto`` | ``triton`` | ``reference``.
        check_finite: raise ``ValueError`` for rows whose logits hold NaN/+inf (or are all -inf);
            costs one host sync on a ``[B]`` tensor.

    Returns:
        ``SwitchStep(tokens, from_teacher, divergence, student_tokens, teacher_tokens, loss)``, each ``[B]``.

    Example::

        step = switchkd.fused_switch_step(student_logits, teacher_logits, positions=t,
                                          policy=switchkd.SwitchPolicy("exp", tau0=0.3, decay=0.01))
        next_tokens = step.tokens            # int64 [B]
        step.loss.mean().backward()          # gradient flows to student_logits
    """
    _check_pair(student_logits, teacher_logits, max_dim=2)
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must have shape [B, V], got {tuple(student_logits.shape)}")
    if not isinstance(policy, SwitchPolicy):
        raise TypeError(f"policy must be a switchkd.SwitchPolicy, got {type(policy).__name__}")
    _check_temperature(temperature, allow_zero=True)
    _check_loss_args(loss, alpha, beta)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    batch, device = student_logits.shape[0], student_logits.device
    if isinstance(positions, bool) or not isinstance(positions, (int, torch.Tensor)):
        raise TypeError(f"positions must be an int or a [B] integer tensor, got {type(positions).__name__}")
    if isinstance(positions, int):
        if positions < 0:
            raise ValueError(f"positions must be >= 0, got {positions}")
    else:
        positions = _check_int_rows("positions", positions, batch, device)
    if row_keys is not None:
        row_keys = _check_int_rows("row_keys", row_keys, batch, device)
    loss = reference.canonical_kind(loss, beta)

    if resolve_backend(student_logits, backend) == "reference":
        step = reference.switch_step(
            student_logits, teacher_logits, positions, policy=policy, temperature=temperature, seed=seed,
            row_keys=row_keys, loss=loss, alpha=alpha, beta=beta,
        )
    else:
        s, t = _rows_2d(student_logits), _rows_2d(teacher_logits.detach())
        step = SwitchStep(*SwitchStepFunction.apply(
            s, t, positions, row_keys, policy, float(temperature), reference.seed_hash(seed), loss, alpha, beta,
        ))
    if check_finite:
        _raise_on_bad_rows(step.divergence, student_logits, teacher_logits)
    return step


def _raise_on_bad_rows(divergence, student_logits, teacher_logits):
    bad = torch.isnan(divergence)
    if not bool(bad.any()):
        return
    rows = bad.nonzero().flatten()[:8].tolist()
    for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        x = x.detach()[bad]
        if bool((x.isnan() | x.isposinf()).any() | (x == float("-inf")).all(-1).any()):
            raise ValueError(f"{name} has NaN/+inf values or an all -inf row in row(s) {rows}")
    raise ValueError(f"the divergence is NaN in row(s) {rows}")


def kd_loss(student_logits, teacher_logits, labels=None, *, kind="srkl", alpha=0.1, beta=0.5, temperature=1.0,
            ignore_index=-100, reduction="mean", backend="auto"):
    """Token-level distillation loss between student and teacher logits, fused over the vocabulary.

    Every position contributes ``D(p_T, p_S)`` (nats) with ``p = softmax(logits / temperature)``;
    kinds: ``fkl`` KL(p_T||p_S), ``rkl`` KL(p_S||p_T), ``jsd`` (weight ``beta``; 0 → fkl, 1 → rkl),
    ``skl``/``srkl`` skew KL with ``alpha`` (DistiLLM), ``tvd``. Positions whose label equals
    ``ignore_index`` are skipped. Forward and backward are one Triton kernel over each row; there
    is no host sync. No gradient flows to the teacher. NaN/inf logits give a NaN loss.

    Args:
        student_logits, teacher_logits: ``[..., V]`` float32/bfloat16/float16 (float64 runs the reference).
        labels: optional integer tensor of shape ``[...]``; only compared with ``ignore_index``.
        reduction: ``mean`` over kept positions (0 when none is kept), ``sum``, or ``none`` (shape ``[...]``).

    Returns:
        float32 loss (float64 for float64 inputs); the gradient has the student dtype.

    Example::

        loss = switchkd.kd_loss(student_out.logits, teacher_out.logits, labels, kind="srkl", alpha=0.1)
        loss.backward()
    """
    _check_pair(student_logits, teacher_logits)
    _check_loss_args(kind, alpha, beta)
    _check_temperature(temperature, allow_zero=False)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    lead_shape = student_logits.shape[:-1]
    if labels is not None:
        _check_labels(labels, lead_shape, student_logits.device)
    kind = reference.canonical_kind(kind, beta)

    if resolve_backend(student_logits, backend) == "reference":
        return reference.kd_loss(
            student_logits, teacher_logits, labels, kind=kind, alpha=alpha, beta=beta, temperature=temperature,
            ignore_index=ignore_index, reduction=reduction,
        )
    s, t = _rows_2d(student_logits), _rows_2d(teacher_logits.detach())
    rows_labels = None if labels is None else labels.reshape(-1).to(torch.int64)
    out = KDLossFunction.apply(s, t, rows_labels, kind, alpha, beta, float(temperature), ignore_index, reduction)
    return out.reshape(lead_shape) if reduction == "none" else out
