"""Shared benchmark plumbing: timing, the environment of a row, the matmul and memory rooflines, the
benchmark models (LLaDA-8B-shaped with random weights, the built-in tiny one), the command line, output.

Two timers: ``bench`` for kernels (CUDA events through ``triton.testing.do_bench``, which also flushes the L2
cache between calls) and ``bench_interleaved`` for end-to-end work that synchronises with the host on its own
(rollouts, training iterations): wall clock around the call, a device synchronise on each side, providers
timed round-robin. On CPU both also report ``cpu_ms``, the process CPU time, steadier on a shared host.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"

# LLaDA-8B's architecture (the LLaDAConfig defaults, spelled out so a row states what it ran).
LLADA_8B = dict(
    d_model=4096, n_heads=32, n_kv_heads=32, n_layers=32, mlp_hidden_size=12288, max_sequence_length=4096,
    rope_theta=500000.0, vocab_size=126464, embedding_size=126464, mask_token_id=126336, eos_token_id=126081,
    pad_token_id=126081,
)  # fmt: skip


def _stats(wall: list[float], cpu: list[float] | None) -> dict:
    """Median, p20 / p80 and min of the wall times, and every sample. With ``cpu`` (CPU runs) also the median
    process CPU time. On a host shared with bursty jobs the min is the most repeatable estimate of the
    undisturbed cost (the median and quantiles are the figures quoted)."""
    q = statistics.quantiles(wall, n=5, method="inclusive") if len(wall) > 1 else [wall[0]] * 4
    out = {"median_ms": statistics.median(wall), "p20_ms": q[0], "p80_ms": q[3], "repeats": len(wall)}
    if cpu is not None:
        out["cpu_ms"] = statistics.median(cpu)
        out["min_ms"] = min(wall)
        out["samples_ms"] = [round(t, 3) for t in wall]
    return out


def _timed(fn, device: torch.device) -> tuple[float, float]:
    """(wall ms, process CPU ms) of one call. The CPU time (all threads of this process) hardly moves when
    other processes share the cores, so on a busy host it is the steadier of the two for comparing providers;
    the wall time is what a user waits."""
    synchronize(device)
    t, c = time.perf_counter(), time.process_time()
    fn()
    synchronize(device)
    return (time.perf_counter() - t) * 1e3, (time.process_time() - c) * 1e3


def bench(fn, device: torch.device, *, quick: bool = False) -> dict:
    """Median and p20 / p80 milliseconds of ``fn()`` after warm-up (CUDA events via do_bench on GPU; on CPU
    also ``cpu_ms``, the median process CPU time)."""
    if device.type == "cuda":
        import triton.testing

        med, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=100)
        return {"median_ms": med, "p20_ms": p20, "p80_ms": p80}
    warm_ms, _ = _timed(fn, device)  # warm-up; its time sets the number of repeats: 3 to 10, about 2 s in all
    n = 3 if quick else min(10, max(3, int(2000 / max(warm_ms, 1e-3))))
    wall, cpu = zip(*(_timed(fn, device) for _ in range(n)), strict=True)
    return _stats(list(wall), list(cpu))


def matmul_tflops(device: torch.device, dtype: torch.dtype, *, quick: bool = False) -> float | None:
    """The dense matmul rate (TFLOP/s) measured now on this device: the floor's denominator."""
    n = 256 if quick else (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device).to(dtype if device.type == "cuda" else torch.float32)
    b = torch.randn(n, n, device=device).to(a.dtype)
    ms = bench(lambda: a @ b, device, quick=quick)["median_ms"]
    return 2 * n**3 / (ms * 1e-3) / 1e12


def memory_gbps(device: torch.device, *, quick: bool = False) -> float:
    """Device-memory bandwidth (GB/s) measured now: a large copy, read + write bytes over its median time."""
    n_bytes = 1 << (24 if quick else (30 if device.type == "cuda" else 28))
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), device, quick=quick)["median_ms"]
    return 2 * n_bytes / (ms * 1e-3) / 1e9


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_interleaved(calls: dict, device: torch.device, *, repeats: int, warmup: int = 1) -> dict:
    """Wall-clock stats (and ``cpu_ms`` on CPU) of several calls that synchronise on their own (rollouts,
    training iterations), timed round-robin (A B C A B C ...) after ``warmup`` rounds: a change in the host's
    load during the run then slows every provider alike, so their ratios stay fair. {name: stats}."""
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    wall = {name: [] for name in calls}
    cpu = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            w, c = _timed(fn, device)
            wall[name].append(w)
            cpu[name].append(c)
    return {name: _stats(wall[name], cpu[name] if device.type == "cpu" else None) for name in calls}


def git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        cmd = ["git", "rev-parse", "--short", "HEAD"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=5, cwd=here)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def package_version(dist: str) -> str | None:
    """The installed version of distribution ``dist`` (e.g. "liger-kernel"), or None when it is absent."""
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def environment(device: torch.device) -> dict:
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "device_type": device.type,
        "cpu_threads": torch.get_num_threads(),
        # Load average over the last minute: other processes on a shared host slow CPU rows down.
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "commit": git_commit(),
        "date": datetime.date.today().isoformat(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    from dmpo_fast.ops._common import native_available

    env["native_ops_loaded"] = native_available()  # whether impl="auto" on CPU could pick them
    return env


def print_table(rows: list[dict], columns: list[str]) -> None:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}"
        return "-" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def write_rows(rows: list[dict], name: str, args) -> Path:
    if getattr(args, "out", None):
        path = Path(args.out)
    else:
        tag = "quick" if getattr(args, "quick", False) else args.device
        path = RESULTS / f"{name}-{tag}-{datetime.date.today().isoformat()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=2) + "\n")
    return path


# --------------------------------------------------------------------------------------------------
# Models: random weights, built in place (no download)
# --------------------------------------------------------------------------------------------------


def build_lm(
    arch: str,
    device: torch.device,
    dtype: torch.dtype,
    *,
    layers: int | None = None,
    vocab: int | None = None,
    seed: int = 0,
):
    """``(DiffusionLM in eval mode, description dict)`` with random weights.

    arch "llada8b": LLaDA-8B's architecture (``LLADA_8B``; ``layers`` overrides the 32 blocks), built directly
    on ``device`` in ``dtype`` (an 8B model in fp32 on the host first would need 32 GB).
    arch "tiny": ``build_tiny`` over the character tokenizer's vocabulary (the shipped default model's shape),
    or over ``vocab`` ids (mask ``vocab - 1``, EOS ``vocab - 2``) to give the head an LLM's weight.
    """
    from dmpo_fast.models import LLaDADiffusionLM, LLaDAModelLM, build_tiny, tiny_config

    if arch == "llada8b":
        fields = dict(LLADA_8B)
        if layers is not None:
            fields["n_layers"] = layers
        config = tiny_config(fields.pop("vocab_size"), **fields)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed)
                with torch.device(device):
                    lm = LLaDADiffusionLM(LLaDAModelLM(config))
        finally:
            torch.set_default_dtype(previous)
    elif arch == "tiny":
        from dmpo_fast.tokenizer import CharTokenizer

        tok = CharTokenizer()
        V, mask, eos = (
            (tok.vocab_size, tok.mask_id, tok.eos_id) if vocab is None else (vocab, vocab - 1, vocab - 2)
        )
        overrides = {} if layers is None else {"n_layers": layers}
        lm = build_tiny(V, mask, eos, seed=seed, **overrides).to(device, dtype)
    else:
        raise ValueError(f"arch must be 'llada8b' or 'tiny', got {arch!r}")
    cfg = lm.config
    desc = {
        "model": f"{arch} (random weights)",
        "layers": cfg.n_layers,
        "d_model": cfg.d_model,
        "vocab": cfg.vocab_size,
        "params": sum(p.numel() for p in lm.parameters()),
        "dtype": str(dtype).replace("torch.", ""),
    }
    return lm.eval(), desc


def native_ready(*, build: bool) -> bool:
    """Whether the native CPU ops can run now. ``impl="native"`` silently falls back to chunked when they
    cannot be built, so a script asks this first rather than time chunked under the name "native".
    ``build=False`` never compiles (the quick runs: a first build takes about a minute)."""
    from dmpo_fast.ops import _native

    return _native.load(build=True) if build else _native.usable_for_auto()


def tensor_bytes(tensors) -> int:
    """Bytes held by ``tensors`` (distinct storages counted once)."""
    seen, total = set(), 0
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


# --------------------------------------------------------------------------------------------------
# The process's real peak memory (CPU)
# --------------------------------------------------------------------------------------------------


def _status_bytes(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process from /proc/self/status, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{field} not in /proc/self/status")


def peak_rss_extra(setup: str, *args, threads: int | None = None, timeout: float = 600) -> int | None:
    """Extra peak resident memory (bytes) of one call, measured in a fresh process: what the OS had to give.

    ``setup`` names a function ``"module:function"``; in a new interpreter ``function(*args)`` (JSON-able
    args) returns ``(warmup, step)``. The child runs ``warmup()`` (a tiny shape: it loads the libraries and
    starts the thread pools, so their pages are not charged to the step), collects garbage, reads its
    resident set, resets the kernel's high-water mark (``/proc/self/clear_refs``, Linux), runs ``step()``
    once and reads the mark again: extra = VmHWM after − VmRSS before. Unlike ``peak_memory``'s tracker of
    torch allocations this sees the allocator's real footprint (freed blocks that malloc keeps, alignment,
    GEMM workspaces). None where /proc is missing (not Linux) or the mark cannot be reset.
    """
    if not Path("/proc/self/status").is_file():
        return None
    import sys

    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    payload = json.dumps({"setup": setup, "args": list(args), "threads": threads})
    code = "from benchmarks.common import _peak_rss_child; _peak_rss_child()"
    out = subprocess.run(
        [sys.executable, "-c", code], input=payload, capture_output=True, text=True, env=env, timeout=timeout
    )
    if out.returncode != 0:
        raise RuntimeError(f"peak_rss_extra({setup}) failed:\n{out.stderr[-2000:]}")
    value = json.loads(out.stdout.strip().splitlines()[-1])
    return None if value is None else int(value)


def touch_setup(mib: int):
    """A ``peak_rss_extra`` setup whose step allocates and writes ``mib`` MiB, then frees them: the check
    of the measurement itself (benchmarks/test_bench_cpu.py)."""

    def step():
        torch.ones(mib << 18)  # mib MiB of fp32, every page written

    return (lambda: None), step


def _peak_rss_child() -> None:
    import gc
    import importlib
    import sys

    spec = json.loads(sys.stdin.read())
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    module, name = spec["setup"].split(":")
    warmup, step = getattr(importlib.import_module(module), name)(*spec["args"])
    warmup()
    del warmup
    gc.collect()
    before = _status_bytes("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5: reset the peak RSS to the current RSS
    except OSError:
        print("null")
        return
    step()
    print(json.dumps(_status_bytes("VmHWM") - before))


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def parser(name: str, doc: str) -> argparse.ArgumentParser:
    """The flags every script shares: --device, --quick, --out."""
    p = argparse.ArgumentParser(prog=f"python -m benchmarks {name}", description=doc.split("\n")[0])
    p.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"]
    )
    p.add_argument(
        "--quick", action="store_true", help="tiny shape: checks the script runs, measures nothing"
    )
    p.add_argument(
        "--out",
        default=None,
        help=f"JSON file to write (default: benchmarks/results/{name}-<device>-<date>.json)",
    )
    return p


def parse(p: argparse.ArgumentParser, argv) -> argparse.Namespace:
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    return args


def check_target(what: str, measured: str, met: bool) -> None:
    """Print one line saying whether a target set for the benchmark is met by this run."""
    print(f"target {what}: {measured} -> {'met' if met else 'MISSED'}")


def finish(rows: list[dict], name: str, args, columns: list[str], targets=None) -> int:
    """Print the table, write the JSON rows (marked ``quick`` when they measure nothing), say where.
    ``targets(rows)`` prints the target checks after the table (``check_target``)."""
    for row in rows:
        row["benchmark"] = name
        row["quick"] = bool(getattr(args, "quick", False))
    print_table(rows, columns)
    if targets is not None and rows:
        targets(rows)
    path = write_rows(rows, name, args)
    print(f"wrote {path}")
    return 0
