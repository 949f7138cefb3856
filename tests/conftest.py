"""Test configuration: run Triton kernels in the CPU interpreter when no GPU is present.

TRITON_INTERPRET must be set before Triton is first imported, so this runs before any test module
imports dmpo_fast. Tests marked ``gpu`` are skipped on CPU-only machines.

Every test runs with a fresh temporary folder as the working directory, so neither the tests nor the
subprocesses they start depend on where pytest was started (from the repository root, ``python -c`` and
``python -m`` would put the root, and its ``kernels/`` folder, on ``sys.path``). Tests that mean to run
from the root (``python -m benchmarks``, the import guard) say so with ``cwd=ROOT``.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session", autouse=True)
def _away_from_the_repository(tmp_path_factory):
    before = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(before)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny shapes on a shared 2-core machine: intra-op threads cost more than the math (x100 seen)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
