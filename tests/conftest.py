"""Test configuration: the ``cuda`` and ``slow`` markers, and per-test seeding.

* ``@pytest.mark.cuda`` tests are skipped only when there is no CUDA GPU. On a machine with a
  GPU they run, and they fail (no silent skip) when the compiled module ``flash_cute._C`` does
  not import.
* Every test starts from a seed derived from its node id (test name and parameters): runs are
  reproducible, and each case draws different random inputs.
"""

from __future__ import annotations

import zlib

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "cuda: needs a CUDA GPU and flash_cute._C; skipped only when no GPU is present"
    )
    config.addinivalue_line("markers", "slow: slower than the rest (tens of seconds); still run by default")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _require_extension_on_gpu(request):
    """On a GPU machine, a missing or broken extension is a failure of every GPU test."""
    if request.node.get_closest_marker("cuda") is None:
        return
    try:
        import flash_cute._C  # noqa: F401
    except ImportError as exc:
        pytest.fail(f"a CUDA GPU is present but flash_cute._C does not import: {exc}", pytrace=False)


@pytest.fixture(autouse=True)
def _seed(request):
    """Seeds torch (CPU and CUDA generators) from the test's node id."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
