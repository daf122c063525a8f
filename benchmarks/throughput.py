"""switchkd throughput benchmark: each op against its PyTorch reference and peers, measured in one run.

    python benchmarks/throughput.py                       # small default (CPU when there is no GPU)
    python benchmarks/throughput.py --sections switch_step --full   # the GPU sizes

Sections, one module each: ``switch_step`` and ``kd_loss`` (``ops_bench.py``: fused ops against
``eager`` = ``switchkd.reference``, ``compiled`` = its ``torch.compile``, and ``liger_jsd`` where
installed), ``linear_kd`` (``linear_kd_bench.py``) and ``decode`` (``decode.py``: ``switch_generate``
against a plain Hugging Face loop). GB/s counts the bytes an op must move; ``pct_copy_bw``
compares it with a measured device copy. Writes ``benchmarks/results/throughput-<device>-<time>.json``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import copy_bandwidth_gbps, device_name, print_table, write_results  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# section name -> module with ``run(section, ctx) -> rows``
SECTIONS = {"switch_step": "ops_bench", "kd_loss": "ops_bench", "linear_kd": "linear_kd_bench", "decode": "decode",
            "train": "train_bench"}


@dataclass
class Context:
    """What every section needs to know about the run."""

    device: str
    dtype: torch.dtype
    full: bool  # the GPU sizes
    no_compile: bool
    copy_gbps: float


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--full", action="store_true", help="the GPU sizes (default on CUDA)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile reference")
    parser.add_argument("--out", type=Path, default=None, help="results JSON path")
    args = parser.parse_args(argv)

    on_gpu = args.device == "cuda"
    copy_gbps = copy_bandwidth_gbps(args.device, 2**30 if on_gpu else 2**27)
    ctx = Context(args.device, DTYPES[args.dtype or ("bf16" if on_gpu else "fp32")], args.full or on_gpu,
                  args.no_compile, copy_gbps)
    name = device_name(args.device)
    print(f"switchkd throughput on {name}{'' if on_gpu else ' [CPU: kernels run the PyTorch reference]'}; "
          f"copy bandwidth {copy_gbps:.0f} GB/s")
    rows = []
    for section in args.sections:
        rows += importlib.import_module(SECTIONS[section]).run(section, ctx)
    print_table([r for r in rows if r["section"] != "decode"])
    print_table([r for r in rows if r["section"] == "decode"], decode=True)
    path = write_results(rows, {"device": args.device, "device_name": name, "copy_gbps": copy_gbps}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
