"""``importance_weights``: DMPO's per-sequence weights, a softmax over each prompt's group of rollouts.

DMPO matches the policy to the reward-tilted target p* ∝ p_ref · exp(r / α). Rollouts come from
p_old, so each one is reweighted by p*/p_old ∝ exp(log p_ref − log p_old + r/α), self-normalised over
the G rollouts of its prompt (consecutive rows form a group):

    alpha > 0:  raw = softmax_group(coeff · (log_ratio + r / alpha))        log_ratio = log p_ref − log p_old
    alpha == 0: raw = softmax_group(coeff · r)

Weight-baseline subtraction (lowers the variance of the weighted denoising loss at small G):
    "none":       weights = raw
    "group":      weights = raw − s · mean_group(raw)          (= raw − s / G_valid)
    "individual": weights = raw − s · softmax_group(coeff · (log_ratio − r / alpha))
                  (alpha == 0: softmax_group(−coeff · r)), the weights of the oppositely tilted target
    "model":      weights = raw; the baseline needs the current model's ELBO and is subtracted in the
                  loss (``dmpo_fast.dmpo.wdce``).
with s = ``centering_strength``. ess = 1 / (G · Σ raw²) per group, in [1/G, 1].

``coeff`` is an inverse temperature. With ``ess_target`` it is solved per group in [0.01, 0.99] by
bisection on the tensor's device (fixed 32 halvings, no host sync, no scipy) so that ess ≈ ess_target;
ESS decreases monotonically in coeff, so the bisection converges to the endpoint when the target is
out of reach.

Non-finite inputs never become NaN weights: a sample whose reward (or, for alpha > 0, log-ratio) is
not finite gets weight 0, its group is renormalised over the remaining samples, and ``dropped`` counts
such samples. A group with no finite sample gets all-zero weights and ess 0.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from dmpo_fast.ops._common import FLOAT_DTYPES, check_same_device, check_tensor, compute_dtype, resolve_impl

BASELINES = ("none", "group", "individual", "model")
COEFF_MIN, COEFF_MAX = 0.01, 0.99
BISECTION_STEPS = 32


class ImportanceWeights(NamedTuple):
    weights: torch.Tensor  # [N] baseline-subtracted weights, 0 for dropped samples
    raw: torch.Tensor  # [N] softmax weights before the baseline (sum to 1 per group with a valid sample)
    ess: torch.Tensor  # [G] normalised effective sample size of raw
    coeff: torch.Tensor  # [G] the inverse temperature used per group
    dropped: torch.Tensor  # 0-dim int64: samples dropped for a non-finite reward or log-ratio
    valid: torch.Tensor  # [N] bool: the samples that were kept


def _check(rewards, log_ratio, group_size, alpha, coeff, baseline, centering_strength, ess_target):
    check_tensor("rewards", rewards, ndim=1, dtypes=FLOAT_DTYPES)
    n = rewards.shape[0]
    if n == 0:
        raise ValueError("rewards must be non-empty, got an empty batch")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if n % group_size:
        raise ValueError(f"group_size ({group_size}) must divide the number of rewards ({n})")
    if not isinstance(alpha, (int, float)) or not alpha >= 0 or alpha == float("inf"):
        raise ValueError(f"alpha must be a finite float >= 0, got {alpha!r}")
    if log_ratio is None:
        if alpha > 0:
            raise ValueError("log_ratio is required when alpha > 0 (log p_ref − log p_old per sample)")
    else:
        check_tensor("log_ratio", log_ratio, dtypes=FLOAT_DTYPES, shape=(n,))
        check_same_device(rewards=rewards, log_ratio=log_ratio)
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
    if not isinstance(centering_strength, (int, float)) or not 0.0 <= centering_strength <= 1.0:
        raise ValueError(f"centering_strength must be a float in [0, 1], got {centering_strength!r}")
    if ess_target is None:
        if not isinstance(coeff, (int, float)) or not coeff > 0 or coeff == float("inf"):
            raise ValueError(f"coeff must be a finite float > 0, got {coeff!r}")
    elif not isinstance(ess_target, (int, float)) or not 0.0 < ess_target <= 1.0:
        raise ValueError(f"ess_target must be a float in (0, 1] or None, got {ess_target!r}")


def _masked_softmax(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim restricted to ``valid``; rows with nothing valid give zeros."""
    x = x.masked_fill(~valid, float("-inf"))
    m = x.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(x - m)  # exp(-inf) = 0 at invalid entries
    s = e.sum(dim=-1, keepdim=True)
    return e / torch.where(s > 0, s, torch.ones_like(s))


def _ess(raw: torch.Tensor) -> torch.Tensor:
    """1 / (G · Σ raw²) per group of the [G, group] tensor; 0 for an all-zero group."""
    sq = (raw * raw).sum(dim=-1)
    return torch.where(sq > 0, 1.0 / (raw.shape[-1] * sq.clamp_min(1e-30)), torch.zeros_like(sq))


def importance_weights_ref(
    rewards: torch.Tensor,
    log_ratio: torch.Tensor | None,
    *,
    group_size: int,
    alpha: float,
    coeff: float = 1.0,
    baseline: str = "individual",
    centering_strength: float = 1.0,
    ess_target: float | None = None,
) -> ImportanceWeights:
    """Eager reference (also the CPU path): vectorised over groups, no host sync."""
    dt = compute_dtype(rewards.dtype, log_ratio.dtype if log_ratio is not None else rewards.dtype)
    G = group_size
    r = rewards.to(dt).reshape(-1, G)  # [num_groups, G]
    valid = torch.isfinite(r)
    if alpha > 0:
        lr = log_ratio.to(dt).reshape(-1, G)
        valid = valid & torch.isfinite(lr)
        r0 = torch.where(valid, r, torch.zeros_like(r))
        lr0 = torch.where(valid, lr, torch.zeros_like(lr))
        logits, anti = lr0 + r0 / alpha, lr0 - r0 / alpha
    else:
        logits = torch.where(valid, r, torch.zeros_like(r))
        anti = -logits

    if ess_target is None:
        c = torch.full((r.shape[0], 1), float(coeff), dtype=dt, device=r.device)
    else:
        lo = torch.full((r.shape[0], 1), COEFF_MIN, dtype=dt, device=r.device)
        hi = torch.full_like(lo, COEFF_MAX)
        for _ in range(BISECTION_STEPS):
            mid = 0.5 * (lo + hi)
            too_flat = _ess(_masked_softmax(mid * logits, valid))[:, None] > ess_target
            # ESS falls as coeff grows: too flat -> raise coeff, else lower it.
            lo = torch.where(too_flat, mid, lo)
            hi = torch.where(too_flat, hi, mid)
        c = 0.5 * (lo + hi)

    raw = _masked_softmax(c * logits, valid)  # [num_groups, G]
    s = float(centering_strength)
    if baseline == "group":
        n_valid = valid.sum(dim=-1, keepdim=True).clamp_min(1).to(dt)  # int / float would give fp32
        weights = torch.where(valid, raw - s / n_valid, torch.zeros_like(raw))
    elif baseline == "individual":
        weights = raw - s * _masked_softmax(c * anti, valid)
    else:  # "none", and "model" whose baseline is applied in the loss
        weights = raw
    return ImportanceWeights(
        weights=weights.reshape(-1),
        raw=raw.reshape(-1),
        ess=_ess(raw),
        coeff=c.squeeze(1),
        dropped=(~valid).sum(),
        valid=valid.reshape(-1),
    )


def importance_weights(
    rewards: torch.Tensor,
    log_ratio: torch.Tensor | None,
    *,
    group_size: int,
    alpha: float,
    coeff: float = 1.0,
    baseline: str = "individual",
    centering_strength: float = 1.0,
    ess_target: float | None = None,
    impl: str = "auto",
) -> ImportanceWeights:
    """Per-sequence DMPO importance weights (see the module docstring for the formulas).

    Args:
        rewards: [N] float; consecutive ``group_size`` rows are the rollouts of one prompt.
        log_ratio: [N] float, log p_ref − log p_old per rollout; may be None when ``alpha == 0``.
        group_size: G, must divide N.
        alpha: KL strength of the target p* ∝ p_ref·exp(r/α); 0 ignores the log-ratio.
        coeff: inverse temperature of the softmax (ignored when ``ess_target`` is set).
        baseline: "none" | "group" | "individual" | "model".
        centering_strength: s in [0, 1], the fraction of the baseline subtracted.
        ess_target: if set, solve coeff per group in [0.01, 0.99] so that ess ≈ ess_target.
        impl: "auto" | "triton" | "chunked" | "eager" (chunked = eager: there is no large tensor).
    Returns:
        ``ImportanceWeights(weights[N], raw[N], ess[G], coeff[G], dropped, valid[N])``; inputs are
        never differentiated (weights are constants of the loss).
    """
    _check(rewards, log_ratio, group_size, alpha, coeff, baseline, centering_strength, ess_target)
    impl = resolve_impl(impl, rewards.device)
    kwargs = dict(
        group_size=group_size,
        alpha=float(alpha),
        coeff=float(coeff),
        baseline=baseline,
        centering_strength=float(centering_strength),
        ess_target=None if ess_target is None else float(ess_target),
    )
    rewards = rewards.detach()
    log_ratio = log_ratio.detach() if log_ratio is not None else None
    if impl == "triton":
        from dmpo_fast.kernels.importance_weights import importance_weights_triton

        return importance_weights_triton(rewards, log_ratio, **kwargs)
    return importance_weights_ref(rewards, log_ratio, **kwargs)
