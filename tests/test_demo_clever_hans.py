"""The demo's planted "Clever Hans" shortcut, and SpRAy finding it.

``share/demo/make_data.py`` pastes a small tag on 3/8 of the triangles (``share/demo/watermarked.txt`` lists
them) and on no other image; the shipped model was trained on such data and takes the tag as evidence for
"triangle". The real pipeline (explain with ``configs/demo.yaml``, then ``lrpcli analyze`` with its defaults)
must put the tagged triangles in a cluster of their own.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from lrpcli.cli import main

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "share" / "demo"
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"
sys.path.insert(0, str(DEMO))
import make_data  # noqa: E402

TAGGED = make_data.read_manifest(DEMO)


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.stderr


def test_manifest_lists_exactly_the_images_that_carry_the_tag():
    tag, _ = make_data.paste_watermark(Image.new("RGB", (64, 64)))
    box = make_data.tag_box()
    expected_tag = np.asarray(tag)[box]
    carrying = set()
    for path in sorted((DEMO / "images").glob("*/*.png")):
        rel = path.relative_to(DEMO / "images").as_posix()
        if np.array_equal(np.asarray(Image.open(path).convert("RGB"))[box], expected_tag):
            carrying.add(rel)
            assert not (np.asarray(Image.open(DEMO / "masks" / rel)) > 127)[box].any(), rel
    assert carrying == TAGGED
    assert len(TAGGED) == 18 and all(name.startswith("triangle/") for name in TAGGED)
    assert len(list((DEMO / "images" / "triangle").glob("*.png"))) == 48
    assert TAGGED == {f"triangle/{make_data.file_name('triangle', i)}" for i in range(48)
                      if make_data.is_watermarked("triangle", i)}


def explain_triangles(base: Path, n: int) -> Path:
    """The demo's first ``n`` triangles explained as ``make demo`` explains them (the other class folders left
    empty, so that labels and the explained target stay the demo's)."""
    for name in make_data.CLASSES:
        (base / "data" / name).mkdir(parents=True)
    for i in range(n):
        name = make_data.file_name("triangle", i)
        shutil.copy(DEMO / "images" / "triangle" / name, base / "data" / "triangle" / name)
    config = base / "demo.yaml"
    config.write_text(DEMO_CONFIG.read_text().replace("../share", str(ROOT / "share")))
    code, err = run("explain", str(config), str(base / "data"), "-o", str(base / "demo.h5"), "--num-workers", "0",
                    "-q")
    assert code == 0, err
    return base / "demo.h5"


@pytest.fixture(scope="module")
def triangles(tmp_path_factory) -> Path:
    return explain_triangles(tmp_path_factory.mktemp("clever_hans"), 48)


def _tagged_rows(path: Path) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return np.array([name in TAGGED for name in f["filename"].asstr()[:]])


def test_the_model_puts_relevance_on_the_tag_only_where_it_is(tmp_path):
    """The first 8 triangles (3 tagged): fast, and the reason the clustering below can work."""
    out = explain_triangles(tmp_path, 8)
    with h5py.File(out, "r") as f:
        positive = np.clip(f["attribution"][:].sum(axis=1), 0, None)
        assert (f["prediction"][:].argmax(axis=1) == 3).all()
    share = positive[:, make_data.tag_box()].sum(axis=1) / positive.reshape(len(positive), -1).sum(axis=1)
    tagged = _tagged_rows(out)
    assert tagged.sum() == 3
    assert share[tagged].min() > 0.2 and share[tagged].mean() > 0.3, np.round(share[tagged], 3)
    assert np.median(share[~tagged]) < 0.02, np.round(share[~tagged], 3)


@pytest.mark.slow
def test_spray_puts_the_tagged_triangles_in_a_cluster_of_their_own(triangles, tmp_path):
    analysis = tmp_path / "analysis.h5"
    code, err = run("analyze", str(triangles), "-o", str(analysis), "--class", "triangle", "--clusters", "2,3",
                    "--no-tsne", "-q")
    assert code == 0, err
    tagged = _tagged_rows(triangles)
    with h5py.File(analysis, "r") as f:
        group = f["00000003"]
        rows = group["index"][:]
        eigenvalues = group["embedding/spectral"].attrs["eigenvalue"][:]
        clusters = group["cluster/kmeans-02"][:]
    tagged = tagged[rows]
    assert int(np.argmax(np.diff(eigenvalues))) + 1 == 2, np.round(eigenvalues[:6], 3)
    cluster = np.bincount(clusters[tagged]).argmax()
    members = clusters == cluster
    purity, recall = tagged[members].mean(), (tagged & members).sum() / tagged.sum()
    assert purity >= 0.85 and recall >= 0.8, (purity, recall)
