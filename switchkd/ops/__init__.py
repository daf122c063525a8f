"""The op layer: torch and triton only. Kernels live in ``switchkd.kernels``; ``reference`` is the spec."""

from .kd_loss import kd_loss
from .linear_kd import fused_linear_kd_loss
from .spec import LOSS_KINDS, POLICY_KINDS, SwitchPolicy, SwitchStep
from .switch_step import fused_switch_step, sample

__all__ = ["LOSS_KINDS", "POLICY_KINDS", "SwitchPolicy", "SwitchStep", "fused_linear_kd_loss", "fused_switch_step",
           "kd_loss", "sample"]
