"""wd1 (Tang et al., "wd1: Weighted Policy Optimization for Reasoning in Diffusion Language Models",
arXiv 2507.08838): ratio-free policy optimisation as a weighted log-likelihood.

For a prompt's group of G rollouts with rewards r and advantages A = r − mean_group(r):

    w⁺ = softmax_group(ψ·A)      w⁻ = softmax_group(−ψ·A)                     (constants, no gradient)
    L  = (1 / groups) · Σ_i (λ·w⁻_i − w⁺_i) · log π_θ(o_i | q)

so rollouts above their group's mean are made more likely and those below less, with no policy ratio, no
clipping and no reference model; a group whose rewards are all equal has w⁺ = w⁻ and (λ = 1) no gradient.
log π_θ(o | q) is d1's one-step estimate (``dmpo_fast.grpo.diffu_grpo_logprobs``): each prompt token
masked with probability ``wd1_p_mask_prompt``, the whole completion masked, one forward, the per-token
log-probs summed over the completion up to its first EOS. Each of the ``num_iterations`` (μ) steps on a
buffer draws a fresh prompt mask (``wd1_random_masking``).

Departures from the public code (its ``RevDiffuGRPOTrainer``), and why:
- the softmax runs over each prompt's group; the code runs it over a device's micro-batch, which is one
  group only when ``per_device_train_batch_size`` equals ``num_generations`` (its configs: 6 and 6);
- ψ (``wd1_psi``) and λ (``wd1_negative_weight``) are options; the code fixes both at 1 (the defaults);
- the loss is divided by the step's number of groups (the code's DDP / accumulation averaging over its
  one-group micro-batches), so micro-batches and processes add up to the one-batch loss here;
- a failed (None / raising) reward leaves its rollout out of the softmax (weight 0); the code scores it 0;
- the one-step forward sees the attention mask (left padding never attended), as diffu-GRPO's here does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from dmpo_fast import grpo
from dmpo_fast.algorithms.base import Algorithm, Buffer, derive_seed, require_groups
from dmpo_fast.dmpo import LossOutput

if TYPE_CHECKING:
    from dmpo_fast.config import TrainConfig


def wd1_weights(rewards: torch.Tensor, group_size: int, *, psi: float = 1.0) -> tuple[torch.Tensor, ...]:
    """(w⁺, w⁻, A), each [N]: the softmax over each group of ±ψ·A, A = r − group mean. Failed (NaN)
    rewards are left out of their group's mean and softmax (weight 0, advantage 0)."""
    adv = grpo.group_advantages(rewards, group_size)  # [N], 0 for failed rewards
    ok = torch.isfinite(rewards.float()).view(-1, group_size)  # [P, G]

    def softmax(x: torch.Tensor) -> torch.Tensor:
        x = x.view(-1, group_size).masked_fill(~ok, float("-inf"))
        top = x.max(dim=1, keepdim=True).values.nan_to_num(neginf=0.0)  # a group with no valid row: all 0
        e = torch.exp(x - top)
        return (e / e.sum(dim=1, keepdim=True).clamp_min(1e-30)).reshape(-1)

    return softmax(psi * adv), softmax(-psi * adv), adv


class WD1(Algorithm):
    name = "wd1"
    total_keys = ("n_failed", "groups_total")
    summed_stats = ("logp_sum",)

    @classmethod
    def validate(cls, cfg: TrainConfig) -> None:
        if not cfg.wd1_psi > 0:
            raise ValueError(f"wd1_psi must be > 0, got {cfg.wd1_psi}")
        if not cfg.wd1_negative_weight >= 0:
            raise ValueError(f"wd1_negative_weight must be >= 0, got {cfg.wd1_negative_weight}")
        if not 0.0 <= cfg.wd1_p_mask_prompt <= 1.0:
            raise ValueError(f"wd1_p_mask_prompt must be in [0, 1], got {cfg.wd1_p_mask_prompt}")
        if cfg.algorithm == cls.name:
            require_groups(cfg)

    def build(self, policy, rollout, rewards, *, reference, scorer, buffer_index, first_row,
              solved=None) -> Buffer:  # fmt: skip
        ids, P = rollout.ids, rollout.prompt_length
        N = ids.shape[0]
        w_pos, w_neg, adv = wd1_weights(rewards.to(ids.device), self.group_size, psi=self.cfg.wd1_psi)
        maskable = torch.zeros_like(ids, dtype=torch.bool)
        maskable[:, P:] = True  # the whole completion is masked; the sum runs up to the first EOS
        completion_mask = torch.zeros_like(maskable)
        completion_mask[:, P:] = rollout.completion_mask
        rows = {
            "ids": ids, "attention_mask": rollout.attention_mask, "maskable": maskable,
            "completion_mask": completion_mask, "row_keys": torch.arange(first_row, first_row + N, device=ids.device),
            "coef": self.cfg.wd1_negative_weight * w_neg - w_pos, "advantages": adv, "w_pos": w_pos,
        }  # fmt: skip
        seeds = grpo.iteration_seeds(
            derive_seed(self.seed, self.name, buffer_index), self.cfg.num_iterations, self.cfg.wd1_random_masking
        )
        return Buffer(rows, {"groups_total": N // self.group_size}, {"first_row": first_row, "mask_seeds": seeds})

    def loss(self, policy, buf: Buffer, step: int) -> LossOutput:
        cm = buf["completion_mask"]
        logp = grpo.diffu_grpo_logprobs(
            policy, buf["ids"], buf["maskable"], attention_mask=buf["attention_mask"],
            p_mask_prompt=self.cfg.wd1_p_mask_prompt, seed=buf["mask_seeds"][step % self.cfg.num_iterations],
            row_keys=buf["row_keys"], score_mask=cm, impl=self.impl,
        )  # fmt: skip  [n, L], 0 outside the scored completion tokens
        seq = logp.sum(dim=1)  # log π_θ(o_i | q), [n]
        loss = (buf["coef"].to(seq) * seq).sum() / buf["groups_total"]
        stats = {"masked_tokens": cm.sum().detach(), "logp_sum": seq.sum().detach()}
        return LossOutput(loss, stats)

    def log_columns(self, rows, totals, sums) -> dict:
        return {
            "advantage_abs_mean": float(rows["advantages"].abs().mean()),
            "w_pos_max_mean": float(rows["w_pos"].view(-1, self.group_size).max(dim=1).values.mean()),
            "logp_token_mean": sums["logp_sum"] / max(sums["masked_tokens"], 1),
        }
