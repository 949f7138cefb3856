"""Benchmark: one denoising step, ``denoise_step`` against the research code's step.

The step samples a token at every active (masked, in-block) position and commits the most confident ones.
Shapes (default on CUDA, LLaDA-8B decoding): B = 8 rows, 32 active positions per row (one block), hidden
4096, vocabulary 126464, bf16; the CPU set is hidden 256, vocabulary 32000, fp32. Two query widths L:

  prefix  L = 256: Fast-dLLM's prefix cache at the first block of a 256-token completion — the model returns
          the block and everything after it, so the head runs over 256 rows of which 32 are active
  dual    L = 32: the dual cache, the block alone (every query row active)

Providers:
  reference       ``denoise_step_reference_fastdllm``: head over all L query rows (model dtype), float64
                  Gumbel noise over the full vocabulary, float64 softmax, top-k per row in a Python loop
  hidden-<impl>   ``denoise_step((hidden, head), ...)``: only the active rows are projected
  logits-<impl>   ``denoise_step(logits, ...)`` with the [B, L, V] logits given (a model that returns logits;
                  the head GEMM is not in the time), so it is not compared with the reference
<impl> is eager / chunked / triton / native, each where it runs (triton on CUDA, native on CPU when built).

Floors (the rates measured in the same run): from hidden states, reading the head weight once and the GEMM of
the active rows, max(V·H·bytes / bandwidth, 2·N·H·V / matmul rate) with N = B·32 active rows — a fused kernel
overlaps the two; from logits, reading the N active rows of logits once. ``tflops`` counts the useful GEMM
(2·N·H·V) for every hidden-state row, the reference included; ``gbps`` the logits read for logits rows.
"""

from __future__ import annotations

import torch

from benchmarks.common import (
    bench,
    check_target,
    environment,
    finish,
    matmul_tflops,
    memory_gbps,
    native_ready,
    parse,
    parser,
)
from dmpo_fast.ops import denoise_step, denoise_step_reference_fastdllm
from dmpo_fast.profiling import peak_memory

TEMPERATURE = 0.7  # sampling (Gumbel) path: the costly one; T = 0 is a plain argmax
NUM_TRANSFER = 4  # tokens committed per row and step (8 steps for a 32-token block)


def shapes(device: torch.device, quick: bool) -> list[dict]:
    if quick:
        return [dict(name="quick", B=2, L=8, active=4, H=16, V=97)]
    H, V = (4096, 126464) if device.type == "cuda" else (256, 32000)
    return [
        dict(name="prefix", B=8, L=256, active=32, H=H, V=V),
        dict(name="dual", B=8, L=32, active=32, H=H, V=V),
    ]


def make_inputs(s: dict, dtype, device, seed=0):
    """hidden [B, L, H], head [V, H], x [B, L] (the first ``active`` columns masked), active [B, L]."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    B, L, H, V = s["B"], s["L"], s["H"], s["V"]
    mask_id = V - 1
    hidden = torch.randn(B, L, H, generator=g).to(dtype).to(device)
    # Scaled so the logits have unit-ish spread: peaked enough that softmax is not flat, as in a trained LM.
    head = (torch.randn(V, H, generator=g) * (2.0 / H**0.5)).to(dtype).to(device)
    x = torch.randint(0, V - 1, (B, L), generator=g).to(device)
    active = torch.zeros(B, L, dtype=torch.bool, device=device)
    active[:, : s["active"]] = True
    x = torch.where(active, mask_id, x)
    return hidden, head, x, active, mask_id


def impls(device: torch.device, quick: bool) -> list[str]:
    """The backends to time here. Triton on a CPU would run in its interpreter (that checks arithmetic, it
    measures nothing); native runs on CPU tensors, and only when built (else it would silently be chunked)."""
    out = ["eager", "chunked"]
    if device.type == "cuda":
        out.append("triton")
    elif native_ready(build=not quick):
        out.append("native")
    return out


def run_case(
    s: dict, device, dtype, backends: list[str], rate: float, bandwidth: float, quick: bool
) -> list[dict]:
    hidden, head, x, active, mask_id = make_inputs(s, dtype, device)
    logits = torch.nn.functional.linear(hidden, head)  # [B, L, V], what a logits-returning model gives
    N, H, V = s["B"] * s["active"], s["H"], s["V"]
    elt = torch.finfo(dtype).bits // 8
    gemm_flops = 2 * N * H * V
    floor_hidden_ms = max(V * H * elt / (bandwidth * 1e9), gemm_flops / (rate * 1e12)) * 1e3
    logit_bytes = N * V * elt
    floor_logits_ms = logit_bytes / (bandwidth * 1e9) * 1e3
    num_transfer = torch.full((s["B"],), NUM_TRANSFER, device=device)

    calls = {
        "reference": lambda: denoise_step_reference_fastdllm(
            hidden, head, x, active, temperature=TEMPERATURE, num_transfer=num_transfer
        )
    }
    for impl in backends:
        for form, first in (("hidden", (hidden, head)), ("logits", logits)):
            calls[f"{form}-{impl}"] = lambda first=first, impl=impl: denoise_step(
                first, x, active, temperature=TEMPERATURE, num_transfer=NUM_TRANSFER, seed=1,
                mask_id=mask_id, impl=impl,
            )  # fmt: skip
    rows = []
    for name, call in calls.items():
        ms = bench(call, device, quick=quick)
        _, mem = peak_memory(call, device)
        from_logits = name.startswith("logits")
        floor = floor_logits_ms if from_logits else floor_hidden_ms
        rows.append({
            "op": "denoise_step",
            "case": s["name"],
            "provider": name,
            **ms,
            "tflops": None if from_logits else gemm_flops / (ms["median_ms"] * 1e-3) / 1e12,
            "gbps": logit_bytes / (ms["median_ms"] * 1e-3) / 1e9 if from_logits else None,
            "floor_ms": floor,
            "pct_of_floor": 100 * floor / ms["median_ms"],
            "peak_extra_bytes": mem,
            "matmul_tflops_measured": rate,
            "bandwidth_gbps_measured": bandwidth,
            "shape": {**{k: v for k, v in s.items() if k != "name"}, "num_transfer": NUM_TRANSFER,
                      "temperature": TEMPERATURE, "dtype": str(dtype).replace("torch.", "")},
            **environment(device),
        })  # fmt: skip
    base = rows[0]["median_ms"]
    for r in rows:
        r["speedup_vs_reference"] = None if r["provider"].startswith("logits") else base / r["median_ms"]
    return rows


def run(args) -> list[dict]:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    rate = matmul_tflops(device, dtype, quick=args.quick)
    bandwidth = memory_gbps(device, quick=args.quick)
    backends = impls(device, args.quick)
    rows = []
    for s in shapes(device, args.quick):
        rows += run_case(s, device, dtype, backends, rate, bandwidth, args.quick)
    return rows


def main(argv=None):
    p = parser("denoise", __doc__)
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="default: bfloat16 on cuda, float32 on cpu")  # fmt: skip
    args = parse(p, argv)
    rows = run(args)
    columns = ["case", "provider", "median_ms", "p20_ms", "p80_ms", "tflops", "gbps", "pct_of_floor",
               "speedup_vs_reference", "peak_extra_bytes"]  # fmt: skip
    return finish(rows, "denoise", args, columns, targets)


def targets(rows: list[dict]) -> None:
    """>= 15x the reference and within 1.5x of the floor, from hidden states (set for CUDA)."""
    for case in dict.fromkeys(r["case"] for r in rows):
        mine = [r for r in rows if r["case"] == case and r["provider"].startswith("hidden")]
        best = min(mine, key=lambda r: r["median_ms"])
        ratio = best["median_ms"] / best["floor_ms"]
        measured = (
            f"{best['provider']} {best['speedup_vs_reference']:.1f}x the reference, {ratio:.2f}x the floor"
        )
        check_target(f"{case} (>= 15x reference, <= 1.5x floor)", measured,
                     best["speedup_vs_reference"] >= 15 and ratio <= 1.5)  # fmt: skip
