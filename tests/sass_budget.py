"""Instructions per vocabulary column of each kernel's loops, from the sm_90 SASS, at the size the GPU benchmark uses.

The kernels are compiled ahead of time as the JIT would compile them for ``V = 128256`` bf16 rows (pointers and
multiples of 16 marked divisible by 16, so loads vectorise) in the first GPU tile config, disassembled with the
``cuobjdump`` that ships with Triton, and every loop (a backward branch) is counted: instructions in its body
divided by the columns one thread handles per trip. Issue-bound time follows: columns x instructions / (SMs x 4
schedulers x 32 lanes x clock). Run as a script (no TRITON_INTERPRET) it prints JSON: case -> per-loop counts.
``tests/test_sass_budget.py`` holds each case to its budget.
"""

import json
import os
import re
import subprocess
import sys
import tempfile

import aot_compile

aot_compile.VOCAB = 128256

# case -> (recorded launches, kernel whose loops are counted)
CASES = {
    "switch_step phase 1 (statistics)": (lambda: aot_compile.switch_step_case("bf16"), "_stats_kernel"),
    "switch_step phase 2 (jsd, fkl loss and gradient; the sampling scans cold)": (
        lambda: aot_compile.switch_step_case("bf16"), "_switch_step_kernel"),
    "switch_step phase 2, decoding (jsd and fkl loss, no gradient)": (
        lambda: aot_compile.switch_step_case("bf16", has_grad=False), "_switch_step_kernel"),
    "switch_step in one launch, decoding (statistics, then jsd and fkl loss)": (
        lambda: aot_compile.switch_step_case("bf16", has_grad=False, fused=True), "_switch_step_fused_kernel"),
    "kd_loss jsd, one program per row": (lambda: aot_compile.kd_loss_case("bf16", kind="jsd"), "_kd_loss_kernel"),
    "kd_loss fkl, one program per row": (lambda: aot_compile.kd_loss_case("bf16", kind="fkl"), "_kd_loss_kernel"),
    "kd_loss srkl (the default kind), one program per row": (lambda: aot_compile.kd_loss_case("bf16", kind="srkl"),
                                                             "_kd_loss_kernel"),
    "kd_loss split phase 1 (statistics)": (lambda: aot_compile.kd_loss_case("bf16", kind="jsd", splits=4),
                                           "_stats_kernel"),
}


def sass(fn, kwargs, arch=90) -> str:
    """SASS of ``fn`` compiled for ``arch`` with the JIT's divisibility-by-16 specialisation."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kwargs = dict(kwargs)
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "maxnreg") if kwargs.get(k) is not None}
    constexprs = {p.name: kwargs[p.name] for p in fn.params if p.is_constexpr}
    signature = {p.name: "constexpr" if p.is_constexpr else aot_compile._type(kwargs[p.name]) for p in fn.params}
    attrs = aot_compile.jit_divisibility(fn, kwargs)
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", arch, 32), options=options)
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        return subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True, check=True).stdout


def loops(text: str) -> list[dict]:
    """Each innermost loop of a SASS listing (an outer loop over rows holds the vocabulary loops): its instruction
    count, global loads and special-function (MUFU) ops, and ``hot``, the instructions outside the blocks that a
    predicated forward branch inside the loop skips (runtime ``if``s: the switch step's sampling scan runs in one
    program per row and model, and only until it finds the token)."""
    body = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", text)]
    branches = []
    for address, instruction in body:
        branch = re.search(r"\bBRA\s+(?:`\(\.L_x_\d+\)|(0x[0-9a-f]+))", instruction)
        if branch and branch.group(1):
            branches.append((address, int(branch.group(1), 16), instruction.lstrip().startswith("@")))
    spans = [(target, address) for address, target, _ in branches if target < address]
    out = []
    for lo, hi in spans:
        if any(lo <= a and b <= hi and (a, b) != (lo, hi) for a, b in spans):
            continue  # holds another loop
        ops = [(a, i) for a, i in body if lo <= a <= hi]
        skipped = [(a, t) for a, t, predicated in branches if predicated and lo <= a < t <= hi]
        cold = sum(any(start < a < end for start, end in skipped) for a, _ in ops)
        # strong loads are a spin on a barrier counter, not a sweep of the vocabulary
        loads = sum("LDG" in i and "STRONG" not in i for _, i in ops)
        out.append({"instructions": len(ops), "hot": len(ops) - cold, "loads": loads,
                    "mufu": sum("MUFU" in i for _, i in ops)})
    return out


def profile() -> dict:
    """case -> {"columns_per_trip", "loops": [...], "per_column": hot instructions per column over the loops that
    load, "barriers": block-wide barriers in the whole kernel}."""
    results = {}
    for case, (launch, wanted) in CASES.items():
        name, kernel, kwargs = next(call for call in launch() if call[0] == wanted)
        _, fn, variant = aot_compile.variants(kernel, kwargs)[0]
        columns = variant["BLOCK"] / (32 * variant["num_warps"])  # per thread and trip
        text = sass(fn, variant)
        found = loops(text)
        # a loop that loads both rows' tiles twice per trip covers two tiles of columns
        per_column = sum(loop["hot"] / max(1, loop["loads"] // 2) for loop in found if loop["loads"]) / columns
        results[case] = {"kernel": name, "columns_per_trip": columns, "loops": found,
                         "per_column": round(per_column, 1), "barriers": text.count("BAR.SYNC")}
    return results


if __name__ == "__main__":
    json.dump(profile(), sys.stdout)
