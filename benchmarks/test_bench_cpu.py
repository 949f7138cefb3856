"""CPU microbenchmarks through pytest-benchmark: ``pytest benchmarks/ --benchmark-only``.

Tiny shapes and the CPU backends (eager, chunked; native when it is built), so that two commits can be
compared on one machine (``--benchmark-autosave``, then ``--benchmark-compare``). These are not the figures to
quote: those come from the scripts (``python -m benchmarks <name>``) at the shapes their docstrings give.
Every benchmark also checks what the call returned, so a broken op fails here rather than timing garbage.
Plain ``pytest`` from the repository root does not collect this folder (``testpaths = ["tests"]``);
without the plugin these are skipped (``benchmarks/conftest.py``).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.rollout import reference_rollout
from dmpo_fast.dmpo import elbo
from dmpo_fast.models import build_tiny
from dmpo_fast.ops import (
    denoise_step,
    denoise_step_reference_fastdllm,
    forward_mask,
    importance_weights,
    wdce_loss,
)
from dmpo_fast.ops._common import native_available
from dmpo_fast.sampling import generate

IMPLS = ["eager", "chunked"] + (["native"] if native_available() else [])


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def tiny():
    V = 64
    return build_tiny(V, mask_id=V - 1, eos_id=V - 2, seed=0, n_layers=2).eval()


@pytest.mark.parametrize("impl", IMPLS)
def test_wdce_loss_fwd_bwd(benchmark, impl):
    R, L, H, V = 8, 48, 64, 1000
    g = _gen()
    hidden = torch.randn(R, L, H, generator=g).requires_grad_()
    head = (torch.randn(V, H, generator=g) / H**0.5).requires_grad_()
    targets = torch.randint(0, V, (R, L), generator=g)
    mask = torch.rand(R, L, generator=g) < 0.5
    weights = torch.randn(R, generator=g)

    def step():
        hidden.grad = head.grad = None
        loss = wdce_loss(hidden, head, targets, mask, weights, impl=impl)
        loss.backward()
        return loss

    loss = benchmark(step)
    assert torch.isfinite(loss) and torch.isfinite(hidden.grad).all() and head.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "provider", ["reference"] + [f"{form}-{impl}" for impl in IMPLS for form in ("hidden", "logits")]
)
def test_denoise_step(benchmark, provider):
    B, L, n_active, H, V = 4, 32, 8, 64, 1000
    g = _gen()
    hidden = torch.randn(B, L, H, generator=g)
    head = torch.randn(V, H, generator=g) * (2 / H**0.5)
    x = torch.randint(0, V - 1, (B, L), generator=g)
    active = torch.zeros(B, L, dtype=torch.bool)
    active[:, :n_active] = True
    x[active] = V - 1
    if provider == "reference":
        nt = torch.full((B,), 2)
        out = benchmark(
            denoise_step_reference_fastdllm, hidden, head, x, active, temperature=0.7, num_transfer=nt
        )
    else:
        form, impl = provider.split("-")
        first = (hidden, head) if form == "hidden" else hidden @ head.T
        kwargs = dict(temperature=0.7, num_transfer=2, seed=1, mask_id=V - 1, impl=impl)
        out = benchmark(denoise_step, first, x, active, **kwargs)
    assert out.committed.sum(dim=1).tolist() == [2] * B and (out.committed <= active).all()
    if provider != "reference":  # the research step may sample the mask id itself; denoise_step never does
        assert (out.x[out.committed] != V - 1).all()


def test_forward_mask(benchmark):
    g = _gen()
    ids = torch.randint(0, 100, (16, 128), generator=g)
    maskable = torch.zeros(16, 128, dtype=torch.bool)
    maskable[:, 32:] = True
    noisy, masked = benchmark(forward_mask, ids, maskable, mask_id=100, replicates=4, seed=0)
    assert noisy.shape == (64, 128) and not masked[:, :32].any() and masked.any()


def test_importance_weights(benchmark):
    g = _gen()
    rewards, log_ratio = torch.rand(64, generator=g), torch.randn(64, generator=g)
    out = benchmark(importance_weights, rewards, log_ratio, group_size=8, alpha=0.04)
    assert torch.isfinite(out.weights).all() and out.weights.shape == (64,)


@pytest.mark.parametrize("impl", IMPLS)
def test_elbo_tiny(benchmark, tiny, impl):
    g = _gen()
    ids = torch.randint(0, 60, (8, 24), generator=g)
    maskable = torch.zeros_like(ids, dtype=torch.bool)
    maskable[:, 8:] = True
    with torch.no_grad():
        out = benchmark(elbo, tiny, ids, maskable, seed=0, impl=impl)
    assert out.shape == (8,) and (out < 0).all()


@pytest.mark.parametrize("sampler", ["llada", "fast_dllm-prefix", "fast_dllm-dual", "reference-prefix"])
def test_rollout_tiny(benchmark, tiny, sampler):
    prompt = torch.randint(0, 60, (4, 16), generator=_gen())
    decode = dict(gen_length=16, block_length=8, steps=8, temperature=0.7)
    if sampler == "reference-prefix":
        ids = benchmark(reference_rollout, tiny, prompt, **decode)
    else:
        name, _, cache = sampler.partition("-")
        extra = {"cache": cache} if cache else {}
        ids = benchmark(generate, tiny, prompt, sampler=name, eos_id=None, seed=0, **extra, **decode).ids
    assert ids.shape == (4, 32) and torch.equal(ids[:, :16], prompt)
