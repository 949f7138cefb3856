"""DMPO's loss in ``transformers.Trainer`` for rollouts you bring yourself.

``Trainer`` calls ``outputs = model(**batch_without_labels)`` and then ``compute_loss_func(outputs, labels)``.
The DMPO loss needs the policy's hidden states on *noisy* copies of each rollout, so the work splits in two:

    DMPOCollator     rollout rows -> noisy ids [R*B, L] (the model input) + labels: the clean ids, the masked
                     positions and per-row weights w_b / R (replicate-major rows, as ``forward_mask``)
    DMPOComputeLoss  hidden states [R*B, L, H] (a ``DiffusionLM``'s forward) -> the fused ``wdce_loss``

    rows = rollout_rows(ids, maskable, weights)          # weights: importance_weights(...).weights, per group
    trainer = Trainer(model=policy, args=TrainingArguments(..., remove_unused_columns=False),
                      train_dataset=rows, data_collator=DMPOCollator(policy.mask_id),
                      compute_loss_func=DMPOComputeLoss(policy))

The model must be the ``DiffusionLM`` (``dmpo_fast.models.load`` / ``wrap``): its forward returns hidden
states, never logits, so the ``[R*B, L, V]`` logits are never built. Each row carries its final weight: DMPO's
weights are a softmax over the rollouts of one prompt, which the Trainer's shuffled batches cannot see, so
compute them per group before building the dataset with the trainer's code
(``dmpo_fast.algorithms.dmpo.dmpo_weights(rewards, log_ratio, DMPOOptions(), G)`` and ``loss_weights``, which
drop all-tied groups as ``dmpo-fast train`` does). The loss of a batch is
Σ_b w_b · mean over replicates of the per-token masked CE (as ``dmpo.wdce``); the Trainer sums it over
gradient-accumulation steps without dividing (it never divides a ``compute_loss_func`` loss).
"""

from __future__ import annotations

import torch

from dmpo_fast.algorithms.dmpo import DEFAULTS
from dmpo_fast.dmpo import NoiseConfig
from dmpo_fast.ops import forward_mask, wdce_loss

_NOISE = DEFAULTS.noise("loss")  # the trainer's masking (dmpo_fast.algorithms.dmpo.DMPOOptions)
_LABELS = ("targets", "loss_mask", "row_weights")


def rollout_rows(
    ids: torch.Tensor,
    maskable: torch.Tensor,
    weights: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> list[dict]:
    """One dict per rollout (``ids``, ``maskable``, ``weights`` and maybe ``attention_mask``): a dataset for
    ``Trainer`` (a list works as one; so does ``datasets.Dataset.from_list``)."""
    n = ids.shape[0]
    if maskable.shape != ids.shape or weights.shape != (n,):
        raise ValueError(
            f"maskable must have ids' shape {list(ids.shape)} and weights shape [{n}], got "
            f"{list(maskable.shape)} and {list(weights.shape)}"
        )
    rows = [{"ids": ids[i], "maskable": maskable[i], "weights": weights[i]} for i in range(n)]
    if attention_mask is not None:
        for i, row in enumerate(rows):
            row["attention_mask"] = attention_mask[i]
    return rows


def _pad(rows: list, pad_value, dtype: torch.dtype) -> torch.Tensor:
    rows = [torch.as_tensor(r, dtype=dtype) for r in rows]
    out = torch.full((len(rows), max(r.shape[0] for r in rows)), pad_value, dtype=dtype)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r  # right padding: padded positions are never maskable nor attended
    return out


class DMPOCollator:
    """Batch rollout rows, noise them (``forward_mask``), and pack the loss targets as ``labels``.

    Each feature holds ``ids`` [L], ``maskable`` [L] (completion positions), ``weights`` (a float) and
    optionally ``attention_mask`` [L]. Rows of different lengths are right-padded with ``pad_id``. The mask
    seed is drawn from torch's global generator, which the Trainer seeds (and seeds per dataloader worker).
    """

    def __init__(self, mask_id: int, *, noise: NoiseConfig = _NOISE, pad_id: int = 0):
        if isinstance(mask_id, bool) or not isinstance(mask_id, int) or mask_id < 0:
            raise ValueError(f"mask_id must be a non-negative int, got {mask_id!r}")
        if not isinstance(noise, NoiseConfig):
            raise ValueError(f"noise must be a dmpo_fast.dmpo.NoiseConfig, got {type(noise).__name__}")
        self.mask_id = mask_id
        self.noise = noise
        self.pad_id = pad_id

    def __call__(self, features: list[dict]) -> dict:
        missing = [k for k in ("ids", "maskable", "weights") if k not in features[0]]
        if missing:
            raise ValueError(
                f"each row needs 'ids', 'maskable' and 'weights'; missing {missing}. With a "
                "datasets.Dataset, pass TrainingArguments(remove_unused_columns=False) to keep them"
            )
        ids = _pad([f["ids"] for f in features], self.pad_id, torch.long)  # [B, L]
        maskable = _pad([f["maskable"] for f in features], False, torch.bool)
        weights = torch.tensor([float(f["weights"]) for f in features])  # [B]
        attention_mask = None
        if "attention_mask" in features[0] or any(len(f["ids"]) != ids.shape[1] for f in features):
            masks = [f.get("attention_mask", torch.ones(len(f["ids"]))) for f in features]
            attention_mask = _pad(masks, 0, torch.long)
        R = self.noise.replicates
        noisy, masked = forward_mask(
            ids,
            maskable,
            mask_id=self.mask_id,
            replicates=R,
            antithetic=self.noise.antithetic,
            rate_min=self.noise.rate_min,
            rate_max=self.noise.rate_max,
        )  # [R*B, L] each, row r*B + b is replicate r of rollout b
        labels = {"targets": ids.repeat(R, 1), "loss_mask": masked, "row_weights": weights.repeat(R) / R}
        batch = {"ids": noisy, "labels": labels}
        if attention_mask is not None:
            batch["attention_mask"] = attention_mask.repeat(R, 1)
        return batch


class DMPOComputeLoss:
    """``compute_loss_func`` for ``transformers.Trainer``: the fused WDCE loss on the policy's hidden states.

    ``policy`` is the ``DiffusionLM`` being trained (the object given to the Trainer); its ``head_weight``
    (LoRA on the head included) and ``logit_scale`` are read at each call.
    """

    def __init__(self, policy, *, impl: str = "auto"):
        for name in ("head_weight", "hidden", "mask_id"):
            if not hasattr(policy, name):
                raise ValueError(f"policy must be a dmpo_fast DiffusionLM; it has no {name!r}")
        self.policy = policy
        self.impl = impl

    def __call__(self, outputs, labels, num_items_in_batch=None) -> torch.Tensor:
        if not isinstance(outputs, torch.Tensor) or outputs.dim() != 3:
            raise ValueError(
                "outputs must be the hidden states [R*B, L, H] that a DiffusionLM's forward returns; train "
                f"the DiffusionLM itself (dmpo_fast.models.wrap(model)), got {type(outputs).__name__}"
            )
        if not isinstance(labels, dict) or any(k not in labels for k in _LABELS):
            raise ValueError(f"labels must be the dict DMPOCollator builds with keys {_LABELS}")
        hidden = outputs
        scale = float(getattr(self.policy, "logit_scale", 1.0))
        if scale != 1.0:
            hidden = hidden * scale
        head = self.policy.head_weight
        return wdce_loss(
            hidden,
            head.to(hidden.dtype),
            labels["targets"],
            labels["loss_mask"],
            labels["row_weights"].to(torch.float32),
            impl=self.impl,
        )
