"""Package layout that pyproject.toml cannot express statically.

The top-level ``kernels/`` folder holds the Triton kernels and is installed as the subpackage
``dmpo_fast.kernels`` (never as a top-level ``kernels`` module: that name belongs to Hugging Face's
package). ``dmpo_fast/kernels`` is a symbolic link to it, and the folder has no ``__init__.py``: a
folder without one is a namespace portion, which Python passes over for a regular package of the same
name, so even with the repository root on ``sys.path`` ``import kernels`` finds Hugging Face's package.
(A ``package_dir`` mapping would do the same for a wheel, but setuptools' editable finder cannot resolve
a mapped namespace subpackage; the link makes the checkout itself the installed layout.) The optional native CPU ops in ``csrc/`` are compiled at first use by
``dmpo_fast.ops._native`` (torch's extension builder + ninja), so installing needs no compiler; the
sources ship inside the package as ``dmpo_fast.csrc``.
"""

from pathlib import Path

from setuptools import find_packages, setup

# The built-in tiny models (dmpo_fast/assets/tiny_*/: weights, config, tokenizer) are data-only packages.
ASSETS = Path(__file__).resolve().parent / "dmpo_fast" / "assets"
asset_packages = [f"dmpo_fast.assets.{d.name}" for d in sorted(ASSETS.glob("tiny_*")) if d.is_dir()]
packages = find_packages(include=["dmpo_fast", "dmpo_fast.*"]) + asset_packages
packages += ["dmpo_fast.kernels", "dmpo_fast.csrc"]  # folders without __init__.py

setup(
    packages=packages,
    package_dir={"dmpo_fast.csrc": "csrc"},
    package_data={"dmpo_fast.csrc": ["*.cpp", "*.h"], **{name: ["*"] for name in asset_packages}},
    include_package_data=True,
)
