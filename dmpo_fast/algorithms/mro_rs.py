"""MRO's rejection sampling (arXiv 2510.21473) as an algorithm: step-wise group sampling, multi-reward
selection, masked-diffusion SFT on the kept rollout.

    G rollouts per prompt, decoded together by step-wise group sampling (generate_tts(grouped=True)): every
    mro_rs_window model calls the group's partial states are scored by the step rewards of the last window
    (token verification, perplexity) and every rollout continues from the best one's state
      --> multi-reward of each finished rollout: λ_tv·mean r_tv + λ_ppl·mean r_ppl over its steps + λ_q·task
      --> the best of each group (dropped when its task reward is below rs_min_reward, and with
          rs_keep="solved", mro_rs's default, unless the task judges it solved)
      --> num_iterations x rejection_sft_loss on the kept rollouts (fresh masks every step)

The step rewards are averaged over a rollout's steps, so each term stays on its per-step scale (token
verification: a log-prob <= 0, or a prob in [0, 1]; perplexity in [0, 1] with C = F) next to a 0/1 task
reward at weight 1: a solved rollout outranks an unsolved one unless the latter verifies far better. ``rejection_sft``
is the plain recipe (independent rollouts, best by the task reward alone).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from dmpo_fast import mro
from dmpo_fast.algorithms.base import (
    Buffer,
    require_groups,
)
from dmpo_fast.algorithms.mro import mro_config
from dmpo_fast.algorithms.rejection_sft import RejectionSFT

if TYPE_CHECKING:
    from dmpo_fast.config import TrainConfig


def multi_reward(step: dict, task: torch.Tensor, cfg: mro.MROConfig) -> torch.Tensor:
    """[N] λ_tv·mean r_tv + λ_ppl·mean r_ppl over each rollout's steps + λ_q·task (NaN task: NaN)."""
    score = cfg.task_weight * task.float()
    for name, weight in (("tv", cfg.tv_weight), ("ppl", cfg.ppl_weight)):
        if step[name] is not None:
            score = score + weight * torch.nan_to_num(torch.nanmean(step[name], dim=1), nan=0.0).to(score)
    return score


class MRORejectionSampling(RejectionSFT):
    """Rejection sampling as MRO runs it: the selection differs, the masked-diffusion loss is RejectionSFT's."""

    name = "mro_rs"

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        self.options = mro_config(cfg)

    @classmethod
    def validate(cls, cfg: TrainConfig) -> None:
        if isinstance(cfg.mro_rs_window, bool) or cfg.mro_rs_window < 1:
            raise ValueError(f"mro_rs_window must be an int >= 1, got {cfg.mro_rs_window!r}")
        if cfg.algorithm != cls.name:
            return
        require_groups(cfg)
        if not (cfg.mro_tv_weight or cfg.effective_ppl_weight):
            raise ValueError(
                "algorithm='mro_rs' ranks partial states by the MRO step rewards: it needs mro_tv_weight > 0 or "
                "mro_ppl_model (got mro_tv_weight=0 and no perplexity reward)"
            )

    @property
    def needs_scorer(self) -> bool:
        return self.options.ppl_weight > 0

    def rollout_tts(self, policy, scorer) -> dict:
        """The G rollouts of a prompt are one step-wise group: branch every mro_rs_window model calls."""
        fn = mro.tts_reward_fn(policy, self.options, scorer=scorer, window=self.cfg.mro_rs_window, impl=self.impl)
        return {"k": self.group_size, "window": self.cfg.mro_rs_window, "reward_fn": fn, "grouped": True}

    def build(self, policy, rollout, rewards, *, reference, scorer, buffer_index, first_row,
              solved=None) -> Buffer:  # fmt: skip
        task = rewards.float().to(rollout.ids.device)
        step = mro.step_rewards(policy, rollout, self.options, scorer=scorer, impl=self.impl)
        score = multi_reward(step, task, self.options)
        best = mro.select_best(score, self.group_size)
        best = best[torch.isfinite(task[best])]
        if self.cfg.rs_min_reward is not None:
            best = best[task[best] >= self.cfg.rs_min_reward]
        best = self.kept(best, solved)
        extra = {f"{name}_mean": torch.nanmean(step[name], dim=1) for name in ("tv", "ppl") if step[name] is not None}
        return self.selection(policy, rollout, best, first_row, multi_reward=score, **extra)

    def log_columns(self, rows, totals, sums) -> dict:
        sel = rows["selected"].bool()
        out = {"selected": int(sel.sum()), "selected_solved": float(rows["solved"][sel].mean()) if sel.any()
               else float("nan")}  # fmt: skip
        for name in ("tv_mean", "ppl_mean"):
            if name in rows:
                out[f"{name[:-5]}_reward_mean"] = float(torch.nanmean(rows[name]))
        return out
