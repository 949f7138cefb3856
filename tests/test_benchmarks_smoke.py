"""The benchmark scripts run (--quick, CPU) and write well-formed rows; nothing about timing is asserted.

``benchmarks`` is a folder of the repository, not part of the installed package, so it runs as
``python -m benchmarks`` does: from the repository root, in a subprocess. One subprocess runs every script,
the table and the plots (the imports are paid once), then the tests check what it wrote.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("loss", "denoise", "rollout", "iteration")

DRIVER = """
import json, sys
from pathlib import Path

import torch

from benchmarks.__main__ import main
from benchmarks import perf_table, plot
from benchmarks.rollout import reference_rollout
from dmpo_fast.models import build_tiny
from dmpo_fast.sampling import generate

out = Path(sys.argv[1])
for name in sys.argv[2:]:
    assert main([name, "--quick", "--device", "cpu", "--out", str(out / f"{name}.json")]) == 0

# The table and plots of rows marked as measured (quick rows are never tabulated).
for name in sys.argv[2:]:
    rows = json.loads((out / f"{name}.json").read_text())
    (out / f"measured-{name}.json").write_text(json.dumps([{**r, "quick": False} for r in rows]))
quick = [str(out / f"{n}.json") for n in sys.argv[2:]]
measured = [str(out / f"measured-{n}.json") for n in sys.argv[2:]]
perf_table.main([*quick, "--out", str(out / "table-quick.md")])
perf_table.main([*measured, "--out", str(out / "table.md")])
try:
    import matplotlib  # noqa: F401
    plot.main([*measured, "--out-dir", str(out / "plots")])
except ImportError:
    pass

# At T = 0 (no noise) the research-code loop must decode what generate's prefix-cache sampler decodes.
lm = build_tiny(64, mask_id=63, eos_id=62, seed=0, n_layers=2).eval()
prompt = torch.randint(0, 60, (3, 10), generator=torch.Generator().manual_seed(0))
decode = dict(gen_length=16, block_length=8, steps=8, temperature=0.0)
ref = reference_rollout(lm, prompt, **decode)
fast = generate(lm, prompt, sampler="fast_dllm", cache="prefix", eos_id=None, seed=0, **decode).ids
checks = {"reference_equals_generate": torch.equal(ref, fast), "reference_has_mask": bool((ref == 63).any())}
(out / "checks.json").write_text(json.dumps(checks))
"""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, str(out), *SCRIPTS],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def quick_rows(run_dir):
    return {name: json.loads((run_dir / f"{name}.json").read_text()) for name in SCRIPTS}


def _common_fields(rows):
    for r in rows:
        assert r["torch"] and r["device"] and r["device_type"] == "cpu" and r["quick"] is True
        assert "commit" in r and "triton" in r
        if r.get("skipped"):  # a peer that cannot run here (no CUDA, not installed): the reason, no timing
            assert r["skipped"] and "median_ms" not in r
            continue
        assert r["median_ms"] > 0 and r["p20_ms"] <= r["p80_ms"]
        # torch.compile cannot be memory-tracked on CPU (the tracker runs the uncompiled code): no figure.
        if r.get("provider") == "compile":
            assert r["peak_extra_bytes"] is None
        else:
            assert r["peak_extra_bytes"] >= 0


def test_entry_point_lists_the_scripts():
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    for name in SCRIPTS:
        assert name in proc.stderr


def test_loss_quick(quick_rows):
    rows = quick_rows["loss"]
    _common_fields(rows)
    assert {"reference", "chunked"} <= {r["provider"] for r in rows}
    measured = [r for r in rows if not r.get("skipped")]
    assert {"cce", "liger"} <= {r["provider"] for r in rows if r.get("skipped")}  # CUDA-only peers on CPU
    assert all(r["shape"]["n_masked"] > 0 and r["tflops"] > 0 for r in measured)


def test_denoise_quick(quick_rows):
    rows = quick_rows["denoise"]
    _common_fields(rows)
    providers = {r["provider"] for r in rows}
    assert {"reference", "hidden-eager", "hidden-chunked", "logits-eager", "logits-chunked"} <= providers
    for r in rows:
        assert r["floor_ms"] > 0 and r["pct_of_floor"] > 0
        # Only hidden-state rows do the reference's work (the head GEMM); logits rows are not compared.
        assert (r["speedup_vs_reference"] is None) == r["provider"].startswith("logits")


def test_rollout_quick(quick_rows):
    rows = quick_rows["rollout"]
    _common_fields(rows)
    assert [r["provider"] for r in rows] == [
        "llada",
        "fast_dllm-prefix",
        "fast_dllm-dual",
        "reference-prefix",
    ]
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["model_tflops"] > 0 and r["layers"] == 1
    assert rows[0]["speedup_vs_llada"] == 1.0


def test_iteration_quick(quick_rows):
    rows = quick_rows["iteration"]
    _common_fields(rows)
    assert [r["provider"] for r in rows] == ["reference", "dmpo_fast"]
    for r in rows:
        assert r["rollout_ms"] > 0 and r["elbo_ms"] > 0 and r["loss_steps_ms"] > 0
        assert r["peak_bytes"] == r["static_bytes"] + r["peak_extra_bytes"] > 0


def test_reference_rollout_does_the_samplers_work(run_dir):
    """At T = 0 (no noise) the research-code loop decodes exactly what ``generate``'s prefix-cache sampler
    does: same model calls, same schedule, same commits — so the benchmark compares like with like."""
    checks = json.loads((run_dir / "checks.json").read_text())
    assert checks == {"reference_equals_generate": True, "reference_has_mask": False}


def test_perf_table_and_plots(run_dir):
    assert "No benchmark results yet" in (run_dir / "table-quick.md").read_text()
    text = (run_dir / "table.md").read_text()
    for header in ("wdce_loss", "denoise_step", "Rollout throughput", "DMPO iteration", "reference-prefix"):
        assert header in text
    assert sum(line.startswith("|---|") for line in text.splitlines()) == len(SCRIPTS) and "torch " in text
    pytest.importorskip("matplotlib")
    pngs = sorted(p.name for p in (run_dir / "plots").glob("*.png"))
    assert pngs == sorted(f"measured-{name}.png" for name in SCRIPTS)


def test_every_script_accepts_the_device_option():
    """`python -m benchmarks <script> --device cpu` is accepted by every script, native included."""
    for name in (*SCRIPTS, "native"):
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks", name, "--device", "cpu", "--help"],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 0, (name, proc.stderr[-2000:])


def test_loss_block_curve_quick(tmp_path):
    """``--block-curve``: one row per (provider, vocabulary block), whole rows as block 0, the reference once;
    it and ``--chunk-curve`` are separate runs."""
    out = tmp_path / "blocks.json"
    cmd = [sys.executable, "-m", "benchmarks", "loss", "--quick", "--device", "cpu", "--block-curve"]
    proc = subprocess.run([*cmd, "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [r["provider"] for r in rows][0] == "reference" and rows[0]["vocab_block"] is None
    blocks = [r["vocab_block"] for r in rows if r["provider"] == "chunked"]
    assert blocks == [256, 2048, 0]  # BLOCK_CURVE[::3]
    assert all(r["chunk_rows"] > 0 and r["median_ms"] > 0 for r in rows[1:])
    proc = subprocess.run([*cmd, "--chunk-curve"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "separate runs" in proc.stderr
