"""Guard: the repository's top-level ``kernels/`` folder never shadows Hugging Face's ``kernels`` package.

transformers imports Hugging Face's ``kernels`` from its model code. With the repository root on
``sys.path`` (``python -c`` or ``python -m`` started there), a ``kernels/__init__.py`` would make our
folder a regular package that wins that import, and transformers 5.25 with ``kernels`` 0.19 then fails
with ``ImportError: cannot import name 'CUDAProperties' from 'kernels'``. The folder is therefore a
namespace portion (no ``__init__.py``), which Python passes over for a regular package of the same name.
These tests start Python from the root the way a user would, so the next such release fails here first.
"""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python_at_root(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code, str(ROOT)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_kernels_folder_is_not_a_regular_package():
    assert (ROOT / "kernels").is_dir()
    assert not (ROOT / "kernels" / "__init__.py").exists(), (
        "kernels/__init__.py makes the folder shadow Hugging Face's `kernels` package from the root"
    )


def test_transformers_model_code_and_peft_import_from_the_root():
    proc = _python_at_root(
        "import sys, pathlib\n"
        "import transformers.modeling_utils\n"
        "from transformers import AutoModelForCausalLM, AutoModel\n"
        "import peft\n"
        "import dmpo_fast.models, dmpo_fast.kernels.runtime\n"
        "import importlib.util\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "ours = pathlib.Path(sys.argv[1]) / 'kernels'\n"
        "if spec is not None and spec.origin is not None:\n"
        "    assert ours not in pathlib.Path(spec.origin).parents, spec.origin\n"
        "print('ok')\n"
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def test_library_model_loads_through_peft_from_the_root():
    pytest.importorskip("peft")
    proc = _python_at_root(
        "from peft import LoraConfig, get_peft_model\n"
        "from dmpo_fast.models import build_tiny\n"
        "m = get_peft_model(build_tiny(32, mask_id=31, eos_id=30, seed=0, n_layers=1),"
        " LoraConfig(r=2, target_modules=['q_proj']))\n"
        "print('ok')\n"
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_cli_starts_wherever_it_is_started(where, tmp_path):
    cwd = ROOT if where == "root" else tmp_path
    proc = subprocess.run(
        [sys.executable, "-m", "dmpo_fast", "info"], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torch" in proc.stdout
