"""Benchmark: the native CPU ops (csrc/) against the torch paths they replace, on CPU.

1. ``denoise_step`` from logits: B = 8 rows, L = 32 positions all active, vocabulary 32000, fp32 logits,
   temperature 0.7 (the Gumbel path; T = 0 as a second row), num_transfer = 4.
   Providers: eager (the reference: [active, V] fp32 logits, Philox noise emulated in int64 torch ops),
   chunked, native (one C++ call). Target: native >= 5x eager.
2. ``wdce_loss`` forward+backward: 2048 masked positions (8 rows x 512 positions, 256 masked per row), hidden
   256, vocabulary 32000, fp32. Providers: chunked, native (the same chunks of logits; each chunk's row work
   in C++), and ``gemm_floor``: the three GEMMs of the chunked path alone (logits, dH, dW), the time no
   row-work optimisation can beat. Target: native >= 1.5x chunked with no higher peak memory.
   Both providers run wdce_loss's own non-eager path (token weights, gather of the masked rows,
   ``weighted_linear_ce``), called directly because ``wdce_loss`` does not route ``impl="native"`` yet.

Providers are timed in interleaved rounds (7; 2 with --quick) after a warm-up, so load drifting on a shared
machine hits them alike. Each row: median / p20 / p80 ms, the speed-up against the baseline of its op, peak
memory allocated during the call (dmpo_fast.profiling.peak_memory), whether the tokens equal the eager
reference's (denoise), the shapes, device, versions, git commit and the load average. ``--quick`` uses tiny
shapes (a smoke test of the script, not a measurement). The full run writes
benchmarks/results/cpu_native.json. The native ops are built first if the cache holds no build (not timed).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

import torch

from benchmarks.common import RESULTS, environment, print_table, write_rows
from dmpo_fast.ops import _native
from dmpo_fast.ops.denoise_step import denoise_step
from dmpo_fast.ops.linear_ce import chunk_rows, weighted_linear_ce
from dmpo_fast.ops.wdce import token_weights_from_rows
from dmpo_fast.profiling import peak_memory

PROVIDERS_DENOISE = ("eager", "chunked", "native")


def bench_round_robin(fns: dict, *, quick: bool) -> dict:
    """Median / p20 / p80 ms of each provider, timed in rounds that call every provider once in turn.

    On a shared machine the load drifts over minutes; interleaving makes every provider see the same drift,
    so the ratios mean more than those of back-to-back runs (``common.bench``)."""
    for fn in fns.values():
        fn()  # warm-up
    times = {name: [] for name in fns}
    for _ in range(2 if quick else 7):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t) * 1e3)
    out = {}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=5, method="inclusive")
        out[name] = {"median_ms": statistics.median(ts), "p20_ms": q[0], "p80_ms": q[3]}
    return out


def denoise_rows(quick: bool) -> list[dict]:
    B, L, V = (2, 8, 997) if quick else (8, 32, 32000)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, L, V, generator=g) * 3.0
    x = torch.zeros(B, L, dtype=torch.long)
    active = torch.ones(B, L, dtype=torch.bool)
    rows = []
    for temperature in (0.7, 0.0):
        kw = dict(temperature=temperature, num_transfer=4, seed=1234)
        reference = denoise_step(logits, x, active, impl="eager", **kw)
        calls = {
            p: functools.partial(denoise_step, logits, x, active, impl=p, **kw) for p in PROVIDERS_DENOISE
        }
        timings = bench_round_robin(calls, quick=quick)
        for provider, call in calls.items():
            out = call()
            _, mem = peak_memory(call)
            rows.append({
                "op": "denoise_step", "provider": provider, "temperature": temperature, **timings[provider],
                "peak_extra_bytes": mem,
                "same_tokens_as_eager": bool(torch.equal(out.x, reference.x)),
                "same_commits_as_eager": bool(torch.equal(out.committed, reference.committed)),
                "shape": {"B": B, "L": L, "active": int(active.sum()), "V": V, "dtype": "float32",
                          "num_transfer": 4},
            })  # fmt: skip
        same_t = [r for r in rows if r["temperature"] == temperature]
        base = next(r["median_ms"] for r in same_t if r["provider"] == "eager")
        for r in same_t:
            r["speedup"] = base / r["median_ms"]
            r["speedup_vs"] = "eager"
    return rows


def wdce_rows(quick: bool) -> list[dict]:
    R, L, per_row, H, V = (2, 16, 8, 16, 997) if quick else (8, 512, 256, 256, 32000)
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(R, L, H, generator=g) * 0.5).requires_grad_()
    head = (torch.randn(V, H, generator=g) / H**0.5).requires_grad_()
    targets = torch.randint(0, V, (R, L), generator=g)
    mask = torch.zeros(R, L, dtype=torch.bool)
    for r in range(R):
        mask[r, torch.randperm(L, generator=g)[:per_row]] = True
    row_weights = torch.randn(R, generator=g)
    n_masked = int(mask.sum())

    def step(impl):
        hidden.grad = head.grad = None
        tw = token_weights_from_rows(mask, row_weights).reshape(-1)  # wdce_loss's gather, as it does it
        sel = (tw != 0).nonzero().squeeze(1)
        loss = weighted_linear_ce(
            hidden.reshape(R * L, H).index_select(0, sel), head, targets.reshape(-1).index_select(0, sel),
            tw.index_select(0, sel), impl=impl,
        )  # fmt: skip
        loss.backward()
        return loss.detach()

    h_rows = hidden.detach().reshape(R * L, H)[mask.reshape(-1)]
    w = head.detach()
    chunk = chunk_rows(V, device="cpu", hidden=H)  # the chunked path's CPU chunks

    def gemms():  # the chunked path's three GEMMs over the same chunks, nothing else
        dw = torch.zeros_like(w)
        for s in range(0, n_masked, chunk):
            h = h_rows[s : s + chunk]
            z = h @ w.T
            z @ w
            dw.addmm_(z.T, h)

    rows = []
    losses = {}
    calls = {"chunked": functools.partial(step, "chunked"), "native": functools.partial(step, "native"),
             "gemm_floor": gemms}  # fmt: skip
    timings = bench_round_robin(calls, quick=quick)
    for provider, fn in calls.items():
        loss, mem = peak_memory(fn)
        if provider != "gemm_floor":
            losses[provider] = float(loss)
        rows.append({
            "op": "wdce_loss", "mode": "fwd+bwd", "provider": provider, **timings[provider],
            "peak_extra_bytes": mem,
            "shape": {"R": R, "L": L, "n_masked": n_masked, "H": H, "V": V, "dtype": "float32",
                      "chunk_rows": chunk},
        })  # fmt: skip
    base = rows[0]
    for r in rows:
        r["speedup"] = base["median_ms"] / r["median_ms"]
        r["speedup_vs"] = "chunked"
        r["peak_vs_chunked"] = r["peak_extra_bytes"] / max(1, base["peak_extra_bytes"])
    rel = abs(losses["native"] - losses["chunked"]) / max(1e-30, abs(losses["chunked"]))
    rows[1]["loss_rel_diff_vs_chunked"] = rel
    return rows


def run(args) -> list[dict]:
    if not _native.load(build=True):
        raise SystemExit(f"the native ops could not be built or loaded: {_native._failure}")
    load_before = os.getloadavg()[0]
    rows = denoise_rows(args.quick) + wdce_rows(args.quick)
    env = environment(torch.device("cpu"))
    env["native_flags"] = " ".join(_native.compile_flags())
    # 1-minute load average before and after: timings on a shared machine mean little without it.
    env["load_avg_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    return [{**r, **env, "benchmark": "native", "quick": bool(args.quick)} for r in rows]


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks native", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes: the script runs, nothing is measured")
    p.add_argument("--out", default=None, help="JSON file (default: benchmarks/results/cpu_native.json)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all)")
    args = p.parse_args(argv)
    args.device = "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.out is None and not args.quick:
        args.out = str(RESULTS / "cpu_native.json")
    rows = run(args)
    print_table(rows, ["op", "provider", "temperature", "median_ms", "p20_ms", "p80_ms", "speedup",
                       "speedup_vs", "peak_extra_bytes", "same_tokens_as_eager"])  # fmt: skip
    path = write_rows(rows, "native", args)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
