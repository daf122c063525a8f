"""Every Triton kernel variant must compile for sm_80 and sm_90 (the GPU gate on machines without a GPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from aot_compile import cases


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("aot_compile.py"))], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.mark.parametrize("case", sorted(cases()))
def test_kernel_compiles_for_gpu(compiled, case):
    result = compiled[case]
    assert result.get("ok"), result.get("error")
    assert result["n_spills"] == 0, f"{case} spills {result['n_spills']} bytes ({result['n_regs']} registers)"
