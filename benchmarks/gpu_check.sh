#!/usr/bin/env bash
# `make bench-gpu`: the one GPU command. On a CUDA machine without internet: install switchkd (and any
# wheels brought along in wheels/, e.g. Liger-Kernel), run the GPU test subset, then the throughput
# benchmark for switch_step, kd_loss and linear_kd, writing JSON and a markdown table to
# benchmarks/results/ (card and date in the file name; card, date, commit and versions in the JSON "meta").
#
#   bash benchmarks/gpu_check.sh            # PYTHON=python3 by default
#   SKIP_TESTS=1 bash benchmarks/gpu_check.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
STAMP=$(date -u +%Y%m%d-%H%M%S)
OUT=benchmarks/results
mkdir -p "$OUT"
touch "$OUT/gpu-tests-$STAMP.log"
status=0

step() { echo; echo "== $* ($(date -u +%H:%M:%S))"; }

step "install (offline)"
shopt -s nullglob
wheels=(wheels/*.whl)
if ((${#wheels[@]})); then
    # --no-deps: torch, triton and transformers come with the image; the wheels are the optional peers.
    "$PYTHON" -m pip install -q --no-index --find-links wheels --no-deps "${wheels[@]}" || status=1
fi
"$PYTHON" -m pip install -q --no-build-isolation --no-deps -e . || exit 1
"$PYTHON" - <<'EOF' || exit 1
import torch, triton
assert torch.cuda.is_available(), "bench-gpu needs a CUDA device"
try:
    import liger_kernel  # noqa: F401
    liger = "liger-kernel installed"
except ImportError:
    liger = "no liger-kernel (the liger_jsd rows are skipped)"
print(torch.cuda.get_device_name(), "| torch", torch.__version__, "| triton", triton.__version__, "|", liger)
EOF

if [[ -z "${SKIP_TESTS:-}" ]]; then
    step "GPU test subset"
    # One tile config per kernel while testing (each config is tested in the CPU interpreter); xdist if present.
    xdist=()
    "$PYTHON" -c "import xdist" 2>/dev/null && xdist=(-n 8)
    SWITCHKD_AUTOTUNE=0 timeout 180 "$PYTHON" -m pytest -q "${xdist[@]}" tests/test_switch_step.py \
        tests/test_kd_loss.py tests/test_sample.py tests/test_policy.py tests/test_linear_kd.py \
        2>&1 | tee "$OUT/gpu-tests-$STAMP.log" | tail -n 15
    [[ ${PIPESTATUS[0]} -eq 0 ]] || { echo "GPU tests FAILED (log: $OUT/gpu-tests-$STAMP.log)"; status=1; }
fi

# One run per group, so that a failing section does not take the others' rows with it.
for sections in "switch_step kd_loss" "linear_kd"; do
    step "throughput: $sections"
    timeout 240 "$PYTHON" benchmarks/throughput.py --sections $sections || status=1
done

for json in $(find "$OUT" -maxdepth 1 -name 'throughput-*.json' -newer "$OUT/gpu-tests-$STAMP.log"); do
    step "markdown table of $json"
    "$PYTHON" - "$json" "${json%.json}.md" <<'EOF' || status=1
import json, sys

data = json.load(open(sys.argv[1]))
rows, meta = data["rows"], data["meta"]
cols = ["section", "provider", "shape", "dtype", "mode", "ms", "gbps", "pct_copy_bw", "speedup_vs_eager", "peak_mib",
        "error"]
cols = [c for c in cols if any(c in r for r in rows)]


def cell(v):
    return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))


lines = [" ".join(f"{k}={v}" for k, v in meta.items() if not isinstance(v, (list, dict))), "",
         "| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
lines += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
open(sys.argv[2], "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
done
echo
echo "bench-gpu done (status $status): $OUT/*$STAMP*"
exit $status
