"""``wdce_loss``: the weighted denoising cross-entropy of DMPO over a batch of noisy sequences.

    wdce_loss = Σ_r row_weights[r] / max(1, Σ_l loss_mask[r, l]) · Σ_{l: loss_mask[r, l]} CE(hidden[r, l] · Wᵀ, targets[r, l])

``eager`` is the reference path that DMPO's research code takes: logits for every position of every
row, ``F.cross_entropy`` over all of them, then mask and weight. Every other backend gathers only the
positions that are masked *and* belong to a row with a non-zero weight (one device sync for the
count) and hands them to ``weighted_linear_ce`` with per-token weights ``row_weights[r] / n_r``, so
prompt, unmasked and zero-weight positions are never projected onto the vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dmpo_fast.ops._common import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_same_device,
    check_tensor,
    compute_dtype,
    resolve_impl,
)
from dmpo_fast.ops.linear_ce import (
    autocast_dtype,
    autocast_operands,
    weighted_linear_ce,
    weighted_linear_ce_chunked,
)


def _check(hidden, head_weight, targets, loss_mask, row_weights):
    check_tensor("hidden", hidden, ndim=3, dtypes=FLOAT_DTYPES)
    R, L, H = hidden.shape
    check_tensor("head_weight", head_weight, ndim=2, dtypes=FLOAT_DTYPES, shape=(None, H))
    check_tensor("targets", targets, dtypes=INDEX_DTYPES, shape=(R, L))
    check_tensor("loss_mask", loss_mask, dtypes=(torch.bool,), shape=(R, L))
    check_tensor("row_weights", row_weights, dtypes=FLOAT_DTYPES, shape=(R,))
    check_same_device(
        hidden=hidden, head_weight=head_weight, targets=targets, loss_mask=loss_mask, row_weights=row_weights
    )
    if R == 0:
        raise ValueError("hidden must hold at least one row, got R = 0")


def token_weights_from_rows(loss_mask: torch.Tensor, row_weights: torch.Tensor) -> torch.Tensor:
    """[R, L] per-token weights row_weights[r] / max(1, n_r) on loss positions, 0 elsewhere."""
    n = loss_mask.sum(dim=1).clamp_min(1)
    per_row = row_weights.to(compute_dtype(row_weights.dtype)) / n
    return torch.where(loss_mask, per_row[:, None], torch.zeros_like(per_row)[:, None])


def wdce_loss_ref(hidden, head_weight, targets, loss_mask, row_weights) -> torch.Tensor:
    """The reference path: full-sequence logits, CE at every position, then mask and weight."""
    R, L, H = hidden.shape
    dt = compute_dtype(hidden.dtype)
    logits = hidden.reshape(R * L, H).to(dt) @ head_weight.to(dt).T  # [R*L, V]
    ce = F.cross_entropy(logits, targets.reshape(-1).long(), reduction="none").reshape(R, L)
    return (token_weights_from_rows(loss_mask, row_weights).to(dt) * ce).sum()


def wdce_loss(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    targets: torch.Tensor,
    loss_mask: torch.Tensor,
    row_weights: torch.Tensor,
    *,
    impl: str = "auto",
    deterministic: bool = False,
) -> torch.Tensor:
    """Weighted denoising cross-entropy (see the module docstring).

    Args:
        hidden: [R, L, H] final hidden states of the model on the noisy rows.
        head_weight: [V, H] the output projection (same dtype as ``hidden``).
        targets: [R, L] int, the clean tokens.
        loss_mask: [R, L] bool, the positions in the loss (the masked completion tokens).
        row_weights: [R] float, per-row weights (importance weight / replicate count); any sign.
        impl: "auto" | "triton" | "native" | "chunked" | "eager".
        deterministic: triton only, see ``weighted_linear_ce``.

    Under ``torch.autocast`` the head runs in the autocast dtype, as ``F.linear`` would (hidden and
    head_weight may then differ in dtype).

    Returns:
        A 0-dim fp32 tensor (fp64 for fp64 inputs).
    """
    _check(hidden, head_weight, targets, loss_mask, row_weights)
    if head_weight.dtype != hidden.dtype and autocast_dtype(hidden) is None:
        raise ValueError(f"head_weight dtype {head_weight.dtype} must equal hidden dtype {hidden.dtype}")
    impl = resolve_impl(impl, hidden.device, has_native=True)
    if impl == "eager":
        hidden, head_weight, no_autocast = autocast_operands(hidden, head_weight)
        with no_autocast:
            return wdce_loss_ref(hidden, head_weight, targets, loss_mask, row_weights)
    R, L, H = hidden.shape
    token_weights = token_weights_from_rows(loss_mask, row_weights).reshape(-1)  # [R*L]
    rows = (token_weights != 0).nonzero().squeeze(1)  # masked positions of non-zero-weight rows
    if rows.numel() == 0:
        impl = "chunked"  # nothing to project: the chunked path returns an exact 0 with zero grads
    if impl in ("chunked", "native") and not token_weights.requires_grad and autocast_dtype(hidden) is None:
        # The chunked paths take the live rows as an index and gather them chunk by chunk, writing dH
        # straight into its [R*L, H] buffer, which becomes hidden's gradient: no gathered copy of the masked
        # rows nor of their gradient (two [N, H] fp32 buffers, 14 MB of the 49 MB this loss took at the
        # default run's shape). The targets of the other positions are never read: only the live ones are
        # checked.
        flat = hidden.reshape(R * L, H)
        return _wdce_chunked(flat, head_weight, targets.reshape(-1), token_weights, rows, impl)
    # Under autocast weighted_linear_ce casts the gathered rows only, never the whole [R, L, H].
    return weighted_linear_ce(
        hidden.reshape(R * L, H).index_select(0, rows),
        head_weight,
        targets.reshape(-1).index_select(0, rows),
        token_weights.index_select(0, rows),
        impl=impl,
        deterministic=deterministic,
    )


def _wdce_chunked(hidden, head_weight, targets, token_weights, rows, impl):
    """``weighted_linear_ce``'s chunked (or native) path over all R*L rows, skipping all but ``rows``."""
    y = targets.index_select(0, rows)
    if rows.numel() and (int(y.min()) < 0 or int(y.max()) >= head_weight.shape[0]):
        raise ValueError(
            f"targets must lie in [0, {head_weight.shape[0]}) at the loss positions, "
            f"got values in [{int(y.min())}, {int(y.max())}]"
        )
    return weighted_linear_ce_chunked(
        hidden, head_weight, targets, token_weights, native=impl == "native", rows=rows
    )
