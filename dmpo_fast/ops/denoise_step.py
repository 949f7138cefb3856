"""``denoise_step``: one reverse step of masked diffusion — sample a token at every active position,
score it, and commit the best-scored ones.

    x_new, committed, confidence = denoise_step(logits, x, active, temperature=T, num_transfer=k, seed=s)
    x_new, committed, confidence = denoise_step((hidden, head_weight), x, active, threshold=0.9, seed=s)

For every active position (b, l), with fp32 logits z = logits[b, l] · logit_scale:

    token      = argmax_v (z_v / T + g_v)   g_v ~ Gumbel(0, 1): token ~ softmax(z / T); argmax z at T = 0
    confidence = softmax(z)[token]          UNtempered, as LLaDA / Fast-dLLM low-confidence remasking
                                            (a Philox uniform instead with remasking="random")

then per row one commit rule picks which active positions keep their token (the others stay masked):

    num_transfer[b]   the num_transfer[b] highest confidences (LLaDA; Fast-dLLM with a fixed schedule)
    threshold         every position with confidence >= threshold, and always the best one (Fast-dLLM)
    factor            the n best, n the largest with (i + 1)·(1 − c_(i)) <= factor for i = 1..n, c sorted
                      descending; at least one (Fast-dLLM's factor-based parallel decoding: it commits while
                      c_(i) >= 1 − factor / (i + 1); the thresholds grow with i and c_(i) falls, so the
                      passing ranks form a prefix). Fast-dLLM's loop also commits the last candidate when
                      only it fails; that quirk is not reproduced.

Ties in confidence go to the lower position (a stable sort), so every backend commits the same set.

Design. The whole step is one pass over the vocabulary per active row: the max, the sum of exponentials and
the Gumbel-argmax are accumulated online over vocabulary tiles, in fp32, and no [rows, V] noise or probability
tensor is kept. From hidden states only the active rows are projected (``hidden[active] · head_weightᵀ``);
the Triton kernel (``dmpo_fast.kernels.denoise_step``) fuses that GEMM with the sampling epilogue so the
logits never reach memory. The commit rules run on [B, L] confidences with a stable sort, on the device,
with no host sync; the syncs are the count of active positions (to size the gather) and, when counters come
as tensors, one range check. The native CPU op (``csrc/denoise_step.cpp``, ``impl="native"``) does the same
tile-by-tile pass per active row with at::parallel_for over rows, and from logits also the commit rule, in one
call (B=8, 32 active positions, V=32000, T=0.7: 17x the eager path on one core, about 40x on two;
benchmarks/native.py).

Random numbers are counter-based (Philox4x32-10, ``dmpo_fast.ops.philox``; key = the 64-bit ``seed``), so a
row's result depends only on its own counters, never on the batch layout or the backend:

    Gumbel noise of vocabulary entry v:  word (v mod 4) of philox(seed; v // 4, p, r, 4·t + STREAM_GUMBEL)
    random-remasking score:              word 0 of philox(seed; 0, p, r, 4·t + STREAM_REMASK)

with p = column index + ``position_offset`` (the samplers pass the index within the completion), r = the row
key (``rows[b]``, default b) and t = the step (``step`` or ``step[b]``). The Gumbel draw uses all four output
words of a Philox call (4x fewer calls); its uniform is u = (2·(bits >> 9) + 1)·2⁻²⁴, the midpoints of
a 2²³-cell grid of (0, 1) — exact in fp32, never 0 or 1, so g = −log(−log u) is finite (|g| < 17). The
remasking uniform is ``uniform_from_bits`` (top 24 bits · 2⁻²⁴).

``denoise_step_reference_fastdllm`` is the benchmark baseline: what the research code does per step (head over
every query row, float64 Gumbel noise over the full vocabulary, float64 softmax, per-row top-k in a loop).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

from dmpo_fast.ops._common import FLOAT_DTYPES, INDEX_DTYPES, check_same_device, check_tensor, resolve_impl
from dmpo_fast.ops.philox import draw_seed, philox4x32, uniform_from_bits

STREAM_GUMBEL = 0
STREAM_REMASK = 1
STREAM_ORDER = 2  # used by the ROAR sampler for its decoding order (dmpo_fast.sampling)
MAX_STEP = (1 << 30) - 1  # 4·step + stream must fit the 32-bit counter word
REMASKING = ("low_confidence", "random")
# Rows of [rows, V] fp32 logits the chunked path holds at once: 64 MiB.
_CHUNK_ELEMENTS = 1 << 24


class DenoiseOutput(NamedTuple):
    """x: [B, L] ids with committed tokens written; committed: [B, L] bool; confidence: [B, L] fp32 (0 where
    not active)."""

    x: torch.Tensor
    committed: torch.Tensor
    confidence: torch.Tensor


# --------------------------------------------------------------------------------------------------
# Noise (shared by every backend: the kernel reproduces these formulas bit for bit)
# --------------------------------------------------------------------------------------------------


def open_uniform_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """uint32 bits (int64 holding [0, 2^32)) -> fp32 in (0, 1): (2·(bits >> 9) + 1)·2⁻²⁴.

    2·k + 1 < 2²⁴ is exact in fp32, so every backend converts identically, and u is never 0 or 1.
    """
    return ((bits >> 9) * 2 + 1).to(torch.float32) * (1.0 / 16777216.0)


def gumbel_noise(seed: int, V: int, pos: torch.Tensor, row: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """[N, V] fp32 Gumbel(0, 1) noise for N (position, row key, step) counter triples (int64 [N] each)."""
    V4 = (V + 3) // 4
    c0 = torch.arange(V4, device=pos.device)[None, :]
    words = philox4x32(seed, c0, pos[:, None], row[:, None], (4 * step + STREAM_GUMBEL)[:, None])
    bits = torch.stack(words, dim=-1).reshape(pos.shape[0], 4 * V4)[:, :V]  # column v = word v % 4 of v // 4
    u = open_uniform_from_bits(bits)
    return -torch.log(-torch.log(u))


def remask_uniform(seed: int, pos: torch.Tensor, row: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """[N] fp32 U[0, 1) scores of random remasking."""
    zero = torch.zeros_like(pos)
    return uniform_from_bits(philox4x32(seed, zero, pos, row, 4 * step + STREAM_REMASK)[0])


# --------------------------------------------------------------------------------------------------
# Commit rules: [B, L] on the device, no host sync, shared by every backend
# --------------------------------------------------------------------------------------------------


def commit_mask(
    score: torch.Tensor,
    active: torch.Tensor,
    *,
    num_transfer: torch.Tensor | None = None,
    threshold: float | None = None,
    factor: float | None = None,
) -> torch.Tensor:
    """[B, L] bool: which active positions commit, given their scores (higher = commit first).

    Exactly one of ``num_transfer`` ([B] int), ``threshold``, ``factor`` is given (see the module docstring).
    Ties go to the lower position.
    """
    B, L = score.shape
    ranked = torch.where(active, score, float("-inf"))
    # Stable descending sort: equal scores keep position order, so the set is the same on every backend.
    sorted_score, order = torch.sort(ranked, dim=1, descending=True, stable=True)
    n_active = active.sum(dim=1)  # [B]
    rank = torch.arange(L, device=score.device)[None, :]  # [1, L]
    if num_transfer is not None:
        k = num_transfer.to(n_active.dtype)
    elif threshold is not None:
        k = (sorted_score >= threshold).sum(dim=1).clamp_min(1)
    else:
        # rank i (0-based) is the (i+1)-th best: it passes when (i + 2)·(1 − c) <= factor.
        passes = (rank + 2).to(torch.float32) * (1.0 - sorted_score) <= factor
        k = passes.to(torch.int32).cumprod(dim=1).sum(dim=1).clamp_min(1)
    k = torch.minimum(k, n_active)
    take_sorted = rank < k[:, None]  # [B, L] in sorted order
    return torch.zeros_like(active).scatter(1, order, take_sorted) & active


# --------------------------------------------------------------------------------------------------
# Eager reference (also the chunked CPU path)
# --------------------------------------------------------------------------------------------------


def sample_rows_ref(
    z: torch.Tensor,
    pos: torch.Tensor,
    row: torch.Tensor,
    step: torch.Tensor,
    *,
    seed: int,
    inv_t: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(token [N] int64, confidence [N] fp32) from fp32 logits ``z [N, V]`` (excluded entries −inf).

    ``inv_t`` is 1/T as an fp32 number, or None for T = 0 (argmax; first index on ties).
    """
    if inv_t is None:
        score = z
    else:
        score = z * torch.tensor(inv_t, dtype=torch.float32, device=z.device) + gumbel_noise(
            seed, z.shape[1], pos, row, step
        )
    token = torch.argmax(score, dim=1)
    m = z.max(dim=1).values
    s = torch.exp(z - m[:, None]).sum(dim=1)
    conf = (
        torch.exp(z.gather(1, token[:, None])[:, 0] - m) / s
    )  # softmax(z)[token], as the kernel computes it
    return token, conf


def _active_logits(logits, hidden, w32, b_idx, l_idx, logit_scale, mask_id) -> torch.Tensor:
    """fp32 [n, V] logits of the active rows (b_idx, l_idx), mask token excluded; ``w32`` the fp32 head."""
    if logits is not None:
        z = logits[b_idx, l_idx].to(torch.float32)
    else:
        z = hidden[b_idx, l_idx].to(torch.float32) @ w32.T
    if logit_scale != 1.0:
        z = z * torch.tensor(logit_scale, dtype=torch.float32, device=z.device)  # the kernel's fp32 scalar
    if mask_id is not None and mask_id < z.shape[1]:
        z[:, mask_id] = float("-inf")
    return z


def denoise_rows_ref(
    logits,
    hidden,
    head_weight,
    b_idx,
    l_idx,
    pos,
    row,
    step,
    *,
    seed,
    inv_t,
    logit_scale,
    mask_id,
    chunk_rows,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token and confidence of the N active rows, ``chunk_rows`` rows of [rows, V] logits at a time."""
    tokens, confs = [], []
    w32 = None if head_weight is None else head_weight.to(torch.float32)
    for a in range(0, b_idx.shape[0], chunk_rows):
        sl = slice(a, a + chunk_rows)
        z = _active_logits(logits, hidden, w32, b_idx[sl], l_idx[sl], logit_scale, mask_id)
        t, c = sample_rows_ref(z, pos[sl], row[sl], step[sl], seed=seed, inv_t=inv_t)
        tokens.append(t)
        confs.append(c)
    return torch.cat(tokens), torch.cat(confs)


# --------------------------------------------------------------------------------------------------
# Native CPU op (csrc/denoise_step.cpp), from hidden states
# --------------------------------------------------------------------------------------------------


def denoise_rows_native(
    hidden, head_weight, b_idx, l_idx, pos, row, step, *, seed, inv_t, logit_scale, mask_id, chunk_rows
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token and confidence of the N active rows: torch projects ``chunk_rows`` rows at a time (the GEMM of
    ``_active_logits``, so the fp32 logits are the chunked path's), the C++ op samples and scores them."""
    tokens, confs = [], []
    w32 = head_weight.to(torch.float32)
    for a in range(0, b_idx.shape[0], chunk_rows):
        sl = slice(a, a + chunk_rows)
        z = hidden[b_idx[sl], l_idx[sl]].to(torch.float32) @ w32.T  # [c, V]
        t, c = torch.ops.dmpo_fast.sample_rows(
            z, pos[sl], row[sl], step[sl], seed, 0.0 if inv_t is None else inv_t, logit_scale,
            -1 if mask_id is None else mask_id,
        )  # fmt: skip
        tokens.append(t)
        confs.append(c)
    return torch.cat(tokens), torch.cat(confs)


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def _as_row_tensor(name: str, value, B: int, device, *, upper: int) -> torch.Tensor:
    """int or [B] integer tensor -> int64 [B] on ``device``, checked to lie in [0, upper]."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int or an integer tensor [B], got a bool")
    if isinstance(value, int):
        if not 0 <= value <= upper:
            raise ValueError(f"{name} must lie in [0, {upper}], got {value}")
        return torch.full((B,), value, dtype=torch.int64, device=device)
    check_tensor(name, value, dtypes=INDEX_DTYPES, shape=(B,))
    if value.device != device:
        raise ValueError(f"{name} must be on the device of x ({device}), got {value.device}")
    return value.to(torch.int64)


def _check_ranges(tensors: dict[str, torch.Tensor], position_offset: int, L: int) -> None:
    """Range checks of the Philox counter words and num_transfer given as tensors (ints were checked in
    Python): one small host sync, none when nothing came as a tensor. User input, so not an assert."""
    if (
        isinstance(position_offset, bool)
        or not isinstance(position_offset, int)
        or position_offset < 0
        or position_offset + L > 1 << 32
    ):
        raise ValueError(
            f"position_offset must be an int with 0 <= position_offset and position_offset + L "
            f"<= 2**32, got {position_offset!r}"
        )
    if not tensors:
        return
    lo_hi = torch.stack([v for t in tensors.values() for v in (t.min(), t.max())]).tolist()
    limits = {"rows": (1 << 32) - 1, "step": MAX_STEP, "num_transfer": 1 << 62}
    for i, name in enumerate(tensors):
        lo, hi = lo_hi[2 * i], lo_hi[2 * i + 1]
        if lo < 0 or hi > limits[name]:
            raise ValueError(f"{name} must lie in [0, {limits[name]}], got values in [{lo}, {hi}]")


def denoise_step(
    logits,
    x: torch.Tensor,
    active: torch.Tensor,
    *,
    temperature: float = 0.0,
    num_transfer: torch.Tensor | int | None = None,
    threshold: float | None = None,
    factor: float | None = None,
    remasking: Literal["low_confidence", "random"] = "low_confidence",
    seed: int | None = None,
    generator: torch.Generator | None = None,
    step: torch.Tensor | int = 0,
    rows: torch.Tensor | None = None,
    position_offset: int = 0,
    mask_id: int | None = None,
    logit_scale: float = 1.0,
    impl: str = "auto",
) -> DenoiseOutput:
    """One denoising step: sample every active position, commit the best-scored ones per row.

    Args:
        logits: [B, L, V] logits (any float dtype), or a pair ``(hidden [B, L, H], head_weight [V, H])``, in
            which case only the active rows are projected (logits = hidden · head_weightᵀ · logit_scale).
        x: [B, L] int token ids (the current state).
        active: [B, L] bool, the positions to sample (masked positions of the current block).
        temperature: T >= 0; tokens ~ softmax(z / T), argmax at 0.
        num_transfer / threshold / factor: the commit rule, exactly one of them (see the module docstring).
            num_transfer is an int or a [B] int tensor (clamped to the number of active positions).
        remasking: "low_confidence" ranks by softmax(z)[token]; "random" by a Philox uniform (which is then
            the returned confidence).
        seed: 64-bit Philox key; drawn from ``generator`` when None.
        step, rows: Philox counters: the step (int or [B]) and each row's key ([B], default 0..B-1). A row
            alone with its own key and step reproduces what it gets in a batch.
        position_offset: counter position of column 0 (the samplers pass the index within the completion, so a
            window of the sequence draws the same noise as the whole).
        mask_id: this token is never sampled (its logit counts as −∞, in the confidence too).
        logit_scale: multiplies the logits (the model's ``logit_scale``; mainly for the hidden-state form).
        impl: "auto" | "triton" | "native" | "chunked" | "eager" ("eager" materialises the [active, V] fp32
            logits at once, "chunked" a bounded number of rows at a time, "native" runs the C++ CPU op: the
            whole step from logits, the sampling of projected chunks from hidden states).
    Returns:
        ``DenoiseOutput(x, committed, confidence)``: x with committed tokens written, committed [B, L] bool,
        confidence [B, L] fp32 (the ranking score of active positions, 0 elsewhere).
    """
    if isinstance(logits, (tuple, list)):
        if len(logits) != 2:
            raise ValueError(
                f"logits must be a [B, L, V] tensor or a (hidden, head_weight) pair, got {len(logits)} items"
            )
        hidden, head_weight = logits
        logits = None
        check_tensor("hidden", hidden, ndim=3, dtypes=FLOAT_DTYPES)
        check_tensor(
            "head_weight", head_weight, ndim=2, dtypes=(hidden.dtype,), shape=(None, hidden.shape[2])
        )
        B, L, V = hidden.shape[0], hidden.shape[1], head_weight.shape[0]
        check_same_device(hidden=hidden, head_weight=head_weight, x=x)
    else:
        hidden = head_weight = None
        check_tensor("logits", logits, ndim=3, dtypes=FLOAT_DTYPES)
        B, L, V = logits.shape
        check_same_device(logits=logits, x=x)
    check_tensor("x", x, dtypes=INDEX_DTYPES, shape=(B, L))
    check_tensor("active", active, dtypes=(torch.bool,), shape=(B, L))
    check_same_device(x=x, active=active)
    if V < 1 or B < 1 or L < 1:
        raise ValueError(f"logits must have B, L, V >= 1, got B={B}, L={L}, V={V}")
    rules = sum(r is not None for r in (num_transfer, threshold, factor))
    if rules != 1:
        raise ValueError(f"exactly one of num_transfer, threshold, factor must be given, got {rules}")
    if threshold is not None and not (isinstance(threshold, (int, float)) and 0.0 <= threshold <= 1.0):
        raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}")
    if factor is not None and not (isinstance(factor, (int, float)) and factor > 0):
        raise ValueError(f"factor must be a positive number, got {factor!r}")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature >= 0:
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
    if remasking not in REMASKING:
        raise ValueError(f"remasking must be one of {REMASKING}, got {remasking!r}")
    if mask_id is not None and (not isinstance(mask_id, int) or isinstance(mask_id, bool) or mask_id < 0):
        raise ValueError(f"mask_id must be None or a non-negative int, got {mask_id!r}")
    if mask_id is not None and V == 1 and mask_id == 0:
        raise ValueError("mask_id excludes the only vocabulary entry (V = 1)")
    if not isinstance(logit_scale, (int, float)) or isinstance(logit_scale, bool) or not logit_scale > 0:
        raise ValueError(f"logit_scale must be a positive number, got {logit_scale!r}")
    if seed is None:
        seed = draw_seed(generator)
    elif not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    device = x.device
    impl = resolve_impl(impl, device, has_native=True)
    as_tensors = [
        n for n, v in (("rows", rows), ("step", step), ("num_transfer", num_transfer)) if torch.is_tensor(v)
    ]
    if num_transfer is not None:
        num_transfer = _as_row_tensor("num_transfer", num_transfer, B, device, upper=1 << 62)
    step = _as_row_tensor("step", step, B, device, upper=MAX_STEP)
    rows = (
        torch.arange(B, device=device)
        if rows is None
        else _as_row_tensor("rows", rows, B, device, upper=(1 << 32) - 1)
    )
    converted = {"rows": rows, "step": step, "num_transfer": num_transfer}
    _check_ranges({name: converted[name] for name in as_tensors}, position_offset, L)
    inv_t = None if temperature == 0 else 1.0 / float(temperature)
    if impl == "native" and logits is not None:
        # One C++ call samples, scores and commits (csrc/denoise_step.cpp); no gather, no host sync.
        x_new, committed, confidence = torch.ops.dmpo_fast.denoise_step(
            logits, x, active, rows, step, num_transfer, position_offset, seed,
            0.0 if inv_t is None else inv_t, float(logit_scale), -1 if mask_id is None else mask_id,
            None if threshold is None else float(threshold), None if factor is None else float(factor),
            remasking == "random",
        )  # fmt: skip
        return DenoiseOutput(x_new, committed, confidence)

    flat = active.reshape(-1).nonzero()[:, 0]  # [N] — a host sync: sizes the gather
    b_idx, l_idx = flat // L, flat % L
    pos, row_key, row_step = l_idx + position_offset, rows[b_idx], step[b_idx]
    if flat.numel() == 0:
        token = torch.zeros(0, dtype=torch.int64, device=device)
        conf = torch.zeros(0, dtype=torch.float32, device=device)
    elif impl == "triton":
        from dmpo_fast.kernels.denoise_step import denoise_rows_triton

        token, conf = denoise_rows_triton(
            logits, hidden, head_weight, b_idx, l_idx, pos, row_key, row_step,
            seed=seed, inv_t=inv_t, logit_scale=float(logit_scale), mask_id=mask_id,
        )  # fmt: skip
    elif impl == "native":  # from hidden states: torch projects chunks of active rows, C++ samples them
        token, conf = denoise_rows_native(
            hidden, head_weight, b_idx, l_idx, pos, row_key, row_step,
            seed=seed, inv_t=inv_t, logit_scale=float(logit_scale), mask_id=mask_id,
            chunk_rows=max(1, _CHUNK_ELEMENTS // V),
        )  # fmt: skip
    else:
        chunk_rows = flat.numel() if impl == "eager" else max(1, _CHUNK_ELEMENTS // V)
        token, conf = denoise_rows_ref(
            logits, hidden, head_weight, b_idx, l_idx, pos, row_key, row_step,
            seed=seed, inv_t=inv_t, logit_scale=float(logit_scale), mask_id=mask_id, chunk_rows=chunk_rows,
        )  # fmt: skip
    if remasking == "random":
        conf = remask_uniform(seed, pos, row_key, row_step)

    tokens = torch.zeros(B * L, dtype=torch.int64, device=device).index_copy_(0, flat, token).view(B, L)
    confidence = torch.zeros(B * L, dtype=torch.float32, device=device).index_copy_(0, flat, conf).view(B, L)
    committed = commit_mask(confidence, active, num_transfer=num_transfer, threshold=threshold, factor=factor)
    x_new = torch.where(committed, tokens.to(x.dtype), x)
    return DenoiseOutput(x_new, committed, confidence)


# --------------------------------------------------------------------------------------------------
# Benchmark baseline: the research code's step
# --------------------------------------------------------------------------------------------------


def denoise_step_reference_fastdllm(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    x: torch.Tensor,
    active: torch.Tensor,
    *,
    temperature: float,
    num_transfer: torch.Tensor | None = None,
    threshold: float | None = None,
    logit_scale: float = 1.0,
    generator: torch.Generator | None = None,
) -> DenoiseOutput:
    """The step as LLaDA / Fast-dLLM's research code runs it — the baseline the benchmarks compare against.

    Mirrors ``get_transfer_index`` of Fast-dLLM: the head is applied to every query row ([B, L, V] logits in
    the model's dtype), Gumbel noise is float64 over the full vocabulary (``exp(z) / (−log u)^T``, argmax),
    the confidence is a float64 softmax gathered at the token, and top-k / threshold selection runs per row in
    a Python loop (one host sync per row). Noise comes from torch's generator, not Philox: use it for timing,
    not for matching tokens with ``denoise_step``.
    """
    logits = F.linear(hidden, head_weight)  # [B, L, V] in the model dtype
    if logit_scale != 1.0:
        logits = logits * logit_scale
    if temperature == 0:
        noisy = logits
    else:
        z64 = logits.to(torch.float64)
        u = torch.rand(z64.shape, dtype=torch.float64, device=z64.device, generator=generator)
        noisy = z64.exp() / (-torch.log(u)) ** temperature
    x0 = torch.argmax(noisy, dim=-1)  # [B, L]
    p = F.softmax(logits.to(torch.float64), dim=-1)
    x0_p = torch.gather(p, -1, x0[..., None])[..., 0]
    x0 = torch.where(active, x0, x)
    confidence = torch.where(active, x0_p, -float("inf"))
    committed = torch.zeros_like(active)
    if threshold is not None:
        num_transfer = active.sum(dim=1)
    for j in range(confidence.shape[0]):
        k = int(num_transfer[j])
        _, select = torch.topk(confidence[j], k=k)
        committed[j, select] = True
        if threshold is not None:
            for i in range(1, k):
                if confidence[j, select[i]] < threshold:
                    committed[j, select[i]] = False
    x_new = torch.where(committed, x0, x)
    return DenoiseOutput(x_new, committed, torch.where(active, x0_p, 0.0).to(torch.float32))
