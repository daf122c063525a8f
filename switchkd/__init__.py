"""switchkd: SWITCH knowledge distillation (teacher intervention during student generation) with fused kernels."""

from .generate import SwitchGenerator, SwitchOutput, switch_generate
from .linear_kd import fused_linear_kd_loss
from .ops import fused_switch_step, kd_loss
from .policy import SwitchPolicy
from .reference import SwitchStep
from .trainer import SwitchKDConfig, SwitchKDTrainer

__version__ = "0.1.0"

__all__ = [
    "SwitchGenerator", "SwitchKDConfig", "SwitchKDTrainer", "SwitchOutput", "SwitchPolicy", "SwitchStep",
    "fused_linear_kd_loss", "fused_switch_step", "kd_loss", "switch_generate", "__version__",
]
