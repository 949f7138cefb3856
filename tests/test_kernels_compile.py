"""Every Triton kernel compiles for an H100 (sm_90) with the configuration its launcher uses, and fits.

The interpreter tests prove the kernels' arithmetic; this proves the part they cannot: the 16-bit tl.dot
paths, the Hopper tile sizes and pipelining stages go through Triton's real CUDA toolchain (Triton IR,
LLVM, PTX, ptxas: all in the Triton wheel, no GPU needed) and fit the GPU's shared memory and
registers. It does not prove that they are correct or fast there (the ``gpu``-marked tests and the
benchmarks do, on a GPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")


def _has_cuda_toolchain() -> bool:
    from dmpo_fast.kernels.compile_check import _ptxas_path

    return Path(_ptxas_path(90)).is_file()


pytestmark = pytest.mark.skipif(
    not _has_cuda_toolchain(), reason="this Triton build ships no CUDA backend (ptxas)"
)

KERNELS = {
    "_lse_kernel",
    "_probs_to_grad_kernel",
    "_grad_logits_kernel",
    "_dw_kernel",
    "_denoise_partial_kernel",
    "_denoise_merge_kernel",
    "_forward_mask_kernel",
    "_importance_weights_kernel",
}


@pytest.fixture(scope="module")
def sm90(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile") / "sm90.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "dmpo_fast.kernels.compile_check", "--arch", "90", "--quiet"]
        + ["--json", str(out)],
        env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert out.exists(), proc.stdout + proc.stderr
    return proc, json.loads(out.read_text())[0]


def test_every_launcher_call_compiles_for_sm90(sm90):
    proc, rep = sm90
    assert rep["failures"] == [], "\n".join(f"{f['case']}: {f['error']}" for f in rep["failures"])
    assert {k["kernel"] for k in rep["kernels"]} == KERNELS
    assert rep["target"] == "sm_90a"
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_kernel_fits_an_h100(sm90):
    _, rep = sm90
    over = [(k["kernel"], k["config"], k["problems"]) for k in rep["kernels"] if k["problems"]]
    assert over == []
    assert all(0 < k["registers"] <= 255 for k in rep["kernels"])
    assert max(k["shared"] for k in rep["kernels"]) <= 232448


def test_the_16bit_gemms_run_on_tensor_cores(sm90):
    # DOT_FP32 upcasts the tl.dot operands for the interpreter only: on the GPU, 16-bit operands go to
    # the tensor cores. Every 16-bit GEMM specialisation must be the path a GPU run takes and must issue
    # Hopper's warpgroup MMA (wgmma), without which the GEMM-floor targets are out of reach.
    _, rep = sm90
    gemms = [
        k
        for k in rep["kernels"]
        if "DOT_FP32" in k["config"]
        and k["config"].get("HAS_HIDDEN", True)  # denoise_step from logits has no GEMM
        and {"bfloat16", "float16"} & set(k["dtypes"])
    ]
    assert {k["kernel"] for k in gemms} == {
        "_lse_kernel", "_grad_logits_kernel", "_dw_kernel", "_denoise_partial_kernel"
    }  # fmt: skip
    assert all(k["config"]["DOT_FP32"] is False for k in gemms)
    # wgmma works on 64-row tiles; the 16- and 32-row tiles of a denoising step with few active rows
    # (memory-bound: the head is read once either way) use the Ampere-style mma.sync.
    big = [k for k in gemms if k["config"].get("BLOCK_N", 64) >= 64]
    assert len(big) > len(gemms) // 2
    assert [k["case"] for k in big if k["tensor_cores"] != "wgmma"] == []
    assert [k["case"] for k in gemms if k["tensor_cores"] not in ("wgmma", "mma")] == []
    # ptxas serialises wgmma when it runs out of registers for the pipeline, and says so only as a
    # warning: the kernel would still run, at a fraction of the tensor-core rate.
    assert [(k["case"], k["ptxas_warnings"]) for k in gemms if k["ptxas_warnings"]] == []


def test_the_check_refuses_to_run_under_the_interpreter(monkeypatch):
    from dmpo_fast.kernels import compile_check

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        compile_check.check(90)


def test_an_unknown_arch_is_a_clear_error():
    from dmpo_fast.kernels import compile_check

    with pytest.raises(ValueError, match=r"arch must be one of \[80, 86, 89, 90, 100\], got 75"):
        compile_check.check(75)
    proc = subprocess.run(
        [sys.executable, "-m", "dmpo_fast", "check-kernels", "--arch", "75"], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "--arch" in proc.stderr and "90" in proc.stderr, proc.stderr
