import subprocess
import sys

import dmpo_fast


def test_kernels_installed_as_subpackage():
    import dmpo_fast.kernels as k

    assert k.__name__ == "dmpo_fast.kernels"
    # The top-level name `kernels` belongs to Hugging Face's package: we must not provide it.
    import importlib.util

    spec = importlib.util.find_spec("kernels")
    assert spec is None or spec.origin != k.__file__, "our kernels/ folder leaks as a top-level module"


def test_cli_version_and_info():
    out = subprocess.run(
        [sys.executable, "-m", "dmpo_fast", "--version"], capture_output=True, text=True, check=True
    )
    assert dmpo_fast.__version__ in out.stdout
    out = subprocess.run([sys.executable, "-m", "dmpo_fast", "info"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "torch" in out.stdout
