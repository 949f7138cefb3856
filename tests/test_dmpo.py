"""dmpo.py: ELBO, WDCE (every baseline) and WDDO against direct full-logit transcriptions."""

import pytest
import torch
import torch.nn.functional as F
from toy_models import ToyDenoiser

import dmpo_fast
from dmpo_fast import dmpo
from dmpo_fast.dmpo import NoiseConfig


def _batch(N=6, P=3, C=7, vocab=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (N, P + C), generator=g)
    maskable = torch.zeros(N, P + C, dtype=torch.bool)
    maskable[:, P:] = True
    return ids, maskable


def _direct_row_logprob_sums(model, noisy, masked, targets):
    logp = torch.log_softmax(model.logits(noisy).double(), -1).gather(2, targets[..., None]).squeeze(2)
    return (logp * masked).sum(1)


def test_completion_mask():
    c = torch.tensor([[5, 2, 9, 9], [9, 9, 9, 9], [1, 2, 3, 4]])
    m = dmpo.completion_mask(c, eos_id=9, include_eos_padding=False)
    assert m.tolist() == [[True, True, True, False], [True, False, False, False], [True] * 4]
    assert dmpo.completion_mask(c, eos_id=9).all()


@pytest.mark.parametrize("antithetic", [True, False])
def test_elbo_matches_direct_computation(antithetic):
    model = ToyDenoiser()
    ids, maskable = _batch()
    noise = NoiseConfig(replicates=4, antithetic=antithetic)
    got = dmpo.elbo(model, ids, maskable, noise=noise, seed=11, micro_batch=5)
    noisy, masked = dmpo_fast.forward_mask(ids, maskable, mask_id=model.mask_id, replicates=4,
                                           antithetic=antithetic, seed=11)
    sums = _direct_row_logprob_sums(model, noisy, masked, ids.repeat(4, 1))
    n = maskable.sum(1).double().repeat(4)
    m = masked.sum(1).clamp_min(1).double()
    want = (n / m * sums).reshape(4, -1).mean(0)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # Same seed -> same masks -> identical estimate (policy and reference share masks this way).
    assert torch.equal(got, dmpo.elbo(model, ids, maskable, noise=noise, seed=11))


def _direct_wdce(model, ids, maskable, w, seed, R=4):
    noisy, masked = dmpo_fast.forward_mask(ids, maskable, mask_id=model.mask_id, replicates=R, seed=seed)
    logp = torch.log_softmax(model.logits(noisy).double(), -1).gather(2, ids.repeat(R, 1)[..., None]).squeeze(2)
    per_row = -(logp * masked).sum(1) / masked.sum(1).clamp_min(1)
    return (w.double().repeat(R) * per_row).sum() / R


@pytest.mark.parametrize("impl", ["eager", "chunked"])
@pytest.mark.parametrize("baseline", ["none", "individual", "model"])
def test_wdce_matches_direct(impl, baseline):
    G = 3
    model = ToyDenoiser()
    ids, maskable = _batch()
    r = torch.rand(6)
    log_p_old = dmpo.elbo(model, ids, maskable, seed=99).detach()
    iw = dmpo_fast.importance_weights(r, torch.randn(6), group_size=G, alpha=0.5,
                                      baseline="none" if baseline == "model" else baseline)
    out = dmpo.wdce(model, ids, maskable, iw.weights, group_size=G, baseline=baseline,
                    log_p_old=log_p_old, seed=5, impl=impl)
    w = iw.weights
    if baseline == "model":
        elbo_now = dmpo.elbo(model, ids, maskable, seed=5)  # the same masks as the loss
        w = w - torch.softmax((elbo_now - log_p_old).reshape(-1, G), -1).reshape(-1)
        torch.testing.assert_close(out.stats["elbo"], elbo_now, rtol=1e-5, atol=1e-5)
    want = _direct_wdce(model, ids, maskable, w.detach(), seed=5)
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6)
    # Gradients match the direct formula's.
    out.loss.backward()
    got_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    _direct_wdce(model, ids, maskable, w.detach(), seed=5).backward()
    for g1, p in zip(got_grads, model.parameters()):
        torch.testing.assert_close(g1.double(), p.grad.double(), rtol=1e-4, atol=1e-6)


def test_wddo_matches_direct():
    G, R = 3, 4
    model = ToyDenoiser()
    ids, maskable = _batch()
    raw = torch.softmax(torch.randn(2, G), -1).reshape(-1)
    log_p_old = dmpo.elbo(model, ids, maskable, seed=1).detach() + 0.3
    out = dmpo.wddo(model, ids, maskable, raw, log_p_old, group_size=G, beta=0.7, a=0.5, seed=8)
    noisy, masked = dmpo_fast.forward_mask(ids, maskable, mask_id=model.mask_id, replicates=R, seed=8)
    sums = _direct_row_logprob_sums(model, noisy, masked, ids.repeat(R, 1))
    n = maskable.sum(1).double().repeat(R)
    est = n / masked.sum(1).clamp_min(1) * sums
    half = R // 2 * 6
    real = est[:half].reshape(2, -1).mean(0) - log_p_old
    fake = est[half:].reshape(2, -1).mean(0) - log_p_old
    want = -(G * raw * F.logsigmoid(0.7 * real)).mean() - 0.5 * F.logsigmoid(-0.7 * fake).mean()
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-5)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in model.parameters())


def test_loss_errors():
    model = ToyDenoiser()
    ids, maskable = _batch()
    with pytest.raises(ValueError, match="group_size"):
        dmpo.wdce(model, ids, maskable, torch.ones(6), group_size=4)
    with pytest.raises(ValueError, match="log_p_old"):
        dmpo.wdce(model, ids, maskable, torch.ones(6), group_size=3, baseline="model")
    with pytest.raises(ValueError, match="baseline"):
        dmpo.wdce(model, ids, maskable, torch.ones(6), group_size=3, baseline="mean")
    with pytest.raises(ValueError, match="weights"):
        dmpo.wdce(model, ids, maskable, torch.ones(5), group_size=3)
    with pytest.raises(ValueError, match="maskable"):
        dmpo.elbo(model, ids, maskable[:, :-1])


def _train(impl, steps=4):
    """A few DMPO steps of the toy model; returns losses and final parameters."""
    torch.manual_seed(0)
    model = ToyDenoiser(seed=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ids, maskable = _batch(N=8, seed=4)
    r = torch.rand(8, generator=torch.Generator().manual_seed(1))
    log_p_old = dmpo.elbo(model, ids, maskable, seed=0, impl=impl).detach()
    losses = []
    for step in range(steps):
        with torch.no_grad():
            log_p_ref = dmpo.elbo(model, ids, maskable, seed=100 + step, impl=impl)
        iw = dmpo_fast.importance_weights(r, log_p_ref - log_p_old, group_size=4, alpha=0.2)
        out = dmpo.wdce(model, ids, maskable, iw.weights, group_size=4, seed=step, impl=impl)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    return losses, [p.detach().clone() for p in model.parameters()]


def test_training_steps_same_with_every_backend():
    """Kernels on vs off: a few training steps give the same losses and parameters."""
    ref_losses, ref_params = _train("eager")
    from dmpo_fast.kernels import runtime as kernels

    impls = ["chunked", "triton"] if kernels.available() else ["chunked"]
    for impl in impls:
        losses, params = _train(impl)
        assert losses == pytest.approx(ref_losses, rel=1e-4, abs=1e-6), impl
        for a, b in zip(params, ref_params):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_tied_groups():
    r = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.5, float("nan"), 2.0, float("nan"), 0.3, 0.3, float("nan")])
    # equal; spread; one finite reward (nothing to compare); equal finite rewards around a failed one
    assert dmpo.tied_groups(r, 3).tolist() == [True, False, True, True]
    assert dmpo.tied_groups(torch.tensor([0.0, 1e-9]), 2).tolist() == [True]
    assert dmpo.tied_groups(torch.tensor([0.0, 1e-3]), 2, tol=1e-6).tolist() == [False]
    with pytest.raises(ValueError, match="group_size"):
        dmpo.tied_groups(torch.zeros(5), 2)


def test_wdce_model_baseline_keep():
    """With ``keep`` the model baseline's softmax runs over the kept rows of a group; a group with no kept
    row gets no baseline (its rows carry no weight at all)."""
    G = 3
    model = ToyDenoiser()
    ids, maskable = _batch()
    log_p_old = dmpo.elbo(model, ids, maskable, seed=99).detach()
    raw = torch.tensor([0.7, 0.3, 0.0, 0.0, 0.0, 0.0])  # group 0: row 2 dropped; group 1: all dropped
    keep = torch.tensor([True, True, False, False, False, False])
    out = dmpo.wdce(model, ids, maskable, raw, group_size=G, baseline="model", log_p_old=log_p_old,
                    keep=keep, seed=5)
    gap = (dmpo.elbo(model, ids, maskable, seed=5) - log_p_old)[:2]
    c = torch.cat([torch.softmax(gap, 0), torch.zeros(4)])
    torch.testing.assert_close(out.stats["effective_weights"], raw - c, rtol=1e-5, atol=1e-6)
    want = _direct_wdce(model, ids, maskable, (raw - c).detach(), seed=5)
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6)
    with pytest.raises(ValueError, match="keep"):
        dmpo.wdce(model, ids, maskable, raw, group_size=G, baseline="model", log_p_old=log_p_old,
                  keep=keep[:4], seed=5)


@pytest.mark.parametrize("baseline", ["none", "group"])
def test_wdce_zero_weight_rows_cost_nothing_and_change_nothing(baseline):
    """Rows of weight 0 are left out of the forward pass; the loss and gradients equal the direct formula's
    over every row (and an all-zero batch gives a zero loss that still backpropagates)."""
    model = ToyDenoiser()
    ids, maskable = _batch()
    w = torch.tensor([0.5, 0.0, -0.25, 0.0, 0.0, 0.75])
    calls, hidden = [], model.hidden

    def counted(x, attention_mask=None):
        calls.append(x.shape[0])
        return hidden(x, attention_mask)

    model.hidden = counted
    out = dmpo.wdce(model, ids, maskable, w, group_size=3, baseline=baseline, seed=5)
    assert calls == [3 * 4] and out.stats["masked_tokens"] > 0  # the 3 weighted rows x 4 replicates
    want = _direct_wdce(model, ids, maskable, w, seed=5)
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6)
    out.loss.backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    _direct_wdce(model, ids, maskable, w, seed=5).backward()
    for g1, p in zip(got, model.parameters()):
        torch.testing.assert_close(g1.double(), p.grad.double(), rtol=1e-4, atol=1e-6)
    zero = dmpo.wdce(model, ids, maskable, torch.zeros(6), group_size=3, baseline=baseline, seed=5)
    assert zero.loss.item() == 0.0
    zero.loss.backward()


def test_elbo_of_selected_rows():
    model = ToyDenoiser()
    ids, maskable = _batch()
    rows = torch.tensor([True, False, True, True, False, False])
    full = dmpo.elbo(model, ids, maskable, seed=3)
    part = dmpo.elbo(model, ids, maskable, seed=3, rows=rows, micro_batch=5)
    torch.testing.assert_close(part[rows], full[rows], rtol=1e-6, atol=1e-6)
    assert torch.isnan(part[~rows]).all()
    assert torch.isnan(dmpo.elbo(model, ids, maskable, seed=3, rows=torch.zeros(6, dtype=torch.bool))).all()
    with pytest.raises(ValueError, match="rows"):
        dmpo.elbo(model, ids, maskable, seed=3, rows=rows[:4])
