"""switchkd throughput benchmark: each op against its PyTorch reference and peers, measured in one run.

    python benchmarks/throughput.py                       # small default (CPU when there is no GPU)
    python benchmarks/throughput.py --sections switch_step --full   # the GPU sizes

Sections: ``switch_step`` (``fused_switch_step``, forward, as in decoding), ``kd_loss``
(forward + backward) and ``decode`` (``switch_generate`` against a plain Hugging Face loop, see
``decode.py``). Providers: ``switchkd``, ``eager`` (``switchkd.reference``),
``compiled`` (``torch.compile`` of the reference) and ``liger_jsd`` (log_softmax + Liger-Kernel's
JSD, CUDA only, when installed). GB/s counts the bytes the op must move (both logits read once,
the gradient written once); ``pct_copy_bw`` compares it with a measured device copy.
Writes ``benchmarks/results/throughput-<device>-<time>.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import switchkd  # noqa: E402
from switchkd import reference  # noqa: E402

from decode import run_decode  # noqa: E402
from harness import (  # noqa: E402
    copy_bandwidth_gbps,
    device_name,
    measure,
    print_table,
    write_results,
)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GPU_SIZES = {
    "switch_step": [(b, v) for v in (32000, 50257, 128256, 151936) for b in (1, 32, 256)],
    "kd_loss": [(n, v) for v in (32000, 50257, 128256, 151936) for n in (4096, 8192, 16384)],
}
CPU_SIZES = {"switch_step": [(16, 32000)], "kd_loss": [(128, 32000)]}
# Decode: (model pairs, batches, prompt length, new tokens, vocabulary).
GPU_DECODE = (["gpt2-large/small", "llama-1b/160m"], [1, 16, 64], 64, 128, 32000)
CPU_DECODE = (["gpt2-tiny"], [8], 16, 96, 8192)
# linear_kd: (rows, student hidden, teacher hidden, vocabulary).
GPU_LINEAR = [(8192, 2048, 4096, 128256)]
CPU_LINEAR = [(512, 256, 512, 32000)]
SECTIONS = ["switch_step", "kd_loss", "linear_kd", "decode"]
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

    def eager(s, t, pos):
        return reference.switch_step(s, t, pos, policy=POLICY)

    providers = {"switchkd": fused, "eager": eager}
    if compile_reference:
        providers["compiled"] = torch.compile(eager)
    return providers


def kd_loss_providers(device, compile_reference):
    def fused(s, t):
        switchkd.kd_loss(s, t, kind="jsd", beta=0.5).backward()

    def eager(s, t):
        reference.kd_loss(s, t, kind="jsd", beta=0.5).backward()

    providers = {"switchkd": fused, "eager": eager}
    if compile_reference:
        compiled = torch.compile(reference.kd_loss)
        providers["compiled"] = lambda s, t: compiled(s, t, kind="jsd", beta=0.5).backward()
    jsd = liger_jsd() if device == "cuda" else None
    if jsd is not None:
        providers["liger_jsd"] = lambda s, t: jsd(torch.log_softmax(s, -1), torch.log_softmax(t, -1)).backward()
    return providers


def run_section(section, sizes, dtype, device, compile_reference, copy_gbps):
    rows = []
    elt = torch.finfo(dtype).bits // 8
    providers = (switch_step_providers if section == "switch_step" else kd_loss_providers)(device, compile_reference)
    for n, vocab in sizes:
        s = (torch.randn(n, vocab, device=device) * 2).to(dtype)
        t = (torch.randn(n, vocab, device=device) * 2).to(dtype)
        if section == "switch_step":
            positions = torch.randint(0, 200, (n,), device=device)
            args = (s, t, positions)
            grad_to_none, nbytes, mode = None, 2 * n * vocab * elt, "fwd"
        else:
            s.requires_grad_()
            args = (s, t)
            grad_to_none, nbytes, mode = [s], 3 * n * vocab * elt, "fwd+bwd"
        calls = {name: (lambda f=f, args=args: f(*args)) for name, f in providers.items()}
        eager_ms = None
        for name, call in sorted(calls.items(), key=lambda kv: kv[0] != "eager"):
            row = {"section": section, "op": section, "provider": name, "shape": f"{n}x{vocab}",
                   "dtype": str(dtype).replace("torch.", ""), "mode": mode}
            try:
                (ms, p20, p80), peak = measure(call, device, grad_to_none=grad_to_none)
            except Exception as err:  # noqa: BLE001 - a failing provider (OOM, compile error) is a result row
                rows.append({**row, "error": f"{type(err).__name__}: {str(err)[:200]}"})
                print(f"{name} {row['shape']}: {rows[-1]['error']}", file=sys.stderr)
                if device == "cuda":
                    torch.cuda.empty_cache()
                continue
            eager_ms = ms if name == "eager" else eager_ms
            gbps = nbytes / ms / 1e6
            rows.append({**row, "ms": ms, "ms_p20": p20, "ms_p80": p80, "gbps": gbps,
                         "pct_copy_bw": 100 * gbps / copy_gbps if copy_gbps else None,
                         "speedup_vs_eager": eager_ms / ms if eager_ms else None, "peak_mib": peak})
    return rows


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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", default=SECTIONS, choices=SECTIONS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--full", action="store_true", help="the GPU sizes (default on CUDA)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile reference")
    parser.add_argument("--out", type=Path, default=None, help="results JSON path")
    args = parser.parse_args(argv)

    on_gpu = args.device == "cuda"
    dtype = DTYPES[args.dtype or ("bf16" if on_gpu else "fp32")]
    sizes = GPU_SIZES if (args.full or on_gpu) else CPU_SIZES
    copy_gbps = copy_bandwidth_gbps(args.device, 2**30 if on_gpu else 2**27)
    name = device_name(args.device)
    print(f"switchkd throughput on {name}{'' if on_gpu else ' [CPU: kernels run the PyTorch reference]'}; "
          f"copy bandwidth {copy_gbps:.0f} GB/s")
    rows = []
    for section in args.sections:
        if section == "decode":
            rows += run_decode(args.device, dtype, *(GPU_DECODE if (args.full or on_gpu) else CPU_DECODE))
        elif section == "linear_kd":
            gpu_sizes = args.full or on_gpu
            rows += run_linear_kd(GPU_LINEAR if gpu_sizes else CPU_LINEAR, dtype, args.device,
                                  chunk_rows=None if gpu_sizes else 64)
        else:
            rows += run_section(section, sizes[section], dtype, args.device, not args.no_compile, copy_gbps)
    print_table([r for r in rows if r["section"] != "decode"])
    print_table([r for r in rows if r["section"] == "decode"], decode=True)
    path = write_results(rows, {"device": args.device, "device_name": name, "copy_gbps": copy_gbps}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
