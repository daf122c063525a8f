"""Timing, memory and result-file helpers shared by the benchmark sections."""

from __future__ import annotations

import datetime
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def measure(fn, device: str, grad_to_none=None, min_time_s: float = 0.5, max_reps: int = 50, graph=False):
    """(median, p20, p80) milliseconds of ``fn()`` and its peak extra memory (MiB) after a warm-up call.
    ``graph`` (CUDA): time replays of a CUDA graph of ``fn`` (the GPU's time without the host's launch
    overhead, as a decoder that captures its steps sees it)."""
    fn()  # warm-up (compilation, autotuning, allocator)
    for tensor in grad_to_none or []:  # else the warm-up's gradient counts as already allocated
        tensor.grad = None
    peak = peak_extra_memory_mib(fn, device)
    if device == "cuda":
        import triton.testing

        if graph:
            return tuple(triton.testing.do_bench_cudagraph(fn, quantiles=[0.5, 0.2, 0.8])), peak
        return tuple(triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], grad_to_none=grad_to_none)), peak
    times = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < min_time_s and len(times) < max_reps):
        for tensor in grad_to_none or []:
            tensor.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=10)
    return (statistics.median(times), q[1], q[7]), peak


def _proc_status_mib(key: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


def peak_extra_memory_mib(fn, device: str) -> float | None:
    """Peak memory of ``fn()`` above what was allocated before it: CUDA allocator peak on GPU, the
    process's resident-set high-water mark (reset through /proc/self/clear_refs) on Linux CPUs."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        base = _proc_status_mib("VmRSS:")
        fn()
        return _proc_status_mib("VmHWM:") - base
    except OSError:
        return None


def copy_bandwidth_gbps(device: str, nbytes: int) -> float:
    """Measured device-to-device copy bandwidth (bytes read + written per second), in GB/s."""
    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).uniform_()
    y = torch.empty_like(x)
    (ms, _, _), _ = measure(lambda: y.copy_(x), device)
    return 2 * nbytes / ms / 1e6


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=10)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def versions() -> dict:
    import transformers
    import triton

    return {"torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def print_table(rows: list[dict], decode: bool = False) -> None:
    if not rows:
        return
    columns = ["section", "provider", "shape", "dtype", "mode", "ms", "gbps", "pct_copy_bw", "speedup_vs_eager",
               "peak_mib"]
    if decode:
        columns = ["provider", "shape", "dtype", "mode", "ms", "tokens_per_s", "speedup_vs_eager", "teacher_share",
                   "teacher_forwards", "bookkeeping_us_per_forward", "bookkeeping_us_per_step"]
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def write_results(rows: list[dict], meta: dict, out: Path | None) -> Path:
    stamp = datetime.datetime.now(datetime.timezone.utc)
    meta = {**meta, "date": stamp.isoformat(timespec="seconds"), "commit": git_commit(), **versions()}
    if out is None:
        slug = "".join(ch if ch.isalnum() else "-" for ch in meta["device_name"].lower()).strip("-")[:40]
        out = RESULTS_DIR / f"throughput-{slug}-{stamp:%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    return out
