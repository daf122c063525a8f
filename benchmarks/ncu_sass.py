"""Summarise `ncu --page source --print-source sass` output for one kernel: where its instructions and stall
samples go, by runs of SASS lines that execute the same number of times (a loop body is one such run).

    ncu --clock-control none --nvtx --nvtx-include profile/ --set full --page source --print-source sass \\
        python3 benchmarks/gpu_probe.py ncu-step 1 > ncu_one_sass.txt
    python benchmarks/ncu_sass.py ncu_one_sass.txt _switch_step_fused_kernel --pairs 32833536

``--pairs`` (logit pairs the launch covers, B x V) adds thread instructions per pair. Columns are read from the
table's dashed header line, so the script follows ncu's column widths.
"""

import argparse
import re
from collections import Counter


def read_table(path: str, kernel: str) -> tuple[list[str], list[list[str]]]:
    """(column names, rows of cells) of ``kernel``'s SASS table."""
    lines = open(path).read().split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("Kernel Name") and kernel in line)
    spans = [(m.start(), m.end()) for m in re.finditer(r"-+", lines[start + 1])]
    header = []
    for line in lines[start + 2:]:
        if line.startswith("0x"):
            break
        header.append(line)
    names = [" ".join(h[a:b + 1].strip() for h in header if h[a:b + 1].strip()) for a, b in spans]
    rows = []
    for line in lines[start + 2:]:
        if line.startswith("Kernel Name"):
            break
        if line.startswith("0x"):
            rows.append([line[a:b + 1].strip() for a, b in spans])
    return names, rows


def number(cell: str) -> float:
    try:
        return float(cell.replace(",", ""))
    except ValueError:
        return 0.0


def column(names: list[str], prefix: str) -> int:
    return next(i for i, name in enumerate(names) if name.replace(" ", "").startswith(prefix.replace(" ", "")))


def summarise(path: str, kernel: str, pairs: int | None, top: int) -> None:
    names, rows = read_table(path, kernel)
    executed = [number(r[column(names, "Instructions Executed")]) for r in rows]
    samples = [number(r[column(names, "Warp Stall Sampling (All")]) for r in rows]
    total = sum(executed)
    per_pair = f", {total * 32 / pairs:.1f} thread instructions per pair" if pairs else ""
    print(f"{kernel}: {len(rows)} SASS lines, {total / 1e6:.2f} M warp instructions{per_pair}, "
          f"{sum(samples):.0f} stall samples")
    runs = []  # [first line, last line, executions]
    for i, count in enumerate(executed):
        if runs and runs[-1][2] == count:
            runs[-1][1] = i
        else:
            runs.append([i, i, count])
    runs.sort(key=lambda r: -(r[1] - r[0] + 1) * r[2])
    print("lines        count  executions  share  samples  commonest opcodes")
    for first, last, count in sorted(runs[:top]):
        n = last - first + 1
        ops = Counter(r[1].split()[1 if r[1].startswith("@") else 0].split(".")[0] for r in rows[first:last + 1])
        print(f"{first:5d}-{last:<5d} {n:5d} {count:11.0f} {n * count / total:6.1%} {sum(samples[first:last + 1]):8.0f}"
              f"  {', '.join(f'{op} {k}' for op, k in ops.most_common(6))}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("path")
    parser.add_argument("kernel")
    parser.add_argument("--pairs", type=int)
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    summarise(args.path, args.kernel, args.pairs, args.top)
