"""Package layout that pyproject.toml cannot express statically.

The top-level ``kernels/`` folder holds the Triton kernels and is installed as the subpackage
``dmpo_fast.kernels`` (never as a top-level ``kernels`` module: that name belongs to Hugging Face's
package). The optional native CPU ops in ``csrc/`` are compiled at first use by
``dmpo_fast.ops._native`` (torch's extension builder + ninja), so installing needs no compiler; the
sources ship inside the package as ``dmpo_fast.csrc``.
"""

from setuptools import find_packages, setup

packages = find_packages(include=["dmpo_fast", "dmpo_fast.*"]) + ["dmpo_fast.kernels", "dmpo_fast.csrc"]

setup(
    packages=packages,
    package_dir={"dmpo_fast.kernels": "kernels", "dmpo_fast.csrc": "csrc"},
    package_data={"dmpo_fast": ["assets/**/*"], "dmpo_fast.csrc": ["*.cpp", "*.h"]},
    include_package_data=True,
)
