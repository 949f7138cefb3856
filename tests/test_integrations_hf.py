"""``transformers.Trainer(compute_loss_func=DMPOComputeLoss(...))`` on your own rollouts, on CPU."""

from __future__ import annotations

import pytest
import torch
from toy_models import tiny_policy

from dmpo_fast import dmpo, importance_weights
from dmpo_fast.integrations.hf import DMPOCollator, DMPOComputeLoss, rollout_rows
from dmpo_fast.ops.philox import draw_seed

V, MASK, EOS = 55, 2, 1
G, P, C = 3, 4, 6


def _policy():
    return tiny_policy(V, MASK, EOS)


def _rollouts(groups=2):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, V, (groups * G, P + C), generator=g)
    maskable = torch.zeros_like(ids, dtype=torch.bool)
    maskable[:, P:] = True
    rewards = torch.rand(groups * G, generator=g)
    weights = importance_weights(rewards, torch.zeros_like(rewards), group_size=G, alpha=0.1).weights
    return ids, maskable, weights


def test_collator_and_loss_compute_dmpo_wdce():
    policy = _policy()
    ids, maskable, weights = _rollouts(1)
    noise = dmpo.NoiseConfig(replicates=2)
    torch.manual_seed(11)
    batch = DMPOCollator(MASK, noise=noise)(rollout_rows(ids, maskable, weights))
    assert batch["ids"].shape == (2 * G, P + C)
    assert not (batch["ids"][:, :P] == MASK).any()  # prompts are never masked
    loss = DMPOComputeLoss(policy)(policy(batch["ids"]), batch["labels"])
    torch.manual_seed(11)
    seed = draw_seed()  # the collator's draw
    ref = dmpo.wdce(policy, ids, maskable, weights, group_size=G, noise=noise, seed=seed).loss
    assert ref.abs() > 1e-4
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)


def test_trainer_runs_two_optimizer_steps(tmp_path):
    transformers = pytest.importorskip("transformers")
    policy = _policy()
    before = [p.detach().clone() for p in policy.parameters()]
    ids, maskable, weights = _rollouts(2)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=3, max_steps=2, learning_rate=1e-2,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, remove_unused_columns=False,
        dataloader_num_workers=0, seed=0,
    )  # fmt: skip
    trainer = transformers.Trainer(
        model=policy,
        args=args,
        train_dataset=rollout_rows(ids, maskable, weights),
        data_collator=DMPOCollator(MASK, noise=dmpo.NoiseConfig(replicates=2)),
        compute_loss_func=DMPOComputeLoss(policy),
    )
    result = trainer.train()
    assert result.global_step == 2
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    moved = [not torch.equal(a, b.detach()) for a, b in zip(before, policy.parameters(), strict=True)]
    assert all(moved)  # every parameter (embedding, blocks, head) took a step


def test_errors_name_the_problem():
    policy = _policy()
    with pytest.raises(ValueError, match="remove_unused_columns"):
        DMPOCollator(MASK)([{"ids": torch.zeros(3, dtype=torch.long)}])
    with pytest.raises(ValueError, match="hidden states"):
        DMPOComputeLoss(policy)(torch.zeros(2, 3), {})
    with pytest.raises(ValueError, match="DiffusionLM"):
        DMPOComputeLoss(policy.model)
