"""Triton ``forward_mask``: noisy ids and the mask in one pass, from the Philox stream.

Computes exactly ``dmpo_fast.ops.forward_mask.forward_mask_ref``: for base replicate r, sequence b and
position l, masked = maskable[b, l] & (U(seed; l, b, r, 0) < λ[r, b]), and with antithetic noise the
row of replicate r + R/2 is maskable & ~masked. One program handles BLOCK positions of one
(r, b) pair and writes both antithetic rows, so ids and maskable are read once for both.

The per-row rates λ [R/2, B] come from ``mask_rates`` (a few hundred numbers, one torch expression
shared with the reference) so the comparison is bit-identical across backends; only the per-position
uniforms, the comparison and the writes are fused here. U = top 24 bits of the first Philox word
· 2^-24, as in ``dmpo_fast.ops.philox.uniform_from_bits``.
"""

from __future__ import annotations

import torch

from dmpo_fast.kernels.runtime import require
from dmpo_fast.ops.forward_mask import STREAM_POSITION, mask_rates

triton, tl = require(__name__, "forward_mask(..., impl='eager')")


@triton.jit
def _forward_mask_kernel(
    ids_ptr,
    maskable_ptr,
    rate_ptr,
    noisy_ptr,
    masked_ptr,
    seed,
    row_offset,
    mask_id,
    B,
    L,
    stride_ids_b,
    stride_maskable_b,
    STREAM: tl.constexpr,
    ANTITHETIC: tl.constexpr,
    N_BASE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid_l = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    r = tl.program_id(2).to(tl.int64)
    offs = pid_l * BLOCK + tl.arange(0, BLOCK)
    inside = offs < L

    ids = tl.load(ids_ptr + b * stride_ids_b + offs, mask=inside, other=0)
    maskable = tl.load(maskable_ptr + b * stride_maskable_b + offs, mask=inside, other=0) != 0
    rate = tl.load(rate_ptr + r * B + b)

    zero = tl.zeros_like(offs).to(tl.uint32)
    bits, _, _, _ = tl.philox(seed, offs.to(tl.uint32), zero + (b + row_offset).to(tl.uint32), zero + r.to(tl.uint32), zero + STREAM)
    u = (bits >> 8).to(tl.float32) * (1.0 / 16777216.0)
    masked = maskable & (u < rate)

    row = r * B + b
    tl.store(noisy_ptr + row * L + offs, tl.where(masked, mask_id, ids), mask=inside)
    tl.store(masked_ptr + row * L + offs, masked.to(tl.int8), mask=inside)
    if ANTITHETIC:
        comp = maskable & (u >= rate)
        row2 = (r + N_BASE) * B + b
        tl.store(noisy_ptr + row2 * L + offs, tl.where(comp, mask_id, ids), mask=inside)
        tl.store(masked_ptr + row2 * L + offs, comp.to(tl.int8), mask=inside)


def forward_mask_triton(
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
    B, L = ids.shape
    base = replicates // 2 if antithetic else replicates
    ids = ids.contiguous() if ids.stride(1) != 1 else ids
    maskable = maskable.contiguous() if maskable.stride(1) != 1 else maskable
    rate = mask_rates(B, base, rate_min, rate_max, seed, ids.device, row_offset).contiguous()  # [Rb, B] fp32
    noisy = torch.empty(replicates * B, L, dtype=ids.dtype, device=ids.device)
    masked = torch.empty(replicates * B, L, dtype=torch.bool, device=ids.device)
    BLOCK = min(1024, triton.next_power_of_2(L))
    grid = (triton.cdiv(L, BLOCK), B, base)
    _forward_mask_kernel[grid](
        ids,
        maskable.view(torch.int8),
        rate,
        noisy,
        masked.view(torch.int8),
        seed,
        row_offset,
        mask_id,
        B,
        L,
        ids.stride(0),
        maskable.stride(0),
        STREAM=STREAM_POSITION,
        ANTITHETIC=antithetic,
        N_BASE=base,
        BLOCK=BLOCK,
    )
    return noisy, masked
