"""switchkd: SWITCH knowledge distillation (teacher intervention during student generation) with fused kernels."""

from .ops import fused_switch_step, kd_loss
from .policy import SwitchPolicy
from .reference import SwitchStep

__version__ = "0.1.0"

__all__ = ["SwitchPolicy", "SwitchStep", "fused_switch_step", "kd_loss", "__version__"]
