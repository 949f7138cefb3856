"""``DMPOLoss`` and the README's before/after loop: fused loss == full-logits loss, gradients too."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from toy_models import tiny_policy

import dmpo_fast
from dmpo_fast import DMPOLoss, forward_mask, importance_weights
from dmpo_fast.dmpo import NoiseConfig
from dmpo_fast.models import build_tiny

V, MASK, EOS = 55, 2, 1
G, P, C = 3, 5, 7  # group size, prompt length, completion length


def _policy():
    return tiny_policy(V, MASK, EOS)


def _rollouts(groups=2):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, V, (groups * G, P + C), generator=g)
    maskable = torch.zeros_like(ids, dtype=torch.bool)
    maskable[:, P:] = True
    rewards = torch.rand(groups * G, generator=g)
    return ids, maskable, rewards


def _full_logits_loss(policy, ids, maskable, weights, R, seed):
    """The 'before' loop of the README: every logit of every noisy row."""
    B, L = ids.shape
    noisy, masked = forward_mask(ids, maskable, mask_id=policy.mask_id, replicates=R, seed=seed)
    logits = policy.logits(noisy).float()  # [R*B, L, V]
    ce = F.cross_entropy(logits.flatten(0, 1), ids.repeat(R, 1).flatten(), reduction="none").view(R * B, L)
    row_w = weights.repeat(R) / R
    return (row_w[:, None] * ce * masked).sum(1).div(masked.sum(1).clamp_min(1)).sum()


def _grads(policy, loss):
    loss.backward()
    grads = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad()
    return grads


def test_readme_before_and_after_give_the_same_loss_and_gradients():
    policy = _policy()
    ids, maskable, rewards = _rollouts()
    weights = importance_weights(rewards, torch.zeros_like(rewards), group_size=G, alpha=0.5).weights
    R, seed = 4, 123
    before = _full_logits_loss(policy, ids, maskable, weights, R, seed)
    g_before = _grads(policy, before)

    # 'after': the same loop with the fused loss (only masked rows projected, a chunk at a time)
    noisy, masked = forward_mask(ids, maskable, mask_id=policy.mask_id, replicates=R, seed=seed)
    hidden = policy.hidden(noisy) * policy.logit_scale  # [R*B, L, H]
    after = dmpo_fast.wdce_loss(hidden, policy.head_weight, ids.repeat(R, 1), masked, weights.repeat(R) / R)
    g_after = _grads(policy, after)

    # and the module, from rewards (weights computed inside), on the same masks
    criterion = DMPOLoss(G, alpha=0.5, baseline="individual", noise=NoiseConfig(replicates=R))  # the op's default
    out = criterion(policy, ids, maskable, rewards=rewards, log_ratio=torch.zeros_like(rewards), seed=seed)
    g_module = _grads(policy, out.loss)

    assert before.abs() > 1e-3
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, before, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.stats["importance"].weights, weights)
    for a, m, b in zip(g_after, g_module, g_before, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(m, b, rtol=1e-4, atol=1e-7)


def test_log_ratio_scores_both_models_on_the_same_masks():
    policy = _policy()
    ids, maskable, _ = _rollouts(1)
    criterion = DMPOLoss(G)
    # A reference identical to the policy gives exactly 0 only if both saw the same masks.
    same = criterion.log_ratio(policy, copy.deepcopy(policy), ids, maskable)
    assert torch.equal(same, torch.zeros_like(same))
    other = build_tiny(V, MASK, EOS, seed=1)
    differ = criterion.log_ratio(policy, other, ids, maskable, seed=5)
    assert differ.shape == (G,) and torch.isfinite(differ).all() and differ.abs().min() > 0


def test_one_optimizer_step_moves_the_policy_toward_high_reward_rollouts():
    policy = _policy()
    ids, maskable, rewards = _rollouts(1)
    rewards = torch.tensor([1.0, 0.0, 0.0])
    criterion = DMPOLoss(G, alpha=0.0, baseline="group")
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)
    fixed = dict(seed=7)
    elbo = lambda: dmpo_fast.dmpo.elbo(policy, ids, maskable, noise=NoiseConfig(replicates=8), **fixed)  # noqa: E731
    with torch.no_grad():
        start = elbo()
    out = criterion(policy, ids, maskable, rewards=rewards, seed=3)
    out.loss.backward()
    opt.step()
    with torch.no_grad():
        gain = elbo() - start
    assert torch.isfinite(out.loss)
    assert gain[0] > gain[1] and gain[0] > gain[2]  # the rewarded rollout became relatively more likely


def test_model_baseline_and_argument_errors():
    policy = _policy()
    ids, maskable, rewards = _rollouts(1)
    criterion = DMPOLoss(G, alpha=0.0, baseline="model")
    with pytest.raises(ValueError, match="log_p_old"):
        criterion(policy, ids, maskable, rewards=rewards)
    log_p_old = torch.zeros(G)
    out = criterion(policy, ids, maskable, rewards=rewards, log_p_old=log_p_old, seed=1)
    assert torch.isfinite(out.loss) and "elbo" in out.stats
    with pytest.raises(ValueError, match="exactly one"):
        criterion(policy, ids, maskable, rewards=rewards, weights=rewards)
    with pytest.raises(ValueError, match="log_ratio"):
        DMPOLoss(G, alpha=0.1)(policy, ids, maskable, rewards=rewards)
    with pytest.raises(ValueError, match="group_size"):
        DMPOLoss(0)
    with pytest.raises(ValueError, match="baseline"):
        DMPOLoss(G, baseline="mean")
    with pytest.raises(ValueError, match="reference"):
        DMPOLoss(G).log_ratio(policy, None, ids, maskable)
