"""Fused linear cross-entropy on the GPU: ``linear_logprob`` and ``weighted_linear_ce`` in Triton.

What is computed (eager references: ``dmpo_fast.ops.linear_ce``), with z_i = h_i · Wᵀ:

    linear_logprob_triton(h, W, y)[i]        = z_i[y_i] − lse_i                     fp32 [N]
    weighted_linear_ce_triton(h, W, y, w)    = Σ_i w_i · (lse_i − z_i[y_i])         fp32 scalar

The [N, V] logits never exist at once (V = 126464 for LLaDA-8B: 2.3 GB in fp32 at N = 4506).

linear_logprob: the forward is one GEMM pass whose epilogue reduces each logits tile to (max, Σexp)
per row (``_lse_kernel``); only lse[N] is saved (as max + log-sum: 2 floats per row, so that z − lse
keeps its digits for a confident row). Its per-row upstream gradient g exists only in the backward,
which recomputes the logits tiles chunk by chunk and writes G = g·(e_y − p) directly
(``_grad_logits_kernel``), then dH = G·W and dW += Gᵀ·H. Four GEMM passes in all: unavoidable
when g comes after the forward.

weighted_linear_ce: the token weights are known up front, so the gradients are made in the forward
(when grad is enabled and hidden / weight require it) in THREE GEMM passes, never four. Per chunk
of C rows: (1) ``_lse_kernel`` projects the rows onto every vocabulary tile, keeps the per-tile
(max, Σexp) and stores e = exp(z − max_tile) into a [C, V] buffer; the launcher merges the tiles
into lse; ``_probs_to_grad_kernel`` turns the buffer in place into G = w·(p − e_y) (memory-bound:
one read and one write of the buffer, an estimated 4% of the GEMM time at LLaDA-8B shapes);
(2) dH = G·W (cuBLAS); (3) dW += Gᵀ·H (``_dw_kernel``). The backward only scales the saved dH, dW
(and CE for the token weights) by the upstream gradient. Without grad, only pass (1), no buffer.

Trade-offs and bounds (LLaDA-8B: N = 4506, H = 4096, V = 126464, bf16):
- Extra memory is bounded by the chunk, not by N·V: the buffer holds C = chunk_bytes / (2·V) rows
  (256 MiB → C = 1024, 5 chunks), plus 8 bytes per (row, vocabulary tile) of statistics (4 MB).
  The gradients themselves: dH in the hidden dtype (37 MB) and dW. dW is accumulated across chunks
  in an fp32 [V, H] buffer by default (2.07 GB, so dW gets a single bf16 rounding, like the eager
  path); ``LinearCEOptions(dw_accumulate="weight")`` accumulates in the weight's dtype with cuBLAS
  instead (1.04 GB, the size of the gradient itself: one rounding per chunk).
- A bigger chunk means fewer read-modify-write passes over dW (one per chunk: 4 GB of traffic in
  fp32, an estimated 1.2 ms at H100 bandwidth, hidden only partly behind the GEMM) but a bigger
  buffer. The buffer stores e rather than z: e ∈ [0, 1] keeps
  p to the storage precision whatever the size of the logits (a bf16 z would put |z|·2⁻⁹ absolute
  error on log p), and 1 − p_y at the target is recomputed from the fp32 target logit.
- GEMM pass 2 is cuBLAS (fp32 accumulation over the whole vocabulary, one rounding of dH): it has
  no epilogue to fuse and cuBLAS is the fastest GEMM available. Passes 1 and 3 are Triton: pass 1
  needs the fused lse epilogue; pass 3 needs to accumulate into fp32 dW, which a bf16 cuBLAS
  GEMM cannot output on torch < 2.8.
- Rows with token weight 0 are removed before any GEMM (index_select of the live rows): they cost
  no matmul work in any pass. Finding them is one device→host sync per call (the count of live
  rows); the masked-row gather of ``wdce_loss`` already syncs. When token_weights requires a gradient,
  dL/dw_i = CE_i is needed for every row, so nothing is skipped. linear_logprob skips nothing.
- Determinism: the lse merge and every dW tile have a fixed reduction order (one owner per tile,
  read-modify-write across chunks). Only when the dW tile grid is too small to fill the GPU (small
  V·H) is the row sum split across programs: with ``deterministic=False`` the splits meet through
  fp32 atomics, with ``deterministic=True`` through a [splits, V, H] workspace summed in a fixed
  order. cuBLAS (pass 2, and pass 3 with dw_accumulate="weight") is deterministic on one stream.
  linear_logprob always runs the deterministic way.
- Precision: the dH / dW GEMMs take 16-bit operands (tensor cores), so G is rounded to the input
  dtype (after e was) where the eager path keeps it in fp32: dH and dW carry about twice the eager
  error (measured in the interpreter: ratios ~2, at most 3.7 elementwise; 1.0 in fp32).
- dtypes: bf16, fp16 and fp32 (fp32 dots run in full fp32, ``input_precision="ieee"``, as the eager
  path). fp16 stores G = w·(p − e_y) in fp16: |w| beyond 65504 overflows and |w·p| below 6e-8
  flushes to zero. fp64 falls back to the chunked torch path (documented, not an error).

Verified: on CPU only. The arithmetic in Triton's interpreter, at small prime shapes against the fp64
truth (tests/test_kernels_linear_ce.py); that every specialisation compiles for sm_90 and sm_80 with
the tiles above, on tensor cores (wgmma on sm_90), within the shared memory and registers
(``dmpo-fast check-kernels``, tests/test_kernels_compile.py, docs/kernels.md). Not yet verified: their
results on a GPU, their speed
(target at LLaDA-8B shapes: forward + backward within 1.25× of the 3-GEMM floor 3·2·N·H·V =
14.0 TFLOP at the bf16 matmul rate) and the peak memory; the ``gpu``-marked tests and the benchmark
must be run on an H100 / H200. Tile sizes are heuristics for Hopper; ``DMPO_FAST_AUTOTUNE=1`` times
a few candidates once per shape instead. Passes 1 and 3 are plain pointer-based Triton GEMMs (no TMA
descriptors, no warp specialisation): the first place to look if the measured time falls short.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from dmpo_fast.kernels.linear_ce_config import (
    _CONVERT_ROWS,
    _DW_CANDIDATES,
    _LOGITS_CANDIDATES,
    _STATS_BYTES,
    _TUNED,
    LinearCEOptions,
    _autotune_enabled,
    _chunk_rows,
    _dot_flags,
    _dw_tiles,
    _logits_tiles,
    _parallel_target,
    _pick,
    _Tiles,
)
from dmpo_fast.kernels.linear_ce_kernels import (
    _dw_kernel,
    _grad_logits_kernel,
    _lse_kernel,
    _probs_to_grad_kernel,
    triton,
)
from dmpo_fast.kernels.runtime import alloc, interpreting

__all__ = ["LinearCEOptions", "linear_logprob_triton", "weighted_linear_ce_triton"]

# --------------------------------------------------------------------------------------------------
# Launchers (reshape, allocate, grid; no autograd)
# --------------------------------------------------------------------------------------------------


def _lse_pass(h, w, y, tiles: _Tiles, e_buf=None):
    """GEMM pass over the vocabulary for rows ``h`` [n, H].

    Returns top [n] = max_v z, log_s [n] = log Σ_v exp(z − top) (lse = top + log_s, kept apart so
    z − lse = (z − top) − log_s keeps the digits of a confident row), z_y [n] and the per-tile row
    maxima m [tiles, n]. With ``e_buf`` ([n, V], contiguous) also stores e = exp(z − m_tile) there.
    """
    n, H = h.shape
    V = w.shape[0]
    n_tiles = triton.cdiv(V, tiles.cols)
    m = alloc((n_tiles, n), torch.float32, h.device)
    s = alloc((n_tiles, n), torch.float32, h.device)
    zy = torch.full((n,), float("nan"), dtype=torch.float32, device=h.device)  # NaN for a target ∉ [0, V)
    grid = (triton.cdiv(n, tiles.rows) * n_tiles,)
    _lse_kernel[grid](
        h, w, y, m, s, zy, e_buf if e_buf is not None else m,
        n, V, H, h.stride(0), h.stride(1), w.stride(0), w.stride(1), m.stride(0),
        e_buf.stride(0) if e_buf is not None else 0,
        STORE_E=e_buf is not None, BLOCK_N=tiles.rows, BLOCK_V=tiles.cols, BLOCK_K=tiles.inner,
        EVEN_K=H % tiles.inner == 0, **_dot_flags(h.dtype),
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )  # fmt: skip
    # lse = log Σ_t s_t · exp(m_t), merged over the tiles in a fixed order (deterministic).
    top = m.amax(0)
    log_s = torch.log(torch.exp(m - top).mul_(s).sum(0))
    return top, log_s, zy, m


def _lse_all_rows(h, w, y):
    """top, log_s and z_y of every row of ``h``, storing no logits (forward without gradients)."""
    n = h.shape[0]
    tiles = _logits_tiles(h.dtype, h.shape[1])
    if _autotune_enabled(h.dtype) and n > 0:
        key = ("lse", h.dtype, h.shape[1], w.shape[0], h.device.index)
        tiles = _pick(key, _LOGITS_CANDIDATES, lambda t: _lse_pass(h[:4096], w, y[:4096], t), tiles)
    per_tile_row = 8 * triton.cdiv(w.shape[0], tiles.cols)  # bytes of (m, s) per row
    step = max(tiles.rows, _STATS_BYTES // per_tile_row // tiles.rows * tiles.rows)
    out = torch.empty(3, n, dtype=torch.float32, device=h.device)  # top, log_s, z_y
    for s in range(0, n, step):
        top, log_s, zy, _ = _lse_pass(h[s : s + step], w, y[s : s + step], tiles)
        out[0, s : s + step], out[1, s : s + step], out[2, s : s + step] = top, log_s, zy
    return out[0], out[1], out[2]


def _probs_to_grad(buf, m, top, log_s, zy, y, c, tiles: _Tiles):
    """buf := c · (p − e_y) in place, from the e = exp(z − m_tile) that ``_lse_pass`` stored."""
    n, V = buf.shape
    grid = (triton.cdiv(n, _CONVERT_ROWS) * m.shape[0],)
    _probs_to_grad_kernel[grid](
        buf, m, top, log_s, zy, y, c, n, V, m.stride(0), buf.stride(0),
        BLOCK_N=_CONVERT_ROWS, BLOCK_V=tiles.cols, num_warps=4,
    )  # fmt: skip


def _grad_logits(h, w, y, top, log_s, c, buf, tiles: _Tiles):
    """buf := c · (p − e_y) for rows ``h``, recomputing the logits with a known lse (one GEMM pass)."""
    n, H = h.shape
    V = w.shape[0]
    grid = (triton.cdiv(n, tiles.rows) * triton.cdiv(V, tiles.cols),)
    _grad_logits_kernel[grid](
        h, w, y, top, log_s, c, buf, n, V, H,
        h.stride(0), h.stride(1), w.stride(0), w.stride(1), buf.stride(0),
        BLOCK_N=tiles.rows, BLOCK_V=tiles.cols, BLOCK_K=tiles.inner, EVEN_K=H % tiles.inner == 0,
        **_dot_flags(h.dtype), num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )  # fmt: skip


def _launch_dw(out, g, h, rows_per_split, splits, mode, tiles: _Tiles):
    n = g.shape[0]
    V, H = out.shape[-2:]
    grid = (triton.cdiv(V, tiles.cols) * triton.cdiv(H, tiles.inner), splits)
    _dw_kernel[grid](
        g, h, out, n, V, H, rows_per_split, g.stride(0), g.stride(1), h.stride(0), h.stride(1),
        out.stride(0) if out.dim() == 3 else 0, out.stride(-2), out.stride(-1),
        MODE=mode, BLOCK_V=tiles.cols, BLOCK_H=tiles.inner, BLOCK_K=tiles.rows, **_dot_flags(h.dtype),
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )  # fmt: skip


def _accumulate_dw(dw, g, h, *, first: bool, deterministic: bool, opts: LinearCEOptions):
    """dW (+)= gᵀ · h for one chunk of rows (GEMM pass 3); ``first`` overwrites instead of adding."""
    if opts.dw_accumulate == "weight":
        # cuBLAS, fp32 accumulation inside the GEMM, one rounding to the weight's dtype per chunk.
        if first:
            torch.mm(g.t(), h, out=dw)
        else:
            dw.addmm_(g.t(), h)
        return
    n = g.shape[0]
    V, H = dw.shape
    key = ("dw", h.dtype, V, H, h.device.index)
    tiles = _TUNED.get(key, _dw_tiles(h.dtype, H))
    n_tiles = triton.cdiv(V, tiles.cols) * triton.cdiv(H, tiles.inner)
    splits = opts.dw_split
    if splits is None:  # split the row sum only when the output tiles alone cannot fill the GPU
        min_rows = tiles.rows * (1 if interpreting() else 4)
        splits = max(1, min(triton.cdiv(_parallel_target(dw.device), n_tiles), n // min_rows))
    rows_per_split = triton.cdiv(triton.cdiv(n, splits), tiles.rows) * tiles.rows
    splits = triton.cdiv(n, rows_per_split)
    if splits == 1:
        if first and _autotune_enabled(h.dtype):  # mode 0 overwrites: safe to time on the real output
            tiles = _pick(key, _DW_CANDIDATES, lambda t: _launch_dw(dw, g, h, n, 1, 0, t), tiles)
            rows_per_split = n
        _launch_dw(dw, g, h, rows_per_split, 1, 0 if first else 1, tiles)
    elif not deterministic:
        if first:
            dw.zero_()
        _launch_dw(dw, g, h, rows_per_split, splits, 2, tiles)
    else:
        work = alloc((splits, V, H), torch.float32, dw.device)  # bounded: only small V·H is split
        _launch_dw(work, g, h, rows_per_split, splits, 0, tiles)
        if first:
            dw.copy_(work[0])
        else:
            dw.add_(work[0])
        for i in range(1, splits):  # fixed order: the result does not depend on scheduling
            dw.add_(work[i])


def _new_dw(weight, opts: LinearCEOptions, n_rows: int):
    dtype = torch.float32 if opts.dw_accumulate == "fp32" else weight.dtype
    if n_rows == 0:  # no chunk will write it
        return torch.zeros(weight.shape, dtype=dtype, device=weight.device)
    return alloc(weight.shape, dtype, weight.device)


@dataclass(frozen=True)
class _Call:
    """The non-tensor arguments of one ``weighted_linear_ce`` call, passed through autograd as one value:
    which gradients the forward computes (dH, dW, and the per-row CE for d/dw), and how."""

    need_h: bool
    need_w: bool
    need_tw: bool
    deterministic: bool
    options: LinearCEOptions


def _weighted_ce_forward(hidden, weight, targets, token_weights, call: _Call):
    """Loss, per-row CE and (when asked) dH, dW of Σ w_i·CE_i, in three GEMM passes."""
    need_h, need_w, need_tw, opts = call.need_h, call.need_w, call.need_tw, call.options
    N, H = hidden.shape
    V = weight.shape[0]
    tw = token_weights.to(torch.float32)
    live = None
    if not need_tw:  # rows with weight 0 add nothing: drop them before any GEMM (one host sync)
        live = torch.nonzero(tw).squeeze(1)
        if live.numel() == N:
            live = None
    if live is None:
        h, y, c = hidden, targets.contiguous(), tw.contiguous()
    else:
        h, y, c = hidden.index_select(0, live), targets.index_select(0, live), tw.index_select(0, live)
    n = h.shape[0]
    dh = None
    if need_h:  # dead rows get exact zeros; live rows are written chunk by chunk
        dh = torch.zeros_like(hidden) if live is not None else alloc((N, H), hidden.dtype, hidden.device)
    dw = _new_dw(weight, opts, n) if need_w else None
    if not (need_h or need_w):
        top, log_s, zy = _lse_all_rows(h, weight, y)
        ce = (top - zy) + log_s  # lse − z_y
    else:
        tiles = _logits_tiles(hidden.dtype, hidden.shape[1])
        step = _chunk_rows(V, hidden.dtype, tiles, opts)
        buf = alloc((min(step, n), V), hidden.dtype, hidden.device)  # the bounded [C, V] buffer
        ce = alloc((n,), torch.float32, hidden.device)
        if _autotune_enabled(h.dtype) and n > 0:  # the pass only writes: safe to time on chunk 0
            h0, y0, e0 = h[:step], y[:step], buf
            key = ("lse_e", h.dtype, H, V, h.device.index)
            run = lambda t: _lse_pass(h0, weight, y0, t, e_buf=e0)  # noqa: E731
            tiles = _pick(key, _LOGITS_CANDIDATES, run, tiles)
        for s in range(0, n, step):
            hc, yc, cc = h[s : s + step], y[s : s + step], c[s : s + step]
            gc = buf[: hc.shape[0]]
            top, log_s, zy, m = _lse_pass(hc, weight, yc, tiles, e_buf=gc)  # GEMM pass 1
            ce[s : s + step] = (top - zy) + log_s
            _probs_to_grad(gc, m, top, log_s, zy, yc, cc, tiles)  # gc := w · (p − e_y) = d(w·CE)/dz
            if need_h and live is None:
                torch.mm(gc, weight, out=dh[s : s + step])  # GEMM pass 2: dH = G · W
            elif need_h:
                dh.index_copy_(0, live[s : s + step], torch.mm(gc, weight))
            if need_w:
                _accumulate_dw(dw, gc, hc, first=s == 0, deterministic=call.deterministic, opts=opts)  # pass 3
    loss = (c * ce).sum()
    return loss, ce, dh, dw


# --------------------------------------------------------------------------------------------------
# Autograd functions
# --------------------------------------------------------------------------------------------------


class _LinearLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, opts):
        targets = targets.contiguous()
        top, log_s, zy = _lse_all_rows(hidden, weight, targets)
        ctx.save_for_backward(hidden, weight, targets, top, log_s)
        ctx.opts = opts
        return (zy - top) - log_s  # logp = z_y − lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp):
        hidden, weight, targets, top, log_s = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_h or need_w):
            return None, None, None, None
        opts = ctx.opts
        n, V = hidden.shape[0], weight.shape[0]
        # d logp_i / d z_i = e_y − p, so G = g · (e_y − p) = c · (p − e_y) with c = −g.
        coef = grad_logp.to(torch.float32).neg().contiguous()
        tiles = _logits_tiles(hidden.dtype, hidden.shape[1])
        step = _chunk_rows(V, hidden.dtype, tiles, opts)
        buf = alloc((min(step, n), V), hidden.dtype, hidden.device)
        dh = alloc(hidden.shape, hidden.dtype, hidden.device) if need_h else None
        dw = _new_dw(weight, opts, n) if need_w else None
        for s in range(0, n, step):
            hc = hidden[s : s + step]
            gc = buf[: hc.shape[0]]
            rows = slice(s, s + step)
            _grad_logits(hc, weight, targets[rows], top[rows], log_s[rows], coef[rows], gc, tiles)
            if need_h:
                torch.mm(gc, weight, out=dh[s : s + step])  # dH = G · W
            if need_w:
                _accumulate_dw(dw, gc, hc, first=s == 0, deterministic=True, opts=opts)  # dW += Gᵀ · H
        if need_w and dw.dtype != weight.dtype:
            dw = dw.to(weight.dtype)
        return dh, dw, None, None


class _WeightedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, token_weights, call: _Call):
        loss, ce, dh, dw = _weighted_ce_forward(hidden, weight, targets, token_weights, call)
        # Saved on ctx (not save_for_backward): they are made here, not inputs, and the backward
        # scales them in place and drops them, so their memory is returned as early as possible.
        ctx.grads = (dh, dw, ce if call.need_tw else None)
        ctx.dtypes = (weight.dtype, token_weights.dtype)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError(
                "the backward of weighted_linear_ce(impl='triton') can run only once: its gradients are "
                "computed in the forward and scaled in place (do not use retain_graph=True through it)"
            )
        dh, dw, ce = ctx.grads
        ctx.grads = None
        w_dtype, tw_dtype = ctx.dtypes
        g = grad_loss.to(torch.float32)
        if dh is not None:
            dh.mul_(g)  # 16-bit × fp32 scalar is computed in fp32 and rounded once
        if dw is not None:
            if dw.dtype == w_dtype:
                dw.mul_(g)
            else:  # fp32 accumulator: scale and round into a new tensor of the weight's dtype
                dw = torch.mul(dw, g, out=torch.empty(dw.shape, dtype=w_dtype, device=dw.device))
        dtw = (ce * g).to(tw_dtype) if ce is not None else None  # dL/dw_i = CE_i
        return dh, dw, None, dtw, None


# --------------------------------------------------------------------------------------------------
# Entry points (arguments are validated by dmpo_fast.ops.linear_ce before they get here)
# --------------------------------------------------------------------------------------------------


def linear_logprob_triton(hidden, weight, targets, *, options: LinearCEOptions | None = None):
    """logp[i] = log softmax(hidden[i] · weightᵀ)[targets[i]] as fp32 [N], differentiable in hidden
    and weight. fp64 inputs run the chunked torch path (fp64 result)."""
    if hidden.dtype == torch.float64:
        from dmpo_fast.ops.linear_ce import linear_logprob_chunked

        return linear_logprob_chunked(hidden, weight, targets)
    return _LinearLogprob.apply(hidden, weight, targets, options or LinearCEOptions())


def weighted_linear_ce_triton(
    hidden,
    weight,
    targets,
    token_weights,
    *,
    deterministic: bool = False,
    options: LinearCEOptions | None = None,
):
    """Σ_i token_weights[i] · CE(hidden[i] · weightᵀ, targets[i]) as a 0-dim fp32 tensor.

    Gradients for hidden / weight are computed in this call when grad is enabled and they require
    it; token_weights get dL/dw_i = CE_i. fp64 inputs run the chunked torch path (fp64 result).
    """
    if hidden.dtype == torch.float64:
        from dmpo_fast.ops.linear_ce import weighted_linear_ce_chunked

        return weighted_linear_ce_chunked(hidden, weight, targets, token_weights)
    grad_on = torch.is_grad_enabled()
    need_h = grad_on and hidden.requires_grad
    need_w = grad_on and weight.requires_grad
    need_tw = grad_on and token_weights.requires_grad
    call = _Call(need_h, need_w, need_tw, bool(deterministic), options or LinearCEOptions())
    return _WeightedLinearCE.apply(hidden, weight, targets, token_weights, call)
