"""Benchmark: ``wdce_loss`` forward+backward against the reference path and its own backends.

Shapes (default, LLaDA-8B training): 8 sequences × 4 replicates, prompt 200 + completion 256 tokens,
55% of completion tokens masked, hidden 4096, vocabulary 126464, bf16. ``--quick`` uses a tiny
shape that runs anywhere in seconds (a smoke test of the script, not a measurement).

Providers:
  reference  full-sequence logits from the head, F.cross_entropy over every position, then mask and
             weight (what DMPO's research code computes) — ``impl="eager"``
  chunked    memory-lean torch (``impl="chunked"``)
  triton     the fused kernels (``impl="triton"``), CUDA only
Each row: median / p20 / p80 ms of forward+backward, TFLOP/s against the 3-GEMM floor
(2·N_masked·H·V·3 FLOPs), percent of the floor at the bf16 matmul rate measured in the same run,
extra peak memory, shapes, device, versions, git commit.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import bench, environment, matmul_tflops, print_table, write_rows
from dmpo_fast.ops import wdce_loss
from dmpo_fast.profiling import peak_memory


def make_inputs(R, L, prompt, H, V, masked_frac, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = (torch.randn(R, L, H, generator=g) * 0.5).to(dtype).to(device).requires_grad_()
    head = (torch.randn(V, H, generator=g) / H**0.5).to(dtype).to(device).requires_grad_()
    targets = torch.randint(0, V, (R, L), generator=g).to(device)
    mask = torch.zeros(R, L, dtype=torch.bool)
    mask[:, prompt:] = torch.rand(R, L - prompt, generator=g) < masked_frac
    row_weights = torch.randn(R, generator=g).to(device)
    return hidden, head, targets, mask.to(device), row_weights


def run(args) -> list[dict]:
    device = torch.device(args.device)
    if args.quick:
        R, L, prompt, H, V = 4, 24, 8, 32, 257
    else:
        R, L, prompt, H, V = 32, 456, 200, 4096, 126464
    dtype = getattr(torch, args.dtype)
    inputs = make_inputs(R, L, prompt, H, V, 0.55, dtype, device)
    hidden, head, targets, mask, rw = inputs
    n_masked = int(mask.sum())
    floor_flops = 2 * n_masked * H * V * 3
    peak = matmul_tflops(device, dtype, quick=args.quick)
    providers = ["reference", "chunked"] + (["triton"] if device.type == "cuda" else [])
    impl_of = {"reference": "eager", "chunked": "chunked", "triton": "triton"}
    rows = []
    for name in providers:

        def step():
            hidden.grad = head.grad = None
            wdce_loss(hidden, head, targets, mask, rw, impl=impl_of[name]).backward()

        ms = bench(step, device, quick=args.quick)
        _, mem = peak_memory(step, device)
        row = {
            "op": "wdce_loss",
            "mode": "fwd+bwd",
            "provider": name,
            **ms,
            "tflops": floor_flops / (ms["median_ms"] * 1e-3) / 1e12,
            "floor_ms": floor_flops / (peak * 1e12) * 1e3 if peak else None,
            "peak_extra_bytes": mem,
            "shape": {"R": R, "L": L, "prompt": prompt, "H": H, "V": V, "n_masked": n_masked, "dtype": args.dtype},
            **environment(device),
        }
        row["pct_of_floor"] = 100 * row["floor_ms"] / ms["median_ms"] if row["floor_ms"] else None
        rows.append(row)
    base = rows[0]["median_ms"]
    for row in rows:
        row["speedup_vs_reference"] = base / row["median_ms"]
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks loss", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--quick", action="store_true", help="tiny shape: checks the script runs, measures nothing")
    p.add_argument("--out", default=None, help="JSON file to write (default: benchmarks/results/loss-<device>-<date>.json)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    rows = run(args)
    print_table(rows, ["provider", "median_ms", "p20_ms", "p80_ms", "tflops", "pct_of_floor", "speedup_vs_reference",
                       "peak_extra_bytes"])  # fmt: skip
    path = write_rows(rows, "loss", args)
    print(f"wrote {path}")
    return 0
