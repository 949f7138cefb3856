"""CPU microbenchmarks through pytest-benchmark: ``pytest benchmarks/ --benchmark-only``.

Tiny shapes and the CPU backends (eager, chunked; native when it is built), so that two commits can be
compared on one machine (``--benchmark-autosave``, then ``--benchmark-compare``). These are not the figures to
quote: those come from the scripts (``python -m benchmarks <name>``) at the shapes their docstrings give.
Every benchmark also checks what the call returned, so a broken op fails here rather than timing garbage.
Plain ``pytest`` from the repository root does not collect this folder (``testpaths = ["tests"]``);
without the plugin these are skipped (``benchmarks/conftest.py``).

The tests at the end (no ``benchmark`` fixture: run by ``pytest benchmarks/test_bench_cpu.py``, left out by
``--benchmark-only``) check the loss script's providers on CPU: the peers that need CUDA and a failed compile
become rows that say why, a provider that disagrees with the reference is reported and not timed, and the
table and plots carry those rows.
"""

from __future__ import annotations

import argparse
import json
import sys

import pytest
import torch

from benchmarks import loss as loss_bench
from benchmarks import perf_table, plot
from benchmarks.common import peak_rss_extra
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
from dmpo_fast.ops.wdce import wdce_loss_ref
from dmpo_fast.sampling import generate

IMPLS = ["eager", "chunked"] + (["native"] if native_available() else [])


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def tiny():
    V = 64
    return build_tiny(V, mask_id=V - 1, eos_id=V - 2, seed=0, n_layers=2).eval()


def _loss_inputs():
    R, L, H, V = 8, 48, 64, 1000
    g = _gen()
    hidden = torch.randn(R, L, H, generator=g).requires_grad_()
    head = (torch.randn(V, H, generator=g) / H**0.5).requires_grad_()
    targets = torch.randint(0, V, (R, L), generator=g)
    mask = torch.rand(R, L, generator=g) < 0.5
    return hidden, head, targets, mask, torch.randn(R, generator=g)


@pytest.mark.parametrize("impl", IMPLS)
def test_wdce_loss_fwd_bwd(benchmark, impl):
    hidden, head, targets, mask, weights = _loss_inputs()

    def step():
        hidden.grad = head.grad = None
        loss = wdce_loss(hidden, head, targets, mask, weights, impl=impl)
        loss.backward()
        return loss

    loss = benchmark(step)
    assert torch.isfinite(loss) and torch.isfinite(hidden.grad).all() and head.grad.abs().sum() > 0


def test_wdce_loss_compiled_reference(benchmark):
    """The benchmark's ``compile`` provider: torch.compile of the reference; inductor needs a C++ compiler."""
    inputs = _loss_inputs()
    hidden, head = inputs[:2]
    compiled = torch.compile(wdce_loss_ref, dynamic=False)
    want = loss_bench.run_once(wdce_loss_ref, inputs)
    try:
        loss_bench.run_once(compiled, inputs)  # compiles forward and backward
    except Exception as err:  # noqa: BLE001 - no compiler here: the benchmark records a skipped row instead
        pytest.skip(f"torch.compile failed here: {type(err).__name__}: {err}")

    def step():
        hidden.grad = head.grad = None
        loss = compiled(*inputs)
        loss.backward()
        return loss

    loss = benchmark(step)
    assert torch.isclose(loss, torch.tensor(want[0]), rtol=1e-5)
    torch.testing.assert_close(hidden.grad, want[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(head.grad, want[2], rtol=1e-5, atol=1e-6)


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


# --------------------------------------------------------------------------------------------------
# The loss script's providers on CPU (plain tests)
# --------------------------------------------------------------------------------------------------


def _loss_rows(providers=None):
    args = argparse.Namespace(device="cpu", quick=True, dtype=None, providers=providers)
    return {r["provider"]: r for r in loss_bench.run(args)}


@pytest.fixture(scope="module")
def loss_rows():
    return _loss_rows()


def test_loss_providers_on_cpu(loss_rows):
    assert list(loss_rows) == ["reference", "compile", "chunked", "native", "cce", "liger"]
    for name in ("cce", "liger"):  # the peers' kernels are GPU Triton: rows that say so, nothing timed
        assert "needs CUDA" in loss_rows[name]["skipped"] and "median_ms" not in loss_rows[name]
    compiled = loss_rows["compile"]
    assert ("median_ms" in compiled) != compiled.get("skipped", "").startswith("torch.compile failed")
    measured = [r for r in loss_rows.values() if "median_ms" in r]
    assert {"reference", "chunked"} <= {r["provider"] for r in measured}
    for r in measured:  # checked against the reference before timing, within the fp32 tolerance
        assert r["check"]["agrees"] and 0 <= r["err_vs_tol"] <= 1
        assert set(r["max_abs_err"]) == {"loss", "d_hidden", "d_head"}
        assert r["median_ms"] > 0 and r["tflops"] > 0
    assert loss_rows["reference"]["speedup_vs_reference"] == 1.0
    assert loss_rows["reference"]["max_abs_err"] == {"loss": 0.0, "d_hidden": 0.0, "d_head": 0.0}
    assert set(loss_rows["reference"]["peers"]) == {"cut-cross-entropy", "liger-kernel"}


def test_loss_compile_failure_is_a_skipped_row(monkeypatch):
    def no_compiler(fn, **kwargs):
        def fails(*args):
            raise RuntimeError("InductorError: no working C++ compiler found\ndetails")

        return fails

    monkeypatch.setattr(loss_bench.torch, "compile", no_compiler)
    rows = _loss_rows(["reference", "compile"])
    assert rows["compile"]["skipped"] == (
        "torch.compile failed: RuntimeError: InductorError: no working C++ compiler found"
    )
    assert "median_ms" not in rows["compile"] and rows["reference"]["median_ms"] > 0


def test_loss_disagreeing_provider_is_reported_not_timed(monkeypatch):
    real = loss_bench.provider

    def off_by_one_percent(name, device, *, build_native):
        fn, note, unit = real(name, device, build_native=build_native)
        if name != "chunked":
            return fn, note, unit
        return (lambda h, w, t, m, rw: fn(h, w, t, m, rw * 1.01)), note, unit

    monkeypatch.setattr(loss_bench, "provider", off_by_one_percent)
    rows = _loss_rows(["reference", "chunked"])
    bad = rows["chunked"]
    assert "disagrees with the reference" in bad["skipped"] and "median_ms" not in bad
    assert bad["err_vs_tol"] > 1 and not bad["check"]["agrees"]
    assert rows["reference"]["check"]["agrees"]


def test_loss_compare():
    ref = (2.0, torch.ones(3, 4), torch.full((5, 4), 2.0))
    scales = {"loss": 4.0, "d_hidden": 1.0, "d_head": 2.0}
    exact = loss_bench.compare(ref, ref, scales, rtol=1e-3)
    assert exact["agrees"] and exact["err_vs_tol"] == 0
    near = loss_bench.compare((2.003, ref[1] + 5e-4, ref[2]), ref, scales, rtol=1e-3)
    assert near["agrees"] and near["err_vs_tol"] == pytest.approx(0.75)
    wrong_grad = loss_bench.compare((2.0, ref[1], ref[2] * 1.01), ref, scales, rtol=1e-3)
    assert not wrong_grad["agrees"] and wrong_grad["max_abs_err"]["d_head"] == pytest.approx(0.02)
    missing = loss_bench.compare((2.0, ref[1], None), ref, scales, rtol=1e-3)
    assert not missing["agrees"] and missing["err_vs_tol"] == float("inf")


def test_loss_tolerance_and_liger_gate():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert loss_bench.rtol_for(torch.float32, cpu) == 1e-5 < loss_bench.rtol_for(torch.float32, cuda)
    assert loss_bench.rtol_for(torch.bfloat16, cuda) == 4 * 2**-7
    assert loss_bench.rtol_for(torch.float16, cuda) == 4 * 2**-10
    gate = loss_bench.LIGER_PER_TOKEN_GRADS
    assert loss_bench._version_tuple("0.8.1") < gate <= loss_bench._version_tuple("0.8.2")
    assert loss_bench._version_tuple("0.10.0rc1") > gate > loss_bench._version_tuple("0.7.0")


def test_loss_table_and_plot_carry_skipped_rows(loss_rows, tmp_path):
    path = tmp_path / "loss-cpu.json"
    path.write_text(json.dumps([{**r, "benchmark": "loss", "quick": False} for r in loss_rows.values()]))
    ((_, (rows, name)),) = perf_table.load([path]).items()
    text = perf_table.table("wdce_loss", rows, name)
    table_lines = [line for line in text.splitlines() if line.startswith("| ")][1:]
    measured = [r["provider"] for r in loss_rows.values() if "median_ms" in r]
    assert [line.split(" | ")[0][2:] for line in table_lines] == measured
    for skipped in ("cce", "liger"):
        assert f"- not measured: `{skipped}` — needs CUDA" in text
    assert "cut-cross-entropy" in text and "error / tolerance" in text
    pytest.importorskip("matplotlib")
    png = plot.plot_file(path, tmp_path / "plots")
    assert png is not None and png.stat().st_size > 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_peak_rss_extra_sees_a_freed_allocation():
    """The real peak of a call that allocates, writes and frees 64 MiB is about 64 MiB, though the tracker of
    live tensors would see the same and the RSS after the call none of it."""
    extra = peak_rss_extra("benchmarks.common:touch_setup", 64)
    assert extra is not None and 60 * 2**20 <= extra <= 80 * 2**20, extra


def test_loss_linear_ops_rows_on_cpu():
    args = argparse.Namespace(device="cpu", quick=True, dtype=None, providers=["reference", "chunked"],
                              op="linear_logprob", shape=None)  # fmt: skip
    rows = {r["provider"]: r for r in loss_bench.run(args)}
    for r in rows.values():
        assert r["op"] == "linear_logprob" and r["check"]["agrees"] and r["median_ms"] > 0
        if sys.platform.startswith("linux"):
            assert r["peak_rss_extra_bytes"] >= 0
    assert rows["reference"]["rss_vs_reference"] == 1.0
