"""Compile every Triton kernel variant ahead of time for sm_80 and sm_90 on a machine without a GPU.

The cases come from the spec (every loss kind, policy, dtype and switch) and go through the real
launchers with CPU tensors; a recorder stands in for each kernel and keeps every launch's arguments,
so signatures and constexprs are never restated here. An autotuned kernel is compiled in every config
its autotuner may pick on a GPU. Run as a script (in a process without TRITON_INTERPRET) it prints one
JSON object: case name → {kernel[config] → {"ok", "n_regs", "n_spills"} or {"error"}}.
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

from switchkd.kernels.split import ALIGNED_ARGS
from switchkd.ops.spec import LOSS_KINDS, POLICY_KINDS, SwitchPolicy

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64",
              torch.int32: "i32", torch.uint8: "u8", torch.bool: "u8"}
VOCAB = 50257
PACKED_VOCAB = 128256
SPLITS = 4
# module → kernels its launchers may start
KERNELS = {"split": ("_stats_kernel", "_grad_kernel"),
           "kd_loss": ("_kd_loss_kernel", "_kd_loss_split_kernel", "_scale_grad_kernel", "_scaled_copy_kernel"),
           "switch_step": ("_switch_step_kernel", "_switch_step_finish_kernel", "_switch_step_fused_kernel"),
           "sampling": ("_sample_kernel",)}
kd_loss_op = importlib.import_module("switchkd.ops.kd_loss")
switch_step_op = importlib.import_module("switchkd.ops.switch_step")
stored_grad = importlib.import_module("switchkd.ops.stored_grad")


class Recorder:
    """Stands in for a kernel: ``kernel[grid](**kwargs)`` appends ``(name, kernel, kwargs)`` to ``calls``."""

    def __init__(self, name, kernel, calls):
        self.name, self.kernel, self.calls = name, kernel, calls

    def __getitem__(self, grid):
        return lambda **kwargs: self.calls.append((self.name, self.kernel, kwargs))


def _type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + TYPE_NAMES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    return "fp32"


def _record(launch):
    """``[(kernel name, kernel, kwargs)]`` of every launch ``launch()`` makes."""
    calls, saved = [], []
    for module_name, names in KERNELS.items():
        module = importlib.import_module(f"switchkd.kernels.{module_name}")
        for name in names:
            saved.append((module, name, getattr(module, name)))
            setattr(module, name, Recorder(name, saved[-1][2], calls))
    try:
        launch()
    finally:
        for module, name, kernel in saved:
            setattr(module, name, kernel)
    return calls


def switch_step_case(dtype, policy="exp", kind="fkl", greedy=False, scalar_args=False, has_grad=True,
                     given_student=False, splits=SPLITS, fused=False, vocab=None):
    s = torch.zeros(2, vocab or VOCAB, dtype=DTYPES[dtype], requires_grad=has_grad)
    positions = 3 if scalar_args else torch.zeros(2, dtype=torch.int64)
    keys = None if scalar_args else torch.zeros(2, dtype=torch.int64)
    given = torch.zeros(2, dtype=torch.int64) if given_student else None
    return _record(lambda: switch_step_op.switch_step_triton(
        s, s.detach(), positions, keys, policy=SwitchPolicy(policy), temperature=0.0 if greedy else 1.0, seed=0,
        kind=kind, alpha=0.1, beta=0.5, need_grad=has_grad, splits=splits, student_tokens=given, fused=fused))


def kd_loss_case(dtype, kind="srkl", has_labels=True, has_grad=True, splits=1, weighted=True, vocab=None):
    s = torch.zeros(2, vocab or VOCAB, dtype=DTYPES[dtype])
    labels = torch.zeros(2, dtype=torch.int64) if has_labels else None
    weight = torch.ones((), dtype=torch.float32) if weighted else None
    return _record(lambda: kd_loss_op.kd_loss_triton(
        s, s, labels, kind=kind, alpha=0.1, beta=0.5, temperature=1.0, ignore_index=-100, need_grad=has_grad,
        weight=weight, splits=splits))


def sample_case(dtype, greedy=False, scalar_args=False, vocab=None):
    x = torch.zeros(2, vocab or VOCAB, dtype=DTYPES[dtype])
    positions = 3 if scalar_args else torch.zeros(2, dtype=torch.int64)
    return _record(lambda: switch_step_op.sample_triton(
        x, positions, None, temperature=0.0 if greedy else 1.0, seed=0, model=1))


def scale_case(dtype):
    grad = torch.zeros(2, VOCAB, dtype=DTYPES[dtype])

    def launch():
        stored_grad.launch_scale(grad, torch.ones(2))
        stored_grad.launch_scaled_copy(grad, torch.ones(()), torch.empty_like(grad))

    return _record(launch)


def cases():
    """Case name → (arch, case function, its arguments). Both archs for the defaults (every dtype on
    sm_90; fp16 compiles as bf16 does); every policy, loss kind and switch on sm_90."""
    out = {}
    for arch, dtypes in ((80, ("fp32", "bf16")), (90, DTYPES)):
        for dtype in dtypes:
            out[f"sm{arch}-{dtype}-switch_step"] = (arch, switch_step_case, (dtype,), {})
            out[f"sm{arch}-{dtype}-kd_loss"] = (arch, kd_loss_case, (dtype,), {})
            out[f"sm{arch}-{dtype}-kd_loss-split"] = (arch, kd_loss_case, (dtype,), {"splits": SPLITS})
            out[f"sm{arch}-{dtype}-sample"] = (arch, sample_case, (dtype,), {})
            out[f"sm{arch}-{dtype}-scale"] = (arch, scale_case, (dtype,), {})
    for policy in POLICY_KINDS:
        out[f"sm90-bf16-switch_step-{policy}"] = (90, switch_step_case, ("bf16",), {"policy": policy})
    for kind in LOSS_KINDS:
        out[f"sm90-bf16-switch_step-{kind}"] = (90, switch_step_case, ("bf16",), {"kind": kind})
        out[f"sm90-bf16-kd_loss-{kind}"] = (90, kd_loss_case, ("bf16",), {"kind": kind})
        out[f"sm90-bf16-kd_loss-split-{kind}"] = (90, kd_loss_case, ("bf16",), {"kind": kind, "splits": SPLITS})
    out["sm90-bf16-switch_step-given-student-nograd"] = (
        90, switch_step_case, ("bf16",), {"given_student": True, "has_grad": False, "policy": "topk"})
    out["sm90-bf16-switch_step-one-split"] = (90, switch_step_case, ("bf16",), {"splits": 1})
    # the one-launch step (SWITCHKD_FUSED_STEP=1): the defaults on both archs, then greedy, topk and a mixture kind
    for arch in (80, 90):
        out[f"sm{arch}-bf16-switch_step-fused"] = (arch, switch_step_case, ("bf16",), {"fused": True})
    out["sm90-fp32-switch_step-fused-greedy-scalars-nograd"] = (
        90, switch_step_case, ("fp32",), {"fused": True, "greedy": True, "scalar_args": True, "has_grad": False})
    out["sm90-bf16-switch_step-fused-topk-given-student-nograd"] = (
        90, switch_step_case, ("bf16",), {"fused": True, "policy": "topk", "given_student": True, "has_grad": False})
    out["sm90-bf16-switch_step-fused-jsd"] = (90, switch_step_case, ("bf16",), {"fused": True, "kind": "jsd"})
    out["sm90-bf16-switch_step-greedy-scalars-nograd"] = (
        90, switch_step_case, ("bf16",), {"greedy": True, "scalar_args": True, "has_grad": False})
    for splits in (1, SPLITS):
        out[f"sm90-bf16-kd_loss-nolabels-nograd-unweighted-{splits}"] = (
            90, kd_loss_case, ("bf16",), {"has_labels": False, "has_grad": False, "splits": splits, "weighted": False})
    # bf16 rows the kernels read as int32 words (switchkd.ops.spec.kernel_rows): an even V with aligned rows
    packed = {"vocab": PACKED_VOCAB}
    for arch in (80, 90):
        out[f"sm{arch}-bf16-packed-switch_step"] = (arch, switch_step_case, ("bf16",), packed)
        out[f"sm{arch}-bf16-packed-switch_step-fused"] = (arch, switch_step_case, ("bf16",), {**packed, "fused": True})
        out[f"sm{arch}-bf16-packed-kd_loss"] = (arch, kd_loss_case, ("bf16",), {**packed, "kind": "jsd"})
        out[f"sm{arch}-bf16-packed-kd_loss-split"] = (arch, kd_loss_case, ("bf16",),
                                                      {**packed, "kind": "srkl", "splits": SPLITS})
    out["sm90-bf16-packed-switch_step-fused-greedy-topk-nograd"] = (
        90, switch_step_case, ("bf16",), {**packed, "fused": True, "greedy": True, "policy": "topk", "has_grad": False})
    for greedy in (False, True):
        out[f"sm90-bf16-packed-sample{'-greedy' * greedy}"] = (90, sample_case, ("bf16",), {**packed, "greedy": greedy})
    out["sm90-bf16-packed-switch_step-topk-given-student-rkl"] = (
        90, switch_step_case, ("bf16",), {**packed, "policy": "topk", "given_student": True, "kind": "rkl"})
    out["sm90-bf16-sample-greedy-scalars"] = (90, sample_case, ("bf16",), {"greedy": True, "scalar_args": True})
    return out


def variants(kernel, kwargs):
    """``(label, jit function, kwargs)`` for every config an autotuned kernel may pick (the GPU list)."""
    if not hasattr(kernel, "configs"):
        return [("", kernel, kwargs)]
    from switchkd.kernels.split import needs_alignment

    out = []
    for config in kernel.configs:
        options = {"num_warps": config.num_warps, "num_stages": config.num_stages, "maxnreg": config.maxnreg,
                   "aligned": needs_alignment(config)}
        tiles = ",".join(f"{k}={v}" for k, v in config.kwargs.items())
        label = f"[{tiles},w{config.num_warps},s{config.num_stages},r{config.maxnreg}]"
        out.append((label, kernel.fn, {**kwargs, **config.kwargs, **options}))
    return out


def compile_case(arch, kernel, kwargs):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    aligned = kwargs.pop("aligned", False)
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "maxnreg") if kwargs.get(k) is not None}
    constexprs = {p.name: kwargs[p.name] for p in kernel.params if p.is_constexpr}
    signature = {p.name: "constexpr" if p.is_constexpr else _type(kwargs[p.name]) for p in kernel.params}
    attrs = jit_divisibility(kernel, kwargs, force=ALIGNED_ARGS) if aligned else {}
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    if not compiled.asm.get("cubin"):
        return {"error": "no cubin produced"}
    return {"ok": True, **register_usage(compiled.asm["ptx"], arch)}


def jit_divisibility(fn, kwargs, force=()) -> dict:
    """The JIT's divisibility-by-16 specialisation of ``fn``'s arguments: every pointer, every integer that is a
    multiple of 16, and the integers named in ``force`` (a register-capped config runs only when they are, so it is
    compiled as it would run; the others are compiled unspecialised, as at any V)."""
    return {(i,): [["tt.divisibility", 16]] for i, p in enumerate(fn.params) if not p.is_constexpr and (
        hasattr(kwargs[p.name], "data_ptr") or p.name in force
        or (type(kwargs[p.name]) is int and kwargs[p.name] % 16 == 0))}


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


def _compile_key(arch, fn, kwargs):
    """What determines the binary: the kernel, the argument types, the constexprs and the options."""
    fixed = {p.name for p in fn.params if p.is_constexpr} | {"num_warps", "num_stages", "maxnreg", "aligned"}
    return arch, fn.fn.__name__, tuple(sorted((k, repr(v) if k in fixed else _type(v)) for k, v in kwargs.items()))


def compile_all():
    results, done = {}, {}
    for name, (arch, case, args, kwargs) in cases().items():
        results[name] = {}
        try:
            calls = case(*args, **kwargs)
        except Exception:  # noqa: BLE001 - reported to the test, which fails with the message
            results[name]["launch"] = {"error": traceback.format_exc(limit=4)}
            continue
        for kernel_name, kernel, launch_kwargs in calls:
            for label, fn, variant_kwargs in variants(kernel, launch_kwargs):
                key = _compile_key(arch, fn, variant_kwargs)
                if key not in done:
                    try:
                        done[key] = compile_case(arch, fn, dict(variant_kwargs))
                    except Exception:  # noqa: BLE001 - as above
                        done[key] = {"error": traceback.format_exc(limit=4)}
                results[name][kernel_name + label] = done[key]
    return results


if __name__ == "__main__":
    json.dump(compile_all(), sys.stdout)
