"""``lrpcli analyze`` and ``lrpcli virelay`` end to end, checked through the real ViRelAy's REST API.

The data: class folders ``a`` and ``a-b`` (ViRelAy's own image-directory order would put ``a-b/...``
before ``a/...``), an empty class folder, a broken image (a gap in ``index``), and a flat folder (label -1).
Every image is one flat colour, unique per file, so the image ViRelAy serves can be matched to its file.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from lrpcli.cli import main

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"
FOLDERS = {"a": 4, "a-b": 5, "empty": 0, "z": 3}


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def _colour(name: str) -> tuple[int, int, int]:
    h = sum((i + 1) * ord(c) for i, c in enumerate(name))
    return (h * 37) % 200 + 20, (h * 91) % 200 + 20, (h * 53) % 200 + 20


def _make_data(root: Path, flat: bool = False) -> dict[str, tuple[int, int, int]]:
    colours = {}
    items = [("", f"img{i}.png") for i in range(4)] if flat else [
        (cls, f"img{i}.png") for cls, n in FOLDERS.items() for i in range(n)]
    for folder in ([""] if flat else list(FOLDERS)):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for folder, name in items:
        rel = f"{folder}/{name}" if folder else name
        colours[rel] = _colour(rel)
        Image.new("RGB", (40, 40), colours[rel]).save(root / rel)
    if not flat:
        (root / "a-b" / "0broken.png").write_bytes(b"not an image")  # sorts first in a-b: a gap at index 4
    return colours


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("analysis")
    colours = _make_data(base / "data")
    flat_colours = _make_data(base / "flat", flat=True)
    cfg = yaml.safe_load(DEMO_CONFIG.read_text())
    for key in ("entrypoint", "weights"):  # absolute, so the copy works from anywhere
        cfg["model"][key] = str((DEMO_CONFIG.parent / cfg["model"][key]).resolve())
    cfg["attribution"]["target"] = "prediction"  # a flat folder has no labels to explain
    (base / "prediction.yaml").write_text(yaml.safe_dump(cfg))
    for config, data, out in ((DEMO_CONFIG, "data", "f.h5"), (base / "prediction.yaml", "flat", "flat.h5")):
        code, _, err = run("explain", str(config), str(base / data), "-o", str(base / out),
                           "--num-workers", "0", "-q")
        assert code == 0, err
    code, _, err = run("analyze", str(base / "f.h5"), "-o", str(base / "a.h5"), "--clusters", "2,3", "-q")
    assert code == 0, err
    return base, colours, flat_colours


def _classes(path: Path) -> list[str]:
    """What analyze names the classes of the fixture: the stored ``classes`` attribute where explain writes it,
    else derived from the rows' folders (the empty folder has no row: ``class 2``)."""
    with h5py.File(path, "r") as f:
        stored = "classes" in f.attrs
    return ["a", "a-b", "empty", "z"] if stored else ["a", "a-b", "class 2", "z"]


@pytest.mark.parametrize("stored", [True, False])
def test_class_names_from_the_classes_attribute_else_from_paths(runs, tmp_path, stored):
    base, _, _ = runs
    copy = tmp_path / "c.h5"
    shutil.copy(base / "f.h5", copy)
    with h5py.File(copy, "a") as f:
        if "classes" in f.attrs:
            del f.attrs["classes"]
        if stored:
            f.attrs["classes"] = np.array(["a", "a-b", "empty", "z"], dtype=h5py.string_dtype())
    code, _, err = run("analyze", str(copy), "-o", str(tmp_path / "c_a.h5"), "--class", "a-b", "--clusters", "2",
                       "--no-tsne", "-q")
    assert code == 0, err
    with h5py.File(tmp_path / "c_a.h5", "r") as f:
        expected = ["a", "a-b", "empty" if stored else "class 2", "z"]
        assert json.loads(f.attrs["classes"]) == expected and list(f) == ["00000001"]
        assert f["00000001"].attrs["name"] == "a-b"
    code, _, err = run("analyze", str(copy), "-o", str(tmp_path / "c_b.h5"), "--class", expected[2])
    assert code == 2 and err.count("\n") == 1 and f"has no rows with label 2 ({expected[2]})" in err


def test_analyze_writes_virelay_analysis_layout(runs):
    base, _, _ = runs
    with h5py.File(base / "f.h5", "r") as f:
        index, label = f["index"][:], f["label"][:]
    assert list(index) == [0, 1, 2, 3, *range(5, 13)]  # index 4 was the broken image
    with h5py.File(base / "a.h5", "r") as f:
        assert sorted(f) == ["00000000", "00000001", "00000003"]  # the empty class has no samples
        assert f.attrs["lrpcli_analysis"] == "spray" and int(f.attrs["source_rows"]) == 12
        assert json.loads(f.attrs["classes"]) == _classes(base / "f.h5")
        for key, value in (("00000000", 0), ("00000001", 1), ("00000003", 3)):
            g = f[key]
            assert list(g["index"][:]) == list(index[label == value]) and g["index"].dtype == np.uint32
            assert sorted(g["cluster"]) == ["hdbscan", "kmeans-02", "kmeans-03"]
            assert sorted(g["embedding"]) == ["spectral", "tsne"]
            n = len(g["index"])
            assert g["embedding/spectral"].shape == (n, n) and g["embedding/tsne"].shape == (n, 2)
            ev = g["embedding/spectral"].attrs["eigenvalue"]
            assert ev.shape == (n,) and ev[0] == pytest.approx(0, abs=1e-5) and np.all(np.diff(ev) >= -1e-6)
            assert g["cluster/kmeans-02"].attrs["k"] == 2 and g.attrs["name"] == ["a", "a-b", "", "z"][value]


def test_analyze_bad_input_is_one_line(runs, tmp_path):
    base, _, _ = runs
    code, _, err = run("analyze", str(base / "f.h5"), "-o", str(tmp_path / "x.h5"), "--class", "nope")
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("lrpcli: error: --class nope:") and f"classes: {', '.join(_classes(base / 'f.h5'))}" in err
    code, _, err = run("analyze", str(base / "f.h5"), "-o", str(tmp_path / "x.h5"), "--class", "2")
    assert code == 2 and "no rows with label 2" in err and err.count("\n") == 1
    code, _, err = run("analyze", str(base / "f.h5"), "-o", str(base / "a.h5"))
    assert code == 2 and "already exists; pass --overwrite" in err
    code, _, err = run("analyze", str(base / "f.h5"), "-o", str(tmp_path / "x.h5"), "--clusters", "1-3")
    assert code == 2 and err.startswith("lrpcli: error: --clusters '1-3'")
    code, _, err = run("analyze", str(tmp_path / "missing.h5"), "-o", str(tmp_path / "x.h5"))
    assert code == 2 and "missing.h5: no such file" in err
    assert not (tmp_path / "x.h5").exists()


def test_analyze_incomplete_file_uses_rows_written_with_a_warning(runs, tmp_path):
    base, _, _ = runs
    part = tmp_path / "part.h5"
    shutil.copy(base / "f.h5", part)
    with h5py.File(part, "a") as f:
        f.attrs["rows_written"] = np.int64(6)
        f.attrs["complete"] = np.bool_(False)
    code, out, err = run("analyze", str(part), "-o", str(tmp_path / "p.h5"), "--clusters", "2", "--no-tsne")
    assert code == 0, err
    assert "lrpcli: warning:" in err and "using its first 6 of 13 rows" in err
    with h5py.File(tmp_path / "p.h5", "r") as f:
        assert sorted(f) == ["00000000", "00000001"] and int(f.attrs["source_rows"]) == 6
        assert list(f["00000001/index"][:]) == [5, 6]
        assert sorted(f["00000000/embedding"]) == ["spectral"]
    assert "2 categories, 6 samples" in out


def _serve(project_yaml: Path):
    pytest.importorskip("virelay", reason="ViRelAy is a test extra: pip install -e '.[test]'")
    from virelay.model import Workspace
    from virelay.server import Server

    ws = Workspace()
    ws.add_project(str(project_yaml))
    return ws, Server(ws).app.test_client()


def _image_colour(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=float).reshape(-1, 3).mean(0)


def _assert_is_image_of(data: bytes, name: str, colours: dict[str, tuple[int, int, int]]) -> None:
    """The served (JPEG) image is the flat colour of ``name``: within 8 levels, and nearer than any other."""
    got = _image_colour(data)
    np.testing.assert_allclose(got, colours[name], atol=8)
    assert min(colours, key=lambda k: np.abs(np.subtract(colours[k], got)).sum()) == name


def test_virelay_project_serves_every_sample_at_its_index(runs):
    base, colours, _ = runs
    code, out, err = run("virelay", str(base / "f.h5"), "--analysis", str(base / "a.h5"), "-d", str(base / "proj"))
    assert code == 0, err
    assert "python -m virelay " + str(base / "proj" / "f.yaml") in out
    doc = yaml.safe_load((base / "proj" / "f.yaml").read_text())["project"]
    assert doc["attributions"] == {"attribution_method": "lrp epsilon_gamma_box", "attribution_strategy": "true_label",
                                   "sources": ["f.attribution.h5"]}
    assert doc["analyses"] == [{"analysis_method": "a", "sources": ["../a.h5"]}]
    with h5py.File(base / "f.h5", "r") as f:
        index, label, att = f["index"][:], f["label"][:], f["attribution"][:]
        names = f["filename"].asstr()[:]
    with h5py.File(base / "proj" / "f.attribution.h5", "r") as f:
        # no 'index': ViRelAy scans it row by row per request; row i is dataset index i instead
        assert sorted(f) == ["attribution", "label", "prediction"] and f["attribution"].is_virtual
        assert f["attribution"].shape == (13, 3, 64, 64) and list(f["label"][3:6]) == [0, -1, 1]
    ws, client = _serve(base / "proj" / "f.yaml")
    try:
        for row, i in enumerate(index.tolist()):
            sample = client.get(f"/api/projects/0/dataset/{i}").json
            assert sample["labels"][0]["index"] == label[row]
            assert sample["labels"][0]["name"] == names[row].split("/")[0]
            img = client.get(f"/api/projects/0/dataset/{i}/image")
            assert img.status_code == 200
            _assert_is_image_of(img.data, names[row], colours)
            a = client.get(f"/api/projects/0/attributions/{i}").json
            assert a["index"] == i and a["labels"][0]["index"] == label[row]
            np.testing.assert_array_equal(ws.projects[0].get_attribution(i).data, np.moveaxis(att[row], 0, -1))
            heat = client.get(f"/api/projects/0/attributions/{i}/heatmap?colorMap=black-fire-red&superimpose=true")
            assert heat.status_code == 200 and heat.mimetype.startswith("image/")
        gap = client.get("/api/projects/0/dataset/4").json  # the broken image: a black row, label -1
        assert gap["labels"][0]["index"] == -1
        gap = client.get("/api/projects/0/attributions/4").json  # served, but empty
        assert gap["labels"][0]["index"] == -1 and not ws.projects[0].get_attribution(4).data.any()
        project = client.get("/api/projects/0").json
        (method,) = project["analysisMethods"]
        assert [c["name"] for c in method["categories"]] == ["00000000", "00000001", "00000003"]
        assert [c["humanReadableName"] for c in method["categories"]] == ["a", "a-b", "z"]
        assert method["clusterings"] == ["hdbscan", "kmeans-02", "kmeans-03"]
        assert method["embeddings"] == ["spectral", "tsne"]
        for cat, value in (("00000000", 0), ("00000001", 1), ("00000003", 3)):
            for clustering in method["clusterings"]:
                for embedding in method["embeddings"]:
                    r = client.get(f"/api/projects/0/analyses/a?category={cat}&clustering={clustering}"
                                   f"&embedding={embedding}")
                    assert r.status_code == 200, r.data
                    points = r.json["embedding"]
                    assert [p["attributionIndex"] for p in points] == list(index[label == value])
                    assert ("eigenvalues" in r.json) == (embedding == "spectral")
    finally:
        ws.close()


def test_virelay_flat_folder_serves_label_minus_one(runs):
    base, _, flat_colours = runs
    code, _, err = run("analyze", str(base / "flat.h5"), "-o", str(base / "flat_a.h5"), "--clusters", "2", "-q")
    assert code == 0, err
    code, _, err = run("virelay", str(base / "flat.h5"), "--analysis", str(base / "flat_a.h5"),
                       "-d", str(base / "flatproj"), "-q")
    assert code == 0, err
    strategy = yaml.safe_load((base / "flatproj" / "flat.yaml").read_text())["project"]["attributions"]
    assert strategy["attribution_strategy"] == "predicted_label"
    ws, client = _serve(base / "flatproj" / "flat.yaml")
    try:
        for i, name in enumerate(sorted(flat_colours)):
            a = client.get(f"/api/projects/0/attributions/{i}").json
            assert a["labels"] == [{"index": -1, "name": "(no label)", "wordNetId": "unlabelled"}]
            img = client.get(f"/api/projects/0/dataset/{i}/image").data
            _assert_is_image_of(img, name, flat_colours)
        cats = client.get("/api/projects/0").json["analysisMethods"][0]["categories"]
        assert cats == [{"name": "unlabelled", "humanReadableName": "(no label)"}]
        r = client.get("/api/projects/0/analyses/flat-a?category=unlabelled&clustering=kmeans-02&embedding=tsne")
        assert r.status_code == 200 and [p["attributionIndex"] for p in r.json["embedding"]] == [0, 1, 2, 3]
    finally:
        ws.close()


def test_virelay_refuses_an_analysis_of_another_file(runs, tmp_path):
    base, _, _ = runs
    other = tmp_path / "other.h5"
    code, _, err = run("analyze", str(base / "flat.h5"), "-o", str(other), "--clusters", "2", "--no-tsne", "-q")
    assert code == 0, err
    code, _, err = run("virelay", str(base / "f.h5"), "--analysis", str(other), "-d", str(tmp_path / "p"))
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"lrpcli: error: --analysis {other}: is an analysis of {base / 'flat.h5'}")
    assert not (tmp_path / "p").exists()
    code, _, err = run("virelay", str(base / "f.h5"), "--analysis", str(base / "f.h5"), "-d", str(tmp_path / "q"))
    assert code == 2 and "not written by 'lrpcli analyze'" in err
    code, _, err = run("virelay", str(base / "f.h5"), "--analysis", str(base / "a.h5"), "-d", str(base / "proj"))
    assert code == 2 and "already exists; pass --overwrite" in err


def test_virelay_several_runs_of_the_same_data_give_one_project_each(runs, tmp_path):
    base, colours, _ = runs
    shutil.copy(base / "f.h5", tmp_path / "g.h5")  # stands in for a second composite's run
    code, out, err = run("virelay", str(base / "f.h5"), str(tmp_path / "g.h5"), "--analysis", str(base / "a.h5"),
                         "-d", str(tmp_path / "p"))
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == [
        "dataset.h5", "f.attribution.h5", "f.yaml", "g.attribution.h5", "g.yaml", "label-map.json"]
    pytest.importorskip("virelay")
    from virelay.model import Workspace

    ws = Workspace()
    try:
        for name in ("f", "g"):
            ws.add_project(str(tmp_path / "p" / f"{name}.yaml"))
        assert [p.attributions[0].get_attribution(12).labels[0].name for p in ws.projects] == ["z", "z"]
        assert [sorted(p.analyses) for p in ws.projects] == [["a"], []]  # a.h5 is f.h5's (first match)
    finally:
        ws.close()
    code, _, err = run("virelay", str(base / "f.h5"), str(base / "flat.h5"), "-d", str(tmp_path / "q"))
    assert code == 2 and "index 0 is 'img0.png' but 'a/img0.png'" in err and err.count("\n") == 1


def test_analyze_by_target_groups_by_the_explained_output(runs, tmp_path):
    base, _, _ = runs
    with h5py.File(base / "flat.h5", "r") as f:
        target = f["target"][:]
    code, _, err = run("analyze", str(base / "flat.h5"), "-o", str(tmp_path / "t.h5"), "--by", "target",
                       "--clusters", "2", "--no-tsne", "-q")
    assert code == 0, err
    with h5py.File(tmp_path / "t.h5", "r") as f:
        assert sorted(f) == [f"{t:08d}" for t in sorted(set(target.tolist()))]
        for key in f:
            assert list(f[key]["index"][:]) == list(np.flatnonzero(target == int(key)))
            assert f[key].attrs["name"] == f"output {int(key)}" and f[key].attrs["by"] == "target"


def test_analyze_tsne_fit_is_stored_and_bounded(runs, tmp_path):
    base, _, _ = runs
    code, _, err = run("analyze", str(base / "f.h5"), "-o", str(tmp_path / "t.h5"), "--clusters", "2",
                       "--tsne-fit", "4", "-q")
    assert code == 0, err
    with h5py.File(tmp_path / "t.h5", "r") as f:
        assert json.loads(f.attrs["params"])["tsne_fit"] == 4
        assert all(f[key]["embedding/tsne"].shape == (len(f[key]["index"]), 2) for key in f)
    code, _, err = run("analyze", str(base / "f.h5"), "-o", str(tmp_path / "u.h5"), "--tsne-fit", "3")
    assert code == 2 and "--tsne-fit" in err and "3" in err
