"""diffu-GRPO (d1, Zhao et al. 2025) as an algorithm: the math lives in ``dmpo_fast.grpo``.

    rollouts, rewards r [N] --r − group mean--> advantages [N]; one-step log-probs of π_old (μ > 1) and
    π_ref (grpo_beta > 0), one prompt mask per inner step --> μ x clipped-ratio loss + β·KL

μ is ``num_iterations``; the loss denominators (the step's completion tokens or rollouts) are totals, so
micro-batches and processes add up to the one-batch loss.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from dmpo_fast import grpo
from dmpo_fast.algorithms.base import Algorithm, Buffer, derive_seed, require_groups

if TYPE_CHECKING:
    from dmpo_fast.config import TrainConfig


def grpo_config(cfg: TrainConfig) -> grpo.GRPOConfig:
    """The run's diffu-GRPO options (μ = num_iterations, G = num_generations)."""
    return grpo.GRPOConfig(
        group_size=cfg.num_generations, num_iterations=cfg.num_iterations, epsilon=cfg.grpo_epsilon,
        beta=cfg.grpo_beta, p_mask_prompt=cfg.grpo_p_mask_prompt, random_masking=cfg.grpo_random_masking,
        scale_rewards=cfg.grpo_scale_rewards, normalize=cfg.grpo_normalize,
    )  # fmt: skip


class DiffuGRPO(Algorithm):
    name = "diffu_grpo"
    total_keys = ("n_failed", "rows_total", "tokens_total")
    summed_stats = ("kl_sum", "clip_sum", "ratio_sum")

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        self.options = grpo_config(cfg)

    @classmethod
    def validate(cls, cfg: TrainConfig) -> None:
        if not cfg.grpo_epsilon > 0:
            raise ValueError(f"grpo_epsilon must be > 0, got {cfg.grpo_epsilon}")
        if not cfg.grpo_beta >= 0:
            raise ValueError(f"grpo_beta must be >= 0, got {cfg.grpo_beta}")
        if not 0.0 <= cfg.grpo_p_mask_prompt <= 1.0:
            raise ValueError(f"grpo_p_mask_prompt must be in [0, 1], got {cfg.grpo_p_mask_prompt}")
        if cfg.algorithm != cls.name:
            return
        require_groups(cfg)
        if cfg.grpo_beta > 0 and cfg.reference == "none":
            raise ValueError(
                "reference must be 'adapter_disabled' or 'frozen_copy' when algorithm='diffu_grpo' and "
                "grpo_beta > 0 (got 'none'; grpo_beta=0 trains without a reference)"
            )

    @property
    def needs_reference(self) -> bool:
        return self.options.beta > 0

    def build(self, policy, rollout, rewards, *, reference, scorer, buffer_index, first_row,
              solved=None) -> Buffer:  # fmt: skip
        d = grpo.make_buffer(
            policy, rollout, rewards.to(rollout.ids.device), self.options,
            seed=derive_seed(self.seed, self.name, buffer_index),
            reference=reference if self.needs_reference else None, row_offset=first_row, impl=self.impl,
        )  # fmt: skip
        return Buffer.from_dict(d, self.total_keys, first_row=first_row)

    def loss(self, policy, buf: Buffer, step: int):
        out = grpo.loss_step(
            policy, {**buf.rows, **buf.totals, **buf.meta}, self.options, step, impl=self.impl
        )
        n = out.stats["masked_tokens"]
        kl = out.stats.get("kl", torch.zeros((), device=n.device))  # no KL without a reference
        stats = {"masked_tokens": n, "kl_sum": kl * n, "clip_sum": out.stats["clip_ratio"] * n,
                 "ratio_sum": out.stats["ratio_mean"] * n}  # fmt: skip
        return type(out)(out.loss, {k: v.detach() for k, v in stats.items()})

    def log_columns(self, rows, totals, sums) -> dict:
        n = max(sums["masked_tokens"], 1)
        return {
            "kl": sums["kl_sum"] / n,
            "clip_ratio": sums["clip_sum"] / n,
            "ratio_mean": sums["ratio_sum"] / n,
            "advantage_abs_mean": float(rows["advantages"].abs().mean()),
        }
