"""Test setup: on a machine without CUDA the Triton kernels run in Triton's CPU interpreter.

TRITON_INTERPRET must be set before triton is imported, so this happens at collection time.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def random_logits(rows, vocab, dtype=torch.float32, device=DEVICE, spread=(0.5, 4.0)):
    """Random logits with a per-row scale in `spread`, so rows range from flat to peaked."""
    scale = torch.empty(rows, 1, dtype=torch.float64).uniform_(*spread)
    return (torch.randn(rows, vocab, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def assert_error_ratio(name, out, ref64, plain, atol):
    """Kernel error vs the float64 reference is at most 2x plain PyTorch's own error at that dtype, plus atol."""
    err = (out.double() - ref64).abs().max().item()
    base = (plain.double() - ref64).abs().max().item()
    assert err <= 2 * base + atol, f"{name}: error {err:.3g} > 2 x PyTorch's {base:.3g} + {atol:.1g}"
