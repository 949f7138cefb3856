"""diffu-GRPO: one-step log-probs against full logits, the loss against a plain transcription of d1's formula
(clipping active both ways, β = 0 and β > 0), advantages, the buffer / loss step, and a toy task that
improves under a few updates."""

import pytest
import torch
from toy_models import ToyDenoiser

from dmpo_fast import grpo
from dmpo_fast.kernels import runtime as kernels
from dmpo_fast.sampling import llada

V, MASK = 13, 12
P, L = 4, 10

# The fused Triton kernels run where they can (a GPU, or the interpreter on CPU).
IMPLS = ["chunked", "eager"] + (["triton"] if kernels.available() else [])


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def model():
    return ToyDenoiser(vocab=V, hidden=8, mask_id=MASK, seed=0)


def _batch(n=4):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 11, (n, L), generator=g)
    am = torch.ones(n, L, dtype=torch.long)
    am[1, :2] = 0  # left padding
    return ids, am


# --------------------------------------------------------------------------------------------------
# One-step log-probs
# --------------------------------------------------------------------------------------------------


def test_prompt_masks():
    ids, am = _batch(512)
    maskable = (torch.arange(L) >= P).expand(512, L)
    m = grpo.prompt_mask_draw(ids, maskable, am, p_mask_prompt=0.3, seed=1)
    assert m[:, P:].all()  # the whole completion
    assert not m[1, :2].any()  # padding never
    frac = m[:, :P][am[:, :P].bool()].float().mean().item()
    assert abs(frac - 0.3) < 0.03
    assert torch.equal(m, grpo.prompt_mask_draw(ids, maskable, am, p_mask_prompt=0.3, seed=1))
    assert not torch.equal(m, grpo.prompt_mask_draw(ids, maskable, am, p_mask_prompt=0.3, seed=2))
    part = grpo.prompt_mask_draw(ids[5:9], maskable[5:9], am[5:9], p_mask_prompt=0.3, seed=1,
                                 row_keys=torch.arange(5, 9))  # fmt: skip
    assert torch.equal(part, m[5:9])  # a micro-batch draws the full batch's masks
    assert not grpo.prompt_mask_draw(ids, maskable, am, p_mask_prompt=0.0, seed=1)[:, :P].any()


@pytest.mark.parametrize("impl", IMPLS)
def test_logprobs_match_full_logits(model, impl):
    ids, am = _batch()
    maskable = (torch.arange(L) >= P).expand(4, L)
    score = maskable.clone()
    score[2, -3:] = False  # e.g. EOS padding left out of the projections
    got = grpo.diffu_grpo_logprobs(model, ids, P, attention_mask=am, p_mask_prompt=0.5, seed=3,
                                   score_mask=score, impl=impl)  # fmt: skip
    masked = grpo.prompt_mask_draw(ids, maskable, am, p_mask_prompt=0.5, seed=3)
    assert masked[:, :P].any() and not masked[:, :P].all()
    logits = model.logits(torch.where(masked, MASK, ids), am).double()
    want = torch.log_softmax(logits, -1).gather(2, ids[..., None])[..., 0]
    torch.testing.assert_close(got[score], want[score].float(), rtol=1e-5, atol=1e-6)
    assert (got[~score] == 0).all()
    # Gradients through linear_logprob equal the full-logit ones.
    (g_got,) = torch.autograd.grad((got * torch.arange(L)).sum(), [model.head])
    logits = model.logits(torch.where(masked, MASK, ids), am)
    want = torch.log_softmax(logits, -1).gather(2, ids[..., None])[..., 0]
    (g_want,) = torch.autograd.grad((torch.where(score, want, 0.0) * torch.arange(L)).sum(), [model.head])
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------------


def _d1_loss(logp, old, ref, adv, mask, eps, beta):
    """d1's compute_loss, transcribed."""
    coef_1 = torch.exp(logp - old)
    coef_2 = torch.clamp(coef_1, 1 - eps, 1 + eps)
    per_token_loss1 = coef_1 * adv.unsqueeze(1)
    per_token_loss2 = coef_2 * adv.unsqueeze(1)
    per_token_loss = -torch.min(per_token_loss1, per_token_loss2)
    if beta != 0.0:
        per_token_kl = torch.exp(ref - logp) - (ref - logp) - 1
        per_token_loss = per_token_loss + beta * per_token_kl
    return (per_token_loss * mask).sum() / mask.sum()


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_matches_d1_transcription(beta):
    g = torch.Generator().manual_seed(0)
    N, T, eps = 6, 9, 0.2
    old = -torch.rand(N, T, generator=g) * 3
    logp = (old + torch.randn(N, T, generator=g) * 0.4).requires_grad_()  # ratios well outside [0.8, 1.2]
    ref = old + torch.randn(N, T, generator=g) * 0.3
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 0.0, 2.0])
    mask = torch.rand(N, T, generator=g) > 0.2
    ratio = (logp - old).exp().detach()
    a = adv[:, None]
    upper = (ratio > 1 + eps) & (a > 0) & mask  # clipped from above: no gradient
    lower = (ratio < 1 - eps) & (a < 0) & mask  # clipped from below: no gradient
    assert upper.any() and lower.any()
    out = grpo.diffu_grpo_loss(logp, old, ref, adv, mask, epsilon=eps, beta=beta)
    want = _d1_loss(logp, old, ref, adv, mask.float(), eps, beta)
    torch.testing.assert_close(out.loss, want)
    (g_out,) = torch.autograd.grad(out.loss, logp)
    (g_want,) = torch.autograd.grad(want, logp)
    torch.testing.assert_close(g_out, g_want)
    if beta == 0:
        assert (g_out[upper | lower] == 0).all() and (g_out[mask & ~upper & ~lower & (a != 0)] != 0).all()
        assert "kl" not in out.stats
    else:
        assert out.stats["kl"] > 0
    assert out.stats["clip_ratio"].item() == pytest.approx(((upper | lower).sum() / mask.sum()).item())


def test_loss_normalisations_and_on_policy_ratio():
    g = torch.Generator().manual_seed(1)
    logp = (-torch.rand(4, 5, generator=g)).requires_grad_()
    adv = torch.tensor([1.0, -2.0, 0.5, 0.0])
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[0, 3:] = False
    # μ = 1: old = logp detached, ratio 1, gradient of −A·log π / n_tokens.
    out = grpo.diffu_grpo_loss(logp, None, None, adv, mask, beta=0.0)
    (grad,) = torch.autograd.grad(out.loss, logp)
    torch.testing.assert_close(grad, -adv[:, None].expand(4, 5) * mask / mask.sum())
    seq = grpo.diffu_grpo_loss(logp, None, None, adv, mask, beta=0.0, normalize="sequence")
    torch.testing.assert_close(seq.loss, -(adv * 1.0).sum() / 4)
    half = grpo.diffu_grpo_loss(
        logp[:2], None, None, adv[:2], mask[:2], beta=0.0, normalizer=mask.sum().item()
    )
    rest = grpo.diffu_grpo_loss(
        logp[2:], None, None, adv[2:], mask[2:], beta=0.0, normalizer=mask.sum().item()
    )
    torch.testing.assert_close(half.loss + rest.loss, out.loss)
    with pytest.raises(ValueError, match="ref_logp"):
        grpo.diffu_grpo_loss(logp, None, None, adv, mask, beta=0.1)


def test_group_advantages():
    r = torch.tensor([1.0, 0.0, 0.5, 0.5, float("nan"), 1.0])
    torch.testing.assert_close(grpo.group_advantages(r, 2), torch.tensor([0.5, -0.5, 0.0, 0.0, 0.0, 0.0]))
    r = torch.tensor([1.0, 0.0, 0.0, 0.0])
    adv = grpo.group_advantages(r, 4, scale="std")
    torch.testing.assert_close(adv, (r - r.mean()) / (r.std() + 1e-4))
    with pytest.raises(ValueError, match="group_size"):
        grpo.group_advantages(r, 3)


# --------------------------------------------------------------------------------------------------
# Buffer, loss step, training direction
# --------------------------------------------------------------------------------------------------


def _rollouts(policy, n_prompts=2, group=4, seed=0):
    ids = torch.tensor([[1, 2, 3, 4], [4, 3, 2, 1]]).repeat_interleave(group, 0)[: n_prompts * group]
    return llada(
        policy, ids, None, gen_length=6, block_length=6, steps=3, temperature=1.0, seed=seed, eos_id=None
    )


def _reward(ro):  # the share of even completion tokens
    return (ro.ids[:, ro.prompt_length :] % 2 == 0).float().mean(1)


def test_buffer_and_loss_step(model):
    ref = ToyDenoiser(vocab=V, hidden=8, mask_id=MASK, seed=1)
    cfg = grpo.GRPOConfig(group_size=4, num_iterations=2, beta=0.04, p_mask_prompt=0.5)
    ro = _rollouts(model)
    buf = grpo.make_buffer(model, ro, _reward(ro), cfg, seed=0, reference=ref, impl="chunked")
    assert buf["old_logp"].shape == buf["ref_logp"].shape == (8, 2, ro.ids.shape[1])
    assert buf["mask_seeds"][0] != buf["mask_seeds"][1]
    for step in range(2):  # the policy is still the old one: its log-probs are the buffer's
        out = grpo.loss_step(model, buf, cfg, step, impl="chunked")
        kw = dict(p_mask_prompt=0.5, seed=buf["mask_seeds"][step], score_mask=buf["completion_mask"])
        logp = grpo.diffu_grpo_logprobs(model, ro.ids, buf["maskable"], **kw)
        torch.testing.assert_close(logp, buf["old_logp"][:, step])
        ref_logp = grpo.diffu_grpo_logprobs(ref, ro.ids, buf["maskable"], **kw)
        cm = buf["completion_mask"].float()
        want = _d1_loss(logp, logp, ref_logp, buf["advantages"], cm, 0.2, 0.04)
        torch.testing.assert_close(out.loss, want)
        rows = lambda v, s: v[s] if torch.is_tensor(v) and v.dim() and v.shape[0] == 8 else v  # noqa: E731
        parts = [{k: rows(v, s) for k, v in buf.items()} for s in (slice(0, 4), slice(4, 8))]
        total = sum(grpo.loss_step(model, p, cfg, step, impl="chunked").loss for p in parts)
        torch.testing.assert_close(total, out.loss)
    with pytest.raises(ValueError, match="reference"):
        grpo.make_buffer(model, ro, _reward(ro), cfg, seed=0, reference=None)


def test_a_few_updates_raise_the_reward():
    policy = ToyDenoiser(vocab=V, hidden=8, mask_id=MASK, seed=3)
    cfg = grpo.GRPOConfig(group_size=8, num_iterations=2, beta=0.0)
    opt = torch.optim.Adam(policy.parameters(), lr=0.05)

    def mean_reward():
        return torch.stack(
            [_reward(_rollouts(policy, group=16, seed=100 + s)).mean() for s in range(4)]
        ).mean()

    before = mean_reward()
    for it in range(6):
        ro = _rollouts(policy, group=8, seed=it)
        buf = grpo.make_buffer(policy, ro, _reward(ro), cfg, seed=it, impl="chunked")
        for step in range(cfg.num_iterations):
            opt.zero_grad()
            grpo.loss_step(policy, buf, cfg, step, impl="chunked").loss.backward()
            opt.step()
    after = mean_reward()
    assert after > before + 0.1, (before, after)


def test_config_errors_name_the_field():
    cases = [
        ({"epsilon": 0}, "epsilon"), ({"beta": -1}, "beta"), ({"num_iterations": 0}, "num_iter"),
        ({"p_mask_prompt": 2.0}, "p_mask_prompt"), ({"normalize": "x"}, "normalize"),
    ]  # fmt: skip
    for kwargs, field in cases:
        with pytest.raises(ValueError, match=field):
            grpo.GRPOConfig(**kwargs)
