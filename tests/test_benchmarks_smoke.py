"""The benchmark scripts run (--quick, CPU); nothing about timing is asserted."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_loss_benchmark_quick(tmp_path):
    out = tmp_path / "loss.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "loss", "--quick", "--device", "cpu", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    assert {r["provider"] for r in rows} == {"reference", "chunked"}
    for r in rows:
        assert r["median_ms"] > 0 and r["shape"]["n_masked"] > 0 and r["torch"]
