"""The training layer: SwitchKDConfig, SwitchKDTrainer (transformers.Trainer), data and evaluation."""

from .config import SwitchKDConfig
from .trainer import SwitchKDTrainer

__all__ = ["SwitchKDConfig", "SwitchKDTrainer"]
