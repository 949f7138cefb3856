"""Native CPU ops (csrc/): opcheck, parity with the eager reference and the Triton kernel, the fallback path.

The tests that call the ops build them once per session (cached across sessions under the user cache, see
``dmpo_fast.ops._native``); they skip, saying why, when no C++ compiler or ninja is installed. A build that
fails although the tools are there is a test failure, not a skip.
"""

import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

from dmpo_fast.kernels import runtime as kernels
from dmpo_fast.ops import _native
from dmpo_fast.ops._common import resolve_impl
from dmpo_fast.ops.denoise_step import denoise_step
from dmpo_fast.ops.linear_ce import (
    linear_logprob,
    linear_logprob_ref,
    weighted_linear_ce,
    weighted_linear_ce_ref,
)

needs_triton = pytest.mark.skipif(not kernels.available(), reason="Triton kernels cannot run here")


def _missing_tools() -> str | None:
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler!r}) on PATH: the native ops cannot be built"
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        return "ninja is not installed: the native ops cannot be built"
    return None


@pytest.fixture(scope="module")
def ops():
    reason = _missing_tools()
    if reason:
        pytest.skip(reason)
    if not _native.load(build=True):
        pytest.fail(
            f"the native ops did not build although a compiler and ninja are present: {_native._failure}"
        )
    return torch.ops.dmpo_fast


# --------------------------------------------------------------------------------------------------
# denoise_step
# --------------------------------------------------------------------------------------------------


def _step_inputs(B, L, V, dtype, seed=0, p_active=0.7):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, L, V, generator=g) * 2.5).to(dtype)
    x = torch.randint(0, V, (B, L), generator=g)
    active = torch.rand(B, L, generator=g) < p_active
    active[0] = False  # a row with nothing to decode
    active[-1, -1] = True
    return logits, x, active


def _truth_confidence(logits, tokens, mask_id, scale):
    z = logits.double() * scale
    z[..., mask_id] = float("-inf")
    return torch.softmax(z, -1).gather(-1, tokens[..., None])[..., 0]


RULES = {
    "top_k": lambda B, L: dict(num_transfer=torch.tensor([0, 2, L, 1][:B])),
    "threshold": lambda B, L: dict(threshold=0.02),
    "factor": lambda B, L: dict(factor=1.5),
}


@pytest.mark.parametrize(
    "B,L,V", [(3, 7, 1031), (4, 5, 7)]
)  # several 512-column tiles + tail; one short tile
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("rule", sorted(RULES))
def test_denoise_step_from_logits_matches_eager(ops, B, L, V, dtype, temperature, rule):
    logits, x, active = _step_inputs(B, L, V, dtype)
    mask_id, scale = V - 3, 0.75
    kw = dict(
        temperature=temperature,
        seed=(1 << 40) + 7,
        step=torch.arange(B) + 3,
        rows=torch.arange(B) * 5 + 1,
        mask_id=mask_id,
        logit_scale=scale,
        position_offset=11,
        **RULES[rule](B, L),
    )
    a = denoise_step(logits, x, active, impl="eager", **kw)
    b = denoise_step(logits, x, active, impl="native", **kw)
    assert torch.equal(a.x, b.x) and torch.equal(a.committed, b.committed)
    assert b.x.dtype == x.dtype and b.confidence.dtype == torch.float32
    assert torch.equal(b.confidence[~active], torch.zeros_like(b.confidence[~active]))
    assert not bool((b.x[b.committed] == mask_id).any())
    truth = _truth_confidence(logits, a.x, mask_id, scale)
    err_a = (a.confidence.double() - truth)[a.committed].abs().max()
    err_b = (b.confidence.double() - truth)[a.committed].abs().max()
    assert err_b <= 4 * err_a + 2e-6, (err_a.item(), err_b.item())


def test_denoise_step_layouts_int32_and_random_remasking(ops):
    B, L, V = 3, 9, 600
    big, x, active = _step_inputs(B, L + 4, V, torch.float32, seed=1)
    x = x[:, 2 : 2 + L].to(torch.int32)
    active = active[:, 2 : 2 + L]
    logits = big[:, 2 : 2 + L]  # a window: strided rows, no copy
    transposed = logits.transpose(0, 1).contiguous().transpose(0, 1)  # another row layout, same values
    for remasking in ("low_confidence", "random"):
        kw = dict(temperature=1.3, num_transfer=3, seed=5, step=2, remasking=remasking)
        a = denoise_step(logits.contiguous(), x, active, impl="eager", **kw)
        for inp in (logits, transposed):
            b = denoise_step(inp, x, active, impl="native", **kw)
            assert b.x.dtype == torch.int32
            assert torch.equal(a.x, b.x) and torch.equal(a.committed, b.committed)
            if remasking == "random":  # the Philox uniform itself: bit-exact
                assert torch.equal(a.confidence, b.confidence)
            else:
                torch.testing.assert_close(b.confidence, a.confidence, rtol=1e-5, atol=1e-7)


def test_denoise_step_ties_go_to_the_lowest_index(ops):
    B, L, V = 2, 3, 1500
    logits = torch.full((B, L, V), -30.0)
    logits[0, :, [5, 600, 1499]] = 12.0  # equal maxima in three tiles
    logits[1, :, [1100, 1024]] = 50.0
    x = torch.zeros(B, L, dtype=torch.long)
    active = torch.ones(B, L, dtype=torch.bool)
    out = denoise_step(logits, x, active, temperature=0.0, num_transfer=2, seed=3, impl="native")
    assert out.x.tolist() == [[5, 5, 0], [1024, 1024, 0]]
    assert out.committed.tolist() == [[True, True, False], [True, True, False]]  # equal confidences
    ref = denoise_step(logits, x, active, temperature=1.0, num_transfer=2, seed=3, impl="eager")
    nat = denoise_step(logits, x, active, temperature=1.0, num_transfer=2, seed=3, impl="native")
    assert torch.equal(ref.x, nat.x) and torch.equal(ref.committed, nat.committed)


@pytest.mark.parametrize(
    "rule",
    [dict(threshold=0.9), dict(factor=1.0), dict(factor=3.0), dict(num_transfer=torch.tensor([3, 0, 16, 5]))],
)
def test_commit_rules_on_confident_rows_with_ties_match_eager(ops, rule):
    # Two-token vocabulary with logits (log c/(1-c), 0): the confidence of position l is c[l] exactly, so the
    # rules see many confident positions and exact ties (columns 8..11 repeat column 0).
    B, L = 4, 16
    g = torch.Generator().manual_seed(4)
    c = (1 - torch.rand(B, L, generator=g) ** 3 * 0.8).clamp_max(1 - 1e-6)
    c[:, 8:12] = c[:, :1]
    logits = torch.zeros(B, L, 2)
    logits[..., 0] = torch.log(c / (1 - c))
    x = torch.full((B, L), 7)
    active = torch.rand(B, L, generator=g) < 0.8
    active[:, 8:12] = active[:, :1]
    a = denoise_step(logits, x, active, temperature=0.0, seed=0, impl="eager", **rule)
    b = denoise_step(logits, x, active, temperature=0.0, seed=0, impl="native", **rule)
    assert torch.equal(a.committed, b.committed) and torch.equal(a.x, b.x)
    assert torch.equal(a.confidence, b.confidence)
    assert 0 < int(b.committed.sum()) < int(active.sum())  # the rule chose, it did not take all or nothing


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_denoise_step_from_hidden_matches_chunked(ops, dtype):
    B, L, V, H = 3, 6, 700, 24
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(B, L, H, generator=g).to(dtype)
    head = (torch.randn(V, H, generator=g) / H**0.25).to(dtype)
    x = torch.randint(0, V, (B, L), generator=g)
    active = torch.rand(B, L, generator=g) < 0.6
    active[-1, -1] = True
    kw = dict(
        temperature=0.9, threshold=0.3, seed=17, mask_id=4, logit_scale=1.5, step=torch.tensor([0, 4, 9])
    )
    a = denoise_step((hidden, head), x, active, impl="chunked", **kw)
    b = denoise_step((hidden, head), x, active, impl="native", **kw)
    assert torch.equal(a.x, b.x) and torch.equal(a.committed, b.committed)
    torch.testing.assert_close(b.confidence, a.confidence, rtol=1e-5, atol=1e-7)


@needs_triton
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_denoise_step_same_tokens_as_triton_kernel(ops, temperature):
    B, L, V = 2, 5, 197  # interpreter: kernel tiles of 32 columns, several splits
    logits, x, active = _step_inputs(B, L, V, torch.float32, seed=3, p_active=1.0)
    kw = dict(
        temperature=temperature, num_transfer=L, seed=(1 << 33) + 5, step=torch.tensor([1, 6]), mask_id=2
    )
    t = denoise_step(logits, x, active, impl="triton", **kw)
    n = denoise_step(logits, x, active, impl="native", **kw)
    e = denoise_step(logits, x, active, impl="eager", **kw)
    assert torch.equal(t.x, n.x) and torch.equal(e.x, n.x)
    torch.testing.assert_close(n.confidence, t.confidence, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------------------
# weighted linear CE
# --------------------------------------------------------------------------------------------------


def _ce_inputs(n, h, v, dtype):
    g = torch.Generator().manual_seed(n)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64) / h**0.25
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) / h**0.25
    targets = torch.randint(0, v, (n,), generator=g)
    targets[0], targets[-1] = 0, v - 1
    w = torch.randn(n, generator=g, dtype=torch.float64)
    w[::4] = 0.0  # rows that cost nothing
    return hidden.to(dtype), weight.to(dtype), targets, w


@pytest.mark.parametrize("n,h,v", [(37, 19, 1031), (9, 8, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_weighted_linear_ce_native_matches_fp64_like_chunked(ops, n, h, v, dtype):
    hidden, weight, targets, w = _ce_inputs(n, h, v, dtype)
    hd, Wd = hidden.double().clone().requires_grad_(), weight.double().clone().requires_grad_()
    truth = weighted_linear_ce_ref(hd, Wd, targets, w)
    truth.backward()
    errs = {}
    for impl in ("chunked", "native"):
        hx, Wx = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = weighted_linear_ce(hx, Wx, targets, w.to(dtype), impl=impl, chunk_elements=3 * v)
        loss.backward()
        assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        errs[impl] = [
            abs(loss.item() - truth.item()),
            (hx.grad.double() - hd.grad).abs().max().item(),
            (Wx.grad.double() - Wd.grad).abs().max().item(),
        ]
    atol = 1e-12 if dtype == torch.float64 else 1e-6
    for e_native, e_chunked in zip(errs["native"], errs["chunked"], strict=True):
        assert e_native <= 4 * e_chunked + atol, errs


def test_weighted_linear_ce_native_no_grad_and_token_weight_grad(ops):
    hidden, weight, targets, w = _ce_inputs(23, 16, 600, torch.float32)
    with torch.no_grad():
        a = weighted_linear_ce(hidden, weight, targets, w.float(), impl="chunked")
        b = weighted_linear_ce(hidden, weight, targets, w.float(), impl="native")
        ce = -torch.log_softmax(hidden.double() @ weight.double().T, -1).gather(1, targets[:, None])[:, 0]
    # An fp32 sum of n signed terms is good to about n·eps·Σ|terms|; both paths must be within it.
    truth, scale = (w * ce).sum().item(), (w.abs() * ce).sum().item()
    assert abs(a.item() - truth) <= 23 * 2**-24 * scale and abs(b.item() - truth) <= 23 * 2**-24 * scale
    grads = []
    for impl in ("chunked", "native"):
        tw = w.float().requires_grad_()  # dL/dw_i = CE_i: every row, zero-weight ones too
        weighted_linear_ce(hidden, weight, targets, tw, impl=impl).backward()
        grads.append(tw.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n,h,v", [(37, 19, 1031), (9, 8, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_linear_logprob_native_matches_fp64_like_chunked(ops, n, h, v, dtype):
    hidden, weight, targets, _ = _ce_inputs(n, h, v, dtype)
    g = torch.randn(n, dtype=torch.float64)  # per-row upstream gradients of both signs, as diffu-GRPO's
    g[1] = 0.0
    hd, Wd = hidden.double().clone().requires_grad_(), weight.double().clone().requires_grad_()
    truth = linear_logprob_ref(hd, Wd, targets)
    (truth * g).sum().backward()
    errs, outs = {}, {}
    for impl in ("chunked", "native"):
        hx, Wx = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        logp = linear_logprob(hx, Wx, targets, impl=impl, chunk_elements=3 * v)  # several chunks
        assert logp.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        (logp * g.to(logp.dtype)).sum().backward()
        assert hx.grad.dtype == dtype and Wx.grad.dtype == dtype
        outs[impl] = logp.detach()
        errs[impl] = [
            (logp.detach().double() - truth.detach()).abs().max().item(),
            (hx.grad.double() - hd.grad).abs().max().item(),
            (Wx.grad.double() - Wd.grad).abs().max().item(),
        ]
    atol = 1e-12 if dtype == torch.float64 else 1e-6
    for e_native, e_chunked in zip(errs["native"], errs["chunked"], strict=True):
        assert e_native <= 4 * e_chunked + atol, errs
    with torch.no_grad():  # the ELBO's use: forward only
        torch.testing.assert_close(linear_logprob(hidden, weight, targets, impl="native"), outs["native"])


def test_linear_logprob_auto_takes_native_on_cpu(ops, monkeypatch):
    from dmpo_fast.ops import linear_ce

    seen = []
    chunked = linear_ce.linear_logprob_chunked
    monkeypatch.setattr(
        linear_ce, "linear_logprob_chunked", lambda *a, **kw: seen.append(kw["native"]) or chunked(*a, **kw)
    )
    hidden, weight, targets, _ = _ce_inputs(7, 8, 50, torch.float32)
    linear_logprob(hidden, weight, targets)  # impl="auto"
    linear_logprob(hidden, weight, targets, impl="chunked")
    assert seen == [True, False]


def test_auto_takes_native_on_cpu_once_loaded(ops):
    assert resolve_impl("auto", torch.device("cpu"), has_native=True) == "native"
    assert resolve_impl("auto", torch.device("cpu"), has_native=False) == "chunked"
    with pytest.raises(ValueError, match="impl='native' is not provided"):
        resolve_impl("native", torch.device("cpu"), has_native=False)


# --------------------------------------------------------------------------------------------------
# Registration: opcheck (schema, fake kernels, autograd registration, AOT dispatch)
# --------------------------------------------------------------------------------------------------


def test_opcheck(ops):
    logits, x, active = _step_inputs(2, 4, 37, torch.float32)
    rows, step = torch.arange(2), torch.tensor([0, 3])
    base = (logits, x, active, rows, step)
    torch.library.opcheck(
        ops.denoise_step.default, (*base, torch.tensor([1, 2]), 0, 9, 1.25, 1.0, 5, None, None, False)
    )
    torch.library.opcheck(ops.denoise_step.default, (*base, None, 3, 9, 0.0, 0.5, -1, 0.2, None, True))
    z = logits.reshape(8, 37)
    counters = (torch.arange(8), torch.arange(8) % 2, torch.zeros(8, dtype=torch.long))
    torch.library.opcheck(ops.sample_rows.default, (z, *counters, 9, 1.25, 1.0, 5))
    ce_args = lambda: (z.clone(), torch.randint(0, 37, (8,)), torch.randn(8))  # noqa: E731
    torch.library.opcheck(ops.ce_rows_.default, (*ce_args(), True))
    torch.library.opcheck(ops.ce_rows_.default, (*ce_args(), False))
    for dt in (torch.float32, torch.float64):
        y, zd = torch.randint(0, 37, (8,)), z.to(dt)
        torch.library.opcheck(ops.logprob_rows.default, (zd, y))
        logp, lse = ops.logprob_rows(zd, y)  # against the Python reference
        torch.testing.assert_close(lse, torch.logsumexp(zd, -1))
        torch.testing.assert_close(logp, torch.log_softmax(zd, -1).gather(1, y[:, None])[:, 0])
        g = torch.randn(8, dtype=dt)
        torch.library.opcheck(ops.logprob_grad_rows_.default, (zd.clone(), y, lse, g))
        G = zd.clone()
        ops.logprob_grad_rows_(G, y, lse, g)
        want = -g[:, None] * torch.softmax(zd, -1)
        want[torch.arange(8), y] += g
        torch.testing.assert_close(G, want)


# --------------------------------------------------------------------------------------------------
# Fallback and build policy (no compiler needed)
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def fresh_loader(monkeypatch, tmp_path):
    """The loader as in a new process whose build fails, with an empty cache."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.delenv(_native.ENV_SWITCH, raising=False)
    monkeypatch.setattr(_native, "_state", "unloaded")
    monkeypatch.setattr(_native, "_failure", None)
    monkeypatch.setattr(_native, "_warned", False)
    monkeypatch.setattr(_native, "_cache_checked", False)
    calls = []

    def failing_build(build):
        calls.append(build)
        raise RuntimeError(
            "Error building extension 'dmpo_fast_native'\nfoo.cpp:1:1: error: simulated failure"
        )

    monkeypatch.setattr(_native, "_load_library", failing_build)
    return calls


def test_failed_build_warns_once_and_gives_the_chunked_result(fresh_loader):
    hidden, weight, targets, w = _ce_inputs(11, 8, 50, torch.float32)
    logits, x, active = _step_inputs(2, 4, 37, torch.float32)
    step_kw = dict(temperature=0.7, num_transfer=2, seed=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = weighted_linear_ce(hidden, weight, targets, w.float(), impl="native")
        out = denoise_step(logits, x, active, impl="native", **step_kw)
        loss2 = weighted_linear_ce(hidden, weight, targets, w.float(), impl="native")
    mine = [c for c in caught if "native CPU ops are unavailable" in str(c.message)]
    assert len(mine) == 1, [str(c.message) for c in caught]
    assert mine[0].category is RuntimeWarning and "simulated failure" in str(mine[0].message)
    assert fresh_loader == [True]  # one attempt per process
    assert torch.equal(loss, weighted_linear_ce(hidden, weight, targets, w.float(), impl="chunked"))
    assert torch.equal(loss2, loss)
    ref = denoise_step(logits, x, active, impl="chunked", **step_kw)
    assert all(torch.equal(p, q) for p, q in zip(out, ref, strict=True))


def test_failed_build_linear_logprob_native_warns_once_and_gives_the_chunked_result(fresh_loader):
    hidden, weight, targets, _ = _ce_inputs(11, 8, 50, torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = [linear_logprob(hidden, weight, targets, impl="native") for _ in range(2)]
    mine = [c for c in caught if "native CPU ops are unavailable" in str(c.message)]
    assert len(mine) == 1 and fresh_loader == [True], [str(c.message) for c in caught]
    want = linear_logprob(hidden, weight, targets, impl="chunked")
    assert torch.equal(got[0], want) and torch.equal(got[1], want)


def test_auto_never_builds_unless_asked(fresh_loader, monkeypatch):
    logits, x, active = _step_inputs(2, 4, 37, torch.float32)
    monkeypatch.setattr(_native, "_load_library", lambda build: fresh_loader.append(build) or False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            denoise_step(logits, x, active, num_transfer=1, seed=0)  # impl="auto"
    assert fresh_loader == [False]  # looked into the cache once, without building, silently
    assert not [c for c in caught if "native" in str(c.message)]
    assert resolve_impl("auto", torch.device("cpu"), has_native=True) == "chunked"
    # DMPO_FAST_NATIVE=1: auto may build; DMPO_FAST_NATIVE=0: never, and native warns and falls back
    monkeypatch.setenv(_native.ENV_SWITCH, "1")
    resolve_impl("auto", torch.device("cpu"), has_native=True)
    assert fresh_loader == [False, True]
    monkeypatch.setattr(_native, "_state", "unloaded")
    monkeypatch.setenv(_native.ENV_SWITCH, "0")
    with pytest.warns(RuntimeWarning, match="DMPO_FAST_NATIVE=0"):
        assert resolve_impl("native", torch.device("cpu"), has_native=True) == "chunked"
    assert fresh_loader == [False, True]


def test_native_on_a_non_cpu_device_is_a_clear_error():
    with pytest.raises(ValueError, match="CPU tensors only"):
        resolve_impl("native", torch.device("meta"), has_native=True)


def test_import_builds_and_loads_nothing(tmp_path):
    code = (
        "import torch, dmpo_fast\n"
        "from dmpo_fast.ops import _native\n"
        "assert _native._state == 'unloaded'\n"
        "assert not hasattr(torch.ops.dmpo_fast, 'denoise_step')\n"
    )
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), "DMPO_FAST_NATIVE": "1"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
    assert not any(tmp_path.iterdir())


def test_cache_location_and_one_directory_per_source_version(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    assert _native.cache_root() == tmp_path / "ext" / "dmpo_fast"
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _native.cache_root() == tmp_path / "xdg" / "dmpo_fast"
    src = _native.source_dir()
    assert src is not None, "the C++ sources must be found next to the package"
    here = _native.build_dir(src)
    assert here == _native.build_dir(src) and here.parent == tmp_path / "xdg" / "dmpo_fast"
    edited = tmp_path / "csrc"
    shutil.copytree(src, edited)
    with open(edited / "linear_ce.cpp", "a") as f:
        f.write("\n// edited\n")
    assert _native.build_dir(edited) != here  # an edited source never loads a stale build


@pytest.mark.skipif(not _native._openmp_flags(), reason="torch here does not parallelise with OpenMP")
def test_the_ops_run_on_torch_openmp_threads(ops):
    # at::parallel_for is a header template: built without -fopenmp it runs every range on the calling thread.
    # The library must call into OpenMP (GOMP_parallel in its dynamic symbols), and the process must hold one
    # OpenMP runtime, torch's, so torch.set_num_threads governs the ops too.
    lib = _native._library_path(_native.build_dir(_native.source_dir()))
    assert b"GOMP_parallel" in lib.read_bytes(), "the native ops were built without OpenMP: single-threaded"
    with open("/proc/self/maps") as maps:
        runtimes = {line.split()[-1] for line in maps if "libgomp" in line}
    assert len(runtimes) == 1, runtimes
