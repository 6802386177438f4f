"""keep_freed_memory: glibc's malloc keeps freed memory, so a backward's temporaries stop faulting pages in."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from lrpcli.explainer import allocator

GLIBC = sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "gnu_get_libc_version")


def _fresh_process(code: str, **env: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, **env})
    return result.stdout.strip()


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_applies_on_glibc_and_the_environment_can_turn_it_off():
    code = "import lrpcli; print(lrpcli.keep_freed_memory(), lrpcli.keep_freed_memory())"
    assert _fresh_process(code, LRPCLI_KEEP_FREED_MEMORY="1") == "True True"
    assert _fresh_process(code, LRPCLI_KEEP_FREED_MEMORY="0") == "False False"


def test_sets_both_thresholds_once(monkeypatch):
    """Heap (not mmap) up to glibc's largest mmap threshold, 32 MiB, and no trimming below 2 GiB free."""
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(allocator, "_applied", False)
    monkeypatch.delenv(allocator.ENV, raising=False)
    monkeypatch.setattr(allocator, "_glibc_mallopt", lambda: lambda key, value: calls.append((key, value)) or 1)
    assert allocator.keep_freed_memory() is True
    assert allocator.keep_freed_memory() is True
    assert calls == [(-3, 32 * 2**20), (-1, 2**31 - 1)]


def test_false_where_it_does_not_apply(monkeypatch):
    find_mallopt = allocator._glibc_mallopt
    monkeypatch.setattr(allocator, "_applied", False)
    monkeypatch.delenv(allocator.ENV, raising=False)
    monkeypatch.setattr(allocator, "_glibc_mallopt", lambda: lambda key, value: 0)  # glibc refused a value
    assert allocator.keep_freed_memory() is False
    monkeypatch.setattr(allocator.sys, "platform", "darwin")
    assert find_mallopt() is None
    monkeypatch.setattr(allocator, "_glibc_mallopt", find_mallopt)
    assert allocator.keep_freed_memory() is False


def test_the_command_line_applies_it(monkeypatch):
    from lrpcli.cli import main

    calls = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append(1) or True)
    result = CliRunner().invoke(main, ["render", "--help"])
    assert result.exit_code == 0 and calls == [1]
