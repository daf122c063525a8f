"""linear_kd section of the throughput benchmark: fused_linear_kd_loss against kd_loss on materialised
logits and, on CUDA where installed, Liger-Kernel's ``LigerFusedLinearJSD`` (time, peak extra memory and the
loss value, forward + backward)."""

from __future__ import annotations

import torch

import switchkd

from harness import measure

# (rows, student hidden, teacher hidden, vocabulary).
GPU_LINEAR = [(8192, 2048, 4096, 128256)]
CPU_LINEAR = [(512, 256, 512, 32000)]
BETA = 0.5  # jsd weight; symmetric, so switchkd's and Liger's conventions give the same loss


def liger_fused_linear_jsd():
    """Liger-Kernel's fused linear JSD module (CUDA only), or None when it is not importable."""
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD
    except ImportError:
        return None
    return LigerFusedLinearJSD(jsd_beta=BETA)


def providers(device, chunk_rows):
    """name -> fn(hs, ws, ht, wt) returning the loss."""
    out = {
        "kd_loss_full_logits": lambda hs, ws, ht, wt: switchkd.kd_loss(hs @ ws.T, ht @ wt.T, kind="jsd", beta=BETA),
        "switchkd_fused_linear": lambda hs, ws, ht, wt: switchkd.fused_linear_kd_loss(
            hs, ws, ht, wt, kind="jsd", beta=BETA, chunk_rows=chunk_rows),
    }
    liger = liger_fused_linear_jsd() if device == "cuda" else None
    if liger is not None:
        out["liger_fused_linear_jsd"] = lambda hs, ws, ht, wt: liger(hs, ws, ht, wt, None)  # shift_labels: none
    return out


def measure_provider(loss_fn, tensors, device):
    """(ms, p20, p80), peak extra MiB and loss value of ``loss_fn(*tensors).backward()``."""
    hs, ws = tensors[:2]

    def step():
        loss_fn(*tensors).backward()

    hs.grad = ws.grad = None
    times, peak = measure(step, device, grad_to_none=[hs, ws])
    with torch.no_grad():
        value = float(loss_fn(*tensors))
    return times, peak, value


def run_linear_kd(sizes, dtype, device, chunk_rows=None):
    """Each provider's fwd+bwd time, peak extra memory (also as a fraction of the full-logits peak) and value."""
    rows = []
    for n, h_s, h_t, vocab in sizes:
        hs = torch.randn(n, h_s, device=device, dtype=dtype, requires_grad=True)
        ws = (torch.randn(vocab, h_s, device=device) / h_s**0.5).to(dtype).requires_grad_()
        ht = torch.randn(n, h_t, device=device, dtype=dtype)
        wt = (torch.randn(vocab, h_t, device=device) / h_t**0.5).to(dtype)
        full_peak = None
        for name, loss_fn in providers(device, chunk_rows).items():
            (ms, p20, p80), peak, value = measure_provider(loss_fn, (hs, ws, ht, wt), device)
            full_peak = peak if name == "kd_loss_full_logits" else full_peak
            rows.append({"section": "linear_kd", "op": "linear_kd", "provider": name,
                         "shape": f"{n}x{h_s}/{h_t}x{vocab}", "dtype": str(dtype).replace("torch.", ""),
                         "mode": "fwd+bwd", "ms": ms, "ms_p20": p20, "ms_p80": p80, "peak_mib": peak, "value": value,
                         "peak_vs_full_logits": peak / full_peak if peak and full_peak else None})
    return rows


def run(section, ctx):
    return run_linear_kd(GPU_LINEAR if ctx.full else CPU_LINEAR, ctx.dtype, ctx.device,
                         chunk_rows=None if ctx.full else 64)
