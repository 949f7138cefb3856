#!/usr/bin/env bash
# One command for a whole GPU verification: install in place, run the GPU tests, then the benchmarks at the
# shapes the issues name (loss, denoise, rollout, iteration), then the markdown table and plots of the rows.
# Logs, JSON rows and the table go to ${OUT:-gpu-results}/; SUMMARY.txt there lists every step's exit code.
#
# Every step runs whatever happened before it (no `set -e`), under its own timeout, and within an overall
# budget (SUITE_BUDGET_S, default 570 s: a remote call is capped at 600 s), so a hang or a crash costs one
# step, not the suite. Steps that the remaining budget cannot cover are skipped and say so.
# JSON files are named <benchmark>-<gpu>-<date>.json: copy them into benchmarks/results/ and commit them.
#
# The loss benchmark's peers (Cut Cross-Entropy, Liger-Kernel) come as wheels, since the GPU machine may have no
# network: run `bash benchmarks/fetch_wheels.sh` where an index is reachable, and bring benchmarks/wheels/
# (git-ignored) along with the checkout. They are installed from there with --no-deps --no-index; without the
# folder, or if that install fails, the suite goes on and the loss rows of the peers say why they were skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-results}"
BUDGET="${SUITE_BUDGET_S:-570}"
PY="${PYTHON:-python}"
mkdir -p "$OUT"
START=$SECONDS
SUMMARY="$OUT/SUMMARY.txt"
: > "$SUMMARY"

# step NAME TIMEOUT_S COMMAND...: run COMMAND with its output in $OUT/NAME.log, never longer than the budget.
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - (SECONDS - START)))
    if ((left < 15)); then
        echo "$name: skipped (budget spent: $((SECONDS - START)) of $BUDGET s)" | tee -a "$SUMMARY"
        return 0
    fi
    ((limit > left - 5)) && limit=$((left - 5))
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    local note=""
    ((rc == 124 || rc == 137)) && note=" (timed out after ${limit} s)"
    echo "$name: exit $rc$note, $((SECONDS - t0)) s" | tee -a "$SUMMARY"
}

GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
SLUG=$(echo "${GPU:-cuda}" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9' '-' | sed 's/^-//; s/-$//')
TAG="$SLUG-$(date +%F)"
echo "device: ${GPU:-unknown}; budget $BUDGET s; output $OUT" | tee -a "$SUMMARY"

# Read-only queries: the conditions (clocks, power limit) the figures were taken under.
step nvidia-smi 20 bash -c "nvidia-smi; nvidia-smi -q -d POWER,CLOCK,PERFORMANCE"
step install 90 "$PY" -m pip install -e . --no-deps --no-build-isolation -q
if compgen -G "benchmarks/wheels/*.whl" > /dev/null; then
    step wheels 60 "$PY" -m pip install --no-deps --no-index -q benchmarks/wheels/*.whl
else
    echo "wheels: none in benchmarks/wheels/ (bash benchmarks/fetch_wheels.sh): cce and liger rows will be skipped" \
        | tee -a "$SUMMARY"
fi
step info 30 "$PY" -m dmpo_fast info
step pytest-gpu 170 pytest -m gpu -x -q -p no:cacheprovider
step bench-loss 150 "$PY" -m benchmarks loss --device cuda --out "$OUT/loss-$TAG.json"
step bench-denoise 60 "$PY" -m benchmarks denoise --device cuda --out "$OUT/denoise-$TAG.json"
step bench-rollout 150 "$PY" -m benchmarks rollout --device cuda --out "$OUT/rollout-$TAG.json"
step bench-iteration 120 "$PY" -m benchmarks iteration --device cuda --out "$OUT/iteration-$TAG.json"
if compgen -G "$OUT/*-$TAG.json" > /dev/null; then
    step perf-table 30 "$PY" -m benchmarks.perf_table "$OUT"/*-"$TAG".json --out "$OUT/perf_table.md"
    step plots 30 "$PY" -m benchmarks.plot "$OUT"/*-"$TAG".json --out-dir "$OUT/plots"
fi
echo "done in $((SECONDS - START)) s; see $OUT" | tee -a "$SUMMARY"
