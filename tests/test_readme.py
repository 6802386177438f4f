"""The README's Python examples run as written (the 'Python API' section, in one namespace)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _section(text: str, start: str, end: str) -> str:
    return text[text.index(start):text.index(end)]


def test_python_api_examples_run(capsys):
    text = _section(README.read_text(), "## Python API", "## Benchmarks")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 4
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - our own documentation
    assert namespace["relevance"].shape == (1, 3, 64, 64)
