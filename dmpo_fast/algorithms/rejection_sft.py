"""Rejection sampling as an algorithm: masked-diffusion SFT on each group's best rollout (MRO's recipe).

    rollouts, rewards r [N] --best of each group (first on ties; below rs_min_reward dropped; with
        rs_keep="solved" dropped unless solved)--> selected
    fresh masks every step --rejection_sft_loss: WDCE with weight 1/n on the selected rows--> loss

n (``selected_total``) counts every process's selections, so the processes' losses add up to the mean.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from dmpo_fast import mro
from dmpo_fast.algorithms.base import (
    Algorithm,
    Buffer,
    completion_positions,
    derive_seed,
    noise_of,
    require_groups,
)

if TYPE_CHECKING:
    from dmpo_fast.config import TrainConfig


class RejectionSFT(Algorithm):
    name = "rejection_sft"
    total_keys = ("n_failed", "selected_total")

    @classmethod
    def validate(cls, cfg: TrainConfig) -> None:
        if cfg.algorithm == cls.name:
            require_groups(cfg)

    def build(self, policy, rollout, rewards, *, reference, scorer, buffer_index, first_row,
              solved=None) -> Buffer:  # fmt: skip
        best = mro.select_best(rewards, self.group_size, min_reward=self.cfg.rs_min_reward)
        return self.selection(policy, rollout, self.kept(best, solved), first_row)

    def kept(self, best: torch.Tensor, solved: torch.Tensor | None) -> torch.Tensor:
        """The rows of ``best`` to train on: all with rs_keep="best", the solved ones with "solved"."""
        if self.cfg.rs_keep == "best":
            return best
        if solved is None:
            raise ValueError(f"rs_keep='solved' needs the rollouts' solved flags; {self.name}.build got none")
        return best[solved.to(best.device)[best].bool()]

    def selection(self, policy, rollout, best: torch.Tensor, first_row: int, **rows) -> Buffer:
        """The buffer that trains on rows ``best`` of ``rollout`` (and carries ``rows`` for the log)."""
        selected = torch.zeros(rollout.ids.shape[0], dtype=torch.bool, device=rollout.ids.device)
        selected[best.to(selected.device)] = True
        maskable = completion_positions(rollout, policy.eos_id, self.cfg.include_eos_padding)
        rows = {"ids": rollout.ids, "attention_mask": rollout.attention_mask, "maskable": maskable,
                "selected": selected, **rows}  # fmt: skip
        return Buffer(rows, {"selected_total": int(selected.sum())}, {"first_row": first_row})

    def loss(self, policy, buf: Buffer, step: int):
        out = mro.rejection_sft_loss(
            policy, buf["ids"], buf["maskable"], noise=noise_of(self.cfg, self.cfg.num_replicates),
            attention_mask=buf["attention_mask"], selected=buf["selected"], total=buf["selected_total"],
            seed=derive_seed(self.seed, "loss", step), row_offset=buf.first_row, impl=self.impl,
        )  # fmt: skip
        return type(out)(out.loss, {"masked_tokens": out.stats["masked_tokens"].detach()})

    def log_columns(self, rows, totals, sums) -> dict:
        return {"selected": int(rows["selected"].sum())}
