"""GPU probe (one device call): which kernel configurations the kd_loss and switch-step kernels should use.

``python benchmarks/gpu_probe.py kd OUT.json``: kd_loss jsd fwd+bwd at 8192 x 128256 bf16: the autotuner's timing of
each config, then per call and replayed from a CUDA graph.
``python benchmarks/gpu_probe.py switch OUT.json``: the switch step at V = 128256 per batch and split count, as three
launches and as one (``SWITCHKD_FUSED_STEP``), checked against each other and replayed from CUDA graphs.
``python benchmarks/gpu_probe.py ncu``: one launch of each kernel with a fixed config, for ``ncu``.
``python benchmarks/gpu_probe.py ncu-step 1|0``: the switch step at B = 256 in one launch (1) or three (0), tuned, then
once inside the NVTX range ``profile`` (``ncu --nvtx --nvtx-include profile/``).
``python benchmarks/gpu_probe.py compare NEW.json OLD.json``: two runs' timings side by side.
``python benchmarks/gpu_probe.py boundary OUT.json``: where two split counts or launch modes draw different tokens at
B = 256, whether the uniform sat on a cumulative-probability boundary (float64 mass between the two tokens).
Every timing is printed and written to OUT.json with the registers and spills of every kernel compiled, and the
switchkd the probe imported (``PYTHONPATH=baseline`` puts an older copy first, for a same-machine comparison:
benchmarks/gpu_plan.md)."""

import json
import sys
from functools import partial

import torch
import triton
import triton.testing

import switchkd
from switchkd.kernels import split
from switchkd.kernels.kd_loss import _kd_loss_kernel
from switchkd.kernels.split import _stats_kernel
from switchkd.kernels.switch_step import _switch_step_fused_kernel, _switch_step_kernel
from switchkd.ops.switch_step import switch_step_triton

POLICY = switchkd.SwitchPolicy("exp", tau0=0.2, decay=0.01)
ROWS = []


def logits(n, v, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(n, v, device="cuda", generator=g) * 2).to(torch.bfloat16)


def decoding_pair(b, generator=None):
    """The probe's switch-step inputs at V = 128256: student and teacher logits and positions for ``b`` rows."""
    pos = torch.randint(0, 200, (b,), device="cuda", generator=generator)
    return logits(b, 128256, 3), logits(b, 128256, 4), pos


def decode_step(s, t, pos, fused, splits=None):
    """The decoding step the probe times (fkl, no gradient): its :class:`SwitchStep`."""
    return switch_step_triton(s, t, pos, None, policy=POLICY, temperature=1.0, seed=0, kind="fkl", alpha=0.1,
                              beta=0.5, need_grad=False, splits=splits, fused=fused)[0]


def bench(name, fn, graph=False, **extra):
    fn()
    torch.cuda.synchronize()
    q = (triton.testing.do_bench_cudagraph if graph else triton.testing.do_bench)(fn, quantiles=[0.5, 0.2, 0.8])
    print(f"{name}{' graph' if graph else ''}: {q[0] * 1e3:.1f} us  (p20 {q[1] * 1e3:.1f}, p80 {q[2] * 1e3:.1f})",
          flush=True)
    ROWS.append({"name": name, "graph": graph, "us": q[0] * 1e3, "p20": q[1] * 1e3, "p80": q[2] * 1e3, **extra})


def tuning(kernel, label):
    """The autotuner's timings of every config it tried (the last key tuned), fastest first."""
    for config, ms in sorted(getattr(kernel, "configs_timings", {}).items(), key=lambda kv: kv[1][0]):
        print(f"  tuning {label}: {config} -> {ms[0] * 1e3:.1f} us", flush=True)
        ROWS.append({"name": f"tuning {label}", "config": str(config), "us": ms[0] * 1e3})


def compiled(kernel, label):
    """Registers and spills of every variant of ``kernel`` compiled so far."""
    try:
        for entry in kernel.fn.device_caches.values():
            for key, kern in entry[0].items():
                kern._init_handles()
                row = {"name": f"compiled {label}", "regs": kern.n_regs, "spills": kern.n_spills,
                       "warps": kern.metadata.num_warps, "key": str(key)[:300]}
                print(f"  compiled {label}: {row['regs']} regs, {row['spills']} B spilled, {row['warps']} warps",
                      flush=True)
                ROWS.append(row)
    except Exception as err:  # noqa: BLE001 (Triton's cache layout differs between versions)
        print(f"  compiled {label}: {type(err).__name__}: {err}", flush=True)


def kd():
    s, t = logits(8192, 128256, 1), logits(8192, 128256, 2)
    s.requires_grad_()
    def step():
        s.grad = None
        switchkd.kd_loss(s, t, kind="jsd", beta=0.5).backward()
    bench("kd_loss jsd fwd+bwd 8192x128256", step)
    tuning(_kd_loss_kernel, "kd_loss jsd")
    bench("kd_loss jsd fwd+bwd 8192x128256", step, graph=True)
    compiled(_kd_loss_kernel, "kd_loss")


def switch():
    """Three launches against one (``_switch_step_fused_kernel``) per batch and split count. Each row first checks on
    this GPU that the one launch gives the three launches' tokens and decisions (its programs really run together
    here, which the interpreter cannot show), then times both from CUDA graphs."""
    for b, splits_list in ((1, (None,)), (32, (None, 16, 32)), (256, (None, 4, 8, 16))):
        s, t, pos = decoding_pair(b)
        for splits in splits_list:
            three, one = decode_step(s, t, pos, False, splits), decode_step(s, t, pos, True, splits)
            same = all(torch.equal(getattr(one, k), getattr(three, k)) for k in ("tokens", "from_teacher"))
            gap = (one.divergence - three.divergence).abs().max().item()
            print(f"switch_step {b}x128256 splits {splits or 'plan'}: one launch = three: {same}, divergence gap "
                  f"{gap:.2e}", flush=True)
            ROWS.append({"name": f"check {b} {splits}", "same_tokens": same, "divergence_gap": gap})
            for fused, label in ((False, "three launches"), (True, "one launch")):
                name = f"switch_step {b}x128256 splits {splits or 'plan'} {label}"
                bench(name, partial(decode_step, s, t, pos, fused, splits), graph=True, batch=b, splits=splits,
                      fused=fused)
                tuning(_switch_step_fused_kernel if fused else _switch_step_kernel, name)
    partial_trips()
    four_programs()
    compiled(_switch_step_kernel, "switch phase 2")
    compiled(_stats_kernel, "switch phase 1")
    compiled(_switch_step_fused_kernel, "switch one launch")


def both_modes(variant, splits):
    """Graph-time the planned step at B = 32 and 256 in both launch modes, as rows named after ``variant``."""
    for b in (32, 256):
        s, t, pos = decoding_pair(b)
        for fused, label in ((False, "three launches"), (True, "one launch")):
            bench(f"switch_step {b}x128256 {variant} {label}", partial(decode_step, s, t, pos, fused), graph=True,
                  batch=b, splits=splits, fused=fused)


def partial_trips():
    """The plan before whole trips (``split.TRIP_ALIGN`` = 128: chunks of 16128 columns at B = 256, 15.75 tiles, and a
    partial last trip in every program), graph-timed in both launch modes against the rows above."""
    saved, split.TRIP_ALIGN = getattr(split, "TRIP_ALIGN", split.COL_ALIGN), split.COL_ALIGN  # a baseline may lack it
    try:
        both_modes(f"chunks on {split.COL_ALIGN} columns", f"align {split.COL_ALIGN}")
    finally:
        split.TRIP_ALIGN = saved


def four_programs():
    """Phase 2 and the one launch pinned to 1024 columns on 4 warps capped at 128 registers: a fourth program per SM.
    The probe's rows (packed bf16, fkl, decoding) compile to 127 registers without spilling with triton 3.6; fp32 rows
    and some kinds spill, so the library does not offer this config (benchmarks/RESULTS.md). Graph-timed in both
    launch modes at B = 32 and 256 (``compiled`` lists its registers with the others'), then the configs restored."""
    kernels = (_switch_step_kernel, _switch_step_fused_kernel)
    saved = [kernel.configs for kernel in kernels]
    try:
        for kernel in kernels:
            fix(kernel, BLOCK=1024, num_warps=4, maxnreg=128)
        both_modes("4 warps at 128 registers", "plan")
    finally:
        for kernel, configs in zip(kernels, saved, strict=True):
            kernel.configs = configs
            kernel.cache.clear()


def fix(kernel, **kw):
    """Pin an autotuned kernel to one config (no tuning launches for ncu to see)."""
    meta = {k: v for k, v in kw.items() if k not in ("num_warps", "maxnreg")}
    kernel.configs = [triton.Config(meta, num_warps=kw["num_warps"], num_stages=2, maxnreg=kw["maxnreg"])]
    kernel.cache.clear()  # the config already tuned for a key would otherwise be reused


def one_launch_each():
    fix(_kd_loss_kernel, BLOCK=2048, num_warps=8, maxnreg=64)
    s, t = logits(8192, 128256, 1), logits(8192, 128256, 2)
    s.requires_grad_()
    switchkd.kd_loss(s, t, kind="jsd", beta=0.5).backward()
    torch.cuda.synchronize()
    del s, t
    torch.cuda.empty_cache()
    fix(_stats_kernel, BLOCK=2048, num_warps=16, maxnreg=128)
    fix(_switch_step_kernel, BLOCK=1024, num_warps=4, maxnreg=255)
    for b in (256, 1):
        s, t, pos = decoding_pair(b)
        switchkd.fused_switch_step(s, t, pos, policy=POLICY, check_finite=False)
        torch.cuda.synchronize()


def step_profiled(fused):
    s, t, pos = decoding_pair(256)
    for _ in range(3):  # tunes, then runs the chosen configs
        decode_step(s, t, pos, fused)
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_push("profile")
    decode_step(s, t, pos, fused)
    torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()


def boundary():
    """Tokens of three launches (planned splits) against three at 16 splits and one launch at the planned and 16
    splits, V = 128256, B = 256. For each token that differs: the float64 probability mass strictly between the two
    tokens and each token's probability; a mass near 0 means the uniform sat on a boundary, within float32 rounding."""
    s, t, pos = decoding_pair(256, torch.Generator(device="cuda").manual_seed(5))
    base = decode_step(s, t, pos, False)
    cdf = {name: torch.softmax(x.double(), -1).cumsum(-1) for name, x in (("student", s), ("teacher", t))}
    for fused, splits in ((False, 16), (True, None), (True, 16), (False, 4)):
        other = decode_step(s, t, pos, fused, splits)
        label = f"{'one launch' if fused else 'three launches'} splits {splits or 'plan'}"
        rows = (other.from_teacher != base.from_teacher).nonzero().flatten().tolist()
        print(f"{label}: {len(rows)} decisions differ", flush=True)
        for model in ("student", "teacher"):
            a, b = getattr(base, f"{model}_tokens"), getattr(other, f"{model}_tokens")
            for row in (a != b).nonzero().flatten().tolist():
                lo, hi = sorted((a[row].item(), b[row].item()))
                c = cdf[model][row]
                between = (c[hi - 1] - c[lo]).item()
                p_lo, p_hi = (c[lo] - (c[lo - 1] if lo else 0)).item(), (c[hi] - c[hi - 1]).item()
                print(f"  {model} row {row}: tokens {a[row].item()} / {b[row].item()}, mass between {between:.3e}, "
                      f"p {p_lo:.3e} / {p_hi:.3e}, cdf at the lower {c[lo].item():.9f}", flush=True)
                ROWS.append({"name": f"boundary {label}", "model": model, "row": row, "tokens": [lo, hi],
                             "mass_between": between, "p": [p_lo, p_hi]})


def compare(new_path, old_path):
    """Timed rows of two probe runs side by side (the same names), the second as the baseline."""
    new, old = (json.load(open(path)) for path in (new_path, old_path))
    before = {(row["name"], row.get("graph")): row["us"] for row in old["rows"] if "us" in row and "tuning" not in
              row["name"]}
    print(f"{new['switchkd']} against {old['switchkd']}")
    for row in new["rows"]:
        key = (row["name"], row.get("graph"))
        if key in before:  # tuning rows are not in it
            print(f"{row['name']}: {row['us']:.1f} us, baseline {before[key]:.1f} us, baseline / new "
                  f"{before[key] / row['us']:.2f}")


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "compare":
        compare(sys.argv[2], sys.argv[3])
    elif mode == "ncu":
        one_launch_each()
    elif mode == "ncu-step":
        step_profiled(sys.argv[2] == "1")
    else:
        print("switchkd from", switchkd.__file__, flush=True)
        try:
            {"kd": kd, "switch": switch, "boundary": boundary}[mode]()
        finally:
            with open(sys.argv[2], "w") as f:
                json.dump({"device": torch.cuda.get_device_name(), "switchkd": switchkd.__file__, "rows": ROWS}, f,
                          indent=1)
