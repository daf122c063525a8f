"""switchkd: SWITCH knowledge distillation (teacher intervention during student generation) with fused kernels.

Attributes load on first use (PEP 562): ``switchkd.kd_loss`` imports torch and triton only, the
decoding names bring in transformers and the C++ extension, the training names the Trainer.
"""

import importlib

__version__ = "0.1.0"

_HOMES = {
    "SwitchPolicy": "ops.spec", "SwitchStep": "ops.spec", "LOSS_KINDS": "ops.spec", "POLICY_KINDS": "ops.spec",
    "kd_loss": "ops.kd_loss", "fused_switch_step": "ops.switch_step", "sample": "ops.switch_step",
    "fused_linear_kd_loss": "ops.linear_kd", "reference": "ops",
    "SwitchGenerator": "decoding.generator", "SwitchOutput": "decoding.generator",
    "switch_generate": "decoding.generator",
    "SwitchKDConfig": "training.config", "SwitchKDTrainer": "training.trainer",
}

__all__ = sorted(_HOMES) + ["__version__"]


def __getattr__(name):
    if name not in _HOMES:
        raise AttributeError(f"module 'switchkd' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
