"""SwitchPolicy: when the teacher takes over a token."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

POLICY_KINDS = ("exp", "linear", "constant", "topk", "never", "always")

# tau0: best in both validation sweeps of benchmarks/quality.py (RESULTS.md); decay: between the two
# sweeps' winners (0.005 and 0.02), whose margins were within one seed's noise.
DEFAULT_TAU0 = 0.3
DEFAULT_DECAY = 0.01
DEFAULT_TOP_K = 25


@dataclass(frozen=True)
class SwitchPolicy:
    """Decides, per generated token, whether the teacher's sample replaces the student's.

    With ``d_t`` the Jensen-Shannon divergence (nats) between teacher and student at generated
    position ``t`` (0 = first generated token), the teacher's token is taken when:

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

    @property
    def uses_threshold(self) -> bool:
        return self.kind in ("exp", "linear", "constant")

    def threshold(self, t: int) -> float:
        """Divergence threshold (nats) at generated position ``t``; inf = never switch, -inf = always."""
        if self.kind == "exp":
            return self.tau0 * math.exp(-self.decay * t)
        if self.kind == "linear":
            return max(self.tau0 - self.decay * t, 0.0)
        if self.kind == "constant":
            return self.tau0
        if self.kind == "always":
            return -math.inf
        return math.inf  # never; topk does not use a threshold

    def thresholds(self, positions: torch.Tensor) -> torch.Tensor:
        """Vectorised :meth:`threshold` over a tensor of positions, in float64."""
        t = positions.to(torch.float64)
        if self.kind == "exp":
            return self.tau0 * torch.exp(-self.decay * t)
        if self.kind == "linear":
            return (self.tau0 - self.decay * t).clamp_min(0.0)
        return torch.full_like(t, self.threshold(0))


DEFAULT_POLICY = SwitchPolicy()
