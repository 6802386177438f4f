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


def _render_outputs(line: str) -> list[str]:
    """The paths one README `lrpcli render` line writes: -d/--dir, --swatches, else OUT_heatmaps next to OUT."""
    import shlex

    args = shlex.split(line, comments=True)[2:]
    values = {flag: args[args.index(flag) + 1] for flag in ("-d", "--dir", "--swatches") if flag in args}
    if values:
        return list(values.values())
    return [Path(args[0]).stem + "_heatmaps"]


def test_render_examples_write_only_where_make_clean_cleans_and_git_ignores():
    """Run from the repository root, the examples must leave nothing that `make clean` keeps or git shows."""
    import subprocess

    text = _section(README.read_text(), "## `lrpcli render`", "## `lrpcli debug`")
    block = re.findall(r"```bash\n(.*?)```", text, flags=re.S)[0]
    lines = [ln for ln in block.splitlines() if ln.startswith("lrpcli render")]
    outputs = sorted({p for ln in lines for p in _render_outputs(ln)})
    assert outputs == ["demo_heatmaps", "demo_heatmaps/bwr", "demo_heatmaps/grids", "demo_heatmaps/overlay",
                       "demo_heatmaps/palettes.png", "demo_heatmaps/weighted"]
    makefile = README.with_name("Makefile").read_text()
    cleaned = re.search(r"^DEMO_MAPS := (\S+)$", makefile, flags=re.M)[1]
    assert "$(DEMO_MAPS)" in re.search(r"^clean:\n\trm -rf (.*)$", makefile, flags=re.M)[1]
    assert all(p == cleaned or p.startswith(cleaned + "/") for p in outputs)
    probe = [f"{p}/x.png" if not p.endswith(".png") else p for p in outputs]
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *probe], cwd=README.parent,
                             capture_output=True, text=True)
    assert ignored.stdout.split() == probe
