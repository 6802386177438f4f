"""``make bench``'s analyze section: the worker's one-line JSON contract and the row run.py makes of it."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "share" / "bench"
STAGES = ["preprocess", "graph", "eigen", "clustering", "embedding"]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCH))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


def test_analyze_row_reports_total_stages_and_peak(monkeypatch):
    run = _load("run")
    figures = {"n": 1000, "classes": 2, "stages": {s: [float(i + 1), 0.5] for i, s in enumerate(STAGES)},
               "total": [15.0, 2.5], "peak_rss": 300 * 2**20, "tsne": True, "load": 1.0}
    calls = []

    def fake(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, "preprocess: ...\njson: " + json.dumps(figures) + "\n", "")

    monkeypatch.setattr(run.subprocess, "run", fake)
    table = run.Table()
    run.analyze_row(table, 1000, 2)
    assert calls[0][-5:] == ["--n", "1000", "--classes", "2", "--json"]
    assert table.rows == [("analyze", "1,000 maps 224x224, 2 class(es)", "", "67", "15 s wall (2 s CPU)",
                           "peak RSS 300 MiB", "(diagnostic)", "")]
    assert table.notes[0].startswith("analyze: preprocess 1 s (0 s CPU), graph 2 s (0 s CPU), eigen 3 s")


@pytest.mark.slow
def test_bench_analyze_prints_every_stage_as_json(tmp_path):
    done = subprocess.run([sys.executable, str(BENCH / "bench_analyze.py"), "--n", "300", "--classes", "2",
                           "--file-rows", "20", "--json"], capture_output=True, text=True, check=True)
    line = [row for row in done.stdout.splitlines() if row.startswith("json: ")]
    assert len(line) == 1
    figures = json.loads(line[0][len("json: "):])
    assert list(figures["stages"]) == STAGES and figures["n"] == 300 and figures["classes"] == 2
    assert all(wall >= 0 and cpu >= 0 for wall, cpu in figures["stages"].values())
    assert 50 * 2**20 < figures["peak_rss"] < 2**31
