#!/usr/bin/env bash
# One command for a whole GPU verification: install in place, run the GPU tests, then the benchmarks
# at the shapes the issues name. Logs and JSON rows go to ${OUT:-gpu-results}/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-results}"
mkdir -p "$OUT"
pip install -e . --no-deps --no-build-isolation -q > "$OUT/install.log" 2>&1
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python -m dmpo_fast info > "$OUT/info.txt" 2>&1
pytest -m gpu -x -q -p no:cacheprovider > "$OUT/pytest-gpu.log" 2>&1
echo "pytest -m gpu exit code: $?" >> "$OUT/pytest-gpu.log"
python -m benchmarks loss --device cuda --out "$OUT/loss-cuda.json" > "$OUT/bench-loss.log" 2>&1
echo "done; see $OUT"
