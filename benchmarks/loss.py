"""Benchmark: ``wdce_loss`` forward+backward against the reference path, its own backends and the peers.

Shapes (default, LLaDA-8B training): 8 sequences × 4 replicates, prompt 200 + completion 256 tokens,
55% of completion tokens masked, hidden 4096, vocabulary 126464, bf16; on CPU 4 × 4 rows of 32 + 64 tokens,
hidden 256, vocabulary 32000, fp32. ``--quick`` uses a tiny shape that runs anywhere in seconds (a smoke test
of the script, not a measurement).

Providers, all computing Σ_r w_r / n_r · Σ_{masked l} CE(hidden[r, l] · Wᵀ, targets[r, l]) on the same inputs:
  reference  full-sequence logits from the head, F.cross_entropy over every position, then mask and
             weight (what DMPO's research code computes) — ``impl="eager"``
  compile    ``torch.compile`` of that same reference function (inductor; on CPU it needs a C++ compiler).
             The first call compiles (``compile_s``); a compilation failure is a skipped row with the reason
  chunked    memory-lean torch (``impl="chunked"``)
  native     the compiled CPU ops (``impl="native"``), CPU only, when built
  triton     the fused kernels (``impl="triton"``), CUDA only
  cce        Cut Cross-Entropy, ``linear_cross_entropy(h, W, y, reduction="none")`` over the masked rows, then
             Σ w_i·CE_i (its backward takes per-token upstream gradients), CUDA only
  liger      Liger-Kernel, ``LigerFusedLinearCrossEntropyLoss(reduction="none", accum_dtype=float32)`` over
             the masked rows, then Σ w_i·CE_i, CUDA only. Liger has no per-token weights, and before 0.8.2 its
             reduction="none" backward scaled every row by the first row's upstream gradient: with such a
             version the row measures the unweighted sum over the masked rows instead (same rows, same GEMMs)
             and its ``note`` says so; its check is then against the reference at unit token weights
The peers get the masked rows gathered inside the timed step, as ``wdce_loss`` gathers them for its backends.

Before timing, every provider's loss, dL/dhidden and dL/dW are compared once with the reference's
(``check``): a provider whose error exceeds rtol × scale (``tolerance``) gets a row that says so and is not
timed. A provider that cannot run here (no CUDA, not installed, compilation failed) gets a row with the
reason in ``skipped``. Each measured row: median / p20 / p80 ms of forward+backward, TFLOP/s against the
3-GEMM floor (2·N_masked·H·V·3 FLOPs), percent of the floor at the matmul rate measured in the same run,
extra peak memory, the check, shapes, device, versions (the peers' too), git commit.
"""

from __future__ import annotations

import time
from functools import partial

import torch

from benchmarks.common import (
    bench,
    environment,
    finish,
    matmul_tflops,
    native_ready,
    package_version,
    parse,
    parser,
)
from dmpo_fast.ops import wdce_loss
from dmpo_fast.ops.wdce import token_weights_from_rows, wdce_loss_ref
from dmpo_fast.profiling import peak_memory

PROVIDERS = ("reference", "compile", "chunked", "native", "triton", "cce", "liger")
OWN_IMPL = {"reference": "eager", "chunked": "chunked", "native": "native", "triton": "triton"}
PEERS = {"cce": "cut-cross-entropy", "liger": "liger-kernel"}  # provider -> distribution name
LIGER_PER_TOKEN_GRADS = (0, 8, 2)  # first Liger-Kernel release whose reduction="none" backward is per token


class Unavailable(Exception):
    """A provider that cannot run here; the message becomes the row's ``skipped`` reason."""


def make_inputs(R, L, prompt, H, V, masked_frac, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = (torch.randn(R, L, H, generator=g) * 0.5).to(dtype).to(device).requires_grad_()
    head = (torch.randn(V, H, generator=g) / H**0.5).to(dtype).to(device).requires_grad_()
    targets = torch.randint(0, V, (R, L), generator=g).to(device)
    mask = torch.zeros(R, L, dtype=torch.bool)
    mask[:, prompt:] = torch.rand(R, L - prompt, generator=g) < masked_frac
    row_weights = torch.randn(R, generator=g).to(device)
    return hidden, head, targets, mask.to(device), row_weights


# --------------------------------------------------------------------------------------------------
# Providers: each a function (hidden, head, targets, mask, row_weights) -> scalar loss
# --------------------------------------------------------------------------------------------------


def masked_rows(hidden, targets, mask, row_weights):
    """(hidden rows [N, H], targets [N], token weights w_r / n_r [N]) of the masked positions: what a peer's
    linear cross-entropy is applied to. One host sync for N, as in ``wdce_loss``."""
    rows = mask.reshape(-1).nonzero().squeeze(1)  # [N]
    token_weights = token_weights_from_rows(mask, row_weights).reshape(-1)  # [R*L]
    return (
        hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows),
        targets.reshape(-1).index_select(0, rows),
        token_weights.index_select(0, rows),
    )


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def _import_peer(name: str, device: torch.device):
    dist = PEERS[name]
    if device.type != "cuda":
        raise Unavailable(f"needs CUDA: {dist}'s kernels are Triton GPU kernels")
    try:
        if name == "cce":
            from cut_cross_entropy import linear_cross_entropy as fn
        else:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss as fn
    except Exception as err:  # noqa: BLE001 - any import failure means "not here", with its reason
        raise Unavailable(
            f"{dist} cannot be imported ({type(err).__name__}: {_first_line(err)}); "
            f"pip install {dist} (or the bench extra)"
        ) from None
    return fn


def provider(name: str, device: torch.device, *, build_native: bool):
    """``(loss function, note, unweighted)`` of provider ``name`` on ``device``, or raise ``Unavailable``.
    ``unweighted``: the function computes the sum over the masked rows at unit token weights."""
    if name in ("reference", "chunked"):
        return partial(wdce_loss, impl=OWN_IMPL[name]), None, False
    if name == "native":
        if device.type != "cpu":
            raise Unavailable("the native ops run on CPU tensors only")
        if not native_ready(build=build_native):
            raise Unavailable("the native CPU ops are not built (built on first use, skipped by --quick)")
        return partial(wdce_loss, impl="native"), None, False
    if name == "triton":
        if device.type != "cuda":  # Triton on CPU is its interpreter: it checks, it measures nothing
            raise Unavailable("needs CUDA (on CPU Triton only interprets: a check, not a measurement)")
        return partial(wdce_loss, impl="triton"), None, False
    if name == "compile":
        # Static shapes: one graph, compiled on the first call (forward and, through AOTAutograd, backward).
        return torch.compile(wdce_loss_ref, dynamic=False), "torch.compile(wdce_loss_ref), inductor", False
    if name == "cce":
        linear_cross_entropy = _import_peer(name, device)

        def cce(hidden, head, targets, mask, row_weights):
            h, y, w = masked_rows(hidden, targets, mask, row_weights)
            return (linear_cross_entropy(h, head, y, reduction="none") * w).sum()

        return cce, "linear_cross_entropy(reduction='none'), then sum of w·CE; default gradient filter", False
    if name == "liger":
        loss_class = _import_peer(name, device)
        version = package_version("liger-kernel") or "0"
        per_token = _version_tuple(version) >= LIGER_PER_TOKEN_GRADS
        fused = loss_class(reduction="none" if per_token else "sum", accum_dtype=torch.float32)

        def liger(hidden, head, targets, mask, row_weights):
            h, y, w = masked_rows(hidden, targets, mask, row_weights)
            return (fused(head, h, y) * w).sum() if per_token else fused(head, h, y)

        if per_token:
            note = "reduction='none' (logits recomputed in the backward), then sum of w·CE; fp32 dW sums"
        else:
            note = (
                f"liger-kernel {version} < 0.8.2 has no per-token gradients: measured the UNWEIGHTED sum of "
                "CE over the masked rows (reduction='sum', same rows and GEMMs), checked at unit weights"
            )
        return liger, note, not per_token
    raise ValueError(f"provider must be one of {', '.join(PROVIDERS)}; got {name!r}")


# --------------------------------------------------------------------------------------------------
# The check against the reference
# --------------------------------------------------------------------------------------------------


def rtol_for(dtype: torch.dtype, device: torch.device) -> float:
    """Relative tolerance of a provider against the reference, from the input dtype.

    16-bit inputs: the fused kernels round the logits gradient and the GEMM operands to the input dtype where
    the reference keeps fp32, about two roundings of eps/2 on top of the reference's one: 4·eps (bf16 0.031,
    fp16 0.0039) leaves a factor 2. fp32 on CPU: only the summation order differs, 1e-5. fp32 on CUDA:
    Triton's ``tl.dot`` multiplies fp32 in TF32 by default (10-bit mantissa, eps 2⁻¹⁰): 2e-3.
    """
    if dtype == torch.float32:
        return 2e-3 if device.type == "cuda" else 1e-5
    return 4 * torch.finfo(dtype).eps


def run_once(fn, inputs) -> tuple[float, torch.Tensor, torch.Tensor]:
    """(loss, dL/dhidden, dL/dW) of one forward+backward of ``fn``."""
    hidden, head = inputs[0], inputs[1]
    hidden.grad = head.grad = None
    loss = fn(*inputs)
    loss.backward()
    out = float(loss.detach()), hidden.grad, head.grad
    hidden.grad = head.grad = None
    return out


def compare(got, ref, scales: dict, rtol: float) -> dict:
    """``max_abs_err``, ``tolerance`` (rtol × scale) per quantity, the largest error/tolerance ratio and
    whether the provider agrees. ``scales``: the size of each reference quantity (``reference_scales``).
    ``got``, ``ref``: (loss, dL/dhidden, dL/dW); a missing or misshapen gradient is an infinite error."""
    err = {"loss": abs(got[0] - ref[0])}
    for key, g, r in (("d_hidden", got[1], ref[1]), ("d_head", got[2], ref[2])):
        ok = g is not None and g.shape == r.shape
        err[key] = float((g.float() - r.float()).abs().max()) if ok else float("inf")
    tol = {k: rtol * scales[k] for k in err}
    ratio = max(err[k] / tol[k] if tol[k] > 0 else (0.0 if err[k] == 0 else float("inf")) for k in err)
    return {"max_abs_err": err, "tolerance": tol, "err_vs_tol": ratio, "agrees": ratio <= 1.0}


def reference_scales(ref, inputs, unit_weights: bool) -> dict:
    """Sizes the errors are measured against: max |gradient| for the gradients; for the loss, the loss at
    |row weights| (weights of both signs can cancel in the loss itself, not in its rounding errors)."""
    hidden, head, targets, mask, row_weights = inputs
    with torch.no_grad():
        rw = _unit_row_weights(mask) if unit_weights else row_weights.abs()
        loss_scale = float(wdce_loss_ref(hidden, head, targets, mask, rw))
    return {"loss": loss_scale, "d_hidden": float(ref[1].abs().max()), "d_head": float(ref[2].abs().max())}


def _unit_row_weights(mask: torch.Tensor) -> torch.Tensor:
    """Row weights n_r, so that every masked token weighs 1: the unweighted sum of CE over the masked rows."""
    return mask.sum(dim=1).clamp_min(1).to(torch.float32)


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return (lines[0] if lines else "")[:300]


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


def default_providers(device: torch.device) -> list[str]:
    """Every provider that could run on this kind of device; peers always (they say why they cannot)."""
    own = ["reference", "compile", "chunked", "triton" if device.type == "cuda" else "native"]
    return own + ["cce", "liger"]


def run(args) -> list[dict]:
    device = torch.device(args.device)
    if args.quick:
        R, L, prompt, H, V = 4, 24, 8, 32, 257
    elif device.type == "cuda":
        R, L, prompt, H, V = 32, 456, 200, 4096, 126464
    else:
        R, L, prompt, H, V = 16, 96, 32, 256, 32000
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    names = list(getattr(args, "providers", None) or default_providers(device))
    unknown = [n for n in names if n not in PROVIDERS]
    if unknown:
        raise ValueError(f"providers must be among {', '.join(PROVIDERS)}; got {', '.join(unknown)}")
    inputs = make_inputs(R, L, prompt, H, V, 0.55, dtype, device)
    mask = inputs[3]
    n_masked = int(mask.sum())
    floor_flops = 2 * n_masked * H * V * 3
    peak = matmul_tflops(device, dtype, quick=args.quick)
    rtol = rtol_for(dtype, device)
    dtype_name = str(dtype).removeprefix("torch.")
    base = {
        "op": "wdce_loss",
        "mode": "fwd+bwd",
        "shape": dict(R=R, L=L, prompt=prompt, H=H, V=V, n_masked=n_masked, dtype=dtype_name),
        "peers": {dist: package_version(dist) for dist in PEERS.values()},
        **environment(device),
    }
    # The reference's results, once: every provider is checked against them (even when it is not timed).
    references = {}

    def reference(unit_weights: bool):
        if unit_weights not in references:
            ins = (*inputs[:4], _unit_row_weights(mask)) if unit_weights else inputs
            ref = run_once(wdce_loss_ref, ins)
            references[unit_weights] = (ref, reference_scales(ref, ins, unit_weights))
        return references[unit_weights]

    rows = []
    for name in names:
        row = {**base, "provider": name}
        rows.append(row)
        t0 = time.perf_counter()
        try:
            fn, note, unit_weights = provider(name, device, build_native=not args.quick)
            ins = (*inputs[:4], _unit_row_weights(mask)) if unit_weights else inputs
            got = run_once(fn, ins)
        except Unavailable as why:
            row["skipped"] = str(why)
        except Exception as err:  # noqa: BLE001 - a peer or the compiler failing here is a result, not a crash
            if name in OWN_IMPL:  # a failure of this package's own backends is a bug: let it show
                raise
            what = "torch.compile" if name == "compile" else PEERS[name]
            row["skipped"] = f"{what} failed: {type(err).__name__}: {_first_line(err)}"
        if "skipped" in row:
            print(f"skip {name}: {row['skipped']}")
            continue
        row["note"] = note
        if name == "compile":
            row["compile_s"] = time.perf_counter() - t0  # compilation + one forward+backward
        ref, scales = reference(unit_weights)
        row["check"] = compare(got, ref, scales, rtol)
        row["max_abs_err"] = row["check"]["max_abs_err"]
        row["err_vs_tol"] = row["check"]["err_vs_tol"]
        del got
        if not row["check"]["agrees"]:
            row["skipped"] = (
                f"disagrees with the reference (max error {row['err_vs_tol']:.3g}× the tolerance, "
                f"rtol {rtol:.3g}): not timed"
            )
            print(f"MISMATCH {name}: {row['check']['max_abs_err']} vs tolerance {row['check']['tolerance']}")
            continue

        def step(fn=fn, ins=ins):
            ins[0].grad = ins[1].grad = None
            fn(*ins).backward()

        ms = bench(step, device, quick=args.quick)
        row.update(ms)
        row["tflops"] = floor_flops / (ms["median_ms"] * 1e-3) / 1e12
        row["floor_ms"] = floor_flops / (peak * 1e12) * 1e3 if peak else None
        row["pct_of_floor"] = 100 * row["floor_ms"] / ms["median_ms"] if row["floor_ms"] else None
        if name == "compile" and device.type == "cpu":
            # The CPU tracker is a dispatch mode, under which torch.compile runs the function eagerly.
            row["peak_extra_bytes"] = None
            row["note"] += "; CPU peak memory not measurable through the compiled code"
        else:
            row["peak_extra_bytes"] = peak_memory(step, device)[1]
    measured = {r["provider"]: r for r in rows if "median_ms" in r}
    ref_ms = measured["reference"]["median_ms"] if "reference" in measured else None
    for row in measured.values():
        row["speedup_vs_reference"] = ref_ms / row["median_ms"] if ref_ms else None
    return rows


def _provider_list(text: str) -> list[str]:
    import argparse

    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in PROVIDERS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"--providers takes a comma-separated subset of {', '.join(PROVIDERS)}; got {text!r}"
        )
    return names


def main(argv=None):
    p = parser("loss", __doc__)
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="default: bfloat16 on cuda, float32 on cpu")  # fmt: skip
    p.add_argument("--providers", type=_provider_list, default=None,
                   help=f"a comma-separated subset of {','.join(PROVIDERS)} (default: all)")  # fmt: skip
    args = parse(p, argv)
    rows = run(args)
    columns = ["provider", "median_ms", "p20_ms", "p80_ms", "tflops", "pct_of_floor", "speedup_vs_reference",
               "peak_extra_bytes", "err_vs_tol", "skipped"]  # fmt: skip
    return finish(rows, "loss", args, columns)
