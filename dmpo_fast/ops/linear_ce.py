"""Linear cross-entropy ops: ``linear_logprob`` and ``weighted_linear_ce``.

Both project hidden rows onto the vocabulary (``hidden @ weight.T``) and reduce each row of logits
to one number, so the [N, V] logits never need to exist at once:

    linear_logprob(h, W, y)[i]        = log softmax(h_i · Wᵀ)[y_i]
    weighted_linear_ce(h, W, y, w)    = Σ_i w_i · (−log softmax(h_i · Wᵀ)[y_i])

Backends (``impl=``):
- ``eager``: the plain reference. Builds the full [N, V] logits in fp32 (fp64 for fp64 inputs) and
  lets autograd differentiate. The test oracle and the benchmark baseline.
- ``chunked``: memory-lean torch. Rows are processed in chunks of ``chunk_rows(V, ...)`` so at most a
  chunk of logits is alive in the forward *and* the backward: ``CHUNK_ELEMENTS`` fp32 values (64 MiB) on a
  GPU; on the CPU, where dW is the big buffer, H rows (a chunk of logits no larger than dW; fewer rows
  would update dW more often) or 8 MiB when that is more rows (see ``CPU_CHUNK_ELEMENTS``). Each chunk's
  row work is in place: one [c, V] buffer holds the logits, then exp(z − m), then the gradient of the
  logits. ``weighted_linear_ce`` computes its gradients during the forward (3 GEMM passes: logits, dH,
  dW) because the token weights are known up front; the backward only scales them by the upstream
  gradient (or, when that is 1, hands the saved buffers over without a copy).
  ``linear_logprob`` cannot do that (its per-row coefficient arrives in the backward), so it saves the
  per-row log-sum-exp and recomputes each chunk of logits in the backward.
- On the CPU a vocabulary larger than ``CPU_VOCAB_BLOCK`` (1024) columns is also cut into blocks: a chunk
  of logits is [rows, block], the row's log-sum-exp is accumulated block by block (running max and sum),
  and the gradient is formed block by block from it, each block's dW rows written in place; the forward of
  ``weighted_linear_ce`` then projects every block twice. Its memory is dW plus one block, whatever V.
- ``triton``: the fused kernels in ``dmpo_fast.kernels.linear_ce``.
- ``native`` (CPU): the chunked path with each chunk's row work in one C++ call (``csrc/linear_ce.cpp``)
  instead of four to six torch kernels over the chunk: for ``weighted_linear_ce`` log-sum-exp, CE and the
  in-place gradient of the logits (``ce_rows_``); for ``linear_logprob`` log-sum-exp and log-prob in the
  forward (``logprob_rows``), the in-place gradient of the recomputed logits in the backward
  (``logprob_grad_rows_``). The GEMMs are torch's. With vocabulary blocks the row work is torch's too (a
  block of rows is small enough for the cache, where the C++ sweep's saving was memory traffic).

Gradients, with p_i = softmax(h_i · Wᵀ) and e_y the one-hot of the target:
    d logp_i / d h_i = (e_{y_i} − p_i) · W             d logp_i / d W = (e_{y_i} − p_i)ᵀ h_i
    d CE / d w_i     = CE_i (token weights get a gradient too; usually they are detached).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dmpo_fast.ops._autocast import _autocast_off, autocast_dtype, autocast_operands  # noqa: F401 (re-exported)
from dmpo_fast.ops._common import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_same_device,
    check_tensor,
    compute_dtype,
    resolve_impl,
)

# Largest chunk the chunked path holds on a GPU: 2**24 fp32 values = 64 MiB.
CHUNK_ELEMENTS = 1 << 24
# On the CPU a chunk is sized against dW, the one [V, H] buffer the CPU path must hold anyway: H rows, so
# that a chunk's logits are never larger than dW (33 MB at V = 32000, H = 256; the reference holds several
# [N, V] buffers). Fewer rows cost time, not much memory: each chunk adds its rank-c update to all of dW
# (dW += Gᵀ·H_c reads and writes 8·V·H bytes against 6·c·V·H FLOPs of GEMM), so the dW traffic is
# ∝ 1/c. Measured on the 2-core CPU at V = 32000, H = 256, 420 masked rows (docs/benchmarks.md, "chunk
# size"): 64 rows ran 1.6-1.7x and 129 rows 1.3-1.4x the time of 258 rows, all at 0.15-0.19x the reference's
# extra peak RSS. CPU_CHUNK_ELEMENTS (8 MiB of fp32 values) allows more rows when they are cheap (a small
# vocabulary: 6743 rows of the default run's 55-token head). CPU_MIN_CHUNK_ROWS None means "H rows".
# With vocabulary blocks (below) the same rule sizes a chunk of [rows, block] logits: 1365 rows at H = 256.
CPU_CHUNK_ELEMENTS = 1 << 21
CPU_MIN_CHUNK_ROWS: int | None = None
# On the CPU a vocabulary larger than CPU_VOCAB_BLOCK is also split into blocks of that many columns, so a
# chunk of logits is [rows, block] rather than [rows, V]: the chunk no longer grows with V, and every GEMM
# keeps all the chunk's rows (a tall [rows, H] x [H, block] product, where fewer rows over the whole
# vocabulary made skinny ones). The price is one more GEMM per chunk: the row's log-sum-exp needs every block
# before any block's gradient, so the forward projects the blocks twice (online max and sum, then the
# gradient). Measured on the 2-core CPU at V = 32000, H = 256, 431 rows (docs/benchmarks.md, "vocabulary
# blocks"): blocks of 1024 columns took 0.22-0.24x the eager reference's extra peak RSS where whole rows took
# 0.55-0.74x, at about the same speed for the linear ops and up to 10% slower in wdce_loss (2.8-3.1x the
# reference instead of 3.1-3.2x, at 0.08x its memory instead of 0.19x); 2048 columns reached 0.25-0.26x.
# None: whole rows (one block) everywhere.
CPU_VOCAB_BLOCK: int | None = 1024


def chunk_rows(vocab: int, chunk_elements: int | None = None, *, device=None, hidden: int = 0) -> int:
    """Rows per chunk so that a chunk's fp32 values stay within ``chunk_elements``: its [rows, vocab] logits
    and, with ``hidden``, its gathered [rows, hidden] rows and their [rows, hidden] gradient (which outweigh
    the logits when the vocabulary is small: 55 tokens against a hidden size of 128 in the default run).
    Default on a CPU ``device``: ``CPU_CHUNK_ELEMENTS`` but at least ``hidden`` rows (a chunk of logits as
    large as dW, see the constants); elsewhere ``CHUNK_ELEMENTS``."""
    per_row = max(1, vocab + 2 * hidden)
    if chunk_elements is not None:
        return max(1, chunk_elements // per_row)
    if device is not None and torch.device(device).type == "cpu":
        floor = hidden if CPU_MIN_CHUNK_ROWS is None else CPU_MIN_CHUNK_ROWS
        return max(1, floor, CPU_CHUNK_ELEMENTS // per_row)
    return max(1, CHUNK_ELEMENTS // per_row)


def vocab_block(vocab: int, device=None) -> int:
    """Columns of logits per block: ``CPU_VOCAB_BLOCK`` on a CPU ``device`` when the vocabulary is larger,
    else the whole vocabulary (one block: the single-GEMM path)."""
    if device is not None and torch.device(device).type == "cpu" and CPU_VOCAB_BLOCK:
        return min(vocab, CPU_VOCAB_BLOCK)
    return vocab


def _blocks(vocab: int, block: int) -> list[tuple[int, int]]:
    return [(b, min(b + block, vocab)) for b in range(0, vocab, block)]


def _block_lse(h: torch.Tensor, w: torch.Tensor, block: int, buf: torch.Tensor) -> torch.Tensor:
    """Per-row log-sum-exp of ``h @ w.T`` [c, V] one [c, block] block of logits at a time (in ``buf``, c·block
    values): a running max m and Σ exp(z − m), rescaled when m grows."""
    c = h.shape[0]
    m = torch.full((c,), -torch.inf, dtype=h.dtype, device=h.device)
    total = torch.zeros(c, dtype=h.dtype, device=h.device)
    for b0, b1 in _blocks(w.shape[0], block):
        z = torch.mm(h, w[b0:b1].T, out=buf[: c * (b1 - b0)].view(c, b1 - b0))
        m_new = torch.maximum(m, z.amax(dim=1))
        total = total.mul_((m - m_new).exp_()).add_(z.sub_(m_new[:, None]).exp_().sum(dim=1))
        m = m_new
    return m + total.log()


def _target_logits(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """z_{i, y_i} = h_i · W[y_i] without the row's other logits."""
    return (h * w.index_select(0, y)).sum(dim=1)


def _block_grads(h, w, y, lse, coef, block: int, buf, dw, need_h: bool = True) -> torch.Tensor | None:
    """The gradients of G = coef · (softmax(h·Wᵀ) − e_y) from the row's log-sum-exp: returns dH = G·W [c, H]
    (with ``need_h``) and adds Gᵀ·h into ``dw`` (when not None). The softmax part block by block (each block's
    rows of dW in place), the one-hot part once: −coef_i · W[y_i] into dH, −coef_i · h_i into dW's row y_i."""
    c = h.shape[0]
    dh = (-coef[:, None] * w.index_select(0, y)) if need_h else None
    for b0, b1 in _blocks(w.shape[0], block):
        wb = w[b0:b1]
        P = torch.mm(h, wb.T, out=buf[: c * (b1 - b0)].view(c, b1 - b0))
        P.sub_(lse[:, None]).exp_().mul_(coef[:, None])
        if dh is not None:
            dh.addmm_(P, wb)
        if dw is not None:
            dw[b0:b1].addmm_(P.T, h)
    if dw is not None:
        dw.index_add_(0, y, h * -coef[:, None])
    return dh


def _lse_(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(lse, E, Σ)`` of a [c, V] chunk: lse_i = m_i + log Σ_i, Σ_i = Σ_v exp(z_iv − m_i), with ``logits``
    overwritten by E = exp(z − m). In place: ``torch.logsumexp`` allocates a second [c, V] buffer for
    z − m."""
    m = logits.amax(dim=1, keepdim=True)
    E = logits.sub_(m).exp_()
    total = E.sum(dim=1)
    return m.squeeze(1) + total.log(), E, total


def _subtract_one_hot_(G: torch.Tensor, targets: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``G[i, targets[i]] -= value[i]`` in place, through the flat index i·V + y (G contiguous [c, V]).
    ``scatter_add_`` along dim 1 did the same 10x slower on CPU at 13500 rows of 55."""
    flat = torch.arange(G.shape[0], device=G.device) * G.shape[1] + targets
    G.view(-1).index_add_(0, flat, -value)
    return G


def _scaled(grad: torch.Tensor, *buffers):
    """The gradients a forward saved, times the upstream ``grad``. ``grad`` is 1 for ``loss.backward()`` (the
    trainer's WDCE step): then the saved buffers themselves are returned, so that they become the ``.grad`` of
    the inputs without a copy (a copy of dW alone is 33 MB at V = 32000, H = 256). They are never scaled in
    place, so ``retain_graph`` reuse (gradcheck) stays right. One host sync on a GPU, where the chunked path
    is only the fallback."""
    if bool(grad == 1):
        return buffers
    return tuple(None if b is None else b * grad for b in buffers)


# --------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------


def _check_linear(hidden, weight, targets, token_weights=None):
    check_tensor("hidden", hidden, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES)
    n, h = hidden.shape
    if weight.shape[1] != h:
        raise ValueError(
            f"weight must have shape [V, {h}] to match hidden [N, {h}], got {list(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} must equal hidden dtype {hidden.dtype}")
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one vocabulary row, got V = 0")
    check_tensor("targets", targets, dtypes=INDEX_DTYPES, shape=(n,))
    if token_weights is not None:
        check_tensor("token_weights", token_weights, dtypes=FLOAT_DTYPES, shape=(n,))
    check_same_device(hidden=hidden, weight=weight, targets=targets, token_weights=token_weights)
    # Range check only where it costs no device sync.
    if targets.device.type == "cpu" and n > 0:
        lo, hi = int(targets.min()), int(targets.max())
        if lo < 0 or hi >= weight.shape[0]:
            raise ValueError(f"targets must lie in [0, {weight.shape[0]}), got values in [{lo}, {hi}]")


# --------------------------------------------------------------------------------------------------
# Eager references
# --------------------------------------------------------------------------------------------------


def linear_logprob_ref(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Reference: full [N, V] logits in fp32 (fp64 for fp64 inputs), log-softmax, gather."""
    dt = compute_dtype(hidden.dtype)
    logits = hidden.to(dt) @ weight.to(dt).T  # [N, V]
    return torch.log_softmax(logits, dim=-1).gather(1, targets.long()[:, None]).squeeze(1)


def weighted_linear_ce_ref(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, token_weights: torch.Tensor
) -> torch.Tensor:
    """Reference: Σ_i token_weights[i] · CE(hidden[i] · Wᵀ, targets[i]) with full logits."""
    dt = compute_dtype(hidden.dtype)
    nll = -linear_logprob_ref(hidden, weight, targets)
    return (token_weights.to(dt) * nll).sum()


# --------------------------------------------------------------------------------------------------
# Chunked torch
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Chunking:
    """The non-tensor arguments of a chunked call, passed through autograd as one value: rows per chunk,
    columns per block of the vocabulary (``vocab_block``; the whole vocabulary: one block), whether the row
    work runs in the native ops (one block only), and which gradients the forward computes."""

    chunk: int
    block: int
    native: bool = False
    need_h: bool = False
    need_w: bool = False
    need_tw: bool = False


class _ChunkedLinearLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, how: _Chunking):
        chunk, native = how.chunk, how.native
        dt = compute_dtype(hidden.dtype)
        n = hidden.shape[0]
        logp = torch.empty(n, dtype=dt, device=hidden.device)
        lse = torch.empty(n, dtype=dt, device=hidden.device)
        w = weight.to(dt)
        blocked = how.block < weight.shape[0]
        buf = torch.empty(min(chunk, n) * how.block, dtype=dt, device=hidden.device) if blocked else None
        for s in range(0, n, chunk):
            y = targets[s : s + chunk].long()
            if blocked:  # the log-sum-exp block by block; the target's logit from its own dot product
                h = hidden[s : s + chunk].to(dt)
                lse[s : s + chunk] = _block_lse(h, w, how.block, buf)
                logp[s : s + chunk] = _target_logits(h, w, y) - lse[s : s + chunk]
                continue
            logits = hidden[s : s + chunk].to(dt) @ w.T  # [c, V]
            if native:  # max, Σexp and the gather in one C++ sweep per row (csrc/linear_ce.cpp)
                logp[s : s + chunk], lse[s : s + chunk] = torch.ops.dmpo_fast.logprob_rows(logits, y)
            else:
                z_y = logits.gather(1, y[:, None]).squeeze(1)
                lse[s : s + chunk] = _lse_(logits)[0]
                logp[s : s + chunk] = z_y - lse[s : s + chunk]
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk, ctx.block, ctx.native = chunk, how.block, native
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        hidden, weight, targets, lse = ctx.saved_tensors
        with _autocast_off(hidden.device.type):  # backward() may be called inside an autocast region
            return _ChunkedLinearLogprob._backward(ctx, grad_logp, hidden, weight, targets, lse)

    @staticmethod
    def _backward(ctx, grad_logp, hidden, weight, targets, lse):
        dt = lse.dtype
        chunk = ctx.chunk
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w = weight.to(dt)
        dh = torch.empty_like(hidden) if need_h else None
        dw = torch.zeros(weight.shape, dtype=dt, device=weight.device) if need_w else None
        n = hidden.shape[0]
        blocked = ctx.block < weight.shape[0]
        buf = torch.empty(min(chunk, n) * ctx.block, dtype=dt, device=hidden.device) if blocked else None
        for s in range(0, n, chunk):
            h = hidden[s : s + chunk].to(dt)
            g = grad_logp[s : s + chunk].to(dt).contiguous()
            y = targets[s : s + chunk].long()
            if blocked:  # g · (e_y − p) = −g · (p − e_y), block by block; dW's rows of each block in place
                dh_c = _block_grads(h, w, y, lse[s : s + chunk], -g, ctx.block, buf, dw, need_h)
                if need_h:
                    dh[s : s + chunk] = dh_c.to(hidden.dtype)
                continue
            # d logp / d logits = e_y − p, scaled by the upstream gradient: G = g · (e_y − p), written over
            # the recomputed logits (one [c, V] buffer per chunk)
            G = h @ w.T  # [c, V]
            if ctx.native:
                torch.ops.dmpo_fast.logprob_grad_rows_(G, y, lse[s : s + chunk], g)
            else:
                G.sub_(lse[s : s + chunk, None]).exp_().mul_(-g[:, None])  # −g · p
                _subtract_one_hot_(G, y, -g)
            if need_h:
                dh[s : s + chunk] = (G @ w).to(hidden.dtype)
            if need_w:
                dw.addmm_(G.T, h)
        return dh, (dw.to(weight.dtype) if need_w else None), None, None


class _ChunkedWeightedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, token_weights, rows, how: _Chunking):
        chunk, native, need_h, need_w, need_tw = how.chunk, how.native, how.need_h, how.need_w, how.need_tw
        dt = compute_dtype(hidden.dtype)
        n = hidden.shape[0]
        w = weight.to(dt)
        tw = token_weights.to(dt)
        ce = torch.zeros(n, dtype=dt, device=hidden.device)
        dh = torch.zeros(hidden.shape, dtype=dt, device=hidden.device) if need_h else None
        dw = torch.zeros(weight.shape, dtype=dt, device=weight.device) if need_w else None
        # Rows with weight 0 cost nothing: only live rows are projected. (nonzero() syncs on CUDA;
        # the chunked path is the CPU / fallback path, the Triton kernel skips rows in-kernel.)
        # When the token weights themselves need a gradient (dL/dw_i = CE_i) every row is live.
        # ``rows``: the live rows when the caller already knows them (wdce_loss).
        if need_tw:
            live = torch.arange(n, device=tw.device)
        else:
            live = rows if rows is not None else (tw != 0).nonzero().squeeze(1)
        blocked = how.block < weight.shape[0]
        buf = None
        if blocked:
            buf = torch.empty(min(chunk, live.numel()) * how.block, dtype=dt, device=hidden.device)
        for s in range(0, live.numel(), chunk):
            idx = live[s : s + chunk]
            h = hidden.index_select(0, idx).to(dt)  # [c, H]
            y = targets.index_select(0, idx).long()[:, None]
            if blocked:  # CE from the block-by-block log-sum-exp, then G block by block (a second projection)
                lse = _block_lse(h, w, how.block, buf)
                ce[idx] = lse - _target_logits(h, w, y[:, 0])
                if need_h or need_w:
                    tw_c = tw.index_select(0, idx)
                    dh_c = _block_grads(h, w, y[:, 0], lse, tw_c, how.block, buf, dw, need_h)
                    if need_h:
                        dh.index_copy_(0, idx, dh_c)
                continue
            logits = h @ w.T  # [c, V]
            if native:
                # The same row work in one C++ call (csrc/linear_ce.cpp): CE, and G written over the logits.
                ce[idx] = torch.ops.dmpo_fast.ce_rows_(
                    logits, y[:, 0], tw.index_select(0, idx), need_h or need_w
                )
                G = logits
            else:
                z_y = logits.gather(1, y).squeeze(1)
                lse, E, total = _lse_(logits)  # E = exp(z − m) over the logits buffer
                ce[idx] = lse - z_y
                if need_h or need_w:
                    # d(w_i · CE_i)/d logits_i = w_i · (p_i − e_y), p_i = E_i / Σ_v E_iv: still in place.
                    tw_c = tw.index_select(0, idx)
                    G = E.mul_((tw_c / total)[:, None])
                    _subtract_one_hot_(G, y[:, 0], tw_c)
            if need_h:
                dh.index_copy_(0, idx, G @ w)
            if need_w:
                dw.addmm_(G.T, h)
        ctx.save_for_backward(dh, dw, ce)
        ctx.dtypes = (hidden.dtype, weight.dtype, token_weights.dtype)
        # Σ over the live rows only: the same sum, in the same order, whether or not the caller gathered them.
        return (tw.index_select(0, live) * ce.index_select(0, live)).sum()

    @staticmethod
    def backward(ctx, grad_out):
        dh, dw, ce = ctx.saved_tensors
        h_dt, w_dt, tw_dt = ctx.dtypes
        g = grad_out.to(ce.dtype)
        dtw = (ce * g).to(tw_dt) if ctx.needs_input_grad[3] else None
        dh, dw = _scaled(g, dh, dw)
        dh = dh.to(h_dt) if ctx.needs_input_grad[0] else None
        dw = dw.to(w_dt) if ctx.needs_input_grad[1] else None
        return dh, dw, None, dtw, None, None


def linear_logprob_chunked(
    hidden, weight, targets, *, chunk_elements: int | None = None, native: bool = False
):
    """The chunked path; with ``native`` the per-row work of each chunk runs in the C++ ops ``logprob_rows``
    (forward) and ``logprob_grad_rows_`` (backward). Same chunks, so the same peak memory."""
    V, H = weight.shape
    block = vocab_block(V, hidden.device)
    chunk = chunk_rows(block, chunk_elements, device=hidden.device, hidden=H)
    return _ChunkedLinearLogprob.apply(hidden, weight, targets, _Chunking(chunk, block, native))


def weighted_linear_ce_chunked(
    hidden,
    weight,
    targets,
    token_weights,
    *,
    chunk_elements: int | None = None,
    native: bool = False,
    rows: torch.Tensor | None = None,
):
    """The chunked path; with ``native`` the per-row work of each chunk runs in the C++ op ``ce_rows_``
    (the GEMMs stay torch's). Same chunks, so the same peak memory. ``rows`` (int64 [n_live]): the rows
    with a non-zero token weight, when the caller has them already; the others are skipped."""
    grad_on = torch.is_grad_enabled()
    need_h = grad_on and hidden.requires_grad
    need_w = grad_on and weight.requires_grad
    need_tw = grad_on and token_weights.requires_grad
    V, H = weight.shape
    block = vocab_block(V, hidden.device)
    chunk = chunk_rows(block, chunk_elements, device=hidden.device, hidden=H)
    how = _Chunking(chunk, block, native, need_h, need_w, need_tw)
    return _ChunkedWeightedLinearCE.apply(hidden, weight, targets, token_weights, rows, how)


# --------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------


def linear_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    impl: str = "auto",
    chunk_elements: int | None = None,
    options=None,
) -> torch.Tensor:
    """Per-row log-probability of ``targets`` under ``softmax(hidden @ weight.T)``.

    Args:
        hidden: [N, H] float (bf16 / fp16 / fp32 / fp64).
        weight: [V, H], same dtype as ``hidden`` (the LM head).
        targets: [N] int32/int64 in [0, V).
        impl: "auto" | "triton" | "native" | "chunked" | "eager" ("native": the chunked path with each
            chunk's row work in C++, CPU only; see ``dmpo_fast.ops._native``).
        chunk_elements: chunked and native paths, the most fp32 values a chunk holds (default: 2**21 on
            CPU, 2**24 elsewhere; see ``chunk_rows``).
        options: triton path only, a ``dmpo_fast.kernels.linear_ce.LinearCEOptions`` (chunk size, ...).

    Under ``torch.autocast`` the projection runs in the autocast dtype, as ``F.linear`` would (hidden and
    weight may then differ in dtype); see ``autocast_operands``.

    Returns:
        logp: [N] fp32 (fp64 for fp64 inputs), differentiable in ``hidden`` and ``weight``.
    """
    hidden, weight, no_autocast = autocast_operands(hidden, weight)
    _check_linear(hidden, weight, targets)
    impl = resolve_impl(impl, hidden.device, has_native=True)
    with no_autocast:
        if impl == "eager":
            return linear_logprob_ref(hidden, weight, targets)
        if impl == "triton":
            from dmpo_fast.kernels.linear_ce import linear_logprob_triton

            return linear_logprob_triton(hidden, weight, targets, options=options)
        return linear_logprob_chunked(
            hidden, weight, targets, chunk_elements=chunk_elements, native=impl == "native"
        )


def weighted_linear_ce(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    token_weights: torch.Tensor,
    *,
    impl: str = "auto",
    deterministic: bool = False,
    chunk_elements: int | None = None,
    options=None,
) -> torch.Tensor:
    """``Σ_i token_weights[i] · (−log softmax(hidden[i] @ weight.T)[targets[i]])`` as a scalar.

    Token weights may have any sign; rows with weight 0 cost no matmul work in the chunked and Triton
    paths (unless ``token_weights`` itself requires grad: dL/dw_i = CE_i needs every row). The gradient
    is computed during the forward pass (3 GEMM passes), so call it inside the autograd graph you will
    backpropagate through once.

    Args:
        hidden: [N, H] float; weight: [V, H] same dtype; targets: [N] int in [0, V);
        token_weights: [N] float (any dtype; math in fp32).
        impl: "auto" | "triton" | "native" | "chunked" | "eager" ("native": the chunked path with each
            chunk's row work in C++, CPU only; see ``dmpo_fast.ops._native``).
        deterministic: triton path only, reduce dW in a fixed order (slower, bit-reproducible).
        chunk_elements: chunked and native paths, the most fp32 values a chunk holds (default: 2**21 on
            CPU, 2**24 elsewhere; see ``chunk_rows``).
        options: triton path only, a ``dmpo_fast.kernels.linear_ce.LinearCEOptions`` (chunk size, dW
            accumulation in fp32 or in the weight dtype, ...). The triton backward scales gradients
            saved by the forward, so it can run once per forward (no ``retain_graph`` reuse).

    Under ``torch.autocast`` the projection runs in the autocast dtype, as ``F.linear`` would (hidden and
    weight may then differ in dtype); see ``autocast_operands``.

    Returns:
        A 0-dim fp32 tensor (fp64 for fp64 inputs).
    """
    hidden, weight, no_autocast = autocast_operands(hidden, weight)
    _check_linear(hidden, weight, targets, token_weights)
    impl = resolve_impl(impl, hidden.device, has_native=True)
    with no_autocast:
        if impl == "eager":
            return weighted_linear_ce_ref(hidden, weight, targets, token_weights)
        if impl == "triton":
            from dmpo_fast.kernels.linear_ce import weighted_linear_ce_triton

            return weighted_linear_ce_triton(
                hidden, weight, targets, token_weights, deterministic=deterministic, options=options
            )
        return weighted_linear_ce_chunked(
            hidden, weight, targets, token_weights, chunk_elements=chunk_elements, native=impl == "native"
        )
