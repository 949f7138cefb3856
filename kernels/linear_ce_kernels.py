"""``@triton.jit`` kernels of the fused linear cross-entropy, in the order the launcher calls them.

The op, its design and the trade-offs are described in ``linear_ce.py`` (the launcher, the autograd
functions and the entry points). Notation used in the comments:

    z = hidden · weightᵀ            logits, [rows, V], computed tile by tile in fp32, never stored whole
    m_t, s_t                        per (row, vocabulary tile t): max_v z and Σ_v exp(z − m_t)
    lse = log Σ_v exp(z)            merged from the per-tile (m_t, s_t) by the launcher and kept as
                                    the pair (M, log S), M = max_v z: lse = M + log S. z − lse is
                                    formed as (z − M) − log S so that log S ≈ 1e-7 of a confident
                                    row is not rounded away against M ≈ 40 (ulp 4e-6)
    p = exp(z − lse)                softmax
    d CE / d z = p − e_y            (e_y: one-hot of the target); every gradient below is c · (p − e_y)
                                    with a per-row coefficient c (the token weight, or −grad_logp)

Conventions: pointer arguments end in ``_ptr``, strides are explicit, program ids are widened to
int64 before any offset is formed, loaded tiles are cast to fp32 before arithmetic. ``DOT_FP32``
upcasts the ``tl.dot`` operands: Triton's interpreter computes bf16 dots wrongly (it holds bf16 as
raw uint16), so the CPU tests set it; on a GPU bf16/fp16 operands go to the tensor cores directly
with fp32 accumulation, which is the same products.
"""

from __future__ import annotations

from dmpo_fast.kernels.runtime import require

triton, tl = require("dmpo_fast.kernels.linear_ce", "weighted_linear_ce(..., impl='chunked')")


@triton.jit
def _expm1(x):
    """exp(x) − 1 without the cancellation of ``exp(x) - 1`` near 0.

    1 − p_y of a confident row (p_y = 0.9999) must keep its digits: it is the target's gradient.
    For |x| < 0.35 a degree-7 Taylor polynomial is used (truncation 0.35⁸/8! ≈ 6e-9, 2e-8 relative:
    below fp32 eps); beyond, exp(x) − 1 is within e^x / |e^x − 1| ≤ 3.4 ulp.
    """
    poly = x * (
        1.0
        + x * (0.5 + x * (1.0 / 6.0 + x * (1.0 / 24.0 + x * (1.0 / 120.0 + x * (1.0 / 720.0 + x / 5040.0)))))
    )
    return tl.where(tl.abs(x) < 0.35, poly, tl.exp(x) - 1.0)


@triton.jit
def _project_tile(
    h_ptr,
    w_ptr,
    rows,
    cols,
    H,
    stride_hn,
    stride_hk,
    stride_wv,
    stride_wk,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """acc[BLOCK_N, BLOCK_V] = hidden[rows] · weight[cols]ᵀ, fp32 accumulation.

    ``rows`` / ``cols`` arrive already wrapped into range (index % size), so the main loop has no
    row or column masks (unmasked loads vectorise); the caller masks the edge at the store.
    """
    ks = tl.arange(0, BLOCK_K)
    h_ptrs = h_ptr + rows[:, None] * stride_hn + ks[None, :] * stride_hk  # [BLOCK_N, BLOCK_K]
    w_ptrs = w_ptr + cols[None, :] * stride_wv + ks[:, None] * stride_wk  # [BLOCK_K, BLOCK_V] = Wᵀ tile
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
        h_ptrs += BLOCK_K * stride_hk
        w_ptrs += BLOCK_K * stride_wk
    return acc


@triton.jit
def _lse_kernel(
    h_ptr,
    w_ptr,
    y_ptr,
    m_ptr,
    s_ptr,
    zy_ptr,
    e_ptr,
    n_rows,
    V,
    H,
    stride_hn,
    stride_hk,
    stride_wv,
    stride_wk,
    stride_mt,
    stride_en,
    STORE_E: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """GEMM pass 1: one [BLOCK_N, BLOCK_V] logits tile per program, reduced in the epilogue.

    Writes m_t and s_t for its (rows, tile t) into m/s[t, rows] (the launcher merges the tiles into
    lse: a fixed-order reduction, so no atomics and no cross-program ordering), the target logit
    z_y for the rows whose target falls in this tile, and with STORE_E the tile
    e = exp(z − m_t) ∈ [0, 1] into e[rows, cols]. Storing e rather than z keeps the relative
    precision of p = e · exp(m_t − lse) at the storage dtype's 2⁻⁸ (bf16) whatever the size of the
    logits; a bf16 copy of z would carry an absolute error of |z|·2⁻⁹, i.e. 6% on p at |z| = 30.
    """
    pid = tl.program_id(0).to(tl.int64)
    num_rb = tl.cdiv(n_rows, BLOCK_N)
    # Row blocks vary fastest: the programs running together share one weight tile (read from HBM
    # once per chunk, then from L2) while the chunk's hidden rows stay resident in L2.
    tile = pid // num_rb
    rb = pid % num_rb
    rows = rb * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tile * BLOCK_V + tl.arange(0, BLOCK_V)
    acc = _project_tile(
        h_ptr, w_ptr, rows % n_rows, cols % V, H, stride_hn, stride_hk, stride_wv, stride_wk,
        BLOCK_N, BLOCK_V, BLOCK_K, EVEN_K, DOT_FP32, PRECISION,
    )  # fmt: skip
    row_ok = rows < n_rows
    col_ok = cols < V
    # The target logit first: acc is then dead and z can take its registers (128 per thread at 128x256).
    y = tl.load(y_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    zy = tl.sum(tl.where(cols[None, :] == y[:, None], acc, 0.0), axis=1)
    owns_target = row_ok & (y >= tile * BLOCK_V) & (y < tile * BLOCK_V + BLOCK_V)
    tl.store(zy_ptr + rows, zy, mask=owns_target)
    z = tl.where(col_ok[None, :], acc, float("-inf"))
    m = tl.max(z, axis=1)  # finite: every tile holds at least one real column
    e = tl.exp(z - m[:, None])
    s = tl.sum(e, axis=1)
    tl.store(m_ptr + tile * stride_mt + rows, m, mask=row_ok)
    tl.store(s_ptr + tile * stride_mt + rows, s, mask=row_ok)
    if STORE_E:
        e_ptrs = e_ptr + rows[:, None] * stride_en + cols[None, :]
        tl.store(e_ptrs, e, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _probs_to_grad_kernel(
    e_ptr,
    m_ptr,
    top_ptr,
    logs_ptr,
    zy_ptr,
    y_ptr,
    c_ptr,
    n_rows,
    V,
    stride_mt,
    stride_en,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Turn the stored e = exp(z − m_t) into G = c · (p − e_y) in place (memory-bound, no GEMM).

    BLOCK_V must equal the tile width of ``_lse_kernel``: each column tile reads its own m_t.
    """
    pid = tl.program_id(0).to(tl.int64)
    num_rb = tl.cdiv(n_rows, BLOCK_N)
    tile = pid // num_rb
    rb = pid % num_rb
    rows = rb * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tile * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < n_rows
    ok = row_ok[:, None] & (cols < V)[None, :]
    e_ptrs = e_ptr + rows[:, None] * stride_en + cols[None, :]
    e = tl.load(e_ptrs, mask=ok, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + tile * stride_mt + rows, mask=row_ok, other=0.0)
    top = tl.load(top_ptr + rows, mask=row_ok, other=0.0)
    log_s = tl.load(logs_ptr + rows, mask=row_ok, other=0.0)
    zy = tl.load(zy_ptr + rows, mask=row_ok, other=0.0)
    y = tl.load(y_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    c = tl.load(c_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    p = e * tl.exp((m - top) - log_s)[:, None]  # p = exp(z − m_t) · exp(m_t − lse)
    # At the target p_y − 1 = expm1(z_y − lse) from the exact fp32 target logit: for a confident
    # row 1 − p_y is smaller than e's rounding and would be lost in (p_y − 1).
    d = tl.where(cols[None, :] == y[:, None], _expm1((zy - top) - log_s)[:, None], p)
    tl.store(e_ptrs, d * c[:, None], mask=ok)  # G = c · (p − e_y)


@triton.jit
def _grad_logits_kernel(
    h_ptr,
    w_ptr,
    y_ptr,
    top_ptr,
    logs_ptr,
    c_ptr,
    g_ptr,
    n_rows,
    V,
    H,
    stride_hn,
    stride_hk,
    stride_wv,
    stride_wk,
    stride_gn,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Recompute a logits tile when lse = top + log_s is already known and write G = c · (p − e_y) directly.

    Used by the backward of ``linear_logprob``, whose per-row coefficient c = −grad_logp only exists
    in the backward: d logp / d z = e_y − p, so G = grad_logp · (e_y − p) = −grad_logp · (p − e_y).
    """
    pid = tl.program_id(0).to(tl.int64)
    num_rb = tl.cdiv(n_rows, BLOCK_N)
    tile = pid // num_rb
    rb = pid % num_rb
    rows = rb * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tile * BLOCK_V + tl.arange(0, BLOCK_V)
    acc = _project_tile(
        h_ptr, w_ptr, rows % n_rows, cols % V, H, stride_hn, stride_hk, stride_wv, stride_wk,
        BLOCK_N, BLOCK_V, BLOCK_K, EVEN_K, DOT_FP32, PRECISION,
    )  # fmt: skip
    row_ok = rows < n_rows
    top = tl.load(top_ptr + rows, mask=row_ok, other=0.0)
    log_s = tl.load(logs_ptr + rows, mask=row_ok, other=0.0)
    y = tl.load(y_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    c = tl.load(c_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    x = (acc - top[:, None]) - log_s[:, None]  # z − lse
    hit = cols[None, :] == y[:, None]
    xy = tl.sum(tl.where(hit, x, 0.0), axis=1)  # z_y − lse of the rows whose target is in this tile
    d = tl.where(hit, _expm1(xy)[:, None], tl.exp(x))  # p − e_y, the target term kept exact
    ok = row_ok[:, None] & (cols < V)[None, :]
    tl.store(g_ptr + rows[:, None] * stride_gn + cols[None, :], d * c[:, None], mask=ok)


@triton.jit
def _dw_kernel(
    g_ptr,
    h_ptr,
    dw_ptr,
    n_rows,
    V,
    H,
    rows_per_split,
    stride_gn,
    stride_gv,
    stride_hn,
    stride_hk,
    stride_ds,
    stride_dv,
    stride_dk,
    MODE: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """GEMM pass 3: dW[v, :] (+)= Σ_i G[i, v] · hidden[i, :] over this program's slice of rows.

    Grid (output tiles, splits): split s sums rows [s·rows_per_split, (s+1)·rows_per_split).
    MODE 0 stores the fp32 sum (first chunk, or split s's slot of a workspace: stride_ds), MODE 1
    adds it to the tile already in dW (read-modify-write; the tile has exactly one owner, so the
    result does not depend on scheduling), MODE 2 adds it with fp32 atomics (split > 1, not
    deterministic: the order of the split partial sums varies from run to run).
    """
    pid = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    num_hb = tl.cdiv(H, BLOCK_H)
    # Hidden tiles vary fastest: programs running together share one [rows, BLOCK_V] slab of G
    # (read from HBM once) and the chunk's hidden rows stay resident in L2.
    vb = pid // num_hb
    hb = pid % num_hb
    vs = vb * BLOCK_V + tl.arange(0, BLOCK_V)
    hs = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    ks = tl.arange(0, BLOCK_K)
    k_lo = split * rows_per_split
    k_hi = tl.minimum(k_lo + rows_per_split, n_rows)
    g_ptrs = g_ptr + (k_lo + ks)[:, None] * stride_gn + (vs % V)[None, :] * stride_gv  # [BLOCK_K, BLOCK_V]
    h_ptrs = h_ptr + (k_lo + ks)[:, None] * stride_hn + (hs % H)[None, :] * stride_hk  # [BLOCK_K, BLOCK_H]
    acc = tl.zeros((BLOCK_V, BLOCK_H), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k_ok = (k0 + ks) < k_hi
        g = tl.load(g_ptrs, mask=k_ok[:, None], other=0.0)
        h = tl.load(h_ptrs, mask=k_ok[:, None], other=0.0)
        if DOT_FP32:
            g = g.to(tl.float32)
            h = h.to(tl.float32)
        acc = tl.dot(tl.trans(g), h, acc, input_precision=PRECISION)  # dW += Gᵀ · H
        g_ptrs += BLOCK_K * stride_gn
        h_ptrs += BLOCK_K * stride_hn
    ok = (vs < V)[:, None] & (hs < H)[None, :]
    out_ptrs = dw_ptr + split * stride_ds + vs[:, None] * stride_dv + hs[None, :] * stride_dk
    if MODE == 2:
        tl.atomic_add(out_ptrs, acc, mask=ok)
    else:
        if MODE == 1:
            acc += tl.load(out_ptrs, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptrs, acc, mask=ok)
