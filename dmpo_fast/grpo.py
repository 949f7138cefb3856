"""diffu-GRPO (d1, arXiv 2504.12216) as pure functions: the baseline DMPO and MRO are compared against.

GRPO needs per-token log-probs of a completion under the policy; a masked-diffusion LM has no cheap exact
ones, so d1 uses a one-step estimate: mask the whole completion, mask each prompt token with probability
``p_mask_prompt`` (0.15), run the model once and read log p(o_k | masked) at every completion position k. The
prompt masks are redrawn for every inner update (a random seed per iteration), a regulariser that keeps the μ
updates on one batch from over-fitting the same view; the old-policy and reference log-probs of iteration i
are taken with the *same* masks as the policy's at iteration i.

    A_i   = r_i − mean_{group}(r)                                  (no division by the std, as d1)
    ρ_ik  = exp(log π_θ(o_ik) − log π_old(o_ik))
    KL_ik = exp(log π_ref − log π_θ) − (log π_ref − log π_θ) − 1    (k3 estimator)
    loss  = Σ_ik m_ik [ −min(ρ_ik A_i, clip(ρ_ik, 1 − ε, 1 + ε) A_i) + β KL_ik ] / Σ_ik m_ik

m is the completion mask (up to and including the first EOS). With μ = 1 the old log-probs are the current
ones detached (ρ = 1 in value, ∇ρ = ∇ log π), as in d1.

Where this departs from d1 (and why):
- the prompt masks are Philox draws keyed by (seed, position, row key), so the policy, old and reference
  passes of one iteration see identical masks whatever the micro-batching (d1 seeds torch's global RNG for
  the whole batch); left padding is never masked (d1 masks every column of the padded prompt);
- the loss can be normalised by the token count of the whole buffer (``normalizer``), so accumulating
  micro-batches gives the same gradient as one batch (d1 averages per micro-batch);
- ``scale_rewards="std"`` divides by the group std (original GRPO); the default "none" is d1's.
- d1's released configs use ε = 0.5, μ = 12; the defaults here (ε = 0.2, μ = 1) are the GRPO paper's.

Log-probs are read through ``dmpo_fast.ops.linear_logprob`` on the completion rows of the hidden states, so
the [N, L, V] logits are never materialised.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import torch

from dmpo_fast.dmpo import LossOutput, _hidden_and_head
from dmpo_fast.ops import linear_logprob
from dmpo_fast.ops._common import check_tensor
from dmpo_fast.ops.philox import philox_uniform

# Philox stream of the prompt masks (c3 word), distinct from forward_mask's streams 0 and 1.
STREAM_PROMPT_MASK = 5

Normalize = Literal["token", "sequence"]


@dataclass(frozen=True)
class GRPOConfig:
    """diffu-GRPO options (defaults: d1 / GRPO papers).

    group_size: rollouts per prompt G (consecutive rows form a group).
    num_iterations: μ, inner policy updates per rollout batch (d1's released runs: 12).
    epsilon: clip range ε of the ratio (GRPO paper 0.2; d1's configs 0.5).
    beta: KL coefficient β against the reference (d1: 0.04); 0 skips the reference entirely.
    p_mask_prompt: probability of masking each prompt token in the one-step estimate (d1: 0.15).
    random_masking: a fresh prompt mask per inner iteration (d1: True); False uses one mask for all.
    scale_rewards: "none" (d1: A = r − mean) or "std" (A = (r − mean) / (std + 1e-4), original GRPO).
    normalize: "token" (d1: mean over every completion token of the batch) or "sequence" (mean per sequence,
        then over sequences, as the GRPO paper).
    """

    group_size: int = 8
    num_iterations: int = 1
    epsilon: float = 0.2
    beta: float = 0.04
    p_mask_prompt: float = 0.15
    random_masking: bool = True
    scale_rewards: Literal["none", "std"] = "none"
    normalize: Normalize = "token"

    def __post_init__(self):
        for name in ("group_size", "num_iterations"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if not self.epsilon > 0:
            raise ValueError(f"epsilon must be > 0, got {self.epsilon!r}")
        if not self.beta >= 0:
            raise ValueError(f"beta must be >= 0, got {self.beta!r}")
        if not 0.0 <= self.p_mask_prompt <= 1.0:
            raise ValueError(f"p_mask_prompt must be in [0, 1], got {self.p_mask_prompt!r}")
        if self.scale_rewards not in ("none", "std"):
            raise ValueError(f"scale_rewards must be one of ('none', 'std'), got {self.scale_rewards!r}")
        if self.normalize not in ("token", "sequence"):
            raise ValueError(f"normalize must be one of ('token', 'sequence'), got {self.normalize!r}")


# --------------------------------------------------------------------------------------------------
# Advantages
# --------------------------------------------------------------------------------------------------


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: str = "none") -> torch.Tensor:
    """[N] r − group mean (÷ (group std + 1e-4) with ``scale="std"``); NaN rewards (failed) get advantage 0
    and are left out of their group's mean and std."""
    check_tensor("rewards", rewards, ndim=1)
    N = rewards.shape[0]
    if N % group_size:
        raise ValueError(f"group_size ({group_size}) must divide the number of rollouts ({N})")
    if scale not in ("none", "std"):
        raise ValueError(f"scale must be one of ('none', 'std'), got {scale!r}")
    r = rewards.float().view(-1, group_size)
    ok = torch.isfinite(r)
    n = ok.sum(dim=1, keepdim=True).clamp_min(1)
    r0 = torch.where(ok, r, 0.0)
    mean = r0.sum(dim=1, keepdim=True) / n
    adv = torch.where(ok, r - mean, 0.0)
    if scale == "std":
        # Unbiased std over the finite rewards, as torch.std in GRPO implementations.
        var = (adv**2).sum(dim=1, keepdim=True) / (n - 1).clamp_min(1)
        adv = adv / (var.sqrt() + 1e-4)
    return adv.reshape(N)


# --------------------------------------------------------------------------------------------------
# One-step log-probs
# --------------------------------------------------------------------------------------------------


def prompt_mask_draw(
    ids: torch.Tensor,
    maskable: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    p_mask_prompt: float,
    seed: int,
    row_keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """[N, L] bool: the positions the one-step estimate masks — every ``maskable`` (completion) position, and
    each real prompt token with probability p (uniform(seed; position, row key, 0, stream) < p)."""
    N, L = ids.shape
    keys = torch.arange(N, device=ids.device) if row_keys is None else row_keys.to(ids.device, torch.int64)
    pos = torch.arange(L, device=ids.device)[None, :]
    u = philox_uniform(
        seed, pos, keys[:, None], torch.zeros_like(pos), torch.full_like(pos, STREAM_PROMPT_MASK)
    )
    real = torch.ones_like(maskable) if attention_mask is None else attention_mask.bool()
    prompt = real & ~maskable
    return maskable | (prompt & (u < p_mask_prompt))


def diffu_grpo_logprobs(
    model,
    ids: torch.Tensor,
    maskable: torch.Tensor | int,
    *,
    attention_mask: torch.Tensor | None = None,
    p_mask_prompt: float = 0.15,
    seed: int,
    row_keys: torch.Tensor | None = None,
    score_mask: torch.Tensor | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """d1's one-step per-token log-probs: ``[N, L]`` fp32, log p(ids[n, l] | masked input) at the scored
    positions, 0 elsewhere. One model forward; differentiable when grad is enabled.

    Args:
        ids: [N, L] prompt + completion. maskable: [N, L] bool, the completion positions (all masked), or an
            int P meaning "positions >= P". attention_mask: [N, L] (0 = left padding, never masked) or None.
        seed: Philox seed of the prompt masks; old / reference / policy passes of one iteration share it.
        row_keys: [N] per-row Philox keys (default 0..N-1): pass the rows' indices in the whole batch so
            micro-batches draw the masks the full batch would.
        score_mask: [N, L] bool, the positions to project (default: every maskable one); must lie inside
            ``maskable``. Skipping the EOS padding after the answer saves its projections.
    """
    check_tensor("ids", ids, ndim=2, dtypes=(torch.int32, torch.int64))
    N, L = ids.shape
    if isinstance(maskable, int) and not isinstance(maskable, bool):
        if not 0 <= maskable < L:
            raise ValueError(f"maskable as a prompt length must be in [0, {L}), got {maskable}")
        maskable = (torch.arange(L, device=ids.device) >= maskable).expand(N, L)
    check_tensor("maskable", maskable, dtypes=(torch.bool,), shape=(N, L))
    if attention_mask is not None:
        check_tensor("attention_mask", attention_mask, shape=(N, L))
    if score_mask is None:
        score_mask = maskable
    check_tensor("score_mask", score_mask, dtypes=(torch.bool,), shape=(N, L))
    if not 0.0 <= p_mask_prompt <= 1.0:
        raise ValueError(f"p_mask_prompt must be in [0, 1], got {p_mask_prompt!r}")
    masked = prompt_mask_draw(
        ids, maskable, attention_mask, p_mask_prompt=p_mask_prompt, seed=seed, row_keys=row_keys
    )
    noisy = torch.where(masked, model.mask_id, ids)
    hidden, head = _hidden_and_head(model, noisy, attention_mask)  # [N, L, H]
    flat = (score_mask & maskable).reshape(-1).nonzero().squeeze(1)  # [n]
    logp = linear_logprob(
        hidden.reshape(N * L, -1).index_select(0, flat),
        head,
        ids.reshape(-1).index_select(0, flat),
        impl=impl,
    )
    out = torch.zeros(N * L, dtype=torch.float32, device=ids.device)
    return out.index_put((flat,), logp.float()).view(N, L)


# --------------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------------


def diffu_grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    epsilon: float = 0.2,
    beta: float = 0.04,
    normalize: Normalize = "token",
    normalizer: float | None = None,
) -> LossOutput:
    """The clipped GRPO objective with the k3 KL (module docstring), over per-token log-probs [N, T].

    Args:
        logp: [N, T] policy log-probs (with grad); old_logp: [N, T] at rollout time, or None (μ = 1: the
            detached ``logp``); ref_logp: [N, T] reference log-probs, needed when beta > 0.
        advantages: [N]; completion_mask: [N, T] bool (tokens in the loss).
        normalize: "token" — Σ / (number of loss tokens); "sequence" — Σ_i (Σ_t / n_i) / N.
        normalizer: overrides the denominator (total tokens for "token", total sequences for "sequence"):
            pass the whole batch's count when the batch is split into micro-batches.
    Returns:
        ``LossOutput(loss, stats)`` with stats kl (mean), clip_ratio (share of tokens where the clipped term
        is the active one), ratio_mean, masked_tokens (tokens in the loss).
    """
    check_tensor("logp", logp, ndim=2)
    N, T = logp.shape
    check_tensor("completion_mask", completion_mask, dtypes=(torch.bool,), shape=(N, T))
    check_tensor("advantages", advantages, shape=(N,))
    if old_logp is not None:
        check_tensor("old_logp", old_logp, shape=(N, T))
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta!r}")
    if beta > 0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs ref_logp (the reference model's log-probs)")
        check_tensor("ref_logp", ref_logp, shape=(N, T))
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon!r}")
    if normalize not in ("token", "sequence"):
        raise ValueError(f"normalize must be one of ('token', 'sequence'), got {normalize!r}")
    logp = logp.float()
    old = logp.detach() if old_logp is None else old_logp.detach().float()
    adv = advantages.detach().float()[:, None]  # [N, 1]
    ratio = torch.exp(logp - old)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - epsilon, 1.0 + epsilon) * adv
    per_token = -torch.minimum(unclipped, clipped)  # [N, T]
    stats = {}
    m = completion_mask.float()
    if beta > 0:
        d = ref_logp.detach().float() - logp
        kl = torch.exp(d) - d - 1.0
        per_token = per_token + beta * kl
        stats["kl"] = ((kl * m).sum() / m.sum().clamp_min(1)).detach()
    if normalize == "token":
        loss = (per_token * m).sum() / (m.sum().clamp_min(1) if normalizer is None else float(normalizer))
    else:
        per_seq = (per_token * m).sum(dim=1) / m.sum(dim=1).clamp_min(1)
        loss = per_seq.sum() / (N if normalizer is None else float(normalizer))
    stats["clip_ratio"] = (((clipped < unclipped).float() * m).sum() / m.sum().clamp_min(1)).detach()
    stats["ratio_mean"] = ((ratio * m).sum() / m.sum().clamp_min(1)).detach()
    stats["masked_tokens"] = m.sum().detach()  # the trainer's throughput counter
    return LossOutput(loss, stats)


# --------------------------------------------------------------------------------------------------
# Trainer entry points: a rollout buffer, then one loss per optimizer step
# --------------------------------------------------------------------------------------------------


def _reference_scope(reference):
    """A context giving the reference model: None, a model, or a zero-arg callable returning a context."""
    if reference is None or hasattr(reference, "hidden"):
        return contextlib.nullcontext(reference)
    if callable(reference):
        return reference()
    raise ValueError(f"reference must be None, a model or a callable returning a context, got {reference!r}")


def iteration_seeds(seed: int, num_iterations: int, random_masking: bool) -> list[int]:
    """One Philox seed per inner iteration (all equal without random masking)."""
    g = torch.Generator().manual_seed(seed)
    draws = torch.randint(0, 2**62, (num_iterations,), generator=g).tolist()
    return draws if random_masking else [draws[0]] * num_iterations


@torch.no_grad()
def make_buffer(
    policy,
    rollout,
    rewards: torch.Tensor,
    cfg: GRPOConfig,
    *,
    seed: int,
    reference=None,
    row_offset: int = 0,
    rows_total: int | None = None,
    tokens_total: float | None = None,
    impl: str = "auto",
) -> dict:
    """Everything the μ inner updates on one rollout batch need.

    Args:
        rollout: a ``dmpo_fast.sampling.Rollout`` of N = prompts × group_size rows (groups consecutive).
        rewards: [N] (NaN = failed reward: advantage 0). seed: derives the per-iteration mask seeds.
        reference: the reference model (needed when beta > 0): a model, or a zero-arg callable returning a
            context manager that yields it (the trainer's adapter-disabled / frozen-copy switch).
        row_offset, rows_total, tokens_total: when this batch is one process's share of a larger one, the
            index of its first row in the whole batch (the rows' mask keys) and the whole batch's rollouts
            and completion tokens (the loss denominators), so the shares' losses add up to the whole
            batch's. Defaults: this batch alone.
    Returns:
        a dict of row-indexed tensors (sliceable by rows for micro-batches) — ids, attention_mask, maskable,
        completion_mask, row_keys, advantages, rewards, old_logp [N, μ, L] (μ > 1), ref_logp [N, μ, L]
        (β > 0) — and scalars: mask_seeds (list), tokens_total, rows_total.
    """
    ids, am, P = rollout.ids, rollout.attention_mask, rollout.prompt_length
    N, L = ids.shape
    maskable = torch.zeros(N, L, dtype=torch.bool, device=ids.device)
    maskable[:, P:] = True  # the whole completion is masked (d1), the loss counts up to the first EOS
    completion_mask = torch.zeros_like(maskable)
    completion_mask[:, P:] = rollout.completion_mask
    row_keys = torch.arange(row_offset, row_offset + N, device=ids.device)
    seeds = iteration_seeds(seed, cfg.num_iterations, cfg.random_masking)
    kw = dict(
        attention_mask=am, p_mask_prompt=cfg.p_mask_prompt, row_keys=row_keys, score_mask=completion_mask,
        impl=impl,
    )  # fmt: skip
    buf = {
        "ids": ids, "attention_mask": am, "maskable": maskable, "completion_mask": completion_mask,
        "row_keys": row_keys, "rewards": rewards.float().to(ids.device),
        "advantages": group_advantages(rewards.to(ids.device), cfg.group_size, scale=cfg.scale_rewards),
        "mask_seeds": seeds, "rows_total": N if rows_total is None else rows_total,
        "tokens_total": float(completion_mask.sum()) if tokens_total is None else float(tokens_total),
    }  # fmt: skip
    if cfg.num_iterations > 1:
        old = [diffu_grpo_logprobs(policy, ids, maskable, seed=s, **kw) for s in seeds]
        buf["old_logp"] = torch.stack(old, dim=1)  # [N, μ, L]: rows first, so micro-batches slice it
    if cfg.beta > 0:
        with _reference_scope(reference) as ref:
            if ref is None:
                raise ValueError("beta > 0 needs a reference model")
            refs = [diffu_grpo_logprobs(ref, ids, maskable, seed=s, **kw) for s in seeds]
        buf["ref_logp"] = torch.stack(refs, dim=1)  # [N, μ, L]
    return buf


def loss_step(policy, buf: dict, cfg: GRPOConfig, step: int, *, impl: str = "auto") -> LossOutput:
    """The diffu-GRPO loss of optimizer step ``step`` (inner iteration ``step % μ``) on a buffer, or on a
    row slice of one (micro-batch): the denominators are the whole buffer's."""
    it = step % cfg.num_iterations
    cm = buf["completion_mask"]
    logp = diffu_grpo_logprobs(
        policy, buf["ids"], buf["maskable"], attention_mask=buf["attention_mask"],
        p_mask_prompt=cfg.p_mask_prompt, seed=buf["mask_seeds"][it], row_keys=buf["row_keys"], score_mask=cm,
        impl=impl,
    )  # fmt: skip
    old = buf["old_logp"][:, it] if "old_logp" in buf else None
    ref = buf["ref_logp"][:, it] if "ref_logp" in buf else None
    normalizer = buf["tokens_total"] if cfg.normalize == "token" else buf["rows_total"]
    return diffu_grpo_loss(
        logp, old, ref, buf["advantages"], cm, epsilon=cfg.epsilon, beta=cfg.beta, normalize=cfg.normalize,
        normalizer=normalizer,
    )  # fmt: skip
