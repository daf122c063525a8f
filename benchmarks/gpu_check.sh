#!/usr/bin/env bash
# `make bench-gpu`: the one GPU command (issues #9, #10, #11). On one CUDA GPU without internet: install
# switchkd (and the wheels brought along in wheels/, e.g. Liger-Kernel), run the GPU test subset, then one
# `benchmarks/throughput.py` run per section group, each writing its JSON and a markdown table as soon as
# it ends. Every stage runs under its own `timeout`, clipped to what is left of BUDGET, so a failing or
# slow stage never takes the others down; a summary lists each stage's status and time.
#
#   bash benchmarks/gpu_check.sh                                  # tests + kernel sections, about 5 minutes
#   SECTIONS=all bash benchmarks/gpu_check.sh                     # every section, about 9 minutes
#   SECTIONS="decode train" TESTS=none bash benchmarks/gpu_check.sh
#   DRY_RUN=1 bash benchmarks/gpu_check.sh                        # print the stages and limits, run nothing
#
# Environment:
#   PYTHON     interpreter (python3)
#   SECTIONS   throughput sections, run in this order (switch_step and kd_loss share one run);
#              default: linear_kd switch_step kd_loss (the kernels, #9's five-minute command); "all":
#              linear_kd decode train switch_step kd_loss (never-measured ones first, the compile-heavy
#              kernel group last); "none" skips them
#   TESTS      pytest paths of the GPU test subset (default: default_tests below); "none" skips the tests
#   BUDGET     seconds for the whole script (540); each stage gets min(its limit, what is left)
#   COMMIT     label of the code for the summary (the device copy's git HEAD can be stale)
#   OUT        a folder that also receives summary.md, tests.log, the JSON files and logs.tar.gz
#              (the device tool sets it); results always go to benchmarks/results/
#   SKIP_INSTALL=1  use the installed switchkd; ALLOW_CPU=1  run without CUDA (CPU sizes: checks the
#              script); DRY_RUN=1  print what would run
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
SECTIONS=${SECTIONS:-linear_kd switch_step kd_loss}
[[ $SECTIONS == all ]] && SECTIONS="linear_kd decode train switch_step kd_loss"
# The GPU test subset: the op tests (their tensors live on CUDA when there is one) and every test file with a
# CUDA-only skip mark (today tests/test_decode_graph.py: captured graphs on CUDA, never run on CPU).
default_tests() {
    local tests="tests/test_decode_graph.py tests/test_switch_step.py tests/test_kd_loss.py tests/test_sample.py"
    tests+=" tests/test_policy.py tests/test_linear_kd.py"
    local f
    for f in $(grep -lE "skipif\(.*cuda" tests/test_*.py 2>/dev/null); do
        [[ " $tests " == *" $f "* ]] || tests+=" $f"
    done
    echo "$tests"
}
TESTS=${TESTS:-$(default_tests)}
BUDGET=${BUDGET:-540}
OUT=${OUT:-}
DRY_RUN=${DRY_RUN:-}
# Per-stage limits (s). Expected on one H100/H200 (benchmarks/gpu_plan.md has the arithmetic):
# install 30-50, tests 60-120, linear_kd 25-40, decode 150-175, train 45-80, switch_step+kd_loss 90-150.
declare -A LIMIT=([install]=120 [tests]=150 [linear_kd]=90 [decode]=210 [train]=150 [ops]=200)
RESERVE=15  # kept back for the tables, the summary and the copies to OUT

START=$(date +%s)
STAMP=$(date -u +%Y%m%d-%H%M%S)
RESULTS=benchmarks/results
LOGS=$RESULTS/bench-gpu-$STAMP
[[ -n "$DRY_RUN" ]] && LOGS=$(mktemp -d)/bench-gpu-$STAMP  # a dry run leaves nothing in the repository
SUMMARY=$LOGS/summary.md
mkdir -p "$LOGS"
[[ -n "$OUT" ]] && mkdir -p "$OUT"
STAGES=()  # "name|status|seconds|limit" rows for the summary
JSONS=()
TESTS_LINE="not run"
DEVICE_LINE="-"
SLUG=device

step() { echo; echo "== $* ($(date -u +%H:%M:%S), $(($(date +%s) - START)) s in)"; }

# run_stage NAME LOG CMD...: run CMD under min(LIMIT[NAME], time left) with its output in LOG; record status.
run_stage() {
    local name=$1 log=$2 cap=${LIMIT[$1]} left limit begin rc status
    shift 2
    left=$((BUDGET - RESERVE - ($(date +%s) - START)))
    limit=$((cap < left ? cap : left))
    step "$name (limit ${limit} s of ${cap} s): $*"
    if [[ -n "$DRY_RUN" ]]; then
        [[ $name == tests ]] && echo "SWITCHKD_AUTOTUNE=0 $PYTHON -m pytest -v [-n 12] [--timeout 90] $TESTS"
        STAGES+=("$name|dry run|0|$limit"); return 0
    fi
    if ((limit < 20)); then
        STAGES+=("$name|skipped: budget spent|0|$limit"); echo "skipped: no time left"; return 1
    fi
    begin=$(date +%s)
    timeout -k 10 "$limit" bash -c '"$@"' "$name" "$@" >"$log" 2>&1  # bash -c: CMD may be a function below
    rc=$?
    case $rc in
        0) status=passed ;;
        124 | 137) status="TIMEOUT after ${limit} s" ;;
        *) status="FAILED (exit $rc)" ;;
    esac
    STAGES+=("$name|$status|$(($(date +%s) - begin))|$limit")
    tail -n 25 "$log"
    echo "-- $name: $status"
    return "$rc"
}

preflight() {
    "$PYTHON" - "$LOGS/device.txt" <<'EOF'
import os, sys
import torch, transformers, triton

cuda = torch.cuda.is_available()
assert cuda or os.environ.get("ALLOW_CPU"), "bench-gpu needs a CUDA device (ALLOW_CPU=1 checks the script on CPU)"
try:
    import liger_kernel  # noqa: F401
    from importlib.metadata import version
    liger = f"liger-kernel {version('liger-kernel')}"
except ImportError:
    liger = "no liger-kernel (liger rows skipped)"
name = torch.cuda.get_device_name() if cuda else "cpu"
props = torch.cuda.get_device_properties(0) if cuda else None
card = f" ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs, sm_{props.major}{props.minor})" \
    if cuda else ""
line = (f"{name}{card} | torch {torch.__version__} | triton {triton.__version__} | "
        f"transformers {transformers.__version__} | {liger}")
print(line)
slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")[:40]
open(sys.argv[1], "w").write(f"{slug}\n{line}\n")
EOF
}

do_install() {
    shopt -s nullglob
    local wheels=(wheels/*.whl)
    if ((${#wheels[@]})); then
        # --no-deps: torch, triton and transformers come with the image; the wheels are the optional peers.
        "$PYTHON" -m pip install -q --no-index --no-deps "${wheels[@]}" || echo "WARNING: wheels/ not installed"
    fi
    "$PYTHON" -m pip install -q --no-build-isolation --no-deps -e . || return 1
}

gpu_tests() {
    local extra=()
    "$PYTHON" -c "import xdist" 2>/dev/null && extra+=(-n 12)
    "$PYTHON" -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout 90)
    # One tile config per kernel (each config is tested in the CPU interpreter in CI).
    SWITCHKD_AUTOTUNE=0 "$PYTHON" -m pytest -v -rfEs --durations=15 -p no:cacheprovider "${extra[@]}" $TESTS
}
export -f do_install gpu_tests
export PYTHON TESTS

# tests_line LOG: pytest's final line, and the PASSED/FAILED/ERROR counts of its -v lines (also after a timeout).
tests_line() {
    local last counts
    last=$(grep -E "^=+ .* in [0-9.]+s( \([0-9:]+\))? =+$" "$1" | tail -n 1 | tr -d '=' | xargs)
    counts=$(for k in PASSED FAILED ERROR SKIPPED; do echo -n "$k $(grep -cE "::.* $k( |$)|\] $k " "$1") "; done)
    echo "${last:-no pytest summary line} (-v lines: ${counts% })"
}

# markdown TABLE_MD JSON: the rows of one throughput JSON as a markdown table (meta line first).
markdown() {
    "$PYTHON" - "$2" "$1" <<'EOF'
import json, sys

data = json.load(open(sys.argv[1]))
rows, meta = data["rows"], data["meta"]
cols = []
for row in rows:
    cols += [k for k in row if k not in cols and k not in ("op", "ms_p20", "ms_p80")]


def cell(v):
    return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))


lines = [" ".join(f"{k}={v}" for k, v in meta.items() if not isinstance(v, (list, dict))), "",
         "| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
lines += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
open(sys.argv[2], "w").write("\n".join(lines) + "\n")
EOF
}

write_summary() {
    {
        echo "# bench-gpu $STAMP"
        echo
        echo "device: $DEVICE_LINE"
        echo "commit: ${COMMIT:-not given (COMMIT=...)}; sources: $(source_hash) (gpu_plan.md: how to compare)"
        echo "sections: $SECTIONS | budget ${BUDGET} s | elapsed $(($(date +%s) - START)) s"
        echo "tests: $TESTS_LINE"
        echo
        echo "| stage | status | seconds | limit |"
        echo "| --- | --- | --- | --- |"
        local row
        for row in "${STAGES[@]}"; do echo "| ${row//|/ | } |"; done
        local json
        for json in "${JSONS[@]}"; do
            [[ -f "${json%.json}.md" ]] && { echo; echo "## $(basename "$json")"; echo; cat "${json%.json}.md"; }
        done
    } >"$SUMMARY"
}

source_hash() {
    find switchkd kernels csrc benchmarks tests -type f \( -name '*.py' -o -name '*.cpp' -o -name '*.h' \
        -o -name '*.sh' \) -not -path '*/results/*' | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-16
}

# Copy what exists so far to OUT (at most 8 files come back from the device: summary, tests log, JSONs, logs).
publish() {
    write_summary
    [[ -z "$OUT" || -n "$DRY_RUN" ]] && return 0
    cp "$SUMMARY" "$OUT/summary.md"
    [[ -f "$LOGS/tests.log" ]] && cp "$LOGS/tests.log" "$OUT/tests.log"
    local json
    for json in "${JSONS[@]}"; do [[ -f "$json" ]] && cp "$json" "$OUT/"; done
    tar -czf "$OUT/logs.tar.gz" -C "$RESULTS" "$(basename "$LOGS")" 2>/dev/null
}

# --- install and device check
if [[ -z "${SKIP_INSTALL:-}" ]]; then
    run_stage install "$LOGS/install.log" do_install || { publish; echo "install failed: stop"; exit 1; }
fi
if [[ -z "$DRY_RUN" ]]; then
    preflight || { STAGES+=("preflight|FAILED|0|-"); publish; cat "$SUMMARY"; exit 1; }
    SLUG=$(head -n 1 "$LOGS/device.txt")
    DEVICE_LINE=$(sed -n 2p "$LOGS/device.txt")
fi
publish

# --- GPU test subset
if [[ "$TESTS" != none ]]; then
    run_stage tests "$LOGS/tests.log" gpu_tests
    [[ -f "$LOGS/tests.log" ]] && TESTS_LINE=$(tests_line "$LOGS/tests.log")
    publish
fi

# --- throughput: one run per group, in SECTIONS order; switch_step and kd_loss together ("ops")
groups=()
for section in $SECTIONS; do
    case $section in
        none) ;;
        switch_step | kd_loss) [[ " ${groups[*]-} " == *" ops "* ]] || groups+=(ops) ;;
        linear_kd | decode | train) groups+=("$section") ;;
        *) echo "unknown section $section (switch_step kd_loss linear_kd decode train)"; exit 2 ;;
    esac
done
for group in "${groups[@]}"; do
    sections=$group
    if [[ $group == ops ]]; then
        sections=$(for s in switch_step kd_loss; do [[ " $SECTIONS " == *" $s "* ]] && echo -n "$s "; done)
    fi
    json=$RESULTS/throughput-$SLUG-$STAMP-$group.json
    run_stage "$group" "$LOGS/$group.log" "$PYTHON" benchmarks/throughput.py --sections $sections --out "$json"
    if [[ -f "$json" ]]; then
        JSONS+=("$json")
        markdown "${json%.json}.md" "$json" || echo "markdown table of $json failed"
    fi
    publish
done

echo
sed '/^## /,$d' "$SUMMARY"
[[ -z "$DRY_RUN" ]] && echo "results: $RESULTS/*$STAMP*${OUT:+; copied to $OUT}"
failed=0
for row in "${STAGES[@]}"; do [[ $row == *"|passed|"* || $row == *"|dry run|"* ]] || failed=1; done
exit $failed
