"""forward_mask invariants and the Philox stream."""

import math

import pytest
import torch

import dmpo_fast
from dmpo_fast.ops.philox import philox4x32, philox_uniform


def test_philox_known_answer():
    # Philox4x32-10 known-answer vectors (Random123 kat_vectors): counter 0, key 0 and all-ones.
    z = torch.zeros(1, dtype=torch.int64)
    out = [int(x) for x in philox4x32(0, z, z, z, z)]
    assert out == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    f = torch.full((1,), 0xFFFFFFFF, dtype=torch.int64)
    out = [int(x) for x in philox4x32(0xFFFFFFFF | (0xFFFFFFFF << 32), f, f, f, f)]
    assert out == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]


def test_philox_uniform_is_uniform():
    u = philox_uniform(1234, torch.arange(200_000), torch.tensor(3), torch.tensor(0), torch.tensor(0))
    assert u.dtype == torch.float32 and 0 <= u.min() and u.max() < 1
    counts = torch.histc(u, bins=20, min=0, max=1)
    expected = u.numel() / 20
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 43.8  # 0.999 quantile of chi-square with 19 dof


def _batch(B=5, L=41, prompt=(3, 7, 0, 11, 5)):
    ids = torch.randint(0, 50, (B, L))
    maskable = torch.ones(B, L, dtype=torch.bool)
    for b, p in enumerate(prompt[:B]):
        maskable[b, :p] = False
    maskable[1, -4:] = False  # padding at the end of one row
    return ids, maskable


@pytest.mark.parametrize("antithetic", [True, False])
def test_forward_mask_invariants(antithetic):
    ids, maskable = _batch()
    R, B = 4, ids.shape[0]
    noisy, masked = dmpo_fast.forward_mask(ids, maskable, mask_id=99, replicates=R, antithetic=antithetic, seed=7)
    assert noisy.shape == masked.shape == (R * B, ids.shape[1]) and masked.dtype == torch.bool
    rep_ids, rep_maskable = ids.repeat(R, 1), maskable.repeat(R, 1)
    assert not (masked & ~rep_maskable).any(), "a prompt or padding position was masked"
    assert torch.all(noisy[masked] == 99)
    assert torch.equal(noisy[~masked], rep_ids[~masked])
    if antithetic:
        half = R // 2 * B
        assert torch.equal(masked[half:], rep_maskable[:half] & ~masked[:half])


def test_forward_mask_is_deterministic_and_layout_independent():
    ids, maskable = _batch()
    a = dmpo_fast.forward_mask(ids, maskable, mask_id=99, replicates=2, seed=123)
    b = dmpo_fast.forward_mask(ids, maskable, mask_id=99, replicates=2, seed=123)
    assert torch.equal(a[1], b[1])
    # The mask is a function of (seed, sequence index, replicate, position) only: changing the
    # tokens of other rows never changes a row's mask.
    ids2 = ids.clone()
    ids2[1:] = torch.randint(0, 50, ids2[1:].shape)
    c = dmpo_fast.forward_mask(ids2, maskable, mask_id=99, replicates=2, seed=123)
    assert torch.equal(a[1], c[1])
    d = dmpo_fast.forward_mask(ids, maskable, mask_id=99, replicates=2, seed=124)
    assert not torch.equal(a[1], d[1])


def test_forward_mask_generator_reproducible():
    ids, maskable = _batch()
    g1 = torch.Generator().manual_seed(5)
    g2 = torch.Generator().manual_seed(5)
    a = dmpo_fast.forward_mask(ids, maskable, mask_id=99, replicates=2, generator=g1)
    b = dmpo_fast.forward_mask(ids, maskable, mask_id=99, replicates=2, generator=g2)
    assert torch.equal(a[1], b[1])


@pytest.mark.parametrize("rate_min,rate_max", [(0.1, 1.0), (0.3, 0.5)])
def test_forward_mask_rate_distribution(rate_min, rate_max):
    """Per-row masked fraction ~ λ ~ U[rate_min, rate_max): check its mean and spread."""
    B, L = 400, 2000
    ids = torch.zeros(B, L, dtype=torch.long)
    maskable = torch.ones(B, L, dtype=torch.bool)
    _, masked = dmpo_fast.forward_mask(
        ids, maskable, mask_id=1, replicates=2, antithetic=False, rate_min=rate_min, rate_max=rate_max, seed=3
    )
    frac = masked.float().mean(dim=1)  # ≈ λ per row (binomial noise ~ 0.01)
    n = frac.numel()
    mean, var = (rate_min + rate_max) / 2, (rate_max - rate_min) ** 2 / 12
    assert abs(frac.mean().item() - mean) < 4 * math.sqrt(var / n) + 0.005
    assert abs(frac.var().item() - var) < 0.25 * var + 1e-4
    assert frac.min().item() > rate_min - 0.05 and frac.max().item() < rate_max + 0.05
    # Antithetic complements have rate 1 - λ.
    _, masked = dmpo_fast.forward_mask(
        ids, maskable, mask_id=1, replicates=2, antithetic=True, rate_min=rate_min, rate_max=rate_max, seed=3
    )
    comp = masked[B:].float().mean(dim=1)
    assert abs(comp.mean().item() - (1 - mean)) < 4 * math.sqrt(var / n) + 0.005
