#!/usr/bin/env bash
# The GPU suite: install the project offline, run every benchmark and then the gpu_only tests,
# and write the CSVs, a markdown summary and PNG charts to OUTDIR, in under 8 minutes.
#
#   bash benchmarks/gpu_suite.sh OUTDIR
#
# Before the GPU run, once, on a machine with network (the GPU image has no megatron-core and
# no network):
#   bash benchmarks/fetch_wheels.sh      # megatron-core 0.16.1, cp312 wheel (~2.6 MB) -> .whl/
# .whl/ is git-ignored, so it travels with the checkout only when named: run the suite with
# `carry: [".whl"]` (benchmarks/README.md, "The GPU suite", has the whole call).
#
# Meant for a freshly started GPU machine without network (PyTorch and Triton preinstalled):
#   * wheels in .whl/ at the repo root are installed with pip --no-index into /tmp/site, which
#     goes on PYTHONPATH;
#   * the project is installed editable without network (pip --no-deps --no-index
#     --no-build-isolation -e .), or, if pip cannot, made importable by a shim folder of links
#     (/tmp/mm1_moe_src/mm1_moe -> mm1_moe/*, plus kernels/ as mm1_moe/kernels);
#   * without a GPU it falls back to smoke mode (tiny shapes, CPU figures, *.smoke.csv) and
#     skips the gpu_only tests: that is how the test suite checks this script on CPU.
#
# Order: what the GPU minutes are for comes first, so a run cut short loses the least; the
# gpu_only tests (correctness, already checked on CPU in the interpreter) come last.
# Nominal timeout per step, seconds: the steps' sum + install + the 15 s reserve for summary.md
# is the 470 s budget (SUITE_BUDGET_S), so no step is squeezed by an earlier one that ran long.
# Estimates, not yet timed on a GPU (steps.tsv records the real seconds of each run).
#   part                              step                    nominal   part
#   0 set-up                          install                 ~20       20 (pip calls capped 60)
#   1 kernel rows                     moe_kernels             75
#                                     attention               50
#                                     rmsnorm                 40        165
#   2 MoE layer vs Megatron MoELayer  moe_layer mm1-7b-moe    55
#                                     moe_layer mm1-3b-moe    40        95
#   3 tile sweep                      tile_sweep              45        45 (its box: 30 s)
#   4 training step and data          step                    45
#                                     data                    30        75
#   5 charts (CPU)                    plots                   10        10
#   6 gpu_only tests, last            pytest gpu_only         45        45 (marked files only)
#     summary.md                      (reserve)               15        15
#                                                             total     470 (7 min 50 s)
# Every step runs under min(its nominal timeout, time left - 15 s), even if an earlier one
# failed; a step with under 10 s left is recorded "skipped: out of time". Smoke mode (no GPU)
# triples the nominal timeouts (the Triton interpreter on a possibly shared CPU), inside the
# same budget. Exit code: the number of failed steps (0: all passed); a step skipped for want
# of time counts as failed, one skipped because its file or the GPU is absent does not.
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
case "$PY" in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac  # cd-proof
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

# run NAME NOMINAL_TIMEOUT_S COMMAND...: the step under min(nominal, time left - 15 s). The
# nominal figures are for a GPU; in smoke mode (no GPU: the Triton interpreter on a CPU that may
# be shared) each is tripled, still inside the same budget.
run() {
    local name="$1" nominal="$2"
    shift 2
    [ ${#SMOKE[@]} -eq 0 ] || nominal=$((nominal * 3))
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

install() {  # each pip call capped at 60 s: a hang guard (it takes seconds when it works)
    if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
        timeout -k 5 60 "$PY" -m pip install -q --no-index --no-deps --no-compile \
            --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
        export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    if importable; then
        echo "mm1_moe already importable: not installed again"
        return 0
    fi
    if timeout -k 5 60 "$PY" -m pip install -q --no-deps --no-index --no-build-isolation -e . \
            && importable; then
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

GPU=0
SMOKE=()
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    GPU=1
else
    echo "no GPU: smoke mode (tiny shapes, CPU figures), gpu_only tests skipped"
    SMOKE=(--smoke)
fi

B=benchmarks
# 1. kernel rows: the MoE kernels (dispatch copy-only and with metadata, combine, experts),
#    attention, RMSNorm (dynamo on for it alone: it compares with torch.compile(rms_norm))
run "moe_kernels" 75 "$PY" $B/bench_moe_kernels.py --out "$OUT" "${SMOKE[@]}"
run "attention" 50 "$PY" $B/bench_attention.py --out "$OUT" "${SMOKE[@]}"
run "rmsnorm" 40 env TORCHDYNAMO_DISABLE=0 "$PY" $B/bench_rmsnorm.py --out "$OUT" "${SMOKE[@]}"
# 2. the MoE layer against Megatron-core's MoELayer
run "moe_layer mm1-7b-moe" 55 "$PY" $B/bench_moe_layer.py experts \
    --config configs/mm1-7b-moe.yaml --tokens 16384 --out "$OUT" "${SMOKE[@]}"
run "moe_layer mm1-3b-moe" 40 "$PY" $B/bench_moe_layer.py experts \
    --config configs/mm1-3b-moe.yaml --tokens 16384 --out "$OUT" "${SMOKE[@]}"
# 3. the tile sweep: its own time box (30 s of candidates; default 60) leaves the step's 45 s
#    room for start-up and the first compiles
run "tile_sweep" 45 "$PY" $B/bench_tile_sweep.py --time-box-s 30 --out "$OUT" "${SMOKE[@]}"
# 4. the training step and the data pipeline
run "step" 45 "$PY" $B/bench_step.py --out "$OUT" "${SMOKE[@]}"
run "data" 30 "$PY" $B/bench_data.py --out "$OUT" "${SMOKE[@]}"
# 5. charts of what was measured (CPU, seconds), before the tests can use up the budget
run "plots" 10 "$PY" $B/plot.py "$OUT"
# 6. the gpu_only tests, last, on the files that carry the mark only (so collection imports
#    nothing else): today tests/kernels/test_{attention,dispatch,grouped_gemm,rmsnorm,router}.py
mapfile -t GPU_TESTS < <(grep -rlE --include='test_*.py' 'mark\.gpu_only' tests | LC_ALL=C sort)
echo "$PY -m pytest -m gpu_only -q ${GPU_TESTS[*]}" >"$OUT/logs/pytest_gpu_only.cmd"
if [ ${#GPU_TESTS[@]} -eq 0 ]; then
    record "pytest gpu_only" "skipped (no test file has the gpu_only mark)" 0 "-"
elif [ $GPU -eq 1 ]; then
    run "pytest gpu_only" 45 "$PY" -m pytest -m gpu_only -q "${GPU_TESTS[@]}"
else
    record "pytest gpu_only" "skipped (no GPU)" 0 "logs/pytest_gpu_only.cmd"
fi

"$PY" $B/summarize.py "$OUT" >/dev/null 2>&1 || echo "summary.md could not be written" >&2
echo "suite: $FAILED failed step(s) in $((SECONDS - START)) s; see $OUT/summary.md"
exit $((FAILED > 125 ? 125 : FAILED))
