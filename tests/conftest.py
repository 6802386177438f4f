"""Shared fixtures."""

from __future__ import annotations

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run tests marked slow (zoo sweeps, big models)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: longer than a few seconds; run with --slow (CI runs without)")


def pytest_collection_modifyitems(config, items):
    """Slow cases stay out of the default run so `make test` fits CI's time on two cores."""
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def float64():
    """Tensors default to float64 inside a test (reference comparisons); restored after it."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add contention on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
