"""switch_step and kd_loss sections of the throughput benchmark: each fused op against its PyTorch
reference (eager, ``torch.compile``) and Liger-Kernel's JSD where installed; GB/s against the bytes
the op must move (both logits read once, the gradient written once); ``switchkd_one_launch`` is the switch step as
one launch (``SWITCHKD_FUSED_STEP=1``, on CUDA). The switch_step section also times
``switchkd.sample`` (the decoder's draft sampling, op ``sample``) against ``torch.multinomial`` of the softmax."""

from __future__ import annotations

import os
import sys
from unittest import mock

import torch

import switchkd
from switchkd import reference

from harness import measure

# The sizes of the GPU issue (Llama-3 V = 128256, GPT-2 V = 50257), small enough for `make bench-gpu`'s 5 minutes.
GPU_SIZES = {
    "switch_step": [(b, v) for v in (50257, 128256) for b in (1, 32, 256)],
    "kd_loss": [(4096, 50257), (8192, 128256)],
}
CPU_SIZES = {"switch_step": [(16, 32000)], "kd_loss": [(128, 32000)]}
POLICY = switchkd.SwitchPolicy("exp", tau0=0.2, decay=0.01)


def liger_jsd():
    """Liger-Kernel's JSD module (beta = 0.5 is the symmetric JSD), or None."""
    try:
        from liger_kernel.transformers import LigerJSD
    except ImportError:
        return None
    return LigerJSD(beta=0.5)


def switch_step_providers(device, compile_reference):
    def fused(s, t, pos):
        return switchkd.fused_switch_step(s, t, pos, policy=POLICY, check_finite=False)

    def one_launch(s, t, pos):  # SWITCHKD_FUSED_STEP=1 for this call (read when the kernels launch or are captured)
        with mock.patch.dict(os.environ, SWITCHKD_FUSED_STEP="1"):
            return fused(s, t, pos)

    def eager(s, t, pos):
        return reference.switch_step(s, t, pos, policy=POLICY)

    providers = {"switchkd": fused, "eager": eager}
    if device == "cuda":  # on CPU the op runs the reference either way
        providers["switchkd_one_launch"] = one_launch
    if compile_reference:
        # One static graph per size: Inductor's dynamic-batch graph of this step does not build (torch 2.11, CUDA).
        providers["compiled"] = torch.compile(eager, dynamic=False)
    return providers


def kd_loss_providers(device, compile_reference):
    def fused(s, t):
        switchkd.kd_loss(s, t, kind="jsd", beta=0.5).backward()

    def eager(s, t):
        reference.kd_loss(s, t, kind="jsd", beta=0.5).backward()

    providers = {"switchkd": fused, "eager": eager}
    if compile_reference:
        compiled = torch.compile(reference.kd_loss, dynamic=False)
        providers["compiled"] = lambda s, t: compiled(s, t, kind="jsd", beta=0.5).backward()
    jsd = liger_jsd() if device == "cuda" else None
    if jsd is not None:
        providers["liger_jsd"] = lambda s, t: jsd(torch.log_softmax(s, -1), torch.log_softmax(t, -1)).backward()
    return providers


def without_grad(provider):
    """``provider(s, t)`` after dropping ``s.grad``: every call (and graph replay) does the same work."""
    def call(s, t):
        s.grad = None
        provider(s, t)
    return call


def sample_providers():
    """The decoder's draft sampling: ``switchkd.sample`` against what a user writes, multinomial over the softmax."""
    return {"switchkd": lambda x, pos: switchkd.sample(x, pos, temperature=1.0, seed=0),
            "torch_multinomial": lambda x, pos: torch.multinomial(torch.softmax(x.float(), -1), 1)}


def run_section(section, sizes, dtype, device, compile_reference, copy_gbps):
    rows = []
    elt = torch.finfo(dtype).bits // 8
    providers = (switch_step_providers if section == "switch_step" else kd_loss_providers)(device, compile_reference)
    for n, vocab in sizes:
        s = (torch.randn(n, vocab, device=device) * 2).to(dtype)
        t = (torch.randn(n, vocab, device=device) * 2).to(dtype)
        if section == "switch_step":
            positions = torch.randint(0, 200, (n,), device=device)
            rows += time_providers(section, providers, (s, t, positions), f"{n}x{vocab}", dtype, device,
                                   2 * n * vocab * elt, "fwd", copy_gbps,
                                   graphs=("switchkd", "switchkd_one_launch", "compiled"))
            rows += time_providers("sample", sample_providers(), (t, positions), f"{n}x{vocab}", dtype, device,
                                   n * vocab * elt, "fwd", copy_gbps, graphs=("switchkd", "torch_multinomial"))
        else:
            s.requires_grad_()
            # Each call starts with no .grad (so graph replays time the same work); the graph rows leave out the
            # host's time per call (about 0.5 ms of the 4.75 ms eager jsd row at 8192 x 128256 on an H200).
            fresh = {name: without_grad(f) for name, f in providers.items()}
            rows += time_providers(section, fresh, (s, t), f"{n}x{vocab}", dtype, device, 3 * n * vocab * elt,
                                   "fwd+bwd", copy_gbps, grad_to_none=[s], graphs=("switchkd", "liger_jsd"))
    return rows


def time_providers(op, providers, args, shape, dtype, device, nbytes, mode, copy_gbps, grad_to_none=None,
                   graphs=()):
    """One row per provider (``eager`` first: the others' speedups are against it), plus ``<name>_graph`` rows
    replayed from CUDA graphs for the providers in ``graphs`` (on CUDA: a decoder replays its steps)."""
    rows, eager_ms = [], None
    calls = {name: (lambda f=f: f(*args)) for name, f in providers.items()}
    runs = [(name, call, False) for name, call in sorted(calls.items(), key=lambda kv: kv[0] != "eager")]
    if device == "cuda":
        runs += [(f"{name}_graph", calls[name], True) for name in graphs if name in calls]
    for name, call, graph in runs:
        row = {"section": op, "op": op, "provider": name, "shape": shape,
               "dtype": str(dtype).replace("torch.", ""), "mode": mode + (" graph" if graph else "")}
        try:
            (ms, p20, p80), peak = measure(call, device, grad_to_none=grad_to_none, graph=graph)
        except Exception as err:  # noqa: BLE001 - a failing provider (OOM, compile error) is a result row
            rows.append({**row, "error": f"{type(err).__name__}: {str(err)[:200]}"})
            print(f"{op} {name} {shape}: {rows[-1]['error']}", file=sys.stderr)
            if device == "cuda":
                torch.cuda.empty_cache()
            continue
        eager_ms = ms if name == "eager" else eager_ms
        gbps = nbytes / ms / 1e6
        rows.append({**row, "ms": ms, "ms_p20": p20, "ms_p80": p80, "gbps": gbps,
                     "pct_copy_bw": 100 * gbps / copy_gbps if copy_gbps else None,
                     "speedup_vs_eager": eager_ms / ms if eager_ms else None, "peak_mib": peak})
    return rows


def print_autotune_timings(kernel):
    """Each config the autotuner timed for ``kernel`` (its last tuning key), fastest first: which grid won and by
    how much."""
    timings = getattr(kernel, "configs_timings", None) or {}
    for config, ms in sorted(timings.items(), key=lambda kv: kv[1][0] if isinstance(kv[1], list) else kv[1]):
        print(f"autotune {kernel.fn.__name__}: {config} -> {ms} ms")


def run(section, ctx):
    """Rows of one section (``switch_step`` or ``kd_loss``) at the GPU or CPU sizes."""
    sizes = (GPU_SIZES if ctx.full else CPU_SIZES)[section]
    rows = run_section(section, sizes, ctx.dtype, ctx.device, not ctx.no_compile, ctx.copy_gbps)
    if section == "kd_loss" and ctx.device == "cuda":
        from switchkd.kernels.kd_loss import _kd_loss_kernel

        print_autotune_timings(_kd_loss_kernel)
    return rows
