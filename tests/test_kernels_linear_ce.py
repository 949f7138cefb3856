"""Triton linear cross-entropy kernels against the fp64 truth, judged by the eager error.

For every quantity (loss, logp, dH, dW, d token_weights): truth = the eager reference on the same
inputs upcast to fp64; eager = the reference on the inputs in the test dtype (fp32 math, gradients
rounded to the input dtype, as autograd gives them); the kernel must satisfy
``kernel_err <= K * eager_err + ATOL[dtype] * scale``. On CPU the kernels run in Triton's interpreter
at small prime shapes with tiny tiles (several tiles, masked edges) and with every internal buffer
filled with NaN before use, so an element a kernel forgets to write shows up. Tests marked ``gpu``
repeat the checks at LLaDA-8B shapes on a real GPU.
"""

from __future__ import annotations

import math

import pytest
import torch
from dmpo_fast.kernels.runtime import available

pytestmark = pytest.mark.skipif(not available(), reason="Triton kernels cannot run here")

from dmpo_fast.kernels import linear_ce as lce  # noqa: E402
from dmpo_fast.kernels.linear_ce import (  # noqa: E402
    LinearCEOptions,
    linear_logprob_triton,
    weighted_linear_ce_triton,
)

from dmpo_fast.ops.linear_ce import (  # noqa: E402
    linear_logprob,
    linear_logprob_ref,
    weighted_linear_ce,
    weighted_linear_ce_ref,
)

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
# The kernel may be this many times less accurate than the eager path: its dH / dW GEMMs run on
# 16-bit operands (tensor cores), so the gradient of the logits G = w·(p − e_y) is rounded to the
# input dtype (twice: the stored probabilities, then G), where the eager path keeps it in fp32. Over
# seeds 0-5 the measured ratios are ~2 (up to 3.7 for a single max-abs element), 1.0 in fp32.
K = 4.0
ATOL = {FP32: 1e-6, BF16: 2e-4, FP16: 5e-5}  # ... plus this much, relative to the truth's scale
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(n, h, v, dtype, *, logits="normal", weights="mixed", device=DEVICE, gen=None):
    """hidden, weight, targets (0 and V−1 always present), token_weights; logits of std ≈ 3."""
    kw = {"device": device, "generator": gen}
    hidden = torch.randn(n, h, **kw)
    weight = torch.randn(v, h, **kw) * (3.0 / math.sqrt(h))
    targets = torch.randint(0, v, (n,), **kw)
    targets[0] = 0
    targets[-1] = v - 1
    if logits in ("peaked_target", "peaked_other"):
        # Move each row along its chosen vocabulary row so that one logit sits ~40 above the rest:
        # the target (p_y → 1: the gradient at the target is 1 − p_y, tiny) or another token (CE ≈ 40).
        peak = targets if logits == "peaked_target" else (targets + 1) % v
        direction = weight[peak]
        hidden = hidden + 40.0 * direction / direction.pow(2).sum(1, keepdim=True)
    if weights == "mixed":  # signed, with a run of zero rows (rows 0 and n − 1 stay live)
        tw = torch.randn(n, **kw)
        tw[n // 4 : n // 4 + min(16, n // 2)] = 0.0
    elif weights == "negative":
        tw = -torch.rand(n, **kw) - 0.1
    elif weights == "zero":
        tw = torch.zeros(n, device=device)
    else:
        tw = torch.rand(n, **kw) + 0.1
    return hidden.to(dtype), weight.to(dtype), targets, tw


def _check(name, kernel, eager, truth, dtype, k=K, scale=None):
    """kernel_err <= k * eager_err + ATOL[dtype] * scale (scale: the truth's largest magnitude)."""
    kernel, eager, truth = kernel.detach().double(), eager.detach().double(), truth.detach().double()
    assert kernel.shape == truth.shape, f"{name}: shape {tuple(kernel.shape)} != {tuple(truth.shape)}"
    scale = max(truth.abs().max().item(), 1e-3) if scale is None else scale
    k_err = (kernel - truth).abs().max().item()
    e_err = (eager - truth).abs().max().item()
    atol = ATOL[dtype] * scale
    assert k_err <= k * e_err + atol, (
        f"{name}: kernel error {k_err:.3e} > {k} x eager error {e_err:.3e} + {atol:.3e} (scale {scale:.3g})"
    )


def _leaves(*ts):
    return [t.detach().clone().requires_grad_(True) for t in ts]


def _weighted_all(fn, hidden, weight, targets, tw, grad_out=1.0):
    h, w = _leaves(hidden, weight)
    loss = fn(h, w, targets, tw)
    dh, dw = torch.autograd.grad(loss, (h, w), torch.tensor(grad_out, dtype=loss.dtype, device=loss.device))
    return loss.detach(), dh, dw


def _compare_weighted(hidden, weight, targets, tw, dtype, *, k=K, grad_out=1.0, **kw):
    def kernel(h, w, y, t):
        return weighted_linear_ce_triton(h, w, y, t, **kw)

    got = _weighted_all(kernel, hidden, weight, targets, tw, grad_out)
    eager = _weighted_all(weighted_linear_ce_ref, hidden, weight, targets, tw, grad_out)
    true = _weighted_all(
        weighted_linear_ce_ref, hidden.double(), weight.double(), targets, tw.double(), grad_out
    )
    assert got[0].dtype == torch.float32 and got[0].dim() == 0
    # The loss is a signed sum: judge it on the scale of its terms, not of the (cancelling) total.
    ce = -linear_logprob_ref(hidden.double(), weight.double(), targets)
    _check("loss", got[0], eager[0], true[0], dtype, k, scale=(tw.double() * ce).abs().sum().item())
    for name, g, e, t in zip(("dH", "dW"), got[1:], eager[1:], true[1:], strict=True):
        assert g.dtype == dtype, f"{name} dtype {g.dtype}"
        _check(name, g, e, t, dtype, k)
    return got


# --------------------------------------------------------------------------------------------------
# weighted_linear_ce
# --------------------------------------------------------------------------------------------------

WEIGHTED_CASES = [
    # n, h, v, dtype, logits, weights, options
    (7, 37, 131, BF16, "normal", "mixed", None),
    (23, 48, 97, BF16, "peaked_target", "negative", LinearCEOptions(chunk_rows=8)),
    (23, 48, 97, FP32, "peaked_other", "mixed", LinearCEOptions(chunk_rows=8, dw_split=2)),
    (1, 16, 64, BF16, "normal", "positive", None),
    (37, 48, 131, FP16, "normal", "mixed", LinearCEOptions(chunk_rows=16)),
    (29, 37, 97, BF16, "normal", "mixed", LinearCEOptions(chunk_rows=8, dw_accumulate="weight")),
]


@pytest.mark.parametrize("n,h,v,dtype,logits,weights,options", WEIGHTED_CASES)
def test_weighted_linear_ce_matches_truth(n, h, v, dtype, logits, weights, options):
    hidden, weight, targets, tw = _inputs(n, h, v, dtype, logits=logits, weights=weights)
    _compare_weighted(hidden, weight, targets, tw, dtype, options=options)


def test_weighted_linear_ce_upstream_gradient_scales_saved_gradients():
    hidden, weight, targets, tw = _inputs(23, 37, 97, BF16)
    _compare_weighted(
        hidden, weight, targets, tw, BF16, grad_out=-0.37, options=LinearCEOptions(chunk_rows=8)
    )


def test_confident_rows_keep_the_target_gradient_digits():
    # p_y = 1 − 5e-7: the target's gradient w·(p_y − 1) is formed as expm1(z_y − lse) from the fp32
    # target logit, where exp() − 1 (the eager path) keeps only a few digits. In fp32 (no 16-bit
    # rounding of G) the kernel must therefore be at least as accurate as the eager path.
    hidden, weight, targets, tw = _inputs(23, 48, 97, FP32, logits="peaked_target", weights="positive")
    _compare_weighted(hidden, weight, targets, tw, FP32, k=1.25, options=LinearCEOptions(chunk_rows=8))


def test_all_zero_weights_give_zero_loss_and_exact_zero_gradients():
    hidden, weight, targets, tw = _inputs(23, 48, 97, BF16, weights="zero")
    loss, dh, dw = _weighted_all(weighted_linear_ce_triton, hidden, weight, targets, tw)
    assert loss.item() == 0.0
    assert torch.count_nonzero(dh) == 0 and torch.count_nonzero(dw) == 0
    assert dh.dtype == BF16 and dw.dtype == BF16


def test_zero_weight_rows_are_never_projected(monkeypatch):
    hidden, weight, targets, tw = _inputs(37, 16, 64, FP32)
    seen = []
    real = lce._lse_pass

    def spy(h, *args, **kwargs):
        seen.append(h.shape[0])
        return real(h, *args, **kwargs)

    monkeypatch.setattr(lce, "_lse_pass", spy)
    _weighted_all(weighted_linear_ce_triton, hidden, weight, targets, tw)
    live = int(torch.count_nonzero(tw))
    assert 0 < live < 37 and sum(seen) == live
    seen.clear()
    with torch.no_grad():
        weighted_linear_ce_triton(hidden, weight, targets, tw)
    assert sum(seen) == live


def test_token_weight_gradient_is_the_per_row_cross_entropy():
    hidden, weight, targets, tw = _inputs(23, 37, 97, BF16)
    h, w = _leaves(hidden, weight)
    t = tw.clone().requires_grad_(True)
    loss = weighted_linear_ce_triton(h, w, targets, t)
    (dtw,) = torch.autograd.grad(2.0 * loss, (t,))
    t_true = tw.double().requires_grad_(True)
    (true,) = torch.autograd.grad(
        2.0 * weighted_linear_ce_ref(hidden.double(), weight.double(), targets, t_true), (t_true,)
    )
    t_eager = tw.clone().requires_grad_(True)
    (eager,) = torch.autograd.grad(2.0 * weighted_linear_ce_ref(hidden, weight, targets, t_eager), (t_eager,))
    assert (true[tw == 0] != 0).all()  # zero-weight rows still get their CE: nothing was skipped
    _check("d token_weights", dtw, eager, true, FP32)


@pytest.mark.parametrize("options", [LinearCEOptions(dw_split=2, chunk_rows=32), LinearCEOptions()])
def test_deterministic_is_bitwise_reproducible_and_matches_atomic_path(options, monkeypatch):
    # Small V·H: the dW row sum is split over programs (explicitly, or by the default heuristic).
    hidden, weight, targets, tw = _inputs(37, 48, 64, BF16, weights="positive")
    splits = []
    real = lce._launch_dw

    def spy(out, g, h, rows_per_split, n_splits, mode, tiles):
        splits.append((n_splits, mode))
        return real(out, g, h, rows_per_split, n_splits, mode, tiles)

    monkeypatch.setattr(lce, "_launch_dw", spy)

    def run(deterministic):
        fn = lambda *a: weighted_linear_ce_triton(*a, deterministic=deterministic, options=options)
        return _weighted_all(fn, hidden, weight, targets, tw)

    first, second = run(True), run(True)
    assert any(n > 1 for n, _ in splits)
    assert all(mode == 0 for n, mode in splits if n > 1)  # split: fixed-order workspace, no atomics
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    splits.clear()
    fast = run(False)
    assert any(n > 1 for n, _ in splits)
    assert all(mode == 2 for n, mode in splits if n > 1)  # split: fp32 atomics
    for a, b in zip(first, fast, strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-2)
    true = _weighted_all(weighted_linear_ce_ref, hidden.double(), weight.double(), targets, tw.double())
    eager = _weighted_all(weighted_linear_ce_ref, hidden, weight, targets, tw)
    _check("dW (deterministic split)", first[2], eager[2], true[2], BF16)
    _check("dW (atomic split)", fast[2], eager[2], true[2], BF16)


def test_no_grad_forward_equals_grad_forward():
    hidden, weight, targets, tw = _inputs(23, 37, 131, BF16)
    with_grad = weighted_linear_ce_triton(
        *_leaves(hidden, weight), targets, tw, options=LinearCEOptions(chunk_rows=8)
    )
    with torch.no_grad():
        without = weighted_linear_ce_triton(hidden, weight, targets, tw)
    frozen = weighted_linear_ce_triton(hidden, weight, targets, tw)  # no input requires grad
    assert not without.requires_grad and not frozen.requires_grad
    torch.testing.assert_close(with_grad.detach(), without, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(frozen, without, rtol=0, atol=0)


def test_only_requested_gradients_are_made():
    hidden, weight, targets, tw = _inputs(7, 16, 64, BF16)
    h = hidden.clone().requires_grad_(True)
    loss = weighted_linear_ce_triton(h, weight, targets, tw)  # frozen head, as with LoRA
    (dh,) = torch.autograd.grad(loss, (h,))
    h64 = hidden.double().requires_grad_(True)
    (true,) = torch.autograd.grad(weighted_linear_ce_ref(h64, weight.double(), targets, tw.double()), (h64,))
    h2 = hidden.clone().requires_grad_(True)
    (eager,) = torch.autograd.grad(weighted_linear_ce_ref(h2, weight, targets, tw), (h2,))
    _check("dH (frozen head)", dh, eager, true, BF16)


def test_backward_twice_raises():
    hidden, weight, targets, tw = _inputs(7, 16, 64, FP32)
    h, w = _leaves(hidden, weight)
    loss = weighted_linear_ce_triton(h, w, targets, tw)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()


def test_public_ops_dispatch_to_triton_and_fp64_falls_back():
    hidden, weight, targets, tw = _inputs(7, 37, 131, FP32)
    got = weighted_linear_ce(hidden, weight, targets, tw, impl="triton")
    torch.testing.assert_close(got, weighted_linear_ce_triton(hidden, weight, targets, tw), rtol=0, atol=0)
    got = linear_logprob(hidden, weight, targets, impl="triton")
    torch.testing.assert_close(got, linear_logprob_triton(hidden, weight, targets), rtol=0, atol=0)
    # fp64 runs the chunked torch path and keeps fp64.
    h64, w64 = hidden.double(), weight.double()
    out = weighted_linear_ce_triton(h64, w64, targets, tw)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, weighted_linear_ce_ref(h64, w64, targets, tw), rtol=1e-12, atol=1e-12)
    assert linear_logprob_triton(h64, w64, targets).dtype == torch.float64


def test_options_are_validated():
    with pytest.raises(ValueError, match="dw_accumulate"):
        LinearCEOptions(dw_accumulate="bf16")
    with pytest.raises(ValueError, match="chunk_rows"):
        LinearCEOptions(chunk_rows=0)
    with pytest.raises(ValueError, match="chunk_bytes"):
        LinearCEOptions(chunk_bytes=-1)
    with pytest.raises(ValueError, match="dw_split"):
        LinearCEOptions(dw_split=0)


# --------------------------------------------------------------------------------------------------
# linear_logprob
# --------------------------------------------------------------------------------------------------

LOGPROB_CASES = [
    (7, 37, 131, BF16, "normal", None),
    (23, 48, 97, FP32, "peaked_target", None),
    (23, 48, 97, FP32, "normal", LinearCEOptions(chunk_rows=8)),
    (1, 16, 64, BF16, "normal", None),
    (23, 48, 97, FP16, "normal", None),
    (37, 48, 131, BF16, "peaked_target", LinearCEOptions(chunk_rows=16)),
]


@pytest.mark.parametrize("n,h,v,dtype,logits,options", LOGPROB_CASES)
def test_linear_logprob_matches_truth(n, h, v, dtype, logits, options):
    hidden, weight, targets, _ = _inputs(n, h, v, dtype, logits=logits)
    grad = torch.randn(n, device=hidden.device)  # a random upstream gradient per row

    def run(fn, h, w):
        h, w = _leaves(h, w)
        logp = fn(h, w, targets)
        return (logp.detach(), *torch.autograd.grad(logp, (h, w), grad.to(logp.dtype)))

    got = run(lambda h, w, y: linear_logprob_triton(h, w, y, options=options), hidden, weight)
    eager = run(linear_logprob_ref, hidden, weight)
    true = run(linear_logprob_ref, hidden.double(), weight.double())
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype and got[2].dtype == dtype
    # fp32 confident rows: the kernel keeps 1 − p_y exact (expm1), so it must not be worse than eager.
    k = 1.25 if dtype == FP32 and logits == "peaked_target" else K
    for name, g, e, t in zip(("logp", "dH", "dW"), got, eager, true, strict=True):
        _check(name, g, e, t, dtype, k)


# --------------------------------------------------------------------------------------------------
# GPU: LLaDA-8B shapes (hidden 4096, vocabulary 126464, ~4506 masked rows per step)
# --------------------------------------------------------------------------------------------------

LLADA_H, LLADA_V, LLADA_N = 4096, 126464, 4506


def _truth_chunked(hidden, weight, targets, tw, rows=512):
    """fp64 loss, dH, dW and Σ|w·CE| of the weighted CE, chunk by chunk (no [N, V] fp64 logits)."""
    w64 = weight.double().requires_grad_(True)
    loss = torch.zeros((), dtype=torch.float64, device=hidden.device)
    terms = 0.0
    dh = torch.empty(hidden.shape, dtype=torch.float64, device=hidden.device)
    dw = torch.zeros(weight.shape, dtype=torch.float64, device=hidden.device)
    for s in range(0, hidden.shape[0], rows):
        h64 = hidden[s : s + rows].double().requires_grad_(True)
        w_rows = tw[s : s + rows].double()
        ce = -linear_logprob_ref(h64, w64, targets[s : s + rows])
        part = (w_rows * ce).sum()
        terms += (w_rows.abs() * ce.detach()).sum().item()
        gh, gw = torch.autograd.grad(part, (h64, w64))
        loss += part.detach()
        dh[s : s + rows] = gh
        dw += gw
    return loss, dh, dw, terms


@pytest.mark.gpu
@pytest.mark.parametrize("dw_accumulate", ["fp32", "weight"])
def test_gpu_weighted_linear_ce_llada_shapes(dw_accumulate, monkeypatch):
    monkeypatch.setenv("DMPO_FAST_POISON", "1")  # internal buffers start as NaN
    gen = torch.Generator("cuda").manual_seed(0)
    hidden, weight, targets, tw = _inputs(LLADA_N, LLADA_H, LLADA_V, BF16, device="cuda", gen=gen)
    opts = LinearCEOptions(dw_accumulate=dw_accumulate)
    got = _weighted_all(lambda *a: weighted_linear_ce_triton(*a, options=opts), hidden, weight, targets, tw)
    eager = _weighted_all(weighted_linear_ce_ref, hidden, weight, targets, tw)
    *true, terms = _truth_chunked(hidden, weight, targets, tw)
    k = 2 * K if dw_accumulate == "weight" else K  # 5 chunks: dW rounded 5 times
    _check("loss", got[0], eager[0], true[0], BF16, k, scale=terms)
    _check("dH", got[1], eager[1], true[1], BF16, k)
    _check("dW", got[2], eager[2], true[2], BF16, k)


@pytest.mark.gpu
def test_gpu_weighted_linear_ce_peaked_fp32_and_deterministic(monkeypatch):
    monkeypatch.setenv("DMPO_FAST_POISON", "1")  # internal buffers start as NaN
    gen = torch.Generator("cuda").manual_seed(1)
    hidden, weight, targets, tw = _inputs(
        1031, 1024, 32003, FP32, logits="peaked_target", device="cuda", gen=gen
    )
    _compare_weighted(hidden, weight, targets, tw, FP32, options=LinearCEOptions(chunk_rows=384))
    hidden, weight, targets, tw = _inputs(
        2053, 256, 1031, BF16, device="cuda", gen=gen
    )  # small V·H: dW is split
    runs = [
        _weighted_all(
            lambda *a: weighted_linear_ce_triton(*a, deterministic=True), hidden, weight, targets, tw
        )
        for _ in range(2)
    ]
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)
    fast = _weighted_all(weighted_linear_ce_triton, hidden, weight, targets, tw)
    for a, b in zip(runs[0], fast, strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=1e-2)


@pytest.mark.gpu
def test_gpu_linear_logprob_llada_shapes(monkeypatch):
    monkeypatch.setenv("DMPO_FAST_POISON", "1")  # internal buffers start as NaN
    gen = torch.Generator("cuda").manual_seed(2)
    n = 1024  # the eager reference keeps fp32 [n, V] logits and their gradient
    hidden, weight, targets, _ = _inputs(n, LLADA_H, LLADA_V, BF16, device="cuda", gen=gen)
    grad = torch.randn(n, device="cuda", generator=gen)

    def run(fn, h, w):
        h, w = _leaves(h, w)
        logp = fn(h, w, targets)
        return (logp.detach(), *torch.autograd.grad(logp, (h, w), grad.to(logp.dtype)))

    got = run(linear_logprob_triton, hidden, weight)
    eager = run(linear_logprob_ref, hidden, weight)
    true = run(linear_logprob_ref, hidden.double(), weight.double())
    for name, g, e, t in zip(("logp", "dH", "dW"), got, eager, true, strict=True):
        _check(name, g, e, t, BF16)


@pytest.mark.gpu
@pytest.mark.parametrize("dw_accumulate", ["fp32", "weight"])
def test_gpu_extra_memory_is_bounded_by_a_chunk(dw_accumulate):
    """Peak memory beyond the inputs and the gradients themselves (bf16 dH and dW)."""
    gen = torch.Generator("cuda").manual_seed(3)
    hidden, weight, targets, tw = _inputs(LLADA_N, LLADA_H, LLADA_V, BF16, device="cuda", gen=gen)
    h, w = _leaves(hidden, weight)
    opts = LinearCEOptions(dw_accumulate=dw_accumulate)
    weighted_linear_ce_triton(h, w, targets, tw, options=opts).backward()  # warm-up: compile
    h.grad = w.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    weighted_linear_ce_triton(h, w, targets, tw, options=opts).backward()
    torch.cuda.synchronize()
    grads = h.numel() * 2 + w.numel() * 2
    extra = torch.cuda.max_memory_allocated() - base - grads
    bound = (350 << 20) + (w.numel() * 4 if dw_accumulate == "fp32" else 0)  # + the fp32 dW accumulator
    assert extra <= bound, f"extra peak memory {extra / 2**20:.0f} MiB > {bound / 2**20:.0f} MiB"


def test_autotuning_is_for_16bit_inputs_on_a_gpu(monkeypatch):
    from dmpo_fast.kernels import linear_ce_config as cfg

    monkeypatch.setenv("DMPO_FAST_AUTOTUNE", "1")
    assert not cfg._autotune_enabled(torch.bfloat16)  # the interpreter never times
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # read at call time: the kernels stay interpreted
    assert cfg._autotune_enabled(torch.bfloat16) and cfg._autotune_enabled(torch.float16)
    # The candidates are 16-bit tiles: in fp32 their operands need up to twice the shared memory.
    assert not cfg._autotune_enabled(torch.float32)


def test_autotuning_keeps_the_default_tiles_when_no_candidate_fits(monkeypatch):
    import triton
    import triton.testing
    from dmpo_fast.kernels import linear_ce_config as cfg

    def out_of_shared_memory(fn, **kwargs):
        raise triton.runtime.errors.OutOfResources(300_000, 232_448, "shared memory")

    monkeypatch.setattr(triton.testing, "do_bench", out_of_shared_memory)
    monkeypatch.setattr(cfg, "_TUNED", {})
    default = cfg._GPU_LOGITS_UNALIGNED
    assert cfg._pick(("lse", "test"), cfg._LOGITS_CANDIDATES, lambda t: None, default) == default
    assert cfg._TUNED[("lse", "test")] == default  # remembered: not re-timed on every call

    times = iter([3.0, 1.0, 2.0, 5.0, 4.0])
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kwargs: next(times))
    best = cfg._pick(("lse", "other"), cfg._LOGITS_CANDIDATES, lambda t: None, cfg._GPU_LOGITS)
    assert best == cfg._LOGITS_CANDIDATES[1]


def test_gpu_tiles_follow_the_dtype_and_the_alignment_of_the_hidden_size(monkeypatch):
    from dmpo_fast.kernels import linear_ce_config as cfg

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert cfg._logits_tiles(torch.bfloat16, 4096) == cfg._GPU_LOGITS
    assert cfg._logits_tiles(torch.bfloat16, 200) == cfg._GPU_LOGITS_UNALIGNED
    assert cfg._dw_tiles(torch.float16, 3584) == cfg._GPU_DW
    assert cfg._dw_tiles(torch.float16, 200) == cfg._GPU_DW_UNALIGNED
    assert cfg._logits_tiles(torch.float32, 200) == cfg._GPU_FP32
    assert cfg._dw_tiles(torch.float32, 4096) == cfg._GPU_FP32_DW
