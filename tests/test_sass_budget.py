"""The kernels' loops stay within their instruction budgets (sm_90 SASS, V = 128256 bf16, see sass_budget.py).

The budgets are the design's limits on paper: kd_loss and the switch step are bound by instruction issue, not
memory, once they pass a few dozen instructions per column, so a change that adds instructions to a loop is a
slowdown even where no GPU can time it. benchmarks/RESULTS.md turns these counts into time.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sass_budget import CASES, loops

# instructions per vocabulary column, all the kernel's loading loops together (about 10% above today's counts)
BUDGETS = {
    "switch_step phase 1 (statistics)": 14,
    "switch_step phase 2 (jsd, fkl loss and gradient; the sampling scans cold)": 29,
    "switch_step phase 2, decoding (jsd and fkl loss, no gradient)": 25,
    "switch_step in one launch, decoding (statistics, then jsd and fkl loss)": 38,
    "kd_loss jsd, one program per row": 63,
    "kd_loss fkl, one program per row": 33,
    "kd_loss srkl (the default kind), one program per row": 64,
    "kd_loss split phase 1 (statistics)": 14,
}


@pytest.fixture(scope="module")
def profile():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SWITCHKD_AUTOTUNE")}
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("sass_budget.py"))], env=env,
                          capture_output=True, text=True, timeout=900, cwd=Path(__file__).parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.mark.parametrize("case", sorted(CASES))
def test_loops_stay_within_their_instruction_budget(profile, case):
    result = profile[case]
    assert result["loops"], f"{case}: no loop found in the SASS of {result['kernel']}"
    assert result["per_column"] <= BUDGETS[case], (
        f"{case}: {result['per_column']} instructions per column > budget {BUDGETS[case]} ({result['loops']})")


@pytest.mark.parametrize("case", [case for case in sorted(CASES) if "(statistics)" in case])
def test_statistics_end_in_two_block_reductions(profile, case):
    """Both rows' maxima go through shared memory together, then both rows' sums: two exchanges, whose barriers are
    the kernel's only ones (3 with triton 3.9, 5 with 3.6). One reduction per row and value took 7 (3.9) to 11 (3.6)."""
    assert profile[case]["barriers"] <= 5, f"{case}: {profile[case]['barriers']} barriers"


def test_hot_path_leaves_out_what_a_predicated_forward_branch_skips():
    """A loop of 7 instructions whose 3 middle ones a predicated branch skips has 4 hot ones; the instructions
    outside the loop do not count."""
    listing = "\n".join(f"        /*{address:04x}*/    {op} ;" for address, op in [
        (0x00, "MOV R1, R2"), (0x10, "FADD R1, R1, R2"), (0x20, "@P0 BRA 0x60"), (0x30, "FMUL R1, R1, R1"),
        (0x40, "MUFU.EX2 R1, R1"), (0x50, "FADD R3, R3, R1"), (0x60, "LDG.E.128 R4, desc[UR4][R6.64]"),
        (0x70, "@!P1 BRA 0x10"), (0x80, "EXIT")])
    assert loops(listing) == [{"instructions": 7, "hot": 4, "loads": 1, "mufu": 1}]
