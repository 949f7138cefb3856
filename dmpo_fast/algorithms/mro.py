"""MRO (arXiv 2510.21473) as an algorithm: the math lives in ``dmpo_fast.mro``.

    rollouts --step rewards (token verification, perplexity) + task reward--> window returns, group
    advantages [N, J] --> num_iterations x SGRO REINFORCE loss over the windows' states

The loss denominator (the step's rollouts) is a total and the window draws are keyed by global row, so
micro-batches and processes add up to the one-batch loss. The step rewards also rank the candidates of
test-time scaling (``eval_tts_k``), whose checks live here.
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


def mro_config(cfg: TrainConfig) -> mro.MROConfig:
    """The run's MRO options (G = num_generations); its step rewards also rank TTS candidates."""
    return mro.MROConfig(
        group_size=cfg.num_generations, window=cfg.mro_window, verification=cfg.mro_verification,
        verification_score=cfg.mro_verification_score, verification_tokens=cfg.mro_verification_tokens,
        verification_steps=cfg.mro_verification_steps,
        ppl_text=cfg.mro_ppl_text, tv_weight=cfg.mro_tv_weight,
        ppl_weight=cfg.effective_ppl_weight, task_weight=cfg.mro_task_weight, shaping=cfg.mro_shaping,
        returns=cfg.mro_returns, window_reward=cfg.mro_window_reward, scale_std=cfg.mro_scale_rewards == "std", importance=cfg.mro_importance,
        windows_per_rollout=cfg.mro_windows_per_rollout, states_per_window=cfg.mro_states_per_window,
        num_iterations=cfg.num_iterations,
        baseline=cfg.mro_baseline, anchor=cfg.mro_anchor, anchor_weight=cfg.mro_anchor_weight,
    )  # fmt: skip


def answer_of(text: str) -> str:
    """The answer a completion votes for: its final answer (``tasks.base.final_answer``), spaces removed."""
    from dmpo_fast.tasks.base import completion_text, final_answer

    return "".join(final_answer(completion_text(text)).split())


def tts_reward(policy, cfg: TrainConfig, tokenizer, *, scorer=None):
    """The ``generate_tts`` reward of an evaluation with ``eval_tts_k`` candidates: the MRO step rewards of
    the last ``eval_tts_window`` steps, plus the majority-vote quality reward with ``mro_tts_vote``."""
    vote = {}
    if cfg.mro_tts_vote:
        from dmpo_fast.rollouts import decode

        def answers(rollout):
            return [answer_of(t) for t in decode(tokenizer, rollout.ids[:, rollout.prompt_length :])]

        vote = {"vote": answers, "group_size": cfg.eval_tts_k}
    return mro.tts_reward_fn(policy, mro_config(cfg), scorer=scorer, window=cfg.eval_tts_window, impl=cfg.impl,
                             **vote)  # fmt: skip


class MRO(Algorithm):
    name = "mro"
    total_keys = ("n_failed", "rows_total")
    summed_stats = ("states", "windows", "pg_loss", "anchor_loss")

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        self.options = mro_config(cfg)

    @classmethod
    def validate(cls, cfg: TrainConfig) -> None:
        for name in ("mro_tv_weight", "mro_ppl_weight", "mro_task_weight", "mro_anchor_weight"):
            if getattr(cfg, name) is not None and getattr(cfg, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(cfg, name)}")
        if cfg.mro_ppl_model is not None and not cfg.mro_ppl_model.strip():
            raise ValueError("mro_ppl_model must be a model name, a directory or null, got ''")
        if cfg.mro_ppl_weight and cfg.ppl_model is None:
            auto = f" ('auto' has no built-in scorer for task {cfg.task!r})" if cfg.mro_ppl_model else ""
            raise ValueError(
                f"mro_ppl_weight={cfg.mro_ppl_weight} needs mro_ppl_model (a causal LM scoring the "
                f"perplexity reward, e.g. gpt2){auto}; set mro_ppl_weight=0 or null to go without"
            )
        if cfg.eval_tts_k:
            if not (cfg.mro_tv_weight or cfg.effective_ppl_weight):
                raise ValueError(
                    "eval_tts_k > 0 ranks candidates by the MRO step rewards: it needs mro_tv_weight > 0 or "
                    "mro_ppl_model (got mro_tv_weight=0 and no perplexity reward)"
                )
            if cfg.eval_temperature == 0 and cfg.remasking != "random" and cfg.sampler != "roar":
                raise ValueError(
                    "eval_tts_k > 0 needs eval_temperature > 0 (or remasking='random', or sampler='roar'): "
                    "greedy low-confidence decoding gives k identical candidates"
                )
        if cfg.algorithm != cls.name:
            return
        require_groups(cfg)
        if cfg.mro_anchor == "kl" and cfg.reference == "none":
            raise ValueError(
                "mro_anchor='kl' needs a reference model: reference must be 'frozen_copy' or 'adapter_disabled' "
                "(got 'none')"
            )
        if not any((cfg.mro_tv_weight, cfg.effective_ppl_weight, cfg.mro_task_weight)):
            raise ValueError(
                "mro_tv_weight, mro_ppl_weight and mro_task_weight are all 0: algorithm='mro' has no reward"
            )

    @property
    def needs_scorer(self) -> bool:
        return self.options.ppl_weight > 0

    @property
    def needs_reference(self) -> bool:
        return self.options.anchor == "kl" and self.options.anchor_weight > 0

    def notes(self) -> list[str]:
        if self.cfg.num_iterations > 1:
            return [
                f"algorithm='mro' with num_iterations={self.cfg.num_iterations}: each buffer is reused "
                "off-policy (the SGRO loss has no policy ratio); num_iterations=1 is on-policy"
            ]
        return []

    def build(self, policy, rollout, rewards, *, reference, scorer, buffer_index, first_row,
              solved=None) -> Buffer:  # fmt: skip
        d = mro.make_buffer(
            policy, rollout, rewards.to(rollout.ids.device), self.options,
            seed=derive_seed(self.seed, self.name, buffer_index), scorer=scorer, row_offset=first_row,
            reference=reference if self.needs_reference else None,
            maskable=completion_positions(rollout, policy.eos_id, self.cfg.include_eos_padding), impl=self.impl,
        )  # fmt: skip
        return Buffer.from_dict(d, self.total_keys, first_row=first_row)

    def loss(self, policy, buf: Buffer, step: int):
        out = mro.loss_step(
            policy, {**buf.rows, **buf.totals, **buf.meta}, self.options, step,
            noise=noise_of(self.cfg, self.cfg.num_replicates), anchor_seed=derive_seed(self.seed, "loss", step),
            impl=self.impl,
        )  # fmt: skip
        zero = torch.zeros((), device=out.loss.device)
        stats = {k: out.stats.get(k, zero).detach() for k in ("masked_tokens", *self.summed_stats)}
        return type(out)(out.loss, stats)

    def log_columns(self, rows, totals, sums) -> dict:
        out = {
            "states": int(sums["states"]),
            "windows": int(sums["windows"]),
            "pg_loss": float(sums["pg_loss"]),
            "anchor_loss": float(sums["anchor_loss"]),
            "steps_mean": float(rows["num_steps"].float().mean()),
        }
        for name in ("tv_mean", "ppl_mean"):  # per-rollout mean step rewards, when the term is on
            if name in rows:
                out[f"{name[:-5]}_reward_mean"] = float(torch.nanmean(rows[name]))
        return out
