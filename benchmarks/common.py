"""Shared benchmark plumbing: timing, the environment of a row, the matmul roofline, output."""

from __future__ import annotations

import datetime
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def bench(fn, device: torch.device, *, quick: bool = False) -> dict:
    """Median and p20 / p80 milliseconds of ``fn()`` after warm-up (CUDA events via do_bench on GPU)."""
    if device.type == "cuda":
        import triton.testing

        med, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=100)
        return {"median_ms": med, "p20_ms": p20, "p80_ms": p80}
    fn()  # warm-up
    times = []
    for _ in range(3 if quick else 10):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    q = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
    return {"median_ms": statistics.median(times), "p20_ms": q[0], "p80_ms": q[3]}


def matmul_tflops(device: torch.device, dtype: torch.dtype, *, quick: bool = False) -> float | None:
    """The dense matmul rate (TFLOP/s) measured now on this device: the floor's denominator."""
    n = 256 if quick else (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device).to(dtype if device.type == "cuda" else torch.float32)
    b = torch.randn(n, n, device=device).to(a.dtype)
    ms = bench(lambda: a @ b, device, quick=quick)["median_ms"]
    return 2 * n**3 / (ms * 1e-3) / 1e12


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)  # fmt: skip
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device) -> dict:
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "commit": git_commit(),
        "date": datetime.date.today().isoformat(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def print_table(rows: list[dict], columns: list[str]) -> None:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}"
        return "-" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def write_rows(rows: list[dict], name: str, args) -> Path:
    if getattr(args, "out", None):
        path = Path(args.out)
    else:
        tag = "quick" if getattr(args, "quick", False) else args.device
        path = RESULTS / f"{name}-{tag}-{datetime.date.today().isoformat()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=2) + "\n")
    return path
