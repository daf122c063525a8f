"""Every Triton kernel variant, in every config its autotuner may pick, must compile for sm_80 and sm_90
without register spills (the GPU gate on machines without a GPU). Each config is compiled as it can run: without
the JIT's divisibility specialisation (any V), except the register-capped ones, which the autotuner keeps only
where that specialisation applies (``split.needs_alignment``)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from aot_compile import cases


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SWITCHKD_AUTOTUNE")}
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("aot_compile.py"))], env=env,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.mark.parametrize("case", sorted(cases()))
def test_kernel_compiles_for_gpu_without_spills(compiled, case):
    results = compiled[case]
    assert results, f"{case} launched no kernel"
    for kernel, result in results.items():
        assert result.get("ok"), f"{kernel}: {result.get('error')}"
        assert result["n_spills"] == 0, f"{kernel} spills {result['n_spills']} bytes ({result['n_regs']} registers)"


def test_every_autotuner_config_is_compiled(compiled):
    """The autotuned kernels appear in each of their GPU configs (not only the interpreter's one)."""
    from switchkd.kernels.split import gpu_tile_configs, row_kernel_configs, switch_step_configs

    names = {name for results in compiled.values() for name in results}
    special = {"_kd_loss_kernel": row_kernel_configs, "_switch_step_kernel": switch_step_configs,
               "_switch_step_fused_kernel": switch_step_configs}
    for kernel in ("_stats_kernel", "_grad_kernel", "_kd_loss_kernel", "_kd_loss_split_kernel", "_switch_step_kernel",
                   "_switch_step_fused_kernel"):
        configs = special.get(kernel, gpu_tile_configs)()
        assert sum(name.startswith(kernel + "[") for name in names) == len(configs), kernel
