#!/usr/bin/env bash
# GPU harness: one round on a GPU machine, run from the repository root with the machine's own
# Python (no installs, no network, no nox): environment report, GPU tests, benchmarks, summary.
#
#   bash tools/gpu_harness.sh                      # everything (GPU tests, then the benchmark)
#   bash tools/gpu_harness.sh --quick              # fewer cases: tests not marked slow, bench --quick
#   bash tools/gpu_harness.sh --tests test_buffer  # pytest -k test_buffer (or paths / node ids)
#   bash tools/gpu_harness.sh --no-bench --tests-part 1/2   # first half of the GPU tests
#   bash tools/gpu_harness.sh --no-tests --bench "--num-tokens 4096 --hidden 7168"
#   bash tools/gpu_harness.sh --no-bench --keep-going   # all GPU tests, not stopping at a failure
#   options: --tests-timeout S (default 400, quick 240), --bench-timeout S (170, quick 150)
#
# NIXL: put a bundle from tools/nixl_bundle.py (made for the machine's Python) in .nixl/ and
# carry .nixl; it is unpacked to /tmp/ep-nixl and put on PYTHONPATH.
#
# On 4x H200 every GPU test takes longer than one 10-minute call (about 330 s for the first 28
# of 50, compilation included): run them in two calls with --tests-part 1/2 and 2/2 (contiguous
# halves of the collected tests, in collection order). tests.log has one line per finished test,
# so a step cut by its timeout still shows what passed; the summary then counts from it and
# names the test that was running.
#
# Output goes to $OUT when it is set (the device tool's folder), else ./out: six files, one level
# deep (harness.log, tests.log, tests.xml, bench.json, bench.png, summary.txt). Each step runs
# under `timeout`, so a whole round stays inside a 10-minute command limit; the short summary
# table is printed last. Exit status 1 when a step failed or timed out.
set -uo pipefail

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; }

QUICK=0
RUN_TESTS=1
RUN_BENCH=1
TEST_SEL=""
TEST_PART=""
BENCH_ARGS=""
KEEP_GOING=0
TESTS_TIMEOUT=""
BENCH_TIMEOUT=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --tests) TEST_SEL="${2:?--tests needs a pattern or path}"; shift ;;
        --tests-part) TEST_PART="${2:?--tests-part needs K/N}"; shift ;;
        --no-tests) RUN_TESTS=0 ;;
        --bench) BENCH_ARGS="${2?--bench needs an argument string}"; shift ;;
        --no-bench) RUN_BENCH=0 ;;
        --keep-going) KEEP_GOING=1 ;;
        --tests-timeout) TESTS_TIMEOUT="${2:?}"; shift ;;
        --bench-timeout) BENCH_TIMEOUT="${2:?}"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_harness: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)
OUT_DIR="${OUT:-$ROOT/out}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/harness.log"
SUMMARY="$OUT_DIR/summary.txt"
: >"$LOG"
rm -f "$OUT_DIR"/{tests.log,tests.xml,bench.json,bench.png,summary.txt}

# The packages run from their source folders with this machine's Python.
PY="${PYTHON:-python3}"
src_path=""
for d in "$ROOT"/packages/*/src; do src_path="${src_path:+$src_path:}$d"; done
export PYTHONPATH="$src_path${PYTHONPATH:+:$PYTHONPATH}"
# NIXL (pp-rdma's cross-node backend) where the machine has no index to install it from: a
# bundle made by tools/nixl_bundle.py for this machine's Python, carried in .nixl/.
for b in "$ROOT"/.nixl/*.tar.xz; do
    [[ -f $b ]] || continue
    mkdir -p /tmp/ep-nixl && tar -xJf "$b" -C /tmp/ep-nixl && export PYTHONPATH="$PYTHONPATH:/tmp/ep-nixl"
done
export PYTHONUNBUFFERED=1
# Never NVLink multicast on these machines.
export NCCL_NVLS_ENABLE=0
export TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export EP_JIT_CACHE_DIR="${EP_JIT_CACHE_DIR:-/tmp/ep-jit-cache}"
mkdir -p "$EP_JIT_CACHE_DIR"

if [[ $QUICK == 1 ]]; then
    TESTS_TIMEOUT="${TESTS_TIMEOUT:-240}"
    BENCH_TIMEOUT="${BENCH_TIMEOUT:-150}"
else
    TESTS_TIMEOUT="${TESTS_TIMEOUT:-400}"
    BENCH_TIMEOUT="${BENCH_TIMEOUT:-170}"
fi

ROWS=()
row() { ROWS+=("$(printf '%-8s %-8s %6ss  %s' "$1" "$2" "$3" "$4")"); }
log() { echo "[harness $(date +%H:%M:%S)] $*" | tee -a "$LOG"; }
verdict() {  # exit code -> word
    case "$1" in 0) echo ok ;; 124|137) echo TIMEOUT ;; 5) echo "no-tests" ;; *) echo "FAILED" ;; esac
}

# ---------------------------------------------------------------- 1. environment report
t0=$SECONDS
log "environment"
{
    echo "repo: $ROOT ($(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo 'no git'))"
    echo "PYTHONPATH=$PYTHONPATH"
    echo "EP_JIT_CACHE_DIR=$EP_JIT_CACHE_DIR NCCL_NVLS_ENABLE=$NCCL_NVLS_ENABLE" \
        "TORCH_SYMM_MEM_DISABLE_MULTICAST=$TORCH_SYMM_MEM_DISABLE_MULTICAST"
    timeout 30 nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv \
        || echo "nvidia-smi: not available"
    timeout 30 nvidia-smi topo -m || true
    timeout 10 nvcc --version 2>/dev/null | tail -n 2 || echo "nvcc: not on PATH"
    timeout 120 "$PY" - <<'PY'
import platform
import torch

print(f"python {platform.python_version()}  torch {torch.__version__}  cuda {torch.version.cuda}")
if torch.cuda.is_available():
    n = torch.cuda.device_count()
    print(f"{n} CUDA device(s): {torch.cuda.get_device_name(0)}, sm_{''.join(map(str, torch.cuda.get_device_capability(0)))}")
    try:
        print("nccl", ".".join(map(str, torch.cuda.nccl.version())))
    except Exception as exc:  # noqa: BLE001
        print("nccl: unknown", exc)
else:
    print("CUDA: not available")
for name in ("ep_jit", "ep_core", "ep_elastic"):
    try:
        mod = __import__(name)
        print(f"{name} {getattr(mod, '__version__', '?')} from {mod.__file__}")
    except Exception as exc:  # noqa: BLE001
        print(f"{name}: import failed: {exc!r}")
PY
} >>"$LOG" 2>&1
env_rc=$?
ENV_LINE=$(grep -m1 -E '^python ' "$LOG" || echo "python: unknown")
GPU_LINE=$(grep -m1 -E 'CUDA device|CUDA: not available' "$LOG" || echo "gpus: unknown")
row env "$(verdict $env_rc)" $((SECONDS - t0)) "$ENV_LINE; $GPU_LINE"
sed -n '2,$p' "$LOG"  # the header line was printed already

# ---------------------------------------------------------------- 2. GPU tests
if [[ $RUN_TESTS == 1 ]]; then
    t0=$SECONDS
    marker="gpu"
    [[ $QUICK == 1 ]] && marker="gpu and not slow"
    sel=(packages/*/tests)
    if [[ -n $TEST_SEL ]]; then
        # Paths or node ids (every word names an existing file), else a -k expression.
        read -r -a words <<<"$TEST_SEL"
        all_paths=1
        for w in "${words[@]}"; do [[ -e ${w%%::*} ]] || all_paths=0; done
        if [[ $all_paths == 1 ]]; then sel=("${words[@]}"); else sel+=(-k "$TEST_SEL"); fi
    fi
    if [[ -n $TEST_PART ]]; then
        # Part K of N: a contiguous slice of the collected node ids.
        if [[ ! $TEST_PART =~ ^([0-9]+)/([0-9]+)$ ]] || ((BASH_REMATCH[1] < 1 ||
            BASH_REMATCH[1] > BASH_REMATCH[2])); then
            echo "gpu_harness: --tests-part wants K/N with 1 <= K <= N, got $TEST_PART" >&2
            exit 2
        fi
        part=${BASH_REMATCH[1]} parts=${BASH_REMATCH[2]}
        mapfile -t ids < <("$PY" -m pytest "${sel[@]}" -m "$marker" -p no:xdist --collect-only -q \
            2>/dev/null | grep '::')
        n=${#ids[@]}
        lo=$(((part - 1) * n / parts)) hi=$((part * n / parts))
        sel=("${ids[@]:lo:hi-lo}")
        log "tests: part $part/$parts = collected tests $((lo + 1))-$hi of $n"
    fi
    stop=(-x)
    [[ $KEEP_GOING == 1 ]] && stop=()
    log "tests: pytest ${sel[*]:0:8}$([[ ${#sel[@]} -gt 8 ]] && echo " ...") -m '$marker' (timeout ${TESTS_TIMEOUT}s)"
    rm -f "$OUT_DIR/tests.xml"
    if [[ ${#sel[@]} == 0 ]]; then
        echo "no tests in this part" >"$OUT_DIR/tests.log"
        tests_rc=5
    else
        timeout -k 15 "$TESTS_TIMEOUT" "$PY" -m pytest "${sel[@]}" -m "$marker" -p no:xdist \
            "${stop[@]}" -v -rfE --junitxml="$OUT_DIR/tests.xml" >"$OUT_DIR/tests.log" 2>&1
        tests_rc=$?
    fi
    tail -n 25 "$OUT_DIR/tests.log"
    counts=$("$PY" - "$OUT_DIR/tests.xml" "$OUT_DIR/tests.log" <<'PY' 2>/dev/null || echo "no report"
import os
import re
import sys
import xml.etree.ElementTree as ET

xml_path, log_path = sys.argv[1], sys.argv[2]
if os.path.exists(xml_path):
    t = dict.fromkeys(("tests", "failures", "errors", "skipped"), 0)
    for suite in ET.parse(xml_path).getroot().iter("testsuite"):
        for k in t:
            t[k] += int(suite.get(k, 0))
    bad = t["failures"] + t["errors"]
    print(f"{t['tests'] - bad - t['skipped']} passed, {bad} failed, {t['skipped']} skipped")
else:  # cut short (timeout): count the verbose result lines, name the test left running
    n = dict.fromkeys(("PASSED", "FAILED", "ERROR", "SKIPPED", "XFAIL", "XPASS"), 0)
    running = ""
    for line in open(log_path, errors="replace"):
        m = re.match(r"^(\S+::\S+)(?: (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b)?", line)
        if m:
            if m.group(2):
                n[m.group(2)] += 1
                running = ""
            else:
                running = m.group(1)
    print(
        f"cut short: {n['PASSED']} passed, {n['FAILED'] + n['ERROR']} failed, "
        f"{n['SKIPPED']} skipped before it" + (f"; running: {running}" if running else "")
    )
PY
)
    first_fail=$(grep -m1 -E '^(FAILED|ERROR) ' "$OUT_DIR/tests.log" | cut -c1-100 || true)
    row tests "$(verdict $tests_rc)" $((SECONDS - t0)) "$counts${first_fail:+; $first_fail}"
else
    row tests skipped 0 "--no-tests"
fi

# ---------------------------------------------------------------- 3. benchmarks
BENCH_TAIL=""
if [[ $RUN_BENCH == 1 ]]; then
    t0=$SECONDS
    bargs=()
    [[ $QUICK == 1 ]] && bargs+=(--quick)
    # shellcheck disable=SC2206  # the user's argument string is split on purpose
    [[ -n $BENCH_ARGS ]] && bargs+=($BENCH_ARGS)
    log "bench: python -m ep_elastic.bench ${bargs[*]} (timeout ${BENCH_TIMEOUT}s)"
    timeout -k 15 "$BENCH_TIMEOUT" "$PY" -m ep_elastic.bench "${bargs[@]}" \
        --json "$OUT_DIR/bench.json" --plot "$OUT_DIR/bench.png" >>"$LOG" 2>&1
    bench_rc=$?
    BENCH_TAIL=$(sed -n '/\[harness .*bench:/,$p' "$LOG" | tail -n 30)
    made=""
    for f in bench.json bench.png; do [[ -s $OUT_DIR/$f ]] && made="$made $f"; done
    row bench "$(verdict $bench_rc)" $((SECONDS - t0)) "wrote:${made:- nothing}"
else
    row bench skipped 0 "--no-bench"
fi

# ---------------------------------------------------------------- summary (printed last)
{
    if [[ -n $BENCH_TAIL ]]; then
        echo "---- benchmark output (last lines; full log in harness.log)"
        echo "$BENCH_TAIL"
    fi
    echo "---- gpu_harness summary (files in $OUT_DIR)"
    printf '%-8s %-8s %7s  %s\n' step status time detail
    printf '%s\n' "${ROWS[@]}"
} | tee "$SUMMARY"

status=0
for r in "${ROWS[@]}"; do
    case "$r" in *FAILED*|*TIMEOUT*) status=1 ;; esac
done
exit $status
