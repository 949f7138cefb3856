"""DMPO as an algorithm: the one definition of its options, weights and loss, used by every entry point.

``dmpo-fast train`` (``DMPO``), ``DMPOLoss`` (plain PyTorch), the TRL ``DMPOTrainer`` and the HF Trainer
collator all take their defaults from ``DMPOOptions`` and compute through the functions below, so switching
entry points never switches the algorithm:

    rollouts x [N = P·G, L], rewards r [N]
    --tied_groups (drop_tied_groups)--> r with NaN for all-tied groups (weight 0)
    --elbo_log_ratio(policy, reference, same masks)--> log p_old, log p_ref − log p_old [N]
    --dmpo_weights: importance_weights per prompt group, baseline--> w [N]
    repeat F times: fresh masks --dmpo_loss: wdce / wddo--> loss

The math itself (ELBO, WDCE, WDDO, masks) lives in ``dmpo_fast.dmpo`` with its departures from the paper
and the reference code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from dmpo_fast import dmpo
from dmpo_fast.algorithms.base import Algorithm, Buffer, completion_positions, derive_seed, require_groups
from dmpo_fast.dmpo import LossOutput, NoiseConfig
from dmpo_fast.ops import ImportanceWeights, importance_weights

if TYPE_CHECKING:
    from dmpo_fast.config import TrainConfig

Baseline = Literal["none", "group", "individual", "model"]
BASELINES = ("none", "group", "individual", "model")
LOSSES = ("wdce", "wddo")


@dataclass(frozen=True)
class DMPOOptions:
    """Every DMPO option and its default: the trainer's measured defaults (docs/default_run.md), shared by
    ``TrainConfig``, ``DMPOLoss``, the TRL ``DMPOConfig`` and the HF collator.

    alpha 0.04, 4 antithetic replicates with rate in [0.1, 1.0) are the paper's; baseline "none" (the paper
    and its code default to "individual") and drop_tied_groups (DAPO's filter, not in the paper) are what
    made the small model learn, and reproduce the paper's runs when set back (configs/ does)."""

    alpha: float = 0.04
    coeff: float = 1.0
    ess_target: float | None = None
    baseline: Baseline = "none"
    centering_strength: float = 1.0
    drop_tied_groups: bool = True
    loss: Literal["wdce", "wddo"] = "wdce"
    num_replicates: int = 4
    elbo_replicates: int = 4
    antithetic: bool = True
    mask_rate_min: float = 0.1
    mask_rate_max: float = 1.0
    include_eos_padding: bool = True
    ddo_beta: float = 1.0
    ddo_a: float = 1.0
    ddo_independent_sets: bool = True

    def __post_init__(self):
        check_options(self)

    def noise(self, kind: Literal["loss", "elbo"] = "loss") -> NoiseConfig:
        """The masking of the loss or of the log-ratio ELBOs."""
        replicates = self.num_replicates if kind == "loss" else self.elbo_replicates
        return NoiseConfig(replicates, self.antithetic, self.mask_rate_min, self.mask_rate_max)

    @classmethod
    def from_config(cls, cfg) -> DMPOOptions:
        """The DMPO options of any config that has these fields (``TrainConfig``, TRL's ``DMPOConfig``)."""
        return cls(**{name: getattr(cfg, name) for name in cls.__dataclass_fields__})


def check_options(o) -> None:
    """The checks of DMPO's fields, for any object that has them; ``ValueError`` names the field."""
    if not o.alpha >= 0:
        raise ValueError(f"alpha must be >= 0, got {o.alpha}")
    if not o.coeff > 0:
        raise ValueError(f"coeff must be > 0, got {o.coeff}")
    if o.ess_target is not None and not 0.0 < o.ess_target <= 1.0:
        raise ValueError(f"ess_target must be in (0, 1] or null, got {o.ess_target}")
    if o.baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {o.baseline!r}")
    if o.loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {o.loss!r}")
    if not 0.0 <= o.centering_strength <= 1.0:
        raise ValueError(f"centering_strength must be in [0, 1], got {o.centering_strength}")
    for name in ("num_replicates", "elbo_replicates"):
        value = getattr(o, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if o.antithetic and (o.num_replicates % 2 or o.elbo_replicates % 2):
        raise ValueError(
            "num_replicates and elbo_replicates must be even when antithetic=true, got "
            f"{o.num_replicates} and {o.elbo_replicates}"
        )
    if not 0.0 <= o.mask_rate_min < o.mask_rate_max <= 1.0:
        raise ValueError(
            "mask_rate_min and mask_rate_max must satisfy 0 <= mask_rate_min < mask_rate_max <= 1, "
            f"got {o.mask_rate_min} and {o.mask_rate_max}"
        )


DEFAULTS = DMPOOptions()


# --------------------------------------------------------------------------------------------------
# The three steps every entry point shares
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def elbo_log_ratio(policy, reference, ids, maskable, options: DMPOOptions, *, seed: int,
                   attention_mask=None, row_offset: int = 0, rows: torch.Tensor | None = None,
                   micro_batch: int | None = None, noise: NoiseConfig | None = None,
                   impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(log p_old, log p_ref − log p_old), both [N], by the ELBO of policy and reference on the same masks.

    ``reference`` is a model, a zero-argument callable returning a context manager that yields one, or None
    (alpha = 0: the ratio is 0). ``rows`` [N] bool skips the model calls of the others (their values are
    NaN); ``row_offset`` keys the masks by global row, so a process's rows get a one-process run's masks."""
    kw = dict(noise=noise or options.noise("elbo"), attention_mask=attention_mask, seed=seed, row_offset=row_offset,
              rows=rows, micro_batch=micro_batch, impl=impl)  # fmt: skip
    if options.alpha > 0 and reference is None:
        raise ValueError("a reference model is needed when alpha > 0 (None only with alpha=0)")
    log_p_old = dmpo.elbo(policy, ids, maskable, **kw)
    if options.alpha <= 0:  # p_ref plays no part; NaN stays NaN for the rows that were not scored
        return log_p_old, log_p_old - log_p_old
    if callable(reference) and not hasattr(reference, "hidden"):
        with reference() as ref:
            log_p_ref = dmpo.elbo(ref, ids, maskable, **kw)
    else:
        log_p_ref = dmpo.elbo(reference, ids, maskable, **kw)
    return log_p_old, log_p_ref - log_p_old


def dmpo_weights(rewards: torch.Tensor, log_ratio: torch.Tensor, options: DMPOOptions, group_size: int,
                 tied: torch.Tensor | None = None) -> tuple[ImportanceWeights, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(importance weights, tied [N / G], keep [N]) of rewards [N] (NaN = failed) and log-ratios [N].

    With ``drop_tied_groups`` a group whose rollouts all scored the same enters the weights with NaN
    rewards, i.e. weight 0: it says nothing about the reward, and under baseline "none" it would re-fit the
    policy to its own samples. ``keep`` marks the rollouts with a finite reward and log-ratio, the rows the
    loss computes (``dmpo.wdce``'s ``keep``); the others have weight 0."""
    if tied is None:
        tied = tied_of(rewards, options, group_size)
    weighted = torch.where(
        tied.to(rewards.device).repeat_interleave(group_size), float("nan"), rewards.float()
    )
    iw = importance_weights(
        weighted.to(log_ratio.device), log_ratio, group_size=group_size, alpha=options.alpha, coeff=options.coeff,
        baseline=options.baseline, centering_strength=options.centering_strength, ess_target=options.ess_target,
    )  # fmt: skip
    keep = torch.isfinite(weighted).cpu() & torch.isfinite(log_ratio).cpu()
    return iw, tied, keep


def tied_of(rewards: torch.Tensor, options: DMPOOptions, group_size: int) -> torch.Tensor:
    """[N / G] bool: the groups ``drop_tied_groups`` gives weight 0 (none without it)."""
    if options.drop_tied_groups:
        return dmpo.tied_groups(rewards, group_size)
    return torch.zeros(rewards.shape[0] // group_size, dtype=torch.bool, device=rewards.device)


def loss_weights(iw: ImportanceWeights, options: DMPOOptions) -> torch.Tensor:
    """The per-rollout weights the loss reads: the raw softmax for WDDO and the "model" baseline (both
    subtract inside the loss), the baseline-subtracted weights otherwise."""
    return iw.raw if options.loss == "wddo" or options.baseline == "model" else iw.weights


def dmpo_loss(policy, ids, maskable, weights, options: DMPOOptions, *, group_size: int, seed: int | None,
              attention_mask=None, log_p_old=None, keep=None, row_offset: int = 0, share: float = 1.0,
              noise: NoiseConfig | None = None, generator=None, impl: str = "auto") -> LossOutput:  # fmt: skip
    """The DMPO loss of one optimizer step with fresh masks (``seed``, keyed by global row).

    ``weights`` from ``loss_weights``. WDCE is a sum over rollouts, so slices add up as they are; WDDO is a
    mean over the rollouts, so a slice's loss is scaled by its ``share`` of the step's rollouts. ``noise``
    defaults to the options' loss masking."""
    noise = noise or options.noise("loss")
    if options.loss == "wddo":
        out = dmpo.wddo(
            policy, ids, maskable, weights, log_p_old, group_size=group_size, noise=noise,
            attention_mask=attention_mask, beta=options.ddo_beta, a=options.ddo_a,
            independent_sets=options.ddo_independent_sets, seed=seed, row_offset=row_offset, impl=impl,
        )  # fmt: skip
        return LossOutput(out.loss * share, out.stats)
    return dmpo.wdce(
        policy, ids, maskable, weights, group_size=group_size, noise=noise, attention_mask=attention_mask,
        baseline=options.baseline, log_p_old=log_p_old, centering_strength=options.centering_strength, keep=keep,
        seed=seed, row_offset=row_offset, generator=generator, impl=impl,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# The trainer's algorithm
# --------------------------------------------------------------------------------------------------


class DMPO(Algorithm):
    """DMPO in the trainer: rollouts weighted toward p_ref·exp(r/α), F steps of fresh-mask WDCE / WDDO."""

    name = "dmpo"
    total_keys = ("n_failed", "dropped", "tied_groups", "rows_total")

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        self.options = DMPOOptions.from_config(cfg)

    @classmethod
    def validate(cls, cfg: TrainConfig) -> None:
        check_options(cfg)
        if cfg.algorithm == cls.name:
            # The per-group softmax of a one-rollout group is 1 whatever its reward: nothing is learned.
            require_groups(cfg)
        if cfg.algorithm == cls.name and cfg.alpha > 0 and cfg.reference == "none":
            raise ValueError(
                "reference must be 'adapter_disabled' or 'frozen_copy' when alpha > 0 (got 'none')"
            )

    @property
    def needs_reference(self) -> bool:
        return self.options.alpha > 0

    def build(self, policy, rollout, rewards, *, reference, scorer, buffer_index, first_row,
              solved=None) -> Buffer:  # fmt: skip
        o, G = self.options, self.group_size
        maskable = completion_positions(rollout, policy.eos_id, o.include_eos_padding)
        tied = tied_of(rewards, o, G).cpu()
        # WDCE never reads the ELBO of a weightless rollout (WDDO's second term and the model baseline do).
        scored = (~tied).repeat_interleave(G) if o.loss == "wdce" and o.baseline != "model" else None
        log_p_old, log_ratio = elbo_log_ratio(
            policy, reference if self.needs_reference else None, rollout.ids, maskable, o,
            seed=derive_seed(self.seed, "elbo", buffer_index), attention_mask=rollout.attention_mask,
            row_offset=first_row, rows=scored, impl=self.impl,
        )  # fmt: skip
        iw, _, kept = dmpo_weights(rewards, log_ratio, o, G, tied=tied)
        rows = {
            "ids": rollout.ids, "attention_mask": rollout.attention_mask, "maskable": maskable,
            "weights": iw.weights.float(), "raw": iw.raw.float(), "log_p_old": log_p_old.float(),
            "log_ratio": log_ratio.float(), "kept": kept.to(rollout.ids.device),
            "ess": iw.ess.float().repeat_interleave(G),  # per group, repeated over its rows
        }  # fmt: skip
        totals = {
            "dropped": int(iw.dropped),
            "tied_groups": int(tied.sum()),
            "rows_total": rollout.ids.shape[0],
        }
        return Buffer(rows, totals, {"first_row": first_row})

    def loss(self, policy, buf: Buffer, step: int) -> LossOutput:
        o = self.options
        weights = buf["raw"] if o.loss == "wddo" or o.baseline == "model" else buf["weights"]
        return dmpo_loss(
            policy, buf["ids"], buf["maskable"], weights, o, group_size=self.group_size,
            seed=derive_seed(self.seed, "loss", step), attention_mask=buf["attention_mask"],
            log_p_old=buf["log_p_old"], keep=buf.get("kept"), row_offset=buf.first_row,
            share=len(buf) / buf.totals.get("rows_total", self.cfg.rollouts_per_step), impl=self.impl,
        )  # fmt: skip

    def log_columns(self, rows, totals, sums) -> dict:
        ess, w = rows["ess"], rows["weights"]
        return {
            "ess_mean": _finite_mean(ess.masked_fill(ess <= 0, float("nan"))),  # groups that carry weight
            "weights_min": float(w.min()),
            "weights_max": float(w.max()),
            "weights_std": float(w.std()),
            "log_ratio_mean": _finite_mean(rows["log_ratio"]),  # scored rollouts only
            "dropped": totals["dropped"],
            "tied_groups": totals["tied_groups"],
        }

    def from_saved(self, parts: list[dict]) -> list[Buffer]:
        bufs = super().from_saved(parts)
        for b in bufs:  # format 1 kept the ESS per group
            ess = b.meta.pop("ess", None)
            if ess is not None:
                b.rows["ess"] = ess.repeat_interleave(self.group_size)
        return bufs


def _finite_mean(t: torch.Tensor) -> float:
    t = t[torch.isfinite(t)]
    return float(t.mean()) if t.numel() else 0.0
