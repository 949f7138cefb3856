"""DMPO as pure functions over tensors: the ELBO estimator, the WDCE and WDDO losses, the EOS mask.

DMPO (arXiv 2510.08233) fits the policy p_θ to the reward-tilted target p* ∝ p_ref·exp(r/α). Rollouts
x_1..x_G of a prompt come from p_old; each gets an importance weight w (``dmpo_fast.importance_weights``)
and the policy minimises the weighted denoising cross-entropy

    WDCE = Σ_b (w_b − c_b) · mean_k [ 1/m_bk · Σ_{masked l} −log p_θ(x_bl | noisy_bk) ]

over R noisy copies k of each rollout (``forward_mask``: rate λ ~ U[rate_min, rate_max), Bernoulli per
completion token, antithetic complements), with m_bk the number of masked tokens and c_b a weight
baseline. Every function here takes whole prompt groups (a group never straddles a call), so the
group-wise baselines are exact per group.

Sequence log-likelihoods use the masked-diffusion ELBO with the same noising:

    ELBO(x) = mean_k (n_maskable / m_k) · Σ_{masked l} log p(x_l | noisy_k)

Policy and reference are scored on the *same* masks by passing the same ``seed`` (the noise is
counter-based, ``dmpo_fast.ops.philox``).

Where this departs from the reference implementation (and why):
- the "group" and "model" baselines and the ESS are computed per prompt group; the reference code
  computes them over each GPU's slice of the batch, which mixes groups when a group spans GPUs;
- WDDO uses the paper's scaling (weights G·softmax, mean 1 per group); the reference averages the
  softmax weights over the local batch, i.e. scales the first term by 1/G relative to the second
  (``ddo_a`` reproduces any ratio);
- the EOS padding after the answer is in the loss and the ELBO by default, as in the reference
  (``completion_mask(..., include_eos_padding=True)``); ``False`` keeps only tokens up to the first EOS;
- the reference's ``loss_mask_non_eos`` indexes with an int mask, which clears whole rows of the loss mask
  instead of the positions after the first EOS; ``include_eos_padding=False`` here clears only those
  positions (a bool mask per position);
- WDDO with ``ddo_indep_set`` false: the reference sums the ELBO over the R replicates; here both gaps use
  the mean over the R replicates (``_elbo_from_sums``), the same estimator as with independent sets, so
  ``ddo_beta`` means the same in both modes (the reference's sum scales the gap, and so β, by R);
- ESS targeting: the reference's ``find_coeff`` runs L-BFGS-B from coeff 0.5, which stalls when the
  softmax is saturated (a gradient of ~0) and returns a coeff whose ESS misses the target; here a
  bisection on log coeff (``importance_weights``, 32 halvings in [COEFF_MIN, COEFF_MAX]) reaches the
  target ESS whenever one exists;
- a reward function that returns None (or raises) scores the sample 0 in the reference, which then takes
  part in the group softmax as a wrong answer; here it is NaN and the sample is dropped (weight 0, counted
  in ``reward_failures``), so a grader's failure never counts as the model's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.nn.functional as F

from dmpo_fast.ops import forward_mask, linear_logprob, wdce_loss
from dmpo_fast.ops._common import check_tensor
from dmpo_fast.sharding import is_sharded

Baseline = Literal["none", "group", "individual", "model"]


class Denoiser(Protocol):
    """What the losses need from a model (``dmpo_fast.models.DiffusionLM`` provides it).

    logits = (hidden(ids) @ head_weight.T) · logit_scale; ``logit_scale`` is optional (default 1).
    """

    mask_id: int
    head_weight: torch.Tensor

    def hidden(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor: ...


@dataclass(frozen=True)
class NoiseConfig:
    """The forward-noising options shared by the ELBO and the losses."""

    replicates: int = 4
    antithetic: bool = True
    rate_min: float = 0.1
    rate_max: float = 1.0


# --------------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------------


def completion_mask(
    completion_ids: torch.Tensor, eos_id: int, *, include_eos_padding: bool = True
) -> torch.Tensor:
    """[N, Lc] bool: the completion positions that belong in the loss and the ELBO.

    With ``include_eos_padding`` every position counts (the EOS padding after the answer is
    part of what the model generates, as in LLaDA's SFT and DMPO's reference code). Without it, only
    the positions up to and including the first EOS count (all of them if there is no EOS).
    """
    check_tensor("completion_ids", completion_ids, ndim=2)
    if include_eos_padding:
        return torch.ones_like(completion_ids, dtype=torch.bool)
    is_eos = (completion_ids == eos_id).to(torch.int32)
    eos_before = torch.cumsum(is_eos, dim=1) - is_eos  # EOS strictly before this position
    return eos_before == 0


# --------------------------------------------------------------------------------------------------
# Scoring helpers (written once, used by the ELBO, the model baseline and WDDO)
# --------------------------------------------------------------------------------------------------


def _hidden_and_head(model: Denoiser, ids: torch.Tensor, attention_mask: torch.Tensor | None):
    """Hidden states with the model's logit scale folded in, and the head weight.

    A model sharded with FSDP is called through its root (``model(...)``, which is ``hidden``): that gathers
    the output matrix read next and registers its gradient's reduce-scatter (``dmpo_fast.sharding``)."""
    if is_sharded(model):
        hidden = model(ids, attention_mask=attention_mask)
    else:
        hidden = model.hidden(ids, attention_mask=attention_mask)  # [M, L, H]
    scale = float(getattr(model, "logit_scale", 1.0))
    if scale != 1.0:
        hidden = hidden * scale
    head = model.head_weight
    if head.dtype != hidden.dtype:
        head = head.to(hidden.dtype)
    return hidden, head


def masked_logprob_sums(
    hidden: torch.Tensor, head: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor, *, impl: str = "auto"
) -> torch.Tensor:
    """[M] per-row Σ_{masked l} log softmax(hidden[m, l] · headᵀ)[targets[m, l]]; only masked rows projected."""
    M, L, H = hidden.shape
    flat = masked.reshape(-1).nonzero().squeeze(1)  # [n_masked]
    logp = linear_logprob(
        hidden.reshape(M * L, H).index_select(0, flat), head, targets.reshape(-1).index_select(0, flat), impl=impl
    )
    return torch.zeros(M, dtype=logp.dtype, device=logp.device).index_add(0, flat // L, logp)


def _elbo_from_sums(sums: torch.Tensor, masked: torch.Tensor, maskable: torch.Tensor, replicates: int):
    """Per-sequence ELBO from per-row sums: mean over replicates of (n_maskable / m) · sum."""
    N = maskable.shape[0]
    m = masked.sum(dim=1).clamp_min(1).to(sums.dtype)  # [R*N]
    n = maskable.sum(dim=1).to(sums.dtype).repeat(replicates)  # [R*N]
    return (n / m * sums).reshape(replicates, N).mean(dim=0)


def _noise(ids, maskable, mask_id, noise: NoiseConfig, seed: int | None, generator, row_offset: int = 0):
    return forward_mask(
        ids,
        maskable,
        mask_id=mask_id,
        replicates=noise.replicates,
        antithetic=noise.antithetic,
        rate_min=noise.rate_min,
        rate_max=noise.rate_max,
        seed=seed,
        generator=generator,
        row_offset=row_offset,
    )


def _check_batch(ids, maskable, attention_mask):
    check_tensor("ids", ids, ndim=2, dtypes=(torch.int32, torch.int64))
    check_tensor("maskable", maskable, dtypes=(torch.bool,), shape=tuple(ids.shape))
    if attention_mask is not None:
        check_tensor("attention_mask", attention_mask, shape=tuple(ids.shape))


# --------------------------------------------------------------------------------------------------
# ELBO
# --------------------------------------------------------------------------------------------------


def elbo(
    model: Denoiser,
    ids: torch.Tensor,
    maskable: torch.Tensor,
    *,
    noise: NoiseConfig = NoiseConfig(),
    attention_mask: torch.Tensor | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    micro_batch: int | None = None,
    row_offset: int = 0,
    rows: torch.Tensor | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Per-sequence ELBO estimate of log p(x) [N] (see the module docstring).

    Args:
        model: a ``Denoiser``; ids: [N, L] prompt + completion; maskable: [N, L] bool (completion
        positions, see ``completion_mask``); attention_mask: [N, L] (0 = padding) or None.
        seed: Philox seed of the masks; score two models with the same seed to share masks.
        micro_batch: rows per model call (of the R·N noisy rows); None = all at once.
        row_offset: the global index of row 0 (``forward_mask``): a slice of a batch scored with its
            offset gets the masks it has inside the whole batch.
        rows: optional [N] bool, the sequences to score; the others cost no model call and get NaN.
            The masks of a scored row are the ones it gets when every row is scored.
    Returns:
        [N] in fp32, differentiable through the model when grad is enabled.
    """
    _check_batch(ids, maskable, attention_mask)
    N, R = ids.shape[0], noise.replicates
    noisy, masked = _noise(ids, maskable, model.mask_id, noise, seed, generator, row_offset)  # [R*N, L] each
    targets = ids.repeat(R, 1)
    am = attention_mask.repeat(R, 1) if attention_mask is not None else None
    if rows is not None:
        check_tensor("rows", rows, shape=(N,), dtypes=(torch.bool,))
        sel = rows.to(ids.device).repeat(R).nonzero().squeeze(1)
        noisy, targets, masked_sel = noisy[sel], targets[sel], masked[sel]
        am = am[sel] if am is not None else None
    else:
        masked_sel = masked
    step = max(1, micro_batch or noisy.shape[0])
    sums = []
    for s in range(0, noisy.shape[0], step):
        hidden, head = _hidden_and_head(model, noisy[s : s + step], None if am is None else am[s : s + step])
        sums.append(masked_logprob_sums(hidden, head, targets[s : s + step], masked_sel[s : s + step], impl=impl))
    sums = torch.cat(sums) if sums else torch.zeros(0, device=ids.device)
    if rows is not None:
        sums = torch.full((R * N,), float("nan"), dtype=sums.dtype, device=sums.device).index_copy(0, sel, sums)
    return _elbo_from_sums(sums, masked, maskable, R)


# --------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------


@dataclass
class LossOutput:
    loss: torch.Tensor  # 0-dim, to backpropagate
    stats: dict  # detached tensors for logging (no host sync here)


def _group_softmax(x: torch.Tensor, group_size: int, keep: torch.Tensor | None = None) -> torch.Tensor:
    x = x.reshape(-1, group_size)
    if keep is None:
        return torch.softmax(x, dim=-1).reshape(-1)
    keep = keep.reshape(-1, group_size)
    p = torch.softmax(x.masked_fill(~keep, float("-inf")), dim=-1)
    return p.nan_to_num(0.0).reshape(-1)  # a group with no kept row: all zeros


def tied_groups(rewards: torch.Tensor, group_size: int, *, tol: float = 1e-6) -> torch.Tensor:
    """[N / G] bool: groups whose finite rewards are all equal (within ``tol``), or that have fewer than two.

    Such a group carries no information about which rollout is better: under the "none" baseline its
    weights only re-fit the policy to its own samples, and under the others they are zero anyway. The
    trainer's ``drop_tied_groups`` gives them weight 0 (DAPO's "dynamic sampling" filter, arXiv 2503.14476).
    """
    check_tensor("rewards", rewards, ndim=1)
    if rewards.shape[0] % group_size:
        raise ValueError(f"group_size ({group_size}) must divide the number of rewards ({rewards.shape[0]})")
    r = rewards.float().reshape(-1, group_size)
    finite = torch.isfinite(r)
    hi = r.masked_fill(~finite, float("-inf")).amax(dim=1)
    lo = r.masked_fill(~finite, float("inf")).amin(dim=1)
    return (finite.sum(dim=1) < 2) | (hi - lo <= tol)


def wdce(
    model: Denoiser,
    ids: torch.Tensor,
    maskable: torch.Tensor,
    weights: torch.Tensor,
    *,
    group_size: int,
    noise: NoiseConfig = NoiseConfig(),
    attention_mask: torch.Tensor | None = None,
    baseline: Baseline = "none",
    log_p_old: torch.Tensor | None = None,
    centering_strength: float = 1.0,
    keep: torch.Tensor | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    row_offset: int = 0,
    impl: str = "auto",
) -> LossOutput:
    """Weighted denoising cross-entropy for whole prompt groups, fresh masks each call.

    Args:
        weights: [N] importance weights, already baseline-subtracted for "none" / "group" /
            "individual" (``importance_weights(...).weights``). For ``baseline="model"`` pass the raw
            weights and ``log_p_old``: the baseline c_b = s · softmax_group(ELBO_θ(x_b) − log p_old(x_b))
            is estimated from this very forward pass (detached) and subtracted here.
        log_p_old: [N] rollout-time ELBO of the policy (needed for ``baseline="model"``).
        keep: optional [N] bool, the rows that carry weight (False: a sample dropped for a failed reward
            or a tied group). For ``baseline="model"`` the softmax of c_b runs over the kept rows of each
            group only, and a group with none gets c_b = 0; the other baselines come subtracted already.
    Returns:
        ``LossOutput(loss, stats)``; the loss is Σ over sequences and mean over replicates.
    """
    _check_batch(ids, maskable, attention_mask)
    N = ids.shape[0]
    check_tensor("weights", weights, shape=(N,))
    if N % group_size:
        raise ValueError(f"group_size ({group_size}) must divide the number of sequences ({N})")
    if baseline not in ("none", "group", "individual", "model"):
        raise ValueError(f"baseline must be one of ('none', 'group', 'individual', 'model'), got {baseline!r}")
    if baseline == "model" and log_p_old is None:
        raise ValueError("baseline='model' needs log_p_old (the rollout-time ELBO of the policy)")
    R = noise.replicates
    noisy, masked = _noise(ids, maskable, model.mask_id, noise, seed, generator, row_offset)  # [R*N, L]
    targets = ids.repeat(R, 1)
    am = attention_mask.repeat(R, 1) if attention_mask is not None else None
    w = weights.detach().float()
    row_weights = w.repeat(R) / R  # [R*N], replicate-major like the rows
    stats = {}
    if baseline != "model" and bool((w == 0).any()):
        # A sequence of weight 0 adds nothing to the loss or its gradient, so it costs no model call (its
        # masks are still drawn: the other rows keep the masks they have in the whole batch). If no row has
        # weight, one is kept so the loss stays a graph over the parameters (worth exactly 0).
        sel = (row_weights != 0).nonzero().squeeze(1)
        sel = sel if sel.numel() else sel.new_zeros(1)
        noisy, targets, masked, row_weights = noisy[sel], targets[sel], masked[sel], row_weights[sel]
        am = None if am is None else am[sel]
    hidden, head = _hidden_and_head(model, noisy, am)  # [rows, L, H]
    if baseline == "model":
        with torch.no_grad():
            sums = masked_logprob_sums(hidden.detach(), head.detach(), targets, masked, impl=impl)
            elbo_now = _elbo_from_sums(sums, masked, maskable, R)
            if keep is not None:
                check_tensor("keep", keep, shape=(N,), dtypes=(torch.bool,))
            c = centering_strength * _group_softmax(elbo_now - log_p_old.float(), group_size, keep)
        w = w - c
        row_weights = w.repeat(R) / R
        stats["elbo"] = elbo_now
    loss = wdce_loss(hidden, head, targets, masked, row_weights, impl=impl)
    stats["masked_tokens"] = (masked.sum(1) * (row_weights != 0)).sum()  # tokens that carry weight; no sync
    stats["effective_weights"] = w
    return LossOutput(loss, stats)


def wddo(
    model: Denoiser,
    ids: torch.Tensor,
    maskable: torch.Tensor,
    raw_weights: torch.Tensor,
    log_p_old: torch.Tensor,
    *,
    group_size: int,
    noise: NoiseConfig = NoiseConfig(),
    attention_mask: torch.Tensor | None = None,
    beta: float = 1.0,
    a: float = 1.0,
    independent_sets: bool = True,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    row_offset: int = 0,
    impl: str = "auto",
) -> LossOutput:
    """Weighted direct discriminative optimisation (DMPO §3.4):

        WDDO = −mean_b[ w̃_b · logσ(β·gap_b) ] − a · mean_b[ logσ(−β·gap'_b) ],
        gap = ELBO_θ(x) − log p_old(x),   w̃ = G · softmax weights (mean 1 per group).

    With ``independent_sets`` the first R/2 replicates estimate ``gap`` and the other R/2 ``gap'``
    (with antithetic noise these are the complements of the first half); otherwise both use all R.
    ``raw_weights`` are the softmax weights before any baseline (``importance_weights(...).raw``).
    """
    _check_batch(ids, maskable, attention_mask)
    N = ids.shape[0]
    check_tensor("raw_weights", raw_weights, shape=(N,))
    check_tensor("log_p_old", log_p_old, shape=(N,))
    if N % group_size:
        raise ValueError(f"group_size ({group_size}) must divide the number of sequences ({N})")
    R = noise.replicates
    if independent_sets and R % 2:
        raise ValueError(f"independent_sets=True splits the replicates in halves: replicates must be even, got {R}")
    noisy, masked = _noise(ids, maskable, model.mask_id, noise, seed, generator, row_offset)
    targets = ids.repeat(R, 1)
    am = attention_mask.repeat(R, 1) if attention_mask is not None else None
    hidden, head = _hidden_and_head(model, noisy, am)
    sums = masked_logprob_sums(hidden, head, targets, masked, impl=impl)  # [R*N], differentiable
    lp_old = log_p_old.detach().float()
    if independent_sets:
        half = R // 2 * N
        gap_real = _elbo_from_sums(sums[:half], masked[:half], maskable, R // 2) - lp_old
        gap_fake = _elbo_from_sums(sums[half:], masked[half:], maskable, R // 2) - lp_old
    else:
        gap_real = gap_fake = _elbo_from_sums(sums, masked, maskable, R) - lp_old
    w = group_size * raw_weights.detach().float()
    loss = -(w * F.logsigmoid(beta * gap_real)).mean() - a * F.logsigmoid(-beta * gap_fake).mean()
    return LossOutput(loss, {"gap": gap_real.detach(), "masked_tokens": masked.sum()})
