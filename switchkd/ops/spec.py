"""The one home of switchkd's rules: loss kinds, switch policies, their kernel codes, the threshold
rule, the result record and the input checks shared by every op.

Kernels (``switchkd.kernels``), the reference, the tests and the ahead-of-time compile all import
these names; nothing else lists them.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch

# ------------------------------------------------------------------------------------ loss kinds
LOSS_KINDS = ("fkl", "rkl", "jsd", "skl", "srkl", "tvd")
LOSS_CODES = {kind: code for code, kind in enumerate(LOSS_KINDS)}  # the kernels' KIND constexpr
REDUCTIONS = ("mean", "sum", "none")


def ceil_div(a: int, b: int) -> int:
    """``triton.cdiv`` for the host: plain Python (triton's is a jit function, about 3 µs a call)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """``triton.next_power_of_2`` for the host (1 for n <= 1), plain Python like :func:`ceil_div`."""
    return 1 << max(n - 1, 0).bit_length()


def canonical_kind(kind: str, beta: float) -> str:
    """``jsd`` at the ends of its range is ``fkl`` (beta = 0) or ``rkl`` (beta = 1)."""
    if kind == "jsd" and beta == 0.0:
        return "fkl"
    if kind == "jsd" and beta == 1.0:
        return "rkl"
    return kind


# -------------------------------------------------------------------------------------- policies
POLICY_KINDS = ("exp", "linear", "constant", "topk", "never", "always")
# tau0: best in both validation sweeps of benchmarks/quality.py (RESULTS.md); decay: between the two
# sweeps' winners (0.005 and 0.02), whose margins were within one seed's noise.
DEFAULT_TAU0 = 0.3
DEFAULT_DECAY = 0.01
DEFAULT_TOP_K = 25


class Threshold(NamedTuple):
    """The threshold rule as coefficients: ``max(scale * exp(-rate * t) - slope * t, floor)``.

    Every threshold policy is one point of this family; the kernel and the reference evaluate the
    same formula from these numbers. ``floor = inf`` never switches, ``scale = -inf`` always does.
    """

    scale: float
    rate: float
    slope: float
    floor: float


@dataclass(frozen=True)
class SwitchPolicy:
    """Decides, per generated token, whether the teacher's sample replaces the student's.

    With ``d_t`` the Jensen-Shannon divergence (nats, in ``[0, ln 2]``) between teacher and student
    at generated position ``t`` (0 = first generated token), the teacher's token is taken when:

    - ``exp``:      ``d_t > tau0 * exp(-decay * t)``  (SWITCH)
    - ``linear``:   ``d_t > max(tau0 - decay * t, 0)``
    - ``constant``: ``d_t > tau0``
    - ``topk``:     the student's token is not among the teacher's ``top_k`` logits (Speculative KD)
    - ``never``:    never (pure on-policy, GKD);  ``always``: always (teacher sampling, SeqKD)

    Example::

        policy = SwitchPolicy("exp", tau0=0.3, decay=0.01)
        policy.threshold(10)  # 0.271 nats
    """

    kind: str = "exp"
    tau0: float = DEFAULT_TAU0
    decay: float = DEFAULT_DECAY
    top_k: int = DEFAULT_TOP_K

    def __post_init__(self):
        if self.kind not in POLICY_KINDS:
            raise ValueError(f"SwitchPolicy kind must be one of {POLICY_KINDS}, got {self.kind!r}")
        for name in ("tau0", "decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"SwitchPolicy {name} must be a float, got {type(value).__name__}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"SwitchPolicy {name} must be finite and >= 0, got {value}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int):
            raise TypeError(f"SwitchPolicy top_k must be an int, got {type(self.top_k).__name__}")
        if self.top_k < 1:
            raise ValueError(f"SwitchPolicy top_k must be >= 1, got {self.top_k}")

    def coefficients(self) -> Threshold:
        """This policy's point of the threshold family (``topk`` and ``never``: no threshold switch)."""
        inf = math.inf
        return {
            "exp": Threshold(self.tau0, self.decay, 0.0, -inf),
            "linear": Threshold(self.tau0, 0.0, self.decay, 0.0),
            "constant": Threshold(self.tau0, 0.0, 0.0, -inf),
            "always": Threshold(-inf, 0.0, 0.0, -inf),
        }.get(self.kind, Threshold(0.0, 0.0, 0.0, inf))

    def thresholds(self, positions: torch.Tensor) -> torch.Tensor:
        """Divergence threshold (nats) at each generated position, in float64."""
        c = self.coefficients()
        t = positions.to(torch.float64)
        return (c.scale * torch.exp(-c.rate * t) - c.slope * t).clamp_min(c.floor)

    def threshold(self, t: int) -> float:
        """Divergence threshold (nats) at generated position ``t``; inf = never switch, -inf = always."""
        return float(self.thresholds(torch.tensor([t]))[0])


DEFAULT_POLICY = SwitchPolicy()


class SwitchStep(NamedTuple):
    """Result of one switch step; every field is indexed by row ``[B]``."""

    tokens: torch.Tensor  # int64, the kept token
    from_teacher: torch.Tensor  # bool, True where the teacher's token was kept
    divergence: torch.Tensor  # float32, JSD(p_T, p_S) in nats
    student_tokens: torch.Tensor  # int64, the student's own sample
    teacher_tokens: torch.Tensor  # int64, the teacher's own sample
    loss: torch.Tensor  # float32 (float64 for float64 logits), kind `loss`, differentiable w.r.t. student logits


# ------------------------------------------------------------------------------------ input checks
LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
BACKENDS = ("auto", "triton", "reference")


def check_logits(name: str, x, max_dim: int | None = None):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in LOGIT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {x.dtype}")
    if x.dim() < 1 or (max_dim is not None and x.dim() != max_dim):
        form = "[B, V]" if max_dim == 2 else "[..., V]"
        raise ValueError(f"{name} must have shape {form}, got {tuple(x.shape)}")
    if x.shape[-1] < 1:
        raise ValueError(f"{name} has an empty vocabulary dimension: shape {tuple(x.shape)}")


def check_pair(student_logits, teacher_logits, max_dim: int | None = None):
    check_logits("student_logits", student_logits, max_dim)
    check_logits("teacher_logits", teacher_logits, max_dim)
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


def check_float(name: str, value, low: float = -math.inf, high: float = math.inf):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")


def check_int(name: str, value, low: int | None = None):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def check_temperature(temperature, allow_zero: bool):
    check_float("temperature", temperature)
    if not (temperature > 0 or (allow_zero and temperature == 0)) or temperature == math.inf:
        bound = ">= 0 (0 = greedy)" if allow_zero else "> 0"
        raise ValueError(f"temperature must be finite and {bound}, got {temperature}")


def check_loss_args(kind, alpha, beta):
    if kind not in LOSS_KINDS:
        raise ValueError(f"loss kind must be one of {LOSS_KINDS}, got {kind!r}")
    check_float("alpha", alpha, 0.0, 1.0)
    check_float("beta", beta, 0.0, 1.0)


def check_reduction(reduction, allowed=REDUCTIONS):
    if reduction not in allowed:
        raise ValueError(f"reduction must be one of {allowed}, got {reduction!r}")


def check_int_rows(name: str, value, batch: int, device) -> torch.Tensor:
    """An int64 ``[B]`` tensor on ``device`` from an integer tensor."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be an int or a [B] integer tensor, got {type(value).__name__}")
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise TypeError(f"{name} must have an integer dtype, got {value.dtype}")
    if value.shape != (batch,):
        raise ValueError(f"{name} must have shape [B] = [{batch}], got {tuple(value.shape)}")
    return value.to(device=device, dtype=torch.int64).contiguous()


def check_positions(positions, batch: int, device):
    """``positions`` as a non-negative int or an int64 ``[B]`` tensor."""
    if isinstance(positions, bool) or not isinstance(positions, (int, torch.Tensor)):
        raise TypeError(f"positions must be an int or a [B] integer tensor, got {type(positions).__name__}")
    if isinstance(positions, int):
        check_int("positions", positions, low=0)
        return positions
    return check_int_rows("positions", positions, batch, device)


def check_labels(labels, lead_shape, device):
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must have an integer dtype, got {labels.dtype}")
    if labels.shape != lead_shape:
        raise ValueError(f"labels must have shape {tuple(lead_shape)} (the inputs' without the last dim), got "
                         f"{tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels is on {labels.device} but the inputs are on {device}")


def rows_2d(x: torch.Tensor) -> torch.Tensor:
    """``[..., V]`` → ``[N, V]`` with a contiguous last dimension (a view where possible)."""
    x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


def kernel_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``[R, V]`` logits (last dim contiguous) as the loss and switch-step kernels read them, and their row stride in
    those elements. bf16 rows that stay 16-byte aligned as pairs (V even, the row stride a multiple of 32, an aligned
    base) go as int32 words of two columns each: the kernels widen a word to two float32 columns in two instructions
    instead of about four (``kernels.divergence._widen``). Others go as they are."""
    rows, vocab = x.shape
    stride = x.stride(0)
    if (x.dtype == torch.bfloat16 and vocab % 2 == 0 and x.stride(1) == 1 and x.data_ptr() % 16 == 0
            and (stride % 32 == 0 or (rows == 1 and stride % 2 == 0))):
        x = x.detach().view(torch.int32)
    return x, x.stride(0)


def triton_interpreted() -> bool:
    """Triton runs in its CPU interpreter (TRITON_INTERPRET=1, read when triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_default_backend = os.environ.get("SWITCHKD_BACKEND", "auto")


@contextlib.contextmanager
def default_backend(backend: str):
    """Within the block, ops called with ``backend="auto"`` use ``backend`` (also set by ``SWITCHKD_BACKEND``).

    Example::

        with switchkd.ops.spec.default_backend("reference"):
            trainer.train()  # every op runs the PyTorch reference
    """
    global _default_backend
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    saved, _default_backend = _default_backend, backend
    try:
        yield
    finally:
        _default_backend = saved


def resolve_backend(x: torch.Tensor, backend: str) -> str:
    """``auto``: Triton on CUDA; on CPU the Triton interpreter when TRITON_INTERPRET=1, else reference.

    float64 always runs on the reference (the kernels accumulate in float32).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = _default_backend
    if backend == "reference":
        return "reference"
    if x.dtype == torch.float64:
        if backend == "triton":
            raise ValueError("backend='triton' does not take float64 logits; use backend='reference'")
        return "reference"
    if x.is_cuda:
        return "triton"
    interpreted = triton_interpreted()
    if backend == "triton" and not interpreted:
        raise ValueError(
            "backend='triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 before "
            "triton is imported"
        )
    return "triton" if interpreted else "reference"
