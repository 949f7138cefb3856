"""Benchmark: ``wdce_loss`` forward+backward against the reference path, its own backends and the peers.

Shapes (``--shape``), 55% of completion tokens masked:
  cuda         (the default on CUDA, LLaDA-8B training) 8 sequences × 4 replicates, prompt 200 +
               completion 256 tokens, hidden 4096, vocabulary 126464, bf16
  cpu          (the default on CPU) 2 sequences × 4 replicates, prompt 64 + completion 96, hidden 256,
               vocabulary 32000, fp32: a small model's head with an LLM's vocabulary
  default-run  the loss of the default ``dmpo-fast train`` run: the tiny model (hidden 128, vocabulary 55),
               32 prompts × 8 rollouts × 4 replicates = 1024 rows of prompt 20 + completion 24, fp32
``--quick`` uses a tiny shape that runs anywhere in seconds (a smoke test of the script, not a measurement).

``--op`` picks the op: ``wdce_loss`` (default), or the two linear ops it and the ELBO / diffu-GRPO / MRO
log-probs are built on, on the masked rows of the same inputs gathered into [N, H]: ``weighted_linear_ce``
(token weights w_r / n_r) and ``linear_logprob`` (backward of Σ_i g_i · logp_i with the same per-row
coefficients as g). For those two the providers are reference (``impl="eager"``), chunked and native.

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

Two memory columns: ``peak_extra_bytes``, the peak of torch's allocations during one call
(``dmpo_fast.profiling.peak_memory``: the CUDA allocator's high-water mark; on CPU a tracker of the tensors
torch allocates), and on CPU ``peak_rss_extra_bytes``, the process's real peak: one call in a fresh process,
its resident-set high-water mark over its resident set before (``benchmarks.common.peak_rss_extra``). The
second is what the machine must have; it also counts what malloc keeps and the GEMM's workspaces.

``--chunk-curve`` (CPU) measures chunked and native at chunk budgets 2^18 ... 2^24 fp32 values
(``dmpo_fast.ops.linear_ce.CPU_CHUNK_ELEMENTS``) over whole rows of the vocabulary: time and both memory
columns per budget, a ``chunk_elements`` field in each row. ``--block-curve`` (CPU) measures them at
vocabulary blocks of 256 ... 8192 columns and whole rows (``CPU_VOCAB_BLOCK``), the default row chunks, a
``vocab_block`` field in each row (0: whole rows).
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
    peak_rss_extra,
)
from dmpo_fast.ops import linear_ce, linear_logprob, wdce_loss, weighted_linear_ce
from dmpo_fast.ops.wdce import token_weights_from_rows, wdce_loss_ref
from dmpo_fast.profiling import peak_memory

PROVIDERS = ("reference", "compile", "chunked", "native", "triton", "cce", "liger")
OPS = ("wdce_loss", "weighted_linear_ce", "linear_logprob")
# (R, L, prompt, H, V): rows, sequence length, prompt length, hidden size, vocabulary
SHAPES = {
    "quick": (4, 24, 8, 32, 257),
    "cuda": (32, 456, 200, 4096, 126464),
    "cpu": (8, 160, 64, 256, 32000),
    "default-run": (32 * 8 * 4, 44, 20, 128, 55),
}
CHUNK_CURVE = tuple(1 << k for k in range(18, 25))
BLOCK_CURVE = (256, 512, 1024, 2048, 4096, 8192, 0)  # 0: whole rows (one block)
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


def op_inputs(op: str, inputs: tuple) -> tuple:
    """The inputs of ``op`` from ``make_inputs``'s: wdce_loss takes them as they are; the linear ops take the
    masked rows gathered into a leaf [N, H], their targets, and the per-token weights w_r / n_r (token weights
    of weighted_linear_ce, upstream gradients of linear_logprob)."""
    if op == "wdce_loss":
        return inputs
    hidden, head, targets, mask, row_weights = inputs
    sel = mask.reshape(-1)
    rows = hidden.detach().reshape(-1, hidden.shape[-1])[sel].clone().requires_grad_()
    weights = token_weights_from_rows(mask, row_weights).reshape(-1)[sel]
    return rows, head, targets.reshape(-1)[sel], weights


def _logprob_loss(hidden, head, targets, g, *, impl):
    return (linear_logprob(hidden, head, targets, impl=impl) * g).sum()


def op_function(op: str, impl: str):
    """``op`` with backend ``impl`` as a function of ``op_inputs`` returning a scalar to backpropagate."""
    if op == "wdce_loss":
        return partial(wdce_loss, impl=impl)
    if op == "weighted_linear_ce":
        return partial(weighted_linear_ce, impl=impl)
    return partial(_logprob_loss, impl=impl)


def _curve_point(chunk_elements: int | None = None, vocab_block: int | None = None) -> None:
    """Set the CPU chunking of one point of a curve: ``chunk_elements`` exactly (no floor on the rows) over
    whole rows, or ``vocab_block`` columns per block (0: whole rows) with the default chunks."""
    if chunk_elements:
        linear_ce.CPU_CHUNK_ELEMENTS, linear_ce.CPU_MIN_CHUNK_ROWS = chunk_elements, 1
        linear_ce.CPU_VOCAB_BLOCK = None
    if vocab_block is not None:
        linear_ce.CPU_VOCAB_BLOCK = vocab_block or None


def rss_setup(op: str, provider: str, shape: list, dtype: str, chunk_elements: int | None = None,
              vocab_block: int | None = None):  # fmt: skip
    """``(warmup, step)`` for ``benchmarks.common.peak_rss_extra``: one forward+backward of ``provider`` (one
    of reference, chunked, native) on ``op`` at ``shape``, after a warm-up at the quick shape. The curves'
    settings: ``chunk_elements`` (over whole rows), ``vocab_block`` (0: whole rows)."""
    _curve_point(chunk_elements, vocab_block)
    fn = op_function(op, OWN_IMPL[provider])
    dt, cpu = getattr(torch, dtype), torch.device("cpu")
    small = op_inputs(op, make_inputs(*SHAPES["quick"], 0.55, dt, cpu, seed=1))
    big = op_inputs(op, make_inputs(*shape, 0.55, dt, cpu))
    return (lambda: run_once(fn, small)), (lambda: run_once(fn, big))


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


def provider(name: str, device: torch.device, *, build_native: bool, op: str = "wdce_loss"):
    """``(loss function, note, unweighted)`` of provider ``name`` on ``device``, or raise ``Unavailable``.
    ``unweighted``: the function computes the sum over the masked rows at unit token weights."""
    if op != "wdce_loss" and name not in ("reference", "chunked", "native", "triton"):
        raise Unavailable(f"measured for wdce_loss only (--op {op})")
    if name in ("reference", "chunked"):
        return op_function(op, OWN_IMPL[name]), None, False
    if name == "native":
        if device.type != "cpu":
            raise Unavailable("the native ops run on CPU tensors only")
        if not native_ready(build=build_native):
            raise Unavailable("the native CPU ops are not built (built on first use, skipped by --quick)")
        return op_function(op, "native"), None, False
    if name == "triton":
        if device.type != "cuda":  # Triton on CPU is its interpreter: it checks, it measures nothing
            raise Unavailable("needs CUDA (on CPU Triton only interprets: a check, not a measurement)")
        return op_function(op, "triton"), None, False
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


def reference_scales(ref, inputs, unit_weights: bool, op: str = "wdce_loss") -> dict:
    """Sizes the errors are measured against: max |gradient| for the gradients; for the loss, the loss at
    |row weights| (weights of both signs can cancel in the loss itself, not in its rounding errors)."""
    with torch.no_grad():
        if op == "wdce_loss":
            hidden, head, targets, mask, row_weights = inputs
            rw = _unit_row_weights(mask) if unit_weights else row_weights.abs()
            loss_scale = float(wdce_loss_ref(hidden, head, targets, mask, rw))
        else:  # Σ |w_i| · CE_i either way (for linear_logprob, −Σ |g_i| · logp_i)
            hidden, head, targets, w = inputs
            loss_scale = abs(float(op_function(op, "eager")(hidden, head, targets, w.abs())))
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


def default_providers(device: torch.device, op: str = "wdce_loss") -> list[str]:
    """Every provider that could run on this kind of device; peers always (they say why they cannot).
    The linear ops: the package's own backends only."""
    fast = "triton" if device.type == "cuda" else "native"
    if op != "wdce_loss":
        return ["reference", "chunked", fast]
    return ["reference", "compile", "chunked", fast, "cce", "liger"]


def shape_name(args, device: torch.device) -> str:
    if args.quick:
        return "quick"
    return getattr(args, "shape", None) or ("cuda" if device.type == "cuda" else "cpu")


def run(args) -> list[dict]:
    device = torch.device(args.device)
    op = getattr(args, "op", None) or "wdce_loss"
    shape = shape_name(args, device)
    R, L, prompt, H, V = SHAPES[shape]
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    names = list(getattr(args, "providers", None) or default_providers(device, op))
    unknown = [n for n in names if n not in PROVIDERS]
    if unknown:
        raise ValueError(f"providers must be among {', '.join(PROVIDERS)}; got {', '.join(unknown)}")
    base_inputs = make_inputs(R, L, prompt, H, V, 0.55, dtype, device)
    mask = base_inputs[3]
    inputs = op_inputs(op, base_inputs)
    n_masked = int(mask.sum())
    floor_flops = 2 * n_masked * H * V * 3
    peak = matmul_tflops(device, dtype, quick=args.quick)
    rtol = rtol_for(dtype, device)
    dtype_name = str(dtype).removeprefix("torch.")
    base = {
        "op": op,
        "mode": "fwd+bwd",
        "shape_name": shape,
        "shape": dict(R=R, L=L, prompt=prompt, H=H, V=V, n_masked=n_masked, dtype=dtype_name),
        "peers": {dist: package_version(dist) for dist in PEERS.values()},
        **environment(device),
    }
    # The reference's results, once: every provider is checked against them (even when it is not timed).
    references = {}

    def reference(unit_weights: bool):
        if unit_weights not in references:
            ins = (*inputs[:4], _unit_row_weights(mask)) if unit_weights else inputs
            ref = run_once(op_function(op, "eager"), ins)
            references[unit_weights] = (ref, reference_scales(ref, ins, unit_weights, op))
        return references[unit_weights]

    rows = []
    for name in names:
        row = {**base, "provider": name}
        rows.append(row)
        t0 = time.perf_counter()
        try:
            op_kw = {} if op == "wdce_loss" else {"op": op}  # provider()'s signature as before for wdce_loss
            fn, note, unit_weights = provider(name, device, build_native=not args.quick, **op_kw)
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
        if device.type == "cpu" and name in ("reference", "chunked", "native"):
            setup = ("benchmarks.loss:rss_setup", op, name, [R, L, prompt, H, V], dtype_name)
            row["peak_rss_extra_bytes"] = peak_rss_extra(*setup, threads=torch.get_num_threads())
    measured = {r["provider"]: r for r in rows if "median_ms" in r}
    ref = measured.get("reference", {})
    for row in measured.values():
        row["speedup_vs_reference"] = ref["median_ms"] / row["median_ms"] if ref else None
        ratios = (("peak_extra_bytes", "memory_vs_reference"), ("peak_rss_extra_bytes", "rss_vs_reference"))
        for key, ratio in ratios:
            if row.get(key) is not None and ref.get(key):
                row[ratio] = row[key] / ref[key]
    return rows


def chunk_curve(args, kind: str = "chunk") -> list[dict]:
    """Time and memory of chunked and native against the CPU chunk budget (``CPU_CHUNK_ELEMENTS``, whole
    rows; ``kind="chunk"``) or the vocabulary block (``CPU_VOCAB_BLOCK``, default chunks; ``kind="block"``),
    one row per (provider, setting), with the reference once for the ratios. Same inputs, one run."""
    device = torch.device("cpu")
    op = getattr(args, "op", None) or "wdce_loss"
    shape = shape_name(args, device)
    R, L, prompt, H, V = SHAPES[shape]
    dtype_name = args.dtype or "float32"
    base_inputs = make_inputs(R, L, prompt, H, V, 0.55, getattr(torch, dtype_name), device)
    inputs = op_inputs(op, base_inputs)
    n_masked = int(base_inputs[3].sum())
    env = {**environment(device), "op": op, "mode": "fwd+bwd", "shape_name": shape,
           "shape": dict(R=R, L=L, prompt=prompt, H=H, V=V, n_masked=n_masked, dtype=dtype_name)}  # fmt: skip
    settings = CHUNK_CURVE if kind == "chunk" else BLOCK_CURVE
    settings = settings[::3] if args.quick else settings
    providers = ["chunked"] + (["native"] if native_ready(build=not args.quick) else [])
    default = linear_ce.CPU_CHUNK_ELEMENTS, linear_ce.CPU_MIN_CHUNK_ROWS, linear_ce.CPU_VOCAB_BLOCK
    rows = []
    try:
        for name, value in [("reference", None)] + [(p, v) for p in providers for v in settings]:
            linear_ce.CPU_CHUNK_ELEMENTS, linear_ce.CPU_MIN_CHUNK_ROWS, linear_ce.CPU_VOCAB_BLOCK = default
            budget = value if kind == "chunk" else None
            block = value if kind == "block" else None
            _curve_point(budget, block)
            fn = op_function(op, OWN_IMPL[name])

            def step(fn=fn):
                inputs[0].grad = inputs[1].grad = None
                fn(*inputs).backward()

            row = {**env, "provider": name, "chunk_elements": budget, "vocab_block": block,
                   **bench(step, device, quick=args.quick)}  # fmt: skip
            width = linear_ce.vocab_block(V, device)
            rows_per_chunk = linear_ce.chunk_rows(width, device=device, hidden=H)
            row["chunk_rows"] = rows_per_chunk if value is not None else None
            row["peak_extra_bytes"] = peak_memory(step, device)[1]
            setup = ("benchmarks.loss:rss_setup", op, name, [R, L, prompt, H, V], dtype_name, budget, block)
            row["peak_rss_extra_bytes"] = peak_rss_extra(*setup, threads=torch.get_num_threads())
            rows.append(row)
            print(f"{name} {kind} {value}: {row['median_ms']:.1f} ms, rss {row['peak_rss_extra_bytes']}")
    finally:
        linear_ce.CPU_CHUNK_ELEMENTS, linear_ce.CPU_MIN_CHUNK_ROWS, linear_ce.CPU_VOCAB_BLOCK = default
    ref = rows[0]
    for row in rows:
        row["speedup_vs_reference"] = ref["median_ms"] / row["median_ms"]
        if ref["peak_rss_extra_bytes"] and row["peak_rss_extra_bytes"] is not None:
            row["rss_vs_reference"] = row["peak_rss_extra_bytes"] / ref["peak_rss_extra_bytes"]
    return rows


def plot_chunk_curve(rows: list[dict], path, kind: str = "chunk") -> bool:
    """Time and extra peak RSS against rows per chunk (``kind="chunk"``) or columns per vocabulary block
    (``"block"``, whole rows drawn at V), one line per provider, the reference as a level; False when
    matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 3.8))
    ref = next(r for r in rows if r["provider"] == "reference")
    V = rows[0]["shape"]["V"]

    def x_of(r):
        return r["chunk_rows"] if kind == "chunk" else (r["vocab_block"] or V)

    for name in ("chunked", "native"):
        pts = [(x_of(r), r["median_ms"], r["peak_rss_extra_bytes"] / 2**20) for r in rows
               if r["provider"] == name]  # fmt: skip
        if pts:
            x, t, m = zip(*pts, strict=True)
            ax_t.plot(x, t, "o-", label=name)
            ax_m.plot(x, m, "o-", label=name)
    ax_t.axhline(ref["median_ms"], color="gray", ls="--", label="reference")
    ax_m.axhline(ref["peak_rss_extra_bytes"] / 2**20, color="gray", ls="--", label="reference")
    for ax, label in ((ax_t, "ms (median)"), (ax_m, "extra peak RSS, MiB")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rows per chunk" if kind == "chunk" else "columns per vocabulary block (V: whole rows)")
        ax.set_ylabel(label)
        ax.legend()
    shape = rows[0]["shape"]
    fig.suptitle(f"{rows[0]['op']} fwd+bwd on CPU, V={shape['V']}, H={shape['H']}, {shape['n_masked']} rows")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


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
    p.add_argument("--op", default="wdce_loss", choices=OPS, help="the op measured (default: wdce_loss)")
    p.add_argument("--shape", default=None, choices=[k for k in SHAPES if k != "quick"],
                   help="default: cuda on CUDA, cpu on CPU (see the module docstring)")  # fmt: skip
    p.add_argument("--chunk-curve", action="store_true",
                   help="CPU: chunked and native at chunk budgets 2^18..2^24 (time and memory)")  # fmt: skip
    p.add_argument("--block-curve", action="store_true",
                   help="CPU: chunked and native at vocabulary blocks 256..8192 and whole rows")  # fmt: skip
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parse(p, argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.chunk_curve and args.block_curve:
        raise SystemExit("--chunk-curve and --block-curve are separate runs: pass one of them")
    if args.chunk_curve or args.block_curve:
        kind = "chunk" if args.chunk_curve else "block"
        if args.device != "cpu":
            raise SystemExit(f"--{kind}-curve measures the CPU path: use --device cpu")
        rows = chunk_curve(args, kind)
        if not args.quick and args.out:
            plot_chunk_curve(rows, str(args.out).removesuffix(".json") + ".png", kind)
        columns = ["provider", "chunk_elements" if kind == "chunk" else "vocab_block", "chunk_rows",
                   "median_ms", "p20_ms", "p80_ms", "speedup_vs_reference", "peak_extra_bytes",
                   "peak_rss_extra_bytes", "rss_vs_reference"]  # fmt: skip
        return finish(rows, "loss-chunks" if kind == "chunk" else "loss-blocks", args, columns)
    rows = run(args)
    columns = ["provider", "median_ms", "p20_ms", "p80_ms", "tflops", "pct_of_floor", "speedup_vs_reference",
               "peak_extra_bytes", "peak_rss_extra_bytes", "rss_vs_reference", "err_vs_tol",
               "skipped"]  # fmt: skip
    return finish(rows, "loss", args, columns)
