"""Test setup: on a machine without CUDA the Triton kernels run in Triton's CPU interpreter.

TRITON_INTERPRET must be set before triton is imported, so this happens at collection time.
"""

import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))  # tasks, quality, harness

from switchkd.ops.spec import default_backend  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=["reference", "triton"])
def backend(request):
    """Each op test runs on the PyTorch reference and on the Triton kernels (interpreted on CPU)."""
    return request.param


@pytest.fixture
def reference_backend():
    """Ops called with backend="auto" run the reference: for model-level tests, whose kernels have their own."""
    with default_backend("reference"):
        yield


def random_logits(rows, vocab, dtype=torch.float32, device=DEVICE, spread=(0.5, 4.0)):
    """Random logits with a per-row scale in `spread`, so rows range from flat to peaked."""
    scale = torch.empty(rows, 1, dtype=torch.float64).uniform_(*spread)
    return (torch.randn(rows, vocab, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def assert_same_values(out, expected, name=""):
    """Two kernel variants over the same data agree: exactly in the interpreter, which runs the same arithmetic either
    way, and on CUDA, where the compiler schedules each variant's float arithmetic on its own, within rounding (float32
    to 1e-6 relative, lower precisions to their one-ulp defaults); integers and booleans exactly everywhere."""
    if out.is_cuda and out.is_floating_point():
        tol = {"rtol": 1e-6, "atol": 1e-7} if out.dtype == torch.float32 else {}
        torch.testing.assert_close(out, expected, **tol, msg=lambda m: f"{name}: {m}")
    else:
        assert torch.equal(out, expected), name


def assert_error_ratio(name, out, ref64, plain, atol):
    """Kernel error vs the float64 reference is at most 2x plain PyTorch's own error at that dtype, plus atol."""
    err = (out.double() - ref64).abs().max().item()
    base = (plain.double() - ref64).abs().max().item()
    assert err <= 2 * base + atol, f"{name}: error {err:.3g} > 2 x PyTorch's {base:.3g} + {atol:.1g}"
