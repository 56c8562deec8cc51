#!/usr/bin/env bash
# The GPU suite: install the project offline, run the gpu_only tests and every benchmark, and
# write the CSVs, a markdown summary and PNG charts to OUTDIR, in under 8 minutes.
#
#   bash benchmarks/gpu_suite.sh OUTDIR
#
# Meant for a freshly started GPU machine without network (PyTorch and Triton preinstalled):
#   * wheels in .whl/ at the repo root (benchmarks/fetch_wheels.sh: megatron-core) are installed
#     with pip --no-index into /tmp/site, which goes on PYTHONPATH;
#   * the project is installed editable without network (pip --no-deps --no-index
#     --no-build-isolation -e .), or, if pip cannot, made importable by a shim folder of links
#     (/tmp/mm1_moe_src/mm1_moe -> mm1_moe/*, plus kernels/ as mm1_moe/kernels);
#   * without a GPU it falls back to smoke mode (tiny shapes, CPU figures, *.smoke.csv) and
#     skips the gpu_only tests: that is how the test suite checks this script on CPU.
# Every step runs under its own timeout, all of them inside one 470 s budget; a step runs even
# if an earlier one failed. Exit code: the number of failed steps (0: all passed).
# Environment: PYTHON (default python3), SUITE_BUDGET_S (default 470).
set -uo pipefail

if [ $# -ne 1 ]; then
    echo "usage: bash benchmarks/gpu_suite.sh OUTDIR" >&2
    exit 2
fi
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$1/logs" || exit 2
OUT="$(cd "$1" && pwd)"
PY="${PYTHON:-python3}"
BUDGET="${SUITE_BUDGET_S:-470}"
START=$SECONDS
FAILED=0
: >"$OUT/steps.tsv"
export PYTHONUNBUFFERED=1 TORCHDYNAMO_DISABLE=1 TOKENIZERS_PARALLELISM=false
cd "$REPO" || exit 2

record() {  # name status seconds log
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$OUT/steps.tsv"
    printf '[suite %4ss] %-28s %s (%ss)\n' "$((SECONDS - START))" "$1" "$2" "$3"
}

# run NAME NOMINAL_TIMEOUT_S COMMAND...: the step under min(nominal, time left - 15 s).
run() {
    local name="$1" nominal="$2"
    shift 2
    local log="logs/${name// /_}.log" left=$((BUDGET - (SECONDS - START) - 15))
    local limit=$((nominal < left ? nominal : left))
    if [ "$limit" -lt 10 ]; then
        record "$name" "skipped: out of time" 0 "-"
        FAILED=$((FAILED + 1))
        return
    fi
    local began=$SECONDS rc
    timeout -k 10 "$limit" "$@" >"$OUT/$log" 2>&1
    rc=$?
    local took=$((SECONDS - began))
    if [ $rc -eq 0 ]; then
        record "$name" "ok" "$took" "$log"
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        record "$name" "FAILED: timed out after ${limit}s" "$took" "$log"
        FAILED=$((FAILED + 1))
    else
        record "$name" "FAILED: exit $rc" "$took" "$log"
        FAILED=$((FAILED + 1))
    fi
}

importable() {  # mm1_moe (with its kernels) imports from outside the repo
    (cd /tmp && "$PY" -c "import mm1_moe.kernels, megatron.core" >/dev/null 2>&1)
}

install() {
    if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl || return 1
        export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    if importable; then
        echo "mm1_moe already importable: not installed again"
        return 0
    fi
    if "$PY" -m pip install -q --no-deps --no-index --no-build-isolation -e . && importable; then
        echo "installed editable (pip -e . --no-index)"
        return 0
    fi
    echo "pip could not install offline: using the shim /tmp/mm1_moe_src"
    rm -rf /tmp/mm1_moe_src && mkdir -p /tmp/mm1_moe_src/mm1_moe || return 1
    ln -s "$REPO"/mm1_moe/* /tmp/mm1_moe_src/mm1_moe/ && ln -s "$REPO/kernels" \
        /tmp/mm1_moe_src/mm1_moe/kernels || return 1
    export PYTHONPATH="/tmp/mm1_moe_src${PYTHONPATH:+:$PYTHONPATH}"
    importable
}

began=$SECONDS
install >"$OUT/logs/install.log" 2>&1
rc=$?
record "install" "$([ $rc -eq 0 ] && echo ok || echo "FAILED: exit $rc")" "$((SECONDS - began))" \
    "logs/install.log"
[ $rc -eq 0 ] || FAILED=$((FAILED + 1))
{
    "$PY" -c "import sys, torch, triton; print(sys.version); print('torch', torch.__version__,
'triton', triton.__version__, 'cuda', torch.cuda.is_available())"
    nvidia-smi 2>&1 || true
} >"$OUT/logs/environment.log" 2>&1

SMOKE=()
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    run "pytest gpu_only" 240 "$PY" -m pytest -m gpu_only -q tests
else
    echo "no GPU: smoke mode (tiny shapes, CPU figures), gpu_only tests skipped"
    record "pytest gpu_only" "skipped (no GPU)" 0 "-"
    SMOKE=(--smoke)
fi

B=benchmarks
run "moe_layer mm1-7b-moe" 100 "$PY" $B/bench_moe_layer.py experts \
    --config configs/mm1-7b-moe.yaml --tokens 16384 --out "$OUT" "${SMOKE[@]}"
run "moe_layer mm1-3b-moe" 80 "$PY" $B/bench_moe_layer.py experts \
    --config configs/mm1-3b-moe.yaml --tokens 16384 --out "$OUT" "${SMOKE[@]}"
run "step" 100 "$PY" $B/bench_step.py --out "$OUT" "${SMOKE[@]}"
run "moe_kernels" 90 "$PY" $B/bench_moe_kernels.py --out "$OUT" "${SMOKE[@]}"
# dynamo on for this step only (exported off above): it compares with torch.compile(rms_norm)
run "rmsnorm" 60 env TORCHDYNAMO_DISABLE=0 "$PY" $B/bench_rmsnorm.py --out "$OUT" "${SMOKE[@]}"
run "attention" 90 "$PY" $B/bench_attention.py --out "$OUT" "${SMOKE[@]}"
run "data" 75 "$PY" $B/bench_data.py --out "$OUT" "${SMOKE[@]}"
run "plots" 30 "$PY" $B/plot.py "$OUT"

"$PY" $B/summarize.py "$OUT" >/dev/null 2>&1 || echo "summary.md could not be written" >&2
echo "suite: $FAILED failed step(s) in $((SECONDS - START)) s; see $OUT/summary.md"
exit $((FAILED > 125 ? 125 : FAILED))
