"""GPU probe (one device call): where the kd_loss and switch-step kernels spend their time.

``python benchmarks/gpu_probe.py time``: do_bench of kd_loss per kind / without gradient at 8192 x 128256 bf16, of
the jsd kernel pinned to lower register caps (more warps per SM; they compile without spills only with the JIT's
divisibility specialisation, so they are not in the autotuner's list), and of the compiled reference switch step;
``python benchmarks/gpu_probe.py ncu``: one launch of each kernel with a fixed config, for ``ncu``."""

import sys

import torch
import triton
import triton.testing

import switchkd
from switchkd import reference
from switchkd.kernels.kd_loss import _kd_loss_kernel
from switchkd.kernels.split import _stats_kernel
from switchkd.kernels.switch_step import _switch_step_kernel

POLICY = switchkd.SwitchPolicy("exp", tau0=0.2, decay=0.01)


def logits(n, v, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(n, v, device="cuda", generator=g) * 2).to(torch.bfloat16)


def bench(name, fn, graph=False):
    fn()
    torch.cuda.synchronize()
    q = (triton.testing.do_bench_cudagraph if graph else triton.testing.do_bench)(fn, quantiles=[0.5, 0.2, 0.8])
    print(f"{name}: {q[0] * 1e3:.1f} us  (p20 {q[1] * 1e3:.1f}, p80 {q[2] * 1e3:.1f})", flush=True)


def timings():
    s, t = logits(8192, 128256, 1), logits(8192, 128256, 2)
    s.requires_grad_()
    for kind in ("jsd", "fkl", "srkl"):
        def step(kind=kind):
            s.grad = None
            switchkd.kd_loss(s, t, kind=kind, beta=0.5).backward()
        bench(f"kd_loss {kind} fwd+bwd 8192x128256", step)
        for config, ms in sorted(_kd_loss_kernel.configs_timings.items(), key=lambda kv: kv[1][0])[:4]:
            print(f"  tuning {kind}: {config} -> {ms[0]:.3f} ms")
    configs = _kd_loss_kernel.configs
    for maxnreg in (64, 80):
        fix(_kd_loss_kernel, BLOCK=2048, ROWS_PER_SM=0, PARTS=1, num_warps=8, maxnreg=maxnreg)

        def pinned():
            s.grad = None
            switchkd.kd_loss(s, t, kind="jsd", beta=0.5).backward()
        bench(f"kd_loss jsd fwd+bwd 8192x128256 pinned BLOCK 2048, 8 warps, maxnreg {maxnreg}", pinned)
    _kd_loss_kernel.configs = configs
    _kd_loss_kernel.cache.clear()
    frozen = s.detach()
    bench("kd_loss jsd fwd only 8192x128256", lambda s=frozen, t=t: switchkd.kd_loss(s, t, kind="jsd", beta=0.5))
    del s, t, frozen
    torch.cuda.empty_cache()
    for b in (1, 256):
        s, t = logits(b, 128256, 3), logits(b, 128256, 4)
        pos = torch.randint(0, 200, (b,), device="cuda")
        fused = lambda s=s, t=t, pos=pos: switchkd.fused_switch_step(s, t, pos, policy=POLICY,  # noqa: E731
                                                                     check_finite=False)
        compiled = torch.compile(lambda s=s, t=t, pos=pos: reference.switch_step(s, t, pos, policy=POLICY),
                                 dynamic=False)
        for name, fn in (("switchkd", fused), ("compiled", compiled)):
            try:
                bench(f"switch_step {name} {b}x128256", fn)
                bench(f"switch_step {name}_graph {b}x128256", fn, graph=True)
            except Exception as err:  # noqa: BLE001
                print(f"switch_step {name} {b}x128256: {type(err).__name__}: {str(err)[:300]}", flush=True)


def fix(kernel, **kw):
    """Pin an autotuned kernel to one config (no tuning launches for ncu to see)."""
    meta = {k: v for k, v in kw.items() if k not in ("num_warps", "maxnreg")}
    kernel.configs = [triton.Config(meta, num_warps=kw["num_warps"], num_stages=2, maxnreg=kw["maxnreg"])]
    kernel.cache.clear()  # the config already tuned for a key would otherwise be reused


def one_launch_each():
    fix(_kd_loss_kernel, BLOCK=2048, ROWS_PER_SM=0, PARTS=1, num_warps=8, maxnreg=255)
    s, t = logits(8192, 128256, 1), logits(8192, 128256, 2)
    s.requires_grad_()
    switchkd.kd_loss(s, t, kind="jsd", beta=0.5).backward()
    torch.cuda.synchronize()
    del s, t
    torch.cuda.empty_cache()
    fix(_stats_kernel, BLOCK=2048, num_warps=16, maxnreg=128)
    fix(_switch_step_kernel, BLOCK=1024, num_warps=4, maxnreg=255)
    for b in (256, 1):
        s, t = logits(b, 128256, 3), logits(b, 128256, 4)
        pos = torch.randint(0, 200, (b,), device="cuda")
        switchkd.fused_switch_step(s, t, pos, policy=POLICY, check_finite=False)
        torch.cuda.synchronize()


if __name__ == "__main__":
    timings() if sys.argv[1] == "time" else one_launch_each()
