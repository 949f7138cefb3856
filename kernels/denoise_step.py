"""Triton ``denoise_step``: sample and score the active rows in one pass over the vocabulary.

Computes ``dmpo_fast.ops.denoise_step.sample_rows_ref`` for the N active rows of a step: with fp32 logits
z = (hidden_row · head_weightᵀ or logits_row) · logit_scale, mask token at −∞,

    token = argmax_v (z_v · (1/T) + g_v)   (argmax z at T = 0)
    confidence = exp(z_token − max z) / Σ_v exp(z_v − max z)

with the Gumbel noise g drawn in the kernel from the same Philox counters as the reference (see the header of
``dmpo_fast/ops/denoise_step.py``). The commit rule runs afterwards in torch on [B, L].

Layout. Program (rb, k) owns BLOCK_N active rows and the k-th contiguous split of TILES_PER_SPLIT vocabulary
tiles of BLOCK_V columns. Per tile it forms the logits (a tl.dot over the hidden dimension from gathered
hidden rows, or a load of the given logits), then folds them into five per-row running values — max m,
Σ exp(z − m), best noisy score, its column, z at that column — so no logit, probability or noise value is
ever written to memory. The splits' partials ([n_splits, N] each) are merged by a second, tiny kernel in
split order, so ties resolve to the lowest column, as torch.argmax does. Row blocks vary fastest in the grid:
the programs that run together share one weight split, which is read from HBM once and from L2 by the other
row blocks. At LLaDA-8B scale (B·32 = 256 rows, H = 4096, V = 126464, bf16) the floor is reading the 1.04 GB
head once (≈0.3 ms on an H100) plus 265 GFLOP of GEMM; the epilogue's Philox (one call per 4 columns,
~25 integer ops per column) and three transcendentals per column are small next to it. These numbers are
estimates: the kernel has not been timed on a GPU yet.

Conventions: pointer arguments end in ``_ptr``, strides are explicit, program ids are widened to int64, tiles
are cast to fp32 before arithmetic. ``DOT_FP32`` upcasts the tl.dot operands because Triton's interpreter
computes 16-bit dots wrongly; on a GPU bf16 operands go to the tensor cores with fp32 accumulation.
"""

from __future__ import annotations

import math

import torch

from dmpo_fast.kernels.runtime import alloc, interpreting, programs_per_wave, require
from dmpo_fast.ops.denoise_step import STREAM_GUMBEL

triton, tl = require(__name__, "denoise_step(..., impl='chunked')")


@triton.jit
def _denoise_partial_kernel(
    src_ptr,
    w_ptr,
    row_off_ptr,
    pos_ptr,
    key_ptr,
    step_ptr,
    m_ptr,
    s_ptr,
    best_ptr,
    col_ptr,
    zbest_ptr,
    seed,
    N,
    V,
    H,
    mask_id,
    logit_scale,
    inv_t,
    tiles_per_split,
    stride_src,
    stride_wv,
    stride_wk,
    HAS_HIDDEN: tl.constexpr,
    GREEDY: tl.constexpr,
    HAS_MASK_ID: tl.constexpr,
    STREAM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Partials of rows [rb·BLOCK_N, +BLOCK_N) over vocabulary tiles [k·tiles_per_split, +tiles_per_split).

    src is the logits (row r's column v at src + row_off[r] + v·stride_src) or, with HAS_HIDDEN, the hidden
    states (row r's feature j at src + row_off[r] + j·stride_src), projected through w [V, H].
    """
    rb = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    rows = rb * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows_in = tl.where(row_ok, rows, 0)  # padded rows re-read row 0: no masks in the GEMM loop
    row_off = tl.load(row_off_ptr + rows_in)  # [BLOCK_N] int64 element offsets
    zero = tl.zeros((BLOCK_N, BLOCK_V // 4), dtype=tl.uint32)
    c1 = zero + tl.load(pos_ptr + rows_in).to(tl.uint32)[:, None]
    c2 = zero + tl.load(key_ptr + rows_in).to(tl.uint32)[:, None]
    c3 = zero + (tl.load(step_ptr + rows_in) * 4 + STREAM).to(tl.uint32)[:, None]

    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    best = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    best_col = tl.zeros((BLOCK_N,), dtype=tl.int64)
    z_best = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    lanes = tl.arange(0, BLOCK_V)

    n_tiles = tl.cdiv(V, BLOCK_V)
    t_start = split * tiles_per_split
    t_end = tl.minimum(t_start + tiles_per_split, n_tiles)
    for t in range(t_start, t_end):
        cols = t * BLOCK_V + lanes
        col_ok = cols < V
        if HAS_HIDDEN:
            # acc[BLOCK_N, BLOCK_V] = hidden[rows] · w[cols]ᵀ; columns wrapped into range, masked below.
            ks = tl.arange(0, BLOCK_K)
            h_ptrs = src_ptr + row_off[:, None] + ks[None, :] * stride_src
            w_ptrs = w_ptr + (cols % V)[None, :] * stride_wv + ks[:, None] * stride_wk
            acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
            for k0 in range(0, H, BLOCK_K):
                if EVEN_K:
                    a = tl.load(h_ptrs)
                    b = tl.load(w_ptrs)
                else:
                    k_ok = (k0 + ks) < H
                    a = tl.load(h_ptrs, mask=k_ok[None, :], other=0.0)
                    b = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
                if DOT_FP32:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
                h_ptrs += BLOCK_K * stride_src
                w_ptrs += BLOCK_K * stride_wk
            z = acc
        else:
            z_ptrs = src_ptr + row_off[:, None] + cols[None, :] * stride_src
            z = tl.load(z_ptrs, mask=col_ok[None, :], other=0.0).to(tl.float32)
        z = z * logit_scale
        valid = col_ok
        if HAS_MASK_ID:
            valid = valid & (cols != mask_id)
        z = tl.where(valid[None, :], z, float("-inf"))

        # Online max / Σ exp: the running sum is rescaled when the max grows. m_safe keeps a tile with no
        # valid column (only the mask token) from producing exp(−∞ − (−∞)) = NaN.
        m_new = tl.maximum(m, tl.max(z, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(z - m_safe[:, None]), axis=1)
        m = m_new

        if GREEDY:
            score = z
        else:
            # Column v takes word v % 4 of the Philox call with counter c0 = v // 4 (interleaving the four
            # words gives exactly that order); u = (2·(bits >> 9) + 1)·2⁻²⁴ ∈ (0, 1).
            c0 = zero + (t * (BLOCK_V // 4) + tl.arange(0, BLOCK_V // 4)).to(tl.uint32)[None, :]
            w0, w1, w2, w3 = tl.philox(seed, c0, c1, c2, c3)
            bits = tl.interleave(tl.interleave(w0, w2), tl.interleave(w1, w3))  # [BLOCK_N, BLOCK_V]
            u = ((bits >> 9) * 2 + 1).to(tl.float32) * (1.0 / 16777216.0)
            g = -tl.log(-tl.log(u))
            score = z * inv_t + g
        tile_best = tl.max(score, axis=1)
        tile_arg = tl.argmax(score, axis=1, tie_break_left=True)
        tile_z = tl.sum(tl.where(lanes[None, :] == tile_arg[:, None], z, 0.0), axis=1)
        better = tile_best > best  # strict: an earlier (lower) column keeps a tie
        best = tl.where(better, tile_best, best)
        best_col = tl.where(better, t * BLOCK_V + tile_arg.to(tl.int64), best_col)
        z_best = tl.where(better, tile_z, z_best)

    out = split * N + rows
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(s_ptr + out, s, mask=row_ok)
    tl.store(best_ptr + out, best, mask=row_ok)
    tl.store(col_ptr + out, best_col, mask=row_ok)
    tl.store(zbest_ptr + out, z_best, mask=row_ok)


@triton.jit
def _denoise_merge_kernel(
    m_ptr,
    s_ptr,
    best_ptr,
    col_ptr,
    zbest_ptr,
    token_ptr,
    conf_ptr,
    N,
    n_splits,
    BLOCK: tl.constexpr,
):
    """Merge the splits' partials in split order: token = column of the best score (ties: lowest split, i.e.
    lowest column), confidence = exp(z_token − M) / S with M = max_k m_k, S = Σ_k s_k · exp(m_k − M)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < N
    m = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK,), dtype=tl.float32)
    best = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    col = tl.zeros((BLOCK,), dtype=tl.int64)
    z_best = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    for k in range(0, n_splits):
        at = k * N + rows
        m_k = tl.load(m_ptr + at, mask=ok, other=float("-inf"))
        s_k = tl.load(s_ptr + at, mask=ok, other=0.0)
        m_new = tl.maximum(m, m_k)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + s_k * tl.exp(m_k - m_safe)
        m = m_new
        best_k = tl.load(best_ptr + at, mask=ok, other=float("-inf"))
        better = best_k > best
        best = tl.where(better, best_k, best)
        col = tl.where(better, tl.load(col_ptr + at, mask=ok, other=0), col)
        z_best = tl.where(better, tl.load(zbest_ptr + at, mask=ok, other=0.0), z_best)
    # Rows past N (never stored) get finite stand-ins, so no lane computes 0/0 or inf − inf.
    m_safe = tl.where(ok, m, 0.0)
    s_safe = tl.where(ok, s, 1.0)
    tl.store(token_ptr + rows, col, mask=ok)
    tl.store(conf_ptr + rows, tl.exp(z_best - m_safe) / s_safe, mask=ok)


# --------------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------------

def _programs_target(device: torch.device) -> int:
    """Programs that fill the GPU about four waves deep (8 in the interpreter, to exercise the merge)."""
    return programs_per_wave(device, 4)


def _tiles(n_rows: int, dtype: torch.dtype, has_hidden: bool) -> dict:
    """Tile sizes. Interpreter: tiny, so test shapes span several tiles, splits and masked edges.

    GPU (heuristics for Hopper, not yet timed on hardware): 16-bit GEMM tiles of up to 64x128x64 on 8
    warps, fp32 dots in full precision on 64x64x32 tiles, and wide 16x256 tiles for the memory-bound
    logits path. Each is the largest of its family that ``dmpo-fast check-kernels`` compiles without
    register spills for sm_90 and sm_80: the sampled epilogue (Philox, Gumbel, two running maxima) needs
    registers next to the accumulator, and the 128x128 tile spilled 376 B per thread on sm_90 (868 B on
    sm_80); the fp32 and logits tiles spilled on 4 warps and do not on 8.
    """
    small_n = max(16, triton.next_power_of_2(n_rows))
    if interpreting():
        return dict(BLOCK_N=min(16, small_n), BLOCK_V=32, BLOCK_K=16, num_warps=4, num_stages=1)
    if not has_hidden:
        return dict(BLOCK_N=16, BLOCK_V=256, BLOCK_K=16, num_warps=8, num_stages=2)
    if dtype == torch.float32:
        return dict(BLOCK_N=min(64, small_n), BLOCK_V=64, BLOCK_K=32, num_warps=8, num_stages=2)
    return dict(BLOCK_N=min(64, small_n), BLOCK_V=128, BLOCK_K=64, num_warps=8, num_stages=3)


def denoise_rows_triton(
    logits: torch.Tensor | None,
    hidden: torch.Tensor | None,
    head_weight: torch.Tensor | None,
    b_idx: torch.Tensor,
    l_idx: torch.Tensor,
    pos: torch.Tensor,
    row: torch.Tensor,
    step: torch.Tensor,
    *,
    seed: int,
    inv_t: float | None,
    logit_scale: float,
    mask_id: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(token [N] int64, confidence [N] fp32) of the N active rows (b_idx[i], l_idx[i]); counters int64."""
    has_hidden = hidden is not None
    src = hidden if has_hidden else logits
    if src.stride(2) != 1:
        src = src.contiguous()
    N, device = b_idx.shape[0], src.device
    V = head_weight.shape[0] if has_hidden else src.shape[2]
    H = src.shape[2] if has_hidden else 0
    row_off = (
        b_idx * src.stride(0) + l_idx * src.stride(1)
    ).contiguous()  # gather by offset: no copy of rows
    if has_hidden:
        w = head_weight
        if w.dtype != src.dtype:
            w = w.to(src.dtype)
    else:
        w = src  # unused
    tiles = _tiles(N, src.dtype, has_hidden)
    BLOCK_N, BLOCK_V, BLOCK_K = tiles["BLOCK_N"], tiles["BLOCK_V"], tiles["BLOCK_K"]
    n_rb = triton.cdiv(N, BLOCK_N)
    n_tiles = triton.cdiv(V, BLOCK_V)
    tiles_per_split = max(1, math.ceil(n_tiles * n_rb / _programs_target(device)))
    if interpreting():
        tiles_per_split = min(tiles_per_split, 2)  # several tiles per program, several splits
    n_splits = triton.cdiv(n_tiles, tiles_per_split)

    m = alloc((n_splits, N), torch.float32, device)
    s = alloc((n_splits, N), torch.float32, device)
    best = alloc((n_splits, N), torch.float32, device)
    col = alloc((n_splits, N), torch.int64, device)
    z_best = alloc((n_splits, N), torch.float32, device)
    dot_fp32 = interpreting()
    precision = "ieee" if (dot_fp32 or src.dtype == torch.float32) else "tf32"
    _denoise_partial_kernel[(n_rb, n_splits)](
        src, w, row_off, pos.contiguous(), row.contiguous(), step.contiguous(),
        m, s, best, col, z_best,
        seed, N, V, H, -1 if mask_id is None else mask_id,
        logit_scale, 1.0 if inv_t is None else inv_t, tiles_per_split,
        src.stride(2),
        w.stride(0) if has_hidden else 0,
        w.stride(1) if has_hidden else 0,
        HAS_HIDDEN=has_hidden,
        GREEDY=inv_t is None,
        HAS_MASK_ID=mask_id is not None,
        STREAM=STREAM_GUMBEL,
        BLOCK_N=BLOCK_N,
        BLOCK_V=BLOCK_V,
        BLOCK_K=BLOCK_K,
        EVEN_K=has_hidden and H % BLOCK_K == 0,
        DOT_FP32=dot_fp32,
        PRECISION=precision,
        num_warps=tiles["num_warps"],
        num_stages=tiles["num_stages"],
    )  # fmt: skip
    token = alloc((N,), torch.int64, device)
    conf = alloc((N,), torch.float32, device)
    MERGE_BLOCK = 16 if interpreting() else 128
    _denoise_merge_kernel[(triton.cdiv(N, MERGE_BLOCK),)](
        m, s, best, col, z_best, token, conf, N, n_splits, BLOCK=MERGE_BLOCK
    )
    return token, conf
