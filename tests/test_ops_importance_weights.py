"""importance_weights against the DMPO formulas, written out per group in float64."""

import math

import pytest
import torch

import dmpo_fast


def _softmax(x):
    m = max(x)
    e = [math.exp(v - m) for v in x]
    return [v / sum(e) for v in e]


def _expected(r, lr, G, alpha, coeff, baseline, s):
    """Per-group python-float transcription of the formulas in the DMPO paper / design."""
    raw, weights, ess = [], [], []
    for g in range(len(r) // G):
        rg, lg = r[g * G : (g + 1) * G], lr[g * G : (g + 1) * G]
        if alpha > 0:
            p = _softmax([coeff * (l + x / alpha) for x, l in zip(rg, lg)])
            q = _softmax([coeff * (l - x / alpha) for x, l in zip(rg, lg)])
        else:
            p = _softmax([coeff * x for x in rg])
            q = _softmax([-coeff * x for x in rg])
        if baseline == "none" or baseline == "model":
            w = p
        elif baseline == "group":
            w = [v - s / G for v in p]
        else:
            w = [v - s * b for v, b in zip(p, q)]
        raw += p
        weights += w
        ess.append(1.0 / (G * sum(v * v for v in p)))
    return raw, weights, ess


@pytest.mark.parametrize("baseline", ["none", "group", "individual", "model"])
@pytest.mark.parametrize("alpha", [0.0, 0.04, 1.0])
@pytest.mark.parametrize("G", [1, 4, 7])
def test_formulas(baseline, alpha, G):
    N = 3 * G
    r = torch.rand(N, dtype=torch.float64)
    lr = torch.randn(N, dtype=torch.float64)
    coeff, s = 0.7, 0.8
    out = dmpo_fast.importance_weights(
        r, lr, group_size=G, alpha=alpha, coeff=coeff, baseline=baseline, centering_strength=s
    )
    raw, w, ess = _expected(r.tolist(), lr.tolist(), G, alpha, coeff, baseline, s)
    torch.testing.assert_close(out.raw, torch.tensor(raw, dtype=torch.float64))
    torch.testing.assert_close(out.weights, torch.tensor(w, dtype=torch.float64))
    torch.testing.assert_close(out.ess, torch.tensor(ess, dtype=torch.float64))
    assert torch.all(out.coeff == coeff) and out.dropped.item() == 0 and out.valid.all()
    torch.testing.assert_close(out.raw.reshape(-1, G).sum(1), torch.ones(3, dtype=torch.float64))


def test_fp32_inputs_give_fp32_outputs():
    out = dmpo_fast.importance_weights(torch.rand(8), torch.randn(8), group_size=4, alpha=0.1)
    assert out.weights.dtype == torch.float32 and out.ess.shape == (2,)


def test_alpha_zero_ignores_log_ratio():
    r = torch.rand(8)
    a = dmpo_fast.importance_weights(r, None, group_size=4, alpha=0.0)
    b = dmpo_fast.importance_weights(r, torch.randn(8), group_size=4, alpha=0.0)
    assert torch.equal(a.weights, b.weights)


@pytest.mark.parametrize("target", [0.3, 0.6, 0.9])
def test_ess_target_bisection(target):
    G = 16
    r = torch.rand(4 * G, dtype=torch.float64) * 4
    lr = torch.randn(4 * G, dtype=torch.float64)
    out = dmpo_fast.importance_weights(r, lr, group_size=G, alpha=0.1, ess_target=target)
    assert torch.all((out.coeff >= 0.01) & (out.coeff <= 0.99))
    for g in range(4):
        c = out.coeff[g].item()
        raw, _, ess = _expected(r[g * G : (g + 1) * G].tolist(), lr[g * G : (g + 1) * G].tolist(), G, 0.1, c,
                                "none", 1.0)
        assert out.ess[g].item() == pytest.approx(ess[0], rel=1e-9)
        # Either the target is hit, or it is out of reach and coeff sits at the bound on the right side.
        if 0.011 < c < 0.989:
            assert ess[0] == pytest.approx(target, abs=1e-6)
        elif c >= 0.989:
            assert ess[0] >= target - 1e-6
        else:
            assert ess[0] <= target + 1e-6


def test_ess_target_unreachable_goes_to_bounds():
    # Equal rewards: ESS = 1 for every coeff -> target 0.5 unreachable -> coeff at the upper bound.
    out = dmpo_fast.importance_weights(torch.ones(4), None, group_size=4, alpha=0.0, ess_target=0.5)
    assert out.coeff.item() == pytest.approx(0.99, abs=1e-6)
    # Huge reward gaps: ESS ~ 1/G for every coeff in range -> target 0.9 unreachable -> lower bound.
    out = dmpo_fast.importance_weights(torch.tensor([0.0, 1e4, 0, 0]), None, group_size=4, alpha=0.0,
                                       ess_target=0.9)
    assert out.coeff.item() == pytest.approx(0.01, abs=1e-6)


@pytest.mark.parametrize("baseline", ["none", "group", "individual"])
def test_non_finite_samples_are_dropped_and_group_renormalised(baseline):
    r = torch.tensor([1.0, float("nan"), 0.5, 0.2, float("inf"), float("-inf"), float("nan"), 0.0])
    lr = torch.tensor([0.1, 0.2, float("inf"), -0.3, 0.0, 0.0, 0.0, float("nan")])
    out = dmpo_fast.importance_weights(r, lr, group_size=4, alpha=0.5, baseline=baseline)
    assert torch.isfinite(out.weights).all() and torch.isfinite(out.raw).all() and torch.isfinite(out.ess).all()
    assert out.dropped.item() == 6
    assert out.valid.tolist() == [True, False, False, True, False, False, False, False]
    assert torch.all(out.weights[~out.valid] == 0) and torch.all(out.raw[~out.valid] == 0)
    # Group 0 renormalised over its two valid samples, exactly as if the others were absent.
    ref = dmpo_fast.importance_weights(r[[0, 3]], lr[[0, 3]], group_size=2, alpha=0.5, baseline=baseline)
    torch.testing.assert_close(out.raw[[0, 3]], ref.raw)
    torch.testing.assert_close(out.weights[[0, 3]], ref.weights)
    # Group 1 has nothing valid: all zeros, ess 0.
    assert torch.all(out.weights[4:] == 0) and out.ess[1].item() == 0.0


def test_ess_target_with_dropped_samples_stays_finite():
    r = torch.tensor([1.0, float("nan"), 0.0, 2.0] * 2)
    out = dmpo_fast.importance_weights(r, None, group_size=4, alpha=0.0, ess_target=0.7)
    assert torch.isfinite(out.weights).all() and torch.isfinite(out.coeff).all()
    assert out.dropped.item() == 2
