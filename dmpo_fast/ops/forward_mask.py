"""``forward_mask``: the forward (noising) process of masked diffusion, with antithetic replicates.

For each sequence b and replicate r a rate λ ~ U[rate_min, rate_max) is drawn, and every maskable
position is replaced by ``mask_id`` with probability λ. Rows are replicate-major: row ``r*B + b`` is
replicate r of sequence b. With ``antithetic=True`` replicates R/2..R-1 are the complements (within
the maskable positions) of replicates 0..R/2-1, which pairs a lightly and a heavily masked view of
the same sequence and lowers the variance of the ELBO estimate.

Random numbers are counter-based (Philox, see ``dmpo_fast.ops.philox``): the draw for position l of
sequence b, base replicate r is ``U(seed; l, b, r, STREAM_POSITION)`` and the rate is
``U(seed; 0, b, r, STREAM_RATE)``. The Triton kernel uses the same counters, so both backends give
identical masks for the same seed, whatever the batch layout.
"""

from __future__ import annotations

import torch

from dmpo_fast.ops._common import INDEX_DTYPES, check_same_device, check_tensor, resolve_impl
from dmpo_fast.ops.philox import draw_seed, philox_uniform

STREAM_POSITION = 0
STREAM_RATE = 1


def _check(ids, maskable, mask_id, replicates, antithetic, rate_min, rate_max):
    check_tensor("ids", ids, ndim=2, dtypes=INDEX_DTYPES)
    check_tensor("maskable", maskable, dtypes=(torch.bool,), shape=tuple(ids.shape))
    check_same_device(ids=ids, maskable=maskable)
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"ids must be a non-empty [B, L] batch, got shape {list(ids.shape)}")
    if not isinstance(mask_id, int) or isinstance(mask_id, bool) or mask_id < 0:
        raise ValueError(f"mask_id must be a non-negative int, got {mask_id!r}")
    if not isinstance(replicates, int) or isinstance(replicates, bool) or replicates < 1:
        raise ValueError(f"replicates must be a positive int, got {replicates!r}")
    if antithetic and replicates % 2:
        raise ValueError(
            f"replicates must be even when antithetic=True (pairs of complements), got {replicates}"
        )
    if not (0.0 <= rate_min < rate_max <= 1.0):
        raise ValueError(
            f"rate_min and rate_max must satisfy 0 <= rate_min < rate_max <= 1, got {rate_min}, {rate_max}"
        )


def mask_rates(
    B: int, base_replicates: int, rate_min: float, rate_max: float, seed: int, device, row_offset: int = 0
) -> torch.Tensor:
    """[Rb, B] fp32 rates λ = rate_min + (rate_max − rate_min) · U(seed; 0, row_offset + b, r, STREAM_RATE).

    Computed by this one torch expression for every backend, so the per-position comparison
    ``u < λ`` is bit-identical across backends.
    """
    r = torch.arange(base_replicates, device=device)[:, None]
    b = row_offset + torch.arange(B, device=device)[None, :]
    u = philox_uniform(seed, torch.zeros_like(b), b, r, torch.full_like(r, STREAM_RATE))
    return rate_min + (rate_max - rate_min) * u


def forward_mask_ref(
    ids: torch.Tensor,
    maskable: torch.Tensor,
    *,
    mask_id: int,
    replicates: int,
    antithetic: bool,
    rate_min: float,
    rate_max: float,
    seed: int,
    row_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager reference: Philox uniforms for every (replicate, sequence, position), then compare to λ."""
    B, L = ids.shape
    base = replicates // 2 if antithetic else replicates
    dev = ids.device
    rate = mask_rates(B, base, rate_min, rate_max, seed, dev, row_offset)[:, :, None]  # [Rb, B, 1]
    r = torch.arange(base, device=dev)[:, None, None]  # [Rb, 1, 1]
    b = row_offset + torch.arange(B, device=dev)[None, :, None]  # [1, B, 1]
    pos = torch.arange(L, device=dev)[None, None, :]  # [1, 1, L]
    u = philox_uniform(seed, pos, b, r, torch.full_like(r, STREAM_POSITION))  # [Rb, B, L]
    masked = (u < rate) & maskable[None]  # [Rb, B, L]
    if antithetic:
        masked = torch.cat([masked, maskable[None] & ~masked], dim=0)  # [R, B, L]
    masked = masked.reshape(replicates * B, L)
    noisy = torch.where(masked, torch.full_like(ids, mask_id).repeat(replicates, 1), ids.repeat(replicates, 1))
    return noisy, masked


def forward_mask(
    ids: torch.Tensor,
    maskable: torch.Tensor,
    *,
    mask_id: int,
    replicates: int,
    antithetic: bool = True,
    rate_min: float = 0.1,
    rate_max: float = 1.0,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    row_offset: int = 0,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask ``ids`` for the denoising loss / ELBO.

    Args:
        ids: [B, L] int token ids.
        maskable: [B, L] bool, True where a position may be masked (completion tokens). Prompt and
            padding positions must be False: they are never masked.
        mask_id: the mask token id.
        replicates: R, number of noisy copies per sequence (even when ``antithetic``).
        antithetic: replicates R/2.. are the complements of replicates 0..R/2-1 within ``maskable``.
        rate_min, rate_max: the per-row mask rate λ ~ U[rate_min, rate_max).
        generator: torch generator the 62-bit Philox seed is drawn from (a CPU generator avoids a
            device sync); ignored when ``seed`` is given.
        seed: explicit Philox seed (reproducible across backends and batch layouts).
        row_offset: the Philox sequence counter of row 0 (row b uses ``row_offset + b``): a slice of
            a batch starting at row k, given ``row_offset=k``, gets exactly that slice of the batch's masks.
        impl: "auto" | "triton" | "chunked" | "eager" ("chunked" is the eager code: it holds no
            vocabulary-sized tensor).
    Returns:
        noisy: [R*B, L] ids with masked positions set to ``mask_id``; masked: [R*B, L] bool.
        Row ``r*B + b`` is replicate r of sequence b.
    """
    _check(ids, maskable, mask_id, replicates, antithetic, rate_min, rate_max)
    if seed is None:
        seed = draw_seed(generator)
    elif not isinstance(seed, int) or seed < 0 or seed >= 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    if not isinstance(row_offset, int) or isinstance(row_offset, bool) or not 0 <= row_offset < 2**32 - ids.shape[0]:
        raise ValueError(f"row_offset must be an int in [0, 2**32 - B), got {row_offset!r}")
    impl = resolve_impl(impl, ids.device)
    kwargs = dict(
        mask_id=mask_id,
        replicates=replicates,
        antithetic=antithetic,
        rate_min=float(rate_min),
        rate_max=float(rate_max),
        seed=seed,
        row_offset=row_offset,
    )
    if impl == "triton":
        from dmpo_fast.kernels.forward_mask import forward_mask_triton

        return forward_mask_triton(ids, maskable, **kwargs)
    return forward_mask_ref(ids, maskable, **kwargs)
