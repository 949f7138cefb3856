"""Triton forward_mask and importance_weights against their eager twins (interpreter on CPU)."""

import pytest
import torch

import dmpo_fast
from dmpo_fast.kernels import runtime as kernels

pytestmark = pytest.mark.skipif(not kernels.available(), reason="Triton kernels cannot run here")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("B,L", [(1, 1), (3, 37), (5, 130), (2, 1031)])
@pytest.mark.parametrize("replicates,antithetic", [(2, True), (4, True), (3, False)])
def test_forward_mask_bitwise_equal(B, L, replicates, antithetic):
    ids = torch.randint(0, 1000, (B, L), device=DEVICE)
    maskable = torch.rand(B, L, device=DEVICE) < 0.7
    kw = dict(mask_id=126336, replicates=replicates, antithetic=antithetic, rate_min=0.2, rate_max=0.9,
              seed=(1 << 45) + 12345)
    a = dmpo_fast.forward_mask(ids, maskable, impl="eager", **kw)
    b = dmpo_fast.forward_mask(ids, maskable, impl="triton", **kw)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_forward_mask_non_contiguous_inputs():
    ids = torch.randint(0, 50, (7, 20), device=DEVICE)[::2]
    maskable = (torch.rand(7, 20, device=DEVICE) < 0.5)[::2]
    a = dmpo_fast.forward_mask(ids, maskable, mask_id=3, replicates=2, seed=9, impl="eager")
    b = dmpo_fast.forward_mask(ids, maskable, mask_id=3, replicates=2, seed=9, impl="triton")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("G", [1, 5, 16])
@pytest.mark.parametrize("alpha", [0.0, 0.04])
@pytest.mark.parametrize("baseline", ["none", "group", "individual", "model"])
@pytest.mark.parametrize("ess_target", [None, 0.7])
def test_importance_weights_match_eager(dtype, G, alpha, baseline, ess_target):
    N = 3 * G
    r = (torch.rand(N, device=DEVICE) * 3).to(dtype)
    lr = torch.randn(N, device=DEVICE).to(dtype)
    if N > 3:
        r[1] = float("nan")
        lr[2] = float("inf")
    kw = dict(group_size=G, alpha=alpha, coeff=0.8, baseline=baseline, centering_strength=0.9, ess_target=ess_target)
    a = dmpo_fast.importance_weights(r, lr, impl="eager", **kw)
    b = dmpo_fast.importance_weights(r, lr, impl="triton", **kw)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    if ess_target is not None and dtype == torch.float64:
        # A last-bit difference can flip one bisection halving: coeff moves by ~2e-10 and the
        # weights by that times the logit range (r/alpha ~ 75 here).
        tol = dict(rtol=1e-7, atol=1e-7)
    for name in ("weights", "raw", "ess", "coeff"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        torch.testing.assert_close(y, x, **tol, msg=name)
    assert torch.equal(a.valid, b.valid) and a.dropped.item() == b.dropped.item()


@pytest.mark.gpu
def test_small_ops_at_training_shapes_on_gpu():
    B, L = 32, 456
    ids = torch.randint(0, 126464, (B, L), device="cuda")
    maskable = torch.zeros(B, L, dtype=torch.bool, device="cuda")
    maskable[:, 200:] = True
    kw = dict(mask_id=126336, replicates=4, seed=77)
    a = dmpo_fast.forward_mask(ids, maskable, impl="eager", **kw)
    b = dmpo_fast.forward_mask(ids, maskable, impl="triton", **kw)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    r = torch.rand(256, device="cuda")
    lr = torch.randn(256, device="cuda")
    x = dmpo_fast.importance_weights(r, lr, group_size=16, alpha=0.04, ess_target=0.7, impl="eager")
    y = dmpo_fast.importance_weights(r, lr, group_size=16, alpha=0.04, ess_target=0.7, impl="triton")
    torch.testing.assert_close(y.weights, x.weights, rtol=1e-5, atol=1e-6)
