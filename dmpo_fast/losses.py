"""``DMPOLoss``: the DMPO loss as an ``nn.Module`` for plain PyTorch loops.

A thin module over the pure functions (nothing here that ``dmpo_fast.dmpo`` does not already do): it holds the
options, turns rewards and log-ratios into importance weights per prompt group (``importance_weights``), and
calls ``dmpo.wdce`` — fresh masks, the policy's hidden states and the fused ``wdce_loss``:

    criterion = DMPOLoss(group_size=8, alpha=0.04)
    log_ratio = criterion.log_ratio(policy, reference, ids, maskable, attention_mask=am)   # before the update
    for _ in range(num_iterations):                                                       # buffer reuse F
        out = criterion(policy, ids, maskable, rewards=rewards, log_ratio=log_ratio, attention_mask=am)
        out.loss.backward(); optimizer.step(); optimizer.zero_grad()

Rows are whole prompt groups: ``group_size`` consecutive rows are the rollouts of one prompt. Pass ``weights``
instead of ``rewards`` when they were computed elsewhere (``importance_weights(...).weights``, or the raw
weights with ``baseline="model"``).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from dmpo_fast import dmpo
from dmpo_fast.dmpo import Baseline, LossOutput, NoiseConfig
from dmpo_fast.ops import importance_weights
from dmpo_fast.ops.philox import draw_seed

_BASELINES = ("none", "group", "individual", "model")
_NOISE = NoiseConfig()  # frozen: 4 antithetic replicates, rate in [0.1, 1.0)


class DMPOLoss(nn.Module):
    """DMPO's weighted denoising cross-entropy (``dmpo_fast.dmpo``); ``forward`` returns a ``LossOutput``.

    Args:
        group_size: rollouts per prompt (G); consecutive rows form a group.
        alpha: temperature of the target p_ref·exp(r/alpha); 0 uses the rewards alone (no reference).
        coeff, ess_target, baseline, centering_strength: as ``importance_weights``; ``baseline="model"``
            subtracts s·softmax_group(ELBO_θ − log p_old) estimated in the loss's own forward pass.
        noise: masking of the loss (replicates R, antithetic, rate range); ``elbo_noise`` that of
            ``log_ratio`` (more replicates give a less noisy ratio).
        impl: backend of the ops ("auto", "triton", "native", "chunked", "eager").
    """

    def __init__(
        self,
        group_size: int,
        *,
        alpha: float = 0.04,
        coeff: float = 1.0,
        ess_target: float | None = None,
        baseline: Baseline = "individual",
        centering_strength: float = 1.0,
        noise: NoiseConfig = _NOISE,
        elbo_noise: NoiseConfig = _NOISE,
        impl: str = "auto",
    ):
        super().__init__()
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
        if not alpha >= 0:
            raise ValueError(f"alpha must be >= 0, got {alpha!r}")
        if baseline not in _BASELINES:
            raise ValueError(f"baseline must be one of {_BASELINES}, got {baseline!r}")
        for name, value in (("noise", noise), ("elbo_noise", elbo_noise)):
            if not isinstance(value, NoiseConfig):
                raise ValueError(f"{name} must be a dmpo_fast.dmpo.NoiseConfig, got {type(value).__name__}")
        self.group_size = group_size
        self.alpha = float(alpha)
        self.coeff = coeff
        self.ess_target = ess_target
        self.baseline = baseline
        self.centering_strength = centering_strength
        self.noise = noise
        self.elbo_noise = elbo_noise
        self.impl = impl

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
        kw = dict(noise=self.elbo_noise, attention_mask=attention_mask, seed=seed, micro_batch=micro_batch)
        log_p_ref = dmpo.elbo(reference, ids, maskable, impl=self.impl, **kw)
        log_p_old = dmpo.elbo(policy, ids, maskable, impl=self.impl, **kw)
        return log_p_ref - log_p_old

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
        stats_extra = {}
        if rewards is not None:
            if log_ratio is None:
                if self.alpha > 0:
                    raise ValueError("log_ratio is required with rewards when alpha > 0 (DMPOLoss.log_ratio)")
                log_ratio = torch.zeros_like(rewards, dtype=torch.float32)
            iw = importance_weights(
                rewards,
                log_ratio,
                group_size=self.group_size,
                alpha=self.alpha,
                coeff=self.coeff,
                # The model baseline is applied inside the loss, from the same forward pass.
                baseline="none" if self.baseline == "model" else self.baseline,
                centering_strength=self.centering_strength,
                ess_target=self.ess_target,
            )
            weights = iw.raw if self.baseline == "model" else iw.weights
            stats_extra["importance"] = iw
        out = dmpo.wdce(
            policy,
            ids,
            maskable,
            weights,
            group_size=self.group_size,
            noise=self.noise,
            attention_mask=attention_mask,
            baseline=self.baseline,
            log_p_old=log_p_old,
            centering_strength=self.centering_strength,
            seed=seed,
            generator=generator,
            impl=self.impl,
        )
        out.stats.update(stats_extra)
        return out

    def extra_repr(self) -> str:
        return (
            f"group_size={self.group_size}, alpha={self.alpha}, baseline={self.baseline!r}, "
            f"replicates={self.noise.replicates}, impl={self.impl!r}"
        )
