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


def test_cli_reports_and_builds_the_native_ops(tmp_path):
    import os

    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    env.pop("DMPO_FAST_NATIVE", None)
    out = subprocess.run([sys.executable, "-m", "dmpo_fast", "info"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    native = [line for line in out.stdout.splitlines() if line.startswith("native")]
    assert native and "not built yet: run 'dmpo-fast build-native'" in native[0], out.stdout
    assert not any(tmp_path.iterdir())  # info looks into the cache, it never compiles
    env["DMPO_FAST_NATIVE"] = "0"
    out = subprocess.run(
        [sys.executable, "-m", "dmpo_fast", "build-native"], capture_output=True, text=True, env=env
    )
    assert out.returncode == 1 and "DMPO_FAST_NATIVE=0 forbids building" in out.stderr
    out = subprocess.run([sys.executable, "-m", "dmpo_fast", "info"], capture_output=True, text=True, env=env)
    assert "native    off (DMPO_FAST_NATIVE=0)" in out.stdout
