"""``pytest benchmarks/ --benchmark-only`` needs the pytest-benchmark plugin; without it the microbenchmarks
are skipped with a reason instead of failing on a missing ``benchmark`` fixture."""

import pytest


def pytest_collection_modifyitems(config, items):
    if config.pluginmanager.hasplugin("benchmark"):
        return
    skip = pytest.mark.skip(reason="needs pytest-benchmark (pip install pytest-benchmark)")
    for item in items:
        if "benchmark" in getattr(item, "fixturenames", ()):
            item.add_marker(skip)
