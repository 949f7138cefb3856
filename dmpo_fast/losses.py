"""``DMPOLoss``: the DMPO loss as an ``nn.Module`` for plain PyTorch loops.

A thin module over the code the trainer runs (``dmpo_fast.algorithms.dmpo``: the same defaults, the same
weights, the same loss): it holds the options, turns rewards and log-ratios into importance weights per
prompt group (dropping all-tied groups with ``drop_tied_groups``), and calls the fused WDCE loss with fresh
masks on the policy's hidden states:

    criterion = DMPOLoss(group_size=8, alpha=0.04)
    log_ratio = criterion.log_ratio(policy, reference, ids, maskable, attention_mask=am)   # before the update
    for _ in range(num_iterations):                                                       # buffer reuse F
        out = criterion(policy, ids, maskable, rewards=rewards, log_ratio=log_ratio, attention_mask=am)
        out.loss.backward(); optimizer.step(); optimizer.zero_grad()

Rows are whole prompt groups: ``group_size`` consecutive rows are the rollouts of one prompt. Pass ``weights``
instead of ``rewards`` when they were computed elsewhere (``importance_weights(...).weights``, or the raw
weights with ``baseline="model"``). The defaults are ``DMPOOptions``'s, those of ``dmpo-fast train``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from dmpo_fast.algorithms.dmpo import (
    DEFAULTS,
    Baseline,
    DMPOOptions,
    dmpo_loss,
    dmpo_weights,
    elbo_log_ratio,
    loss_weights,
)
from dmpo_fast.dmpo import LossOutput, NoiseConfig
from dmpo_fast.ops.philox import draw_seed


class DMPOLoss(nn.Module):
    """DMPO's weighted denoising cross-entropy (``dmpo_fast.dmpo``); ``forward`` returns a ``LossOutput``.

    Args:
        group_size: rollouts per prompt (G); consecutive rows form a group.
        alpha: temperature of the target p_ref·exp(r/alpha); 0 uses the rewards alone (no reference).
        coeff, ess_target, baseline, centering_strength: as ``importance_weights``; ``baseline="model"``
            subtracts s·softmax_group(ELBO_θ − log p_old) estimated in the loss's own forward pass.
        drop_tied_groups: weight 0 for a prompt group whose rollouts all got the same reward.
        noise: masking of the loss (replicates R, antithetic, rate range); ``elbo_noise`` that of
            ``log_ratio`` (more replicates give a less noisy ratio).
        impl: backend of the ops ("auto", "triton", "native", "chunked", "eager").
    """

    def __init__(
        self,
        group_size: int,
        *,
        alpha: float = DEFAULTS.alpha,
        coeff: float = DEFAULTS.coeff,
        ess_target: float | None = DEFAULTS.ess_target,
        baseline: Baseline = DEFAULTS.baseline,
        centering_strength: float = DEFAULTS.centering_strength,
        drop_tied_groups: bool = DEFAULTS.drop_tied_groups,
        noise: NoiseConfig = DEFAULTS.noise("loss"),
        elbo_noise: NoiseConfig = DEFAULTS.noise("elbo"),
        impl: str = "auto",
    ):
        super().__init__()
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
        for name, value in (("noise", noise), ("elbo_noise", elbo_noise)):
            if not isinstance(value, NoiseConfig):
                raise ValueError(f"{name} must be a dmpo_fast.dmpo.NoiseConfig, got {type(value).__name__}")
        self.options = DMPOOptions(
            alpha=float(alpha), coeff=coeff, ess_target=ess_target, baseline=baseline,
            centering_strength=centering_strength, drop_tied_groups=drop_tied_groups,
            num_replicates=noise.replicates, elbo_replicates=elbo_noise.replicates, antithetic=noise.antithetic,
            mask_rate_min=noise.rate_min, mask_rate_max=noise.rate_max,
        )  # fmt: skip
        self.group_size = group_size
        self.noise = noise
        self.elbo_noise = elbo_noise
        self.impl = impl

    def __getattr__(self, name):  # alpha, coeff, baseline, ... read from the options
        options = self.__dict__.get("options")
        if options is not None and name in DMPOOptions.__dataclass_fields__:
            return getattr(options, name)
        return super().__getattr__(name)

    @torch.no_grad()
    def log_ratio(
        self,
        policy,
        reference,
        ids: torch.Tensor,
        maskable: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        seed: int | None = None,
        micro_batch: int | None = None,
    ) -> torch.Tensor:
        """[N] log p_ref(x) − log p_policy(x) by the ELBO, both models on the same masks (no grad).

        Call it once per rollout buffer, before the policy is updated (the policy here is p_old).
        ``reference`` None (alpha = 0) gives zeros.
        """
        if reference is None:
            if self.alpha > 0:
                raise ValueError("reference must be a model when alpha > 0 (None only with alpha=0)")
            return torch.zeros(ids.shape[0], device=ids.device)
        seed = draw_seed() if seed is None else seed  # one seed: the same masks for both models
        return elbo_log_ratio(
            policy, reference, ids, maskable, self.options, seed=seed, attention_mask=attention_mask,
            micro_batch=micro_batch, noise=self.elbo_noise, impl=self.impl,
        )[1]  # fmt: skip

    def forward(
        self,
        policy,
        ids: torch.Tensor,
        maskable: torch.Tensor,
        *,
        rewards: torch.Tensor | None = None,
        log_ratio: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
        log_p_old: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> LossOutput:
        """The loss for rollouts ``ids`` [N, L] of ``policy`` (a ``DiffusionLM``), N a multiple of group_size.

        Give either ``rewards`` [N] (with ``log_ratio`` [N] = log p_ref − log p_old when alpha > 0; a NaN
        reward gives weight 0), or ``weights`` [N]. ``maskable`` [N, L] marks the completion positions
        (``dmpo.completion_mask``); ``log_p_old`` [N] is needed by ``baseline="model"``.
        Returns ``LossOutput(loss, stats)``; given rewards, ``stats["importance"]`` is the ImportanceWeights.
        """
        if (rewards is None) == (weights is None):
            raise ValueError("give exactly one of rewards (with log_ratio) or weights")
        stats_extra, keep = {}, None
        if rewards is not None:
            if log_ratio is None:
                if self.alpha > 0:
                    raise ValueError("log_ratio is required with rewards when alpha > 0 (DMPOLoss.log_ratio)")
                log_ratio = torch.zeros_like(rewards, dtype=torch.float32)
            iw, tied, keep = dmpo_weights(rewards, log_ratio, self.options, self.group_size)
            weights = loss_weights(iw, self.options)
            stats_extra.update(importance=iw, tied_groups=tied)
        out = dmpo_loss(
            policy, ids, maskable, weights, self.options, group_size=self.group_size, seed=seed,
            attention_mask=attention_mask, log_p_old=log_p_old, keep=keep, noise=self.noise, generator=generator,
            impl=self.impl,
        )  # fmt: skip
        out.stats.update(stats_extra)
        return out

    def extra_repr(self) -> str:
        return (
            f"group_size={self.group_size}, alpha={self.alpha}, baseline={self.baseline!r}, "
            f"drop_tied_groups={self.drop_tied_groups}, "
            f"replicates={self.noise.replicates}, impl={self.impl!r}"
        )
