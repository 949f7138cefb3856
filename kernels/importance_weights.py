"""Triton ``importance_weights``: every group's softmax, baseline, ESS and coeff bisection in one launch.

Computes exactly ``dmpo_fast.ops.importance_weights.importance_weights_ref`` (see that module for the
formulas). One program per prompt group holds the group's G rewards and log-ratios in registers
(G is small: 4–64 rollouts), so the 32 bisection halvings for ``ess_target`` cost no memory traffic
and no host sync: the whole op is one launch instead of ~200 small torch kernels.
"""

from __future__ import annotations

import torch

from dmpo_fast.kernels.runtime import require
from dmpo_fast.ops.importance_weights import BISECTION_STEPS, COEFF_MAX, COEFF_MIN, ImportanceWeights

triton, tl = require(__name__, "importance_weights(..., impl='eager')")


@triton.jit
def _masked_softmax(x, valid):
    x = tl.where(valid, x, float("-inf"))
    m = tl.max(x, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)
    e = tl.where(valid, tl.exp(x - m), 0.0)
    s = tl.sum(e, axis=0)
    return e / tl.where(s > 0, s, 1.0)


@triton.jit
def _ess(p, G):
    sq = tl.sum(p * p, axis=0)
    return tl.where(sq > 0, 1.0 / (G * tl.maximum(sq, 1e-30)), 0.0)


@triton.jit
def _importance_weights_kernel(
    rewards_ptr,
    log_ratio_ptr,
    weights_ptr,
    raw_ptr,
    ess_ptr,
    coeff_ptr,
    invalid_ptr,
    params_ptr,  # [alpha, coeff, centering strength, ess target] in the compute dtype
    G,
    HAS_ALPHA: tl.constexpr,
    SOLVE_COEFF: tl.constexpr,
    BASELINE: tl.constexpr,  # 0 none/model, 1 group, 2 individual
    COEFF_LO: tl.constexpr,
    COEFF_HI: tl.constexpr,
    STEPS: tl.constexpr,
    F64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    g = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    inside = offs < G
    dt = tl.float64 if F64 else tl.float32
    alpha = tl.load(params_ptr + 0)
    coeff = tl.load(params_ptr + 1)
    centering = tl.load(params_ptr + 2)
    ess_target = tl.load(params_ptr + 3)
    r = tl.load(rewards_ptr + g * G + offs, mask=inside, other=0.0).to(dt)
    valid = inside & (tl.abs(r) < float("inf"))  # finite: excludes ±inf and NaN
    if HAS_ALPHA:
        lr = tl.load(log_ratio_ptr + g * G + offs, mask=inside, other=0.0).to(dt)
        valid = valid & (tl.abs(lr) < float("inf"))
        r = tl.where(valid, r, 0.0)
        lr = tl.where(valid, lr, 0.0)
        logits = lr + r / alpha
        anti = lr - r / alpha
    else:
        logits = tl.where(valid, r, 0.0)
        anti = -logits

    if SOLVE_COEFF:
        # ESS falls as coeff grows: bisect on [COEFF_LO, COEFF_HI] for ess(coeff) = ess_target.
        lo = COEFF_LO
        hi = COEFF_HI
        for _ in range(STEPS):
            mid = 0.5 * (lo + hi)
            too_flat = _ess(_masked_softmax(mid * logits, valid), G) > ess_target
            lo = tl.where(too_flat, mid, lo)
            hi = tl.where(too_flat, hi, mid)
        c = 0.5 * (lo + hi)
    else:
        c = coeff

    raw = _masked_softmax(c * logits, valid)
    if BASELINE == 1:
        n_valid = tl.maximum(tl.sum(valid.to(dt), axis=0), 1.0)
        w = tl.where(valid, raw - centering / n_valid, 0.0)
    elif BASELINE == 2:
        w = raw - centering * _masked_softmax(c * anti, valid)
    else:
        w = raw
    tl.store(weights_ptr + g * G + offs, w, mask=inside)
    tl.store(raw_ptr + g * G + offs, raw, mask=inside)
    tl.store(ess_ptr + g, _ess(raw, G))
    tl.store(coeff_ptr + g, c)
    tl.store(invalid_ptr + g * G + offs, (~valid).to(tl.int8), mask=inside)


_BASELINE_CODE = {"none": 0, "model": 0, "group": 1, "individual": 2}


def importance_weights_triton(
    rewards: torch.Tensor,
    log_ratio: torch.Tensor | None,
    *,
    group_size: int,
    alpha: float,
    coeff: float,
    baseline: str,
    centering_strength: float,
    ess_target: float | None,
) -> ImportanceWeights:
    N = rewards.shape[0]
    num_groups = N // group_size
    f64 = rewards.dtype == torch.float64 or (log_ratio is not None and log_ratio.dtype == torch.float64)
    dt = torch.float64 if f64 else torch.float32
    rewards = rewards.contiguous()
    has_alpha = alpha > 0
    lr = log_ratio.contiguous() if has_alpha else rewards  # dummy pointer when unused
    weights = torch.empty(N, dtype=dt, device=rewards.device)
    raw = torch.empty_like(weights)
    ess = torch.empty(num_groups, dtype=dt, device=rewards.device)
    c = torch.empty_like(ess)
    invalid = torch.empty(N, dtype=torch.bool, device=rewards.device)
    # Scalars travel as a tensor: Triton would pass Python floats as fp32, losing fp64 precision.
    params = torch.tensor(
        [alpha if has_alpha else 1.0, coeff, centering_strength, ess_target or 0.0], dtype=dt
    ).to(rewards.device, non_blocking=True)
    _importance_weights_kernel[(num_groups,)](
        rewards,
        lr,
        weights,
        raw,
        ess,
        c,
        invalid.view(torch.int8),
        params,
        group_size,
        HAS_ALPHA=has_alpha,
        SOLVE_COEFF=ess_target is not None,
        BASELINE=_BASELINE_CODE[baseline],
        COEFF_LO=COEFF_MIN,
        COEFF_HI=COEFF_MAX,
        STEPS=BISECTION_STEPS,
        F64=f64,
        BLOCK=max(2, triton.next_power_of_2(group_size)),
    )
    return ImportanceWeights(
        weights=weights, raw=raw, ess=ess, coeff=c, dropped=invalid.sum(), valid=~invalid
    )
