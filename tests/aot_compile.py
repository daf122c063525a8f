"""Compile every Triton kernel ahead of time for sm_80 and sm_90 on a machine without a GPU.

Run as a script (in a process without TRITON_INTERPRET) it prints one JSON object: case name →
"ok" or the compiler's error. ``tests/test_aot_compile.py`` runs it and checks every case.
"""

import json
import sys
import traceback

LOSS_KINDS = ["fkl", "rkl", "jsd", "skl", "srkl", "tvd"]
POLICIES = ["exp", "linear", "constant", "topk", "never", "always"]
TYPES = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}


def switch_step_case(dtype, policy="exp", kind="fkl", greedy=False, scalar_args=False, has_grad=True):
    signature = {
        "s_ptr": f"*{dtype}", "t_ptr": f"*{dtype}", "positions_ptr": "*i64", "row_keys_ptr": "*i64",
        "tokens_ptr": "*i64", "from_teacher_ptr": "*u8", "divergence_ptr": "*fp32", "s_tokens_ptr": "*i64",
        "t_tokens_ptr": "*i64", "loss_ptr": "*fp32", "grad_ptr": f"*{dtype}", "s_stride": "i64", "t_stride": "i64",
        "grad_stride": "i64", "V": "i32", "position": "i32", "seed_key": "i64", "inv_temp": "fp32", "tau0": "fp32",
        "decay": "fp32", "top_k": "i32", "alpha": "fp32", "beta": "fp32",
    }
    constexprs = {"POLICY": POLICIES.index(policy), "KIND": LOSS_KINDS.index(kind), "POS_SCALAR": scalar_args,
                  "KEYS_ARANGE": scalar_args, "GREEDY": greedy, "HAS_GRAD": has_grad, "BLOCK": 4096}
    return "switch_step", "_switch_step_kernel", signature, constexprs


def kd_loss_case(dtype, kind="srkl", has_labels=True, has_grad=True):
    signature = {
        "s_ptr": f"*{dtype}", "t_ptr": f"*{dtype}", "labels_ptr": "*i64", "loss_ptr": "*fp32",
        "grad_ptr": f"*{dtype}", "s_stride": "i64", "t_stride": "i64", "grad_stride": "i64", "V": "i32",
        "inv_temp": "fp32", "alpha": "fp32", "beta": "fp32", "ignore_index": "i32",
    }
    constexprs = {"KIND": LOSS_KINDS.index(kind), "HAS_LABELS": has_labels, "HAS_GRAD": has_grad, "BLOCK": 4096}
    return "kd_loss", "_kd_loss_kernel", signature, constexprs


def cases():
    """Case name → (arch, kernel case). Both archs and fp32/bf16 for the defaults; every variant on sm_90."""
    out = {}
    for arch in (80, 90):
        for dtype in ("fp32", "bf16"):
            out[f"sm{arch}-{dtype}-switch_step"] = (arch, switch_step_case(dtype))
            out[f"sm{arch}-{dtype}-kd_loss"] = (arch, kd_loss_case(dtype))
    out["sm90-fp16-switch_step"] = (90, switch_step_case("fp16"))
    out["sm90-fp16-kd_loss"] = (90, kd_loss_case("fp16"))
    for policy in POLICIES:
        out[f"sm90-bf16-switch_step-{policy}"] = (90, switch_step_case("bf16", policy=policy))
    for kind in LOSS_KINDS:
        out[f"sm90-bf16-switch_step-{kind}"] = (90, switch_step_case("bf16", kind=kind))
        out[f"sm90-bf16-kd_loss-{kind}"] = (90, kd_loss_case("bf16", kind=kind))
    out["sm90-bf16-switch_step-greedy-scalars-nograd"] = (
        90, switch_step_case("bf16", greedy=True, scalar_args=True, has_grad=False))
    out["sm90-bf16-kd_loss-nolabels-nograd"] = (90, kd_loss_case("bf16", has_labels=False, has_grad=False))
    return out


def compile_all():
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    results = {}
    for name, (arch, (module, kernel, signature, constexprs)) in cases().items():
        fn = getattr(importlib.import_module(f"switchkd.kernels.{module}"), kernel)
        try:
            src = ASTSource(fn=fn, signature={**signature, **dict.fromkeys(constexprs, "constexpr")},
                            constexprs=constexprs)
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 8})
            results[name] = "ok" if compiled.asm.get("cubin") else "no cubin produced"
        except Exception:  # noqa: BLE001 - reported to the test, which fails with the message
            results[name] = traceback.format_exc(limit=3)
    return results


if __name__ == "__main__":
    json.dump(compile_all(), sys.stdout)
