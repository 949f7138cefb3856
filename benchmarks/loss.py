"""Benchmark: ``wdce_loss`` forward+backward against the reference path and its own backends.

Shapes (default, LLaDA-8B training): 8 sequences × 4 replicates, prompt 200 + completion 256 tokens,
55% of completion tokens masked, hidden 4096, vocabulary 126464, bf16; on CPU 4 × 4 rows of 32 + 64 tokens,
hidden 256, vocabulary 32000, fp32. ``--quick`` uses a tiny shape that runs anywhere in seconds (a smoke test
of the script, not a measurement).

Providers:
  reference  full-sequence logits from the head, F.cross_entropy over every position, then mask and
             weight (what DMPO's research code computes) — ``impl="eager"``
  chunked    memory-lean torch (``impl="chunked"``)
  native     the compiled CPU ops (``impl="native"``), when built and routed by ``wdce_loss``
  triton     the fused kernels (``impl="triton"``), CUDA only
Each row: median / p20 / p80 ms of forward+backward, TFLOP/s against the 3-GEMM floor
(2·N_masked·H·V·3 FLOPs), percent of the floor at the bf16 matmul rate measured in the same run,
extra peak memory, shapes, device, versions, git commit.
"""

from __future__ import annotations

import torch

from benchmarks.common import bench, environment, finish, matmul_tflops, native_ready, parse, parser
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
    elif device.type == "cuda":
        R, L, prompt, H, V = 32, 456, 200, 4096, 126464
    else:
        R, L, prompt, H, V = 16, 96, 32, 256, 32000
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    inputs = make_inputs(R, L, prompt, H, V, 0.55, dtype, device)
    hidden, head, targets, mask, rw = inputs
    n_masked = int(mask.sum())
    floor_flops = 2 * n_masked * H * V * 3
    peak = matmul_tflops(device, dtype, quick=args.quick)
    # Triton on a CPU would run in its interpreter: that checks arithmetic, it measures nothing. Native only
    # when built: impl="native" falls back to chunked silently otherwise.
    providers = ["reference", "chunked"]
    providers += (
        ["triton"] if device.type == "cuda" else (["native"] if native_ready(build=not args.quick) else [])
    )
    impl_of = {"reference": "eager", "chunked": "chunked", "native": "native", "triton": "triton"}
    rows = []
    for name in providers:

        def step(impl=impl_of[name]):
            hidden.grad = head.grad = None
            wdce_loss(hidden, head, targets, mask, rw, impl=impl).backward()

        try:
            step()
        except ValueError as err:  # a backend that this op or this machine does not have
            if "impl=" not in str(err):
                raise
            print(f"skip {name}: {err}")
            continue
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
            "shape": {
                "R": R,
                "L": L,
                "prompt": prompt,
                "H": H,
                "V": V,
                "n_masked": n_masked,
                "dtype": str(dtype).replace("torch.", ""),
            },
            **environment(device),
        }
        row["pct_of_floor"] = 100 * row["floor_ms"] / ms["median_ms"] if row["floor_ms"] else None
        rows.append(row)
    base = rows[0]["median_ms"]
    for row in rows:
        row["speedup_vs_reference"] = base / row["median_ms"]
    return rows


def main(argv=None):
    p = parser("loss", __doc__)
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="default: bfloat16 on cuda, float32 on cpu")  # fmt: skip
    args = parse(p, argv)
    rows = run(args)
    columns = ["provider", "median_ms", "p20_ms", "p80_ms", "tflops", "pct_of_floor", "speedup_vs_reference",
               "peak_extra_bytes"]  # fmt: skip
    return finish(rows, "loss", args, columns)
