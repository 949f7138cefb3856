"""Package layout that pyproject.toml cannot express statically.

The top-level ``kernels/`` folder holds the Triton kernels and is installed as the subpackage
``dmpo_fast.kernels`` (never as a top-level ``kernels`` module: that name belongs to Hugging Face's
package). The optional native CPU ops in ``csrc/`` are compiled at first use by
``dmpo_fast.native`` (torch's extension builder + ninja), so installing needs no compiler.
"""

from setuptools import find_packages, setup

packages = find_packages(include=["dmpo_fast", "dmpo_fast.*"]) + ["dmpo_fast.kernels"]

setup(
    packages=packages,
    package_dir={"dmpo_fast.kernels": "kernels"},
    package_data={"dmpo_fast": ["assets/**/*"]},
    include_package_data=True,
)
