"""Compile every Triton kernel variant ahead of time for sm_80 and sm_90 on a machine without a GPU.

The cases come from the spec (every loss kind, policy, dtype and switch) and go through the real
launchers with CPU tensors; a recorder stands in for each kernel and keeps the launch's arguments,
so signatures and constexprs are never restated here. Run as a script (in a process without
TRITON_INTERPRET) it prints one JSON object: case name → {"ok", "n_regs", "n_spills"} or the error.
``tests/test_aot_compile.py`` runs it and checks every case.
"""

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import traceback

import torch

from switchkd.ops.spec import LOSS_KINDS, POLICY_KINDS, SwitchPolicy

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64",
              torch.int32: "i32", torch.uint8: "u8"}
VOCAB = 50257
kd_loss_op = importlib.import_module("switchkd.ops.kd_loss")
switch_step_op = importlib.import_module("switchkd.ops.switch_step")


class Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](**kwargs)`` records the kwargs."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        return lambda **kwargs: self.calls.append(kwargs)


def _type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + TYPE_NAMES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    return "fp32"


def _record(module, name, launch):
    """The kernel of ``module.name`` and the kwargs ``launch()`` passes to it."""
    kernels = __import__(f"switchkd.kernels.{module}", fromlist=[name])
    kernel = getattr(kernels, name)
    recorder = Recorder(kernel)
    setattr(kernels, name, recorder)
    try:
        launch()
    finally:
        setattr(kernels, name, kernel)
    return kernel, recorder.calls[0]


def switch_step_case(dtype, policy="exp", kind="fkl", greedy=False, scalar_args=False, has_grad=True):
    s = torch.zeros(2, VOCAB, dtype=DTYPES[dtype], requires_grad=has_grad)
    positions = 3 if scalar_args else torch.zeros(2, dtype=torch.int64)
    keys = None if scalar_args else torch.zeros(2, dtype=torch.int64)
    return _record("switch_step", "_switch_step_kernel", lambda: switch_step_op.switch_step_triton(
        s, s.detach(), positions, keys, policy=SwitchPolicy(policy), temperature=0.0 if greedy else 1.0, seed=0,
        kind=kind, alpha=0.1, beta=0.5, need_grad=has_grad))


def kd_loss_case(dtype, kind="srkl", has_labels=True, has_grad=True):
    s = torch.zeros(2, VOCAB, dtype=DTYPES[dtype])
    labels = torch.zeros(2, dtype=torch.int64) if has_labels else None
    return _record("kd_loss", "_kd_loss_kernel", lambda: kd_loss_op.kd_loss_triton(
        s, s, labels, kind=kind, alpha=0.1, beta=0.5, temperature=1.0, ignore_index=-100, need_grad=has_grad))


def sample_case(dtype, greedy=False, scalar_args=False):
    x = torch.zeros(2, VOCAB, dtype=DTYPES[dtype])
    positions = 3 if scalar_args else torch.zeros(2, dtype=torch.int64)
    return _record("sampling", "_sample_kernel", lambda: switch_step_op.sample_triton(
        x, positions, None, temperature=0.0 if greedy else 1.0, seed=0, model=1))


def cases():
    """Case name → (arch, case function, its arguments). Both archs and every dtype for the defaults;
    every policy, loss kind and switch on sm_90."""
    out = {}
    for arch in (80, 90):
        for dtype in DTYPES:
            out[f"sm{arch}-{dtype}-switch_step"] = (arch, switch_step_case, (dtype,), {})
            out[f"sm{arch}-{dtype}-kd_loss"] = (arch, kd_loss_case, (dtype,), {})
            out[f"sm{arch}-{dtype}-sample"] = (arch, sample_case, (dtype,), {})
    for policy in POLICY_KINDS:
        out[f"sm90-bf16-switch_step-{policy}"] = (90, switch_step_case, ("bf16",), {"policy": policy})
    for kind in LOSS_KINDS:
        out[f"sm90-bf16-switch_step-{kind}"] = (90, switch_step_case, ("bf16",), {"kind": kind})
        out[f"sm90-bf16-kd_loss-{kind}"] = (90, kd_loss_case, ("bf16",), {"kind": kind})
    out["sm90-bf16-switch_step-greedy-scalars-nograd"] = (
        90, switch_step_case, ("bf16",), {"greedy": True, "scalar_args": True, "has_grad": False})
    out["sm90-bf16-kd_loss-nolabels-nograd"] = (90, kd_loss_case, ("bf16",), {"has_labels": False,
                                                                               "has_grad": False})
    out["sm90-bf16-sample-greedy-scalars"] = (90, sample_case, ("bf16",), {"greedy": True, "scalar_args": True})
    return out


def compile_case(arch, kernel, kwargs):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    constexprs = {p.name: kwargs[p.name] for p in kernel.params if p.is_constexpr}
    signature = {p.name: "constexpr" if p.is_constexpr else _type(kwargs[p.name]) for p in kernel.params}
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    if not compiled.asm.get("cubin"):
        return {"error": "no cubin produced"}
    return {"ok": True, **register_usage(compiled.asm["ptx"], arch)}


def register_usage(ptx: str, arch: int) -> dict:
    """Registers per thread and spilled bytes, from ``ptxas -v`` (Triton's own ptxas) on the kernel's PTX."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        ptxas = get_ptxas(arch).path if hasattr(get_ptxas(arch), "path") else get_ptxas(arch)
        out = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}{'a' if arch >= 90 else ''}", path, "-o",
                              os.path.join(tmp, "k.cubin")], capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", out)
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", out)]
    return {"n_regs": int(regs.group(1)) if regs else None, "n_spills": sum(spills)}


def compile_all():
    results = {}
    for name, (arch, case, args, kwargs) in cases().items():
        try:
            kernel, launch_kwargs = case(*args, **kwargs)
            results[name] = compile_case(arch, kernel, dict(launch_kwargs))
        except Exception:  # noqa: BLE001 - reported to the test, which fails with the message
            results[name] = {"error": traceback.format_exc(limit=4)}
    return results


if __name__ == "__main__":
    json.dump(compile_all(), sys.stdout)
