"""The demo's ViRelAy project in a real browser: ViRelAy serves it over HTTP, headless Chromium renders the page.

The REST API is checked in test_analysis_cli.py; this checks that ViRelAy's web app itself loads the project
(its menus list the analysis, every class, clustering and embedding, and the cluster pane counts samples) and
saves a screenshot. Skipped without a Chromium binary (Debian: ``apt-get install chromium``); slow (the demo's
explain run, then a browser), so it runs with ``pytest --slow``.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from lrpcli.cli import main

ROOT = Path(__file__).resolve().parents[1]
BROWSER = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)

pytestmark = [pytest.mark.slow, pytest.mark.skipif(BROWSER is None, reason="no chromium binary on PATH")]


def _cli(*args: str) -> None:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _browser(*args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1400,900",
             "--virtual-time-budget=20000"]
    return subprocess.run([BROWSER, *flags, *args], capture_output=True, text=True, timeout=300, check=True)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`make demo`'s explain, analyze and virelay steps, then ``python -m virelay`` on a free port."""
    base = tmp_path_factory.mktemp("browser")
    _cli("explain", str(ROOT / "configs" / "demo.yaml"), str(ROOT / "share" / "demo" / "images"),
         "-o", str(base / "demo.h5"), "--num-workers", "0", "-q")
    _cli("analyze", str(base / "demo.h5"), "-o", str(base / "demo_analysis.h5"), "-q")
    _cli("virelay", str(base / "demo.h5"), "--analysis", str(base / "demo_analysis.h5"), "-d", str(base / "vr"), "-q")
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "virelay", "-p", str(port), str(base / "vr" / "demo.yaml")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(url + "api/projects", timeout=5).read()
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("ViRelAy did not answer within two minutes")
        yield base, url
    finally:
        server.terminate()
        server.wait(30)


def test_virelay_web_app_shows_the_demo_analysis(served):
    base, url = served
    dom = _browser("--dump-dom", url).stdout
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", re.sub(r"<style.*?</style>", " ", dom, flags=re.S)))
    with h5py.File(base / "demo.h5", "r") as f:
        classes = [str(c) for c in f.attrs["classes"]]
        first = int(np.sum(f["label"][: f.attrs["rows_written"]] == 0))
    assert "Analysis method demo-analysis" in text
    assert "Category " + " ".join(f"{c} ({i:08d})" for i, c in enumerate(classes)) in text
    clusterings = " ".join(["hdbscan"] + [f"kmeans-{k:02d}" for k in range(2, 11)])
    assert f"Clustering {clusterings} Embedding spectral tsne" in text
    counts = [int(m) for m in re.findall(r"(?:Cluster -?\d+|Noise) \((\d+)\)", text)]
    assert counts and sum(counts) == first  # the cluster pane lists the first class's HDBSCAN clusters


def test_virelay_web_app_screenshot(served, tmp_path):
    _, url = served
    shot = tmp_path / "virelay.png"
    _browser(f"--screenshot={shot}", url)
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape == (900, 1400, 3)
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 100  # rendered page, not a blank or error screen
    header = img[10:50, 300:1300].reshape(-1, 3)  # ViRelAy's dark purple header bar
    assert (header.mean(axis=0) < [90, 40, 110]).all()
