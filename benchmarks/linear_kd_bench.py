"""linear_kd section of the throughput benchmark: fused_linear_kd_loss against kd_loss on
materialised logits (time and peak extra memory, forward + backward)."""

from __future__ import annotations

import torch

import switchkd

from harness import measure

# (rows, student hidden, teacher hidden, vocabulary).
GPU_LINEAR = [(8192, 2048, 4096, 128256)]
CPU_LINEAR = [(512, 256, 512, 32000)]


def run_linear_kd(sizes, dtype, device, chunk_rows=None):
    """fused_linear_kd_loss against kd_loss on materialised logits: time and peak extra memory, fwd+bwd."""
    rows = []
    for n, h_s, h_t, vocab in sizes:
        hs = torch.randn(n, h_s, device=device, dtype=dtype, requires_grad=True)
        ws = (torch.randn(vocab, h_s, device=device) / h_s**0.5).to(dtype).requires_grad_()
        ht = torch.randn(n, h_t, device=device, dtype=dtype)
        wt = (torch.randn(vocab, h_t, device=device) / h_t**0.5).to(dtype)

        def full_logits(hs=hs, ws=ws, ht=ht, wt=wt):
            switchkd.kd_loss(hs @ ws.T, ht @ wt.T, kind="jsd").backward()

        def fused(hs=hs, ws=ws, ht=ht, wt=wt):
            switchkd.fused_linear_kd_loss(hs, ws, ht, wt, kind="jsd", chunk_rows=chunk_rows).backward()

        peaks = {}
        for name, fn in (("kd_loss_full_logits", full_logits), ("switchkd_fused_linear", fused)):
            hs.grad = ws.grad = None
            (ms, p20, p80), peaks[name] = measure(fn, device, grad_to_none=[hs, ws])
            rows.append({"section": "linear_kd", "op": "linear_kd", "provider": name,
                         "shape": f"{n}x{h_s}/{h_t}x{vocab}", "dtype": str(dtype).replace("torch.", ""),
                         "mode": "fwd+bwd", "ms": ms, "ms_p20": p20, "ms_p80": p80, "peak_mib": peaks[name]})
        full, fused_peak = peaks["kd_loss_full_logits"], peaks["switchkd_fused_linear"]
        if full and fused_peak:
            rows[-1]["peak_vs_full_logits"] = fused_peak / full
    return rows


def run(section, ctx):
    return run_linear_kd(GPU_LINEAR if ctx.full else CPU_LINEAR, ctx.dtype, ctx.device,
                         chunk_rows=None if ctx.full else 64)
