"""denoise_step: Triton kernel vs the eager reference, sampling statistics, commit rules, memory, errors."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from dmpo_fast.kernels import runtime as kernels
from dmpo_fast.ops.denoise_step import (
    commit_mask,
    denoise_step,
    denoise_step_reference_fastdllm,
    gumbel_noise,
    remask_uniform,
)

needs_triton = pytest.mark.skipif(not kernels.available(), reason="Triton kernels cannot run here")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(B, L, V, H, dtype, p_active=0.6, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, L, H, generator=g).to(dtype).to(DEVICE)
    head = (torch.randn(V, H, generator=g) / H**0.25).to(dtype).to(DEVICE)
    x = torch.randint(0, V, (B, L), generator=g).to(DEVICE)
    active = (torch.rand(B, L, generator=g) < p_active).to(DEVICE)
    active[0] = False  # a row with nothing to decode
    active[-1, -1] = True
    return hidden, head, x, active


def _truth_confidence(hidden, head, logit_scale, tokens, mask_id):
    z = hidden.double() @ head.double().T * logit_scale  # [B, L, V] fp64 truth
    z[..., mask_id] = float("-inf")
    return torch.softmax(z, dim=-1).gather(-1, tokens[..., None])[..., 0]


# --------------------------------------------------------------------------------------------------
# Kernel vs eager
# --------------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("B,L,V,H", [(3, 7, 197, 40), (2, 5, 67, 19)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("source", ["hidden", "logits"])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_kernel_matches_eager(B, L, V, H, dtype, source, temperature):
    hidden, head, x, active = _inputs(B, L, V, H, dtype)
    mask_id, scale = V - 3, 0.75
    if source == "hidden":
        inp = (hidden, head)
    else:
        inp = (hidden.float() @ head.float().T).to(dtype)  # [B, L, V] logits in the test dtype
        scale = 1.0
    kw = dict(
        temperature=temperature,
        num_transfer=torch.tensor([0, 2, 9][:B], device=DEVICE).clamp_max(L),
        seed=(1 << 40) + 7,
        step=torch.arange(B, device=DEVICE) + 3,
        mask_id=mask_id,
        logit_scale=scale,
        position_offset=11,
    )
    a = denoise_step(inp, x, active, impl="eager", **kw)
    b = denoise_step(inp, x, active, impl="triton", **kw)
    c = denoise_step(inp, x, active, impl="chunked", **kw)
    assert (
        torch.equal(a.x, c.x)
        and torch.equal(a.committed, c.committed)
        and torch.equal(a.confidence, c.confidence)
    )
    # Same tokens (the kernel's fp32 logits differ from eager's only by summation order).
    tok_a = denoise_step(inp, x, active, impl="eager", **{**kw, "num_transfer": L}).x
    tok_b = denoise_step(inp, x, active, impl="triton", **{**kw, "num_transfer": L}).x
    assert torch.equal(tok_a, tok_b)
    assert torch.equal(a.committed, b.committed) and torch.equal(a.x, b.x)
    assert not bool((tok_b[active] == mask_id).any())
    assert torch.equal(b.confidence[~active], torch.zeros_like(b.confidence[~active]))
    # Confidence judged against an fp64 truth: the kernel's error within a small multiple of eager's.
    if source == "hidden":
        truth = _truth_confidence(hidden, head, scale, tok_a, mask_id)
    else:
        z = inp.double()
        z[..., mask_id] = float("-inf")
        truth = torch.softmax(z, -1).gather(-1, tok_a[..., None])[..., 0]
    err_a = (a.confidence.double() - truth)[active].abs().max()
    err_b = (b.confidence.double() - truth)[active].abs().max()
    assert err_b <= 4 * err_a + 2e-6, (err_a.item(), err_b.item())


@needs_triton
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_kernel_argmax_ties_and_peaked_logits(temperature):
    # Equal maxima in different vocabulary tiles and splits: the lowest index wins, as torch.argmax.
    B, L, V = 2, 3, 150
    logits = torch.full((B, L, V), -30.0, device=DEVICE)
    logits[0, :, [5, 40, 149]] = 12.0
    logits[1, :, [0, 130]] = 50.0
    x = torch.zeros(B, L, dtype=torch.long, device=DEVICE)
    active = torch.ones(B, L, dtype=torch.bool, device=DEVICE)
    kw = dict(temperature=temperature, num_transfer=2, seed=3)
    a = denoise_step(logits, x, active, impl="eager", **kw)
    b = denoise_step(logits, x, active, impl="triton", **kw)
    assert torch.equal(a.x, b.x) and torch.equal(a.committed, b.committed)
    torch.testing.assert_close(b.confidence, a.confidence, rtol=1e-6, atol=1e-7)
    if temperature == 0:
        assert a.x[0, :2].tolist() == [5, 5] and a.x[1, :2].tolist() == [0, 0]
        # Peaked rows all have confidence 1/3 or 1/2 exactly-ish; ties go to the lower positions.
        assert a.committed.tolist() == [[True, True, False], [True, True, False]]


def test_temperature_zero_is_argmax():
    hidden, head, x, active = _inputs(3, 6, 53, 16, torch.float32)
    out = denoise_step((hidden, head), x, active, temperature=0.0, num_transfer=6, seed=1)
    expect = torch.argmax(hidden @ head.T, dim=-1)
    assert torch.equal(out.x[active], expect[active])
    assert torch.equal(out.x[~active], x[~active])


# --------------------------------------------------------------------------------------------------
# Sampling statistics
# --------------------------------------------------------------------------------------------------


def _chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    n = counts.sum()
    expected = n * probs
    stat = ((counts - expected) ** 2 / expected).sum()
    df = counts.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


@pytest.mark.parametrize("temperature", [0.6, 1.0, 2.5])
def test_eager_samples_follow_tempered_softmax(temperature):
    V, B, L, steps = 7, 40, 50, 5
    z = torch.tensor([1.5, -0.3, 0.0, 2.2, -2.0, 0.7, 1.1], dtype=torch.float64)
    logits = z.float().expand(B, L, V).contiguous()
    x = torch.zeros(B, L, dtype=torch.long)
    active = torch.ones(B, L, dtype=torch.bool)
    counts = torch.zeros(V, dtype=torch.float64)
    for t in range(steps):
        out = denoise_step(
            logits, x, active, temperature=temperature, num_transfer=L, seed=11, step=t, impl="eager"
        )
        counts += torch.bincount(out.x.reshape(-1), minlength=V).double()
        # the confidence is the untempered probability of the drawn token
        torch.testing.assert_close(out.confidence, torch.softmax(z, 0).float()[out.x])
    p = _chi_square_pvalue(counts, torch.softmax(z / temperature, 0))
    assert p > 1e-4, (counts.tolist(), p)
    # and the test has power: the untempered distribution is rejected when T is far from 1
    if temperature != 1.0:
        assert _chi_square_pvalue(counts, torch.softmax(z, 0)) < 1e-6


@needs_triton
def test_kernel_samples_follow_tempered_softmax():
    V, B, L, T = 5, 4, 30, 0.7
    z = torch.tensor([0.4, -1.0, 1.3, 0.0, 0.9], dtype=torch.float64)
    logits = z.float().expand(B, L, V).contiguous().to(DEVICE)
    x = torch.zeros(B, L, dtype=torch.long, device=DEVICE)
    active = torch.ones(B, L, dtype=torch.bool, device=DEVICE)
    counts = torch.zeros(V, dtype=torch.float64)
    for t in range(10):
        out = denoise_step(logits, x, active, temperature=T, num_transfer=L, seed=5, step=t, impl="triton")
        counts += torch.bincount(out.x.reshape(-1).cpu(), minlength=V).double()
    assert _chi_square_pvalue(counts, torch.softmax(z / T, 0)) > 1e-4, counts.tolist()


def test_gumbel_noise_moments_and_independence():
    g = gumbel_noise(123, 4001, torch.arange(50), torch.zeros(50, dtype=torch.long), torch.full((50,), 2))
    assert g.dtype == torch.float32 and bool(torch.isfinite(g).all())
    # Gumbel(0, 1): mean = Euler's gamma, variance = pi^2 / 6 (200k draws: standard errors 0.003 and 0.01)
    assert abs(g.mean().item() - 0.5772) < 0.015
    assert abs(g.var().item() - math.pi**2 / 6) < 0.05
    # neighbouring vocabulary entries (different Philox words / counters) are uncorrelated
    corr = torch.corrcoef(torch.stack([g[:, :-1].reshape(-1), g[:, 1:].reshape(-1)]))[0, 1]
    assert abs(corr.item()) < 0.015


# --------------------------------------------------------------------------------------------------
# Counters: batch layout, windows, steps
# --------------------------------------------------------------------------------------------------


def test_row_keys_steps_and_windows_make_rows_independent_of_layout():
    hidden, head, x, active = _inputs(4, 9, 41, 12, torch.float32, p_active=1.0)
    kw = dict(temperature=1.0, num_transfer=3, seed=99)
    full = denoise_step((hidden, head), x, active, step=torch.tensor([0, 5, 2, 7]), **kw)
    for b, s in enumerate([0, 5, 2, 7]):
        alone = denoise_step(
            (hidden[b : b + 1], head), x[b : b + 1], active[b : b + 1], step=s, rows=torch.tensor([b]), **kw
        )
        assert torch.equal(alone.x[0], full.x[b]) and torch.equal(alone.committed[0], full.committed[b])
    # a window of columns with position_offset draws the noise of those columns of the whole
    win = denoise_step(
        (hidden[:, 4:], head),
        x[:, 4:],
        active[:, 4:],
        step=torch.tensor([0, 5, 2, 7]),
        position_offset=4,
        **{**kw, "num_transfer": 5},
    )
    whole = denoise_step(
        (hidden, head), x, active, step=torch.tensor([0, 5, 2, 7]), **{**kw, "num_transfer": 9}
    )
    assert torch.equal(win.x, whole.x[:, 4:])
    # another step draws other noise
    other = denoise_step(
        (hidden, head), x, active, step=torch.tensor([1, 6, 3, 8]), **{**kw, "num_transfer": 9}
    )
    assert not torch.equal(other.x, whole.x)


# --------------------------------------------------------------------------------------------------
# Commit rules
# --------------------------------------------------------------------------------------------------


def test_top_k_rule_ties_and_limits():
    conf = torch.tensor([[0.5, 0.9, 0.5, 0.5, 0.1], [0.3, 0.2, 0.9, 0.8, 0.7], [0.6, 0.6, 0.6, 0.6, 0.6]])
    active = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 1, 0, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    got = commit_mask(conf, active, num_transfer=torch.tensor([3, 9, 2]))
    assert got.tolist() == [
        [True, True, True, False, False],  # 0.9, then the two lowest-position 0.5s
        [True, False, True, False, True],  # k larger than the active count: all active
        [False] * 5,  # nothing active
    ]
    assert not commit_mask(conf, active, num_transfer=torch.tensor([0, 0, 0])).any()


def test_threshold_rule_commits_confident_and_at_least_the_best():
    conf = torch.tensor([[0.95, 0.2, 0.91, 0.3], [0.1, 0.4, 0.2, 0.05]])
    active = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    got = commit_mask(conf, active, threshold=0.9)
    assert got.tolist() == [[True, False, True, False], [False, True, False, False]]


def _factor_loop(c: torch.Tensor, factor: float) -> int:
    """Fast-dLLM's factor rule, transcribed: commit while c_(i) >= 1 - factor / (i + 1), at least one."""
    c = sorted(c.tolist(), reverse=True)
    n = 0
    for i, ci in enumerate(c, start=1):
        if ci < 1 - factor / (i + 1):
            break
        n = i
    return max(n, 1) if c else 0


@pytest.mark.parametrize("factor", [0.5, 1.0, 2.0])
def test_factor_rule_matches_the_loop(factor):
    g = torch.Generator().manual_seed(1)
    conf = 1 - torch.rand(64, 16, generator=g) ** 3 * 0.8  # many confident positions
    active = torch.rand(64, 16, generator=g) < 0.7
    got = commit_mask(conf, active, factor=factor)
    for b in range(64):
        n = _factor_loop(conf[b][active[b]], factor)
        assert int(got[b].sum()) == n
        rest = conf[b][active[b] & ~got[b]]
        if n and rest.numel():
            assert conf[b][got[b]].min() >= rest.max()


@pytest.mark.parametrize("rule", [dict(num_transfer=torch.tensor([1, 3, 2])), dict(threshold=0.05)])
def test_matches_fastdllm_reference_at_temperature_zero(rule):
    hidden, head, x, active = _inputs(3, 8, 29, 10, torch.float32, p_active=0.8)
    active[0, :4] = True  # the research loop commits k positions even where fewer are active
    ref = denoise_step_reference_fastdllm(hidden, head, x, active, temperature=0.0, **rule)
    ours = denoise_step((hidden, head), x, active, temperature=0.0, seed=0, **rule)
    assert torch.equal(ours.committed, ref.committed) and torch.equal(ours.x, ref.x)
    torch.testing.assert_close(ours.confidence, ref.confidence)


def test_random_remasking_ranks_by_philox_uniform():
    hidden, head, x, active = _inputs(3, 8, 29, 10, torch.float32, p_active=0.8)
    kw = dict(temperature=1.0, num_transfer=3, seed=4, step=2, position_offset=5)
    low = denoise_step((hidden, head), x, active, **kw)
    rnd = denoise_step((hidden, head), x, active, remasking="random", **kw)
    b, l = active.nonzero(as_tuple=True)
    u = remask_uniform(4, l + 5, b, torch.full_like(b, 2))
    assert torch.equal(rnd.confidence[active], u)
    assert torch.equal(rnd.committed, commit_mask(rnd.confidence, active, num_transfer=torch.full((3,), 3)))
    # same tokens drawn; only the choice of positions differs
    assert torch.equal(rnd.x[rnd.committed & low.committed], low.x[rnd.committed & low.committed])


# --------------------------------------------------------------------------------------------------
# Memory: no float64 [.., V] tensor anywhere
# --------------------------------------------------------------------------------------------------


class _AllocationLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.outputs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.outputs += [
            (str(func), t.dtype, t.numel()) for t in tree_leaves(out) if isinstance(t, torch.Tensor)
        ]
        return out


@pytest.mark.parametrize("impl", ["eager", "chunked"])
def test_no_float64_vocabulary_tensor(impl):
    B, L, V, H = 2, 6, 97, 8
    hidden, head, x, active = _inputs(B, L, V, H, torch.float32, p_active=1.0)
    with _AllocationLog() as log:
        denoise_step((hidden, head), x, active, temperature=1.0, threshold=0.5, seed=0, impl=impl)
    assert not [o for o in log.outputs if o[1] == torch.float64 and o[2] >= V]
    assert (
        max(n for _, d, n in log.outputs if d.is_floating_point) <= B * L * V
    )  # nothing larger than the logits
    with _AllocationLog() as log:  # the detector sees the research code's float64 logits
        denoise_step_reference_fastdllm(hidden, head, x, active, temperature=1.0, threshold=0.5)
    assert [o for o in log.outputs if o[1] == torch.float64 and o[2] >= B * L * V]


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(num_transfer=None), "exactly one of num_transfer"),
        (dict(threshold=0.5), "exactly one of num_transfer"),
        (dict(temperature=-1.0), "temperature"),
        (dict(remasking="top_p"), "remasking"),
        (dict(seed=-1), "seed"),
        (dict(step=1 << 30), "step"),
        (dict(step=torch.tensor([0, -1])), "step"),
        (dict(rows=torch.tensor([0, 1 << 32])), "rows"),
        (dict(position_offset=-2), "position_offset"),
        (dict(impl="fast"), "impl"),
        (dict(logit_scale=0.0), "logit_scale"),
        (dict(num_transfer=torch.tensor([1.0, 2.0])), "num_transfer"),
        (dict(num_transfer=torch.tensor([1, -2])), "num_transfer"),
        (dict(num_transfer=-1), "num_transfer"),
        (dict(mask_id=-3), "mask_id"),
    ],
)
def test_bad_arguments(change, match):
    hidden, head, x, active = _inputs(2, 4, 11, 6, torch.float32)
    kw = dict(temperature=1.0, num_transfer=1, seed=0)
    kw.update(change)
    with pytest.raises(ValueError, match=match):
        denoise_step((hidden, head), x, active, **kw)


def test_bad_tensors():
    hidden, head, x, active = _inputs(2, 4, 11, 6, torch.float32)
    kw = dict(num_transfer=1, seed=0)
    with pytest.raises(ValueError, match="head_weight"):
        denoise_step((hidden, head.double()), x, active, **kw)
    with pytest.raises(ValueError, match="head_weight"):
        denoise_step((hidden, head[:, :5]), x, active, **kw)
    with pytest.raises(ValueError, match="pair"):
        denoise_step((hidden, head, head), x, active, **kw)
    with pytest.raises(ValueError, match="active"):
        denoise_step((hidden, head), x, active.long(), **kw)
    with pytest.raises(ValueError, match="x must"):
        denoise_step((hidden, head), x[:, :3], active, **kw)
    with pytest.raises(ValueError, match="logits"):
        denoise_step(hidden[0], x, active, **kw)


# --------------------------------------------------------------------------------------------------
# GPU: LLaDA-8B shapes (skipped on CPU-only machines)
# --------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_kernel_llada_scale(temperature):
    B, L, H, V = 8, 64, 4096, 126464
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(B, L, H, device="cuda", generator=g).bfloat16()
    head = (torch.randn(V, H, device="cuda", generator=g) * 0.02).bfloat16()
    x = torch.full((B, L), 126336, device="cuda")
    active = torch.zeros(B, L, dtype=torch.bool, device="cuda")
    active[:, :32] = True
    kw = dict(temperature=temperature, num_transfer=L, seed=1, mask_id=126336)
    a = denoise_step((hidden, head), x, active, impl="eager", **kw)
    b = denoise_step((hidden, head), x, active, impl="triton", **kw)
    agree = (a.x == b.x)[active].float().mean().item()
    assert agree >= 0.99, agree  # only near-ties of the two GEMMs' roundings may differ
    same = active & (a.x == b.x)
    truth = _truth_confidence(hidden, head, 1.0, a.x, 126336)
    err_a = (a.confidence.double() - truth)[same].abs().max()
    err_b = (b.confidence.double() - truth)[same].abs().max()
    assert err_b <= 4 * err_a + 1e-5
