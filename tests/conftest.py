"""Shared fixtures."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def float64():
    """Tensors default to float64 inside a test (reference comparisons); restored after it."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
