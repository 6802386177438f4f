"""The file knows its run: class names, the config's folder and absolute model paths, and the reader API
(``open_results(path).load_model()`` and ``.inputs()``) that rebuilds what the run explained from the file alone."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image

import lrpcli
from lrpcli.cli import main
from lrpcli.commands.render.pipeline import class_names
from lrpcli.commands.render.reader import Source
from lrpcli.errors import DataError
from lrpcli.explainer.build import load_config
from lrpcli.explainer.data import ImageDataset
from lrpcli.explainer.models import model_fingerprint

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"
DEMO_DATA = ROOT / "share" / "demo" / "images"
DEMO_MODEL = ROOT / "share" / "demo" / "model.py"
DEMO_WEIGHTS = ROOT / "share" / "demo" / "model.pt"
N = 12


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout + result.stderr


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory) -> Path:
    """The demo config named by a relative path (``../../...``) from a folder that is neither the repository
    nor the config's, so the relative ``../share/demo/model.py:build`` resolves only against the config's folder."""
    where = tmp_path_factory.mktemp("elsewhere")
    before = Path.cwd()
    os.chdir(where)
    try:
        config = os.path.relpath(DEMO_CONFIG, where)
        assert config.startswith("..")
        code, text = cli("explain", config, os.path.relpath(DEMO_DATA, where), "-o", "out.h5", "--max-samples",
                         str(N), "--num-workers", "0", "--batch-size", "4", "-q")
    finally:
        os.chdir(before)
    assert code == 0, text
    return where / "out.h5"


def test_the_file_stores_classes_config_dir_and_absolute_model_paths(demo_out):
    with lrpcli.open_results(demo_out) as r:
        assert r.classes == ["circle", "cross", "square", "triangle"]
        assert r.config_dir == str(DEMO_CONFIG.parent)
        assert r.config["model"]["entrypoint"] == f"{DEMO_MODEL}:build"
        assert r.config["model"]["weights"] == str(DEMO_WEIGHTS)
    with h5py.File(demo_out, "r") as f:  # a variable-length utf-8 string array, as h5py and ViRelAy read lists
        assert h5py.check_string_dtype(f.attrs.get_id("classes").dtype).encoding == "utf-8"
        assert f.attrs["classes"].tolist() == ["circle", "cross", "square", "triangle"]
        assert h5py.check_string_dtype(f.attrs.get_id("config_dir").dtype) is not None
    with Source(demo_out) as src:  # render's reader labels grids with what the run wrote
        assert class_names(src) == ["circle", "cross", "square", "triangle"]


def test_stored_config_loads_as_a_config_from_anywhere(demo_out, tmp_path, monkeypatch):
    with lrpcli.open_results(demo_out) as r:
        text = str(r.attrs["config"])
    copy = tmp_path / "deep" / "stored.yaml"
    copy.parent.mkdir()
    copy.write_text(text)
    monkeypatch.chdir(tmp_path)
    config = load_config(copy)
    assert config.model.entrypoint == f"{DEMO_MODEL}:build"
    assert config.to_dict() == yaml.safe_load(text)


def test_inputs_into_load_model_reproduce_the_stored_prediction(demo_out, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # yet another folder: the file alone rebuilds the model
    with lrpcli.open_results(demo_out) as r:
        model = r.load_model()
        x = r.inputs(normalised=True)
        raw = r.inputs(normalised=False)
        first = r.inputs(rows=slice(0, 2))
        prediction, stored, filenames = r.prediction, r.input, r.filename
        fingerprint = r.attrs["model_fingerprint"]
    assert not model.training and model_fingerprint(model) == fingerprint
    assert x.dtype == torch.float32 and x.shape == (N, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
    np.testing.assert_allclose(out.numpy(), prediction, rtol=0, atol=1e-5)
    assert torch.equal(raw, torch.from_numpy(stored).float() / 255.0) and 0 <= raw.min() and raw.max() <= 1
    assert torch.equal(x, (raw - 0.5) / 0.25)
    assert torch.equal(first, x[:2])
    dataset = ImageDataset(DEMO_DATA, resize=64, crop=64, mean=[0.5] * 3, std=[0.25] * 3)
    for row in (0, N - 1):  # the tensors the run explained, bit for bit
        sample = dataset[dataset.files.index(filenames[row])]
        assert torch.equal(x[row], sample.input)


def test_load_model_refuses_a_model_that_did_not_write_the_file(demo_out, tmp_path):
    copy = tmp_path / "copy.h5"
    shutil.copy(demo_out, copy)
    with h5py.File(copy, "r+") as f:
        f.attrs["model_fingerprint"] = "sha256:" + "0" * 64
    with lrpcli.open_results(copy) as r, pytest.raises(DataError) as err:
        r.load_model()
    assert str(err.value).startswith(f"{copy}: the model built from its stored config is not the one that wrote it")
    assert "\n" not in str(err.value)


def test_inputs_of_a_file_without_inputs_is_one_clear_error(demo_out, tmp_path):
    copy = tmp_path / "no_input.h5"
    with h5py.File(demo_out, "r") as src, h5py.File(copy, "w") as dst:
        for key, value in src.attrs.items():
            dst.attrs[key] = value
        for name in src:
            if name != "input":
                src.copy(name, dst)
    with lrpcli.open_results(copy) as r, pytest.raises(DataError) as err:
        r.inputs()
    assert str(err.value) == (f"{copy} has no 'input' dataset (the run had output.store_input: false), so the "
                              "inputs cannot be restored; rerun with output.store_input: true")


def test_resume_from_another_folder_works_and_a_moved_model_file_is_a_change(demo_out, tmp_path, monkeypatch):
    partial = tmp_path / "p.h5"
    code, text = cli("explain", str(DEMO_CONFIG), str(DEMO_DATA), "-o", str(partial), "--max-samples", "8",
                     "--num-workers", "0", "-q")
    assert code == 0, text
    with h5py.File(partial, "r+") as f:  # as if killed after 4 rows
        f.attrs.modify("rows_written", np.int64(4))
        f.attrs.modify("complete", np.bool_(False))
    monkeypatch.chdir(DEMO_CONFIG.parent)  # the config named relative to another folder
    code, text = cli("explain", "demo.yaml", str(DEMO_DATA), "-o", str(partial), "--max-samples", "8",
                     "--num-workers", "0", "-q", "--resume")
    assert code == 0, text
    with lrpcli.open_results(partial) as r:
        assert r.complete and len(r) == 8
    # a copy of model.py elsewhere is another model file: refused, naming both paths
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(DEMO_MODEL, other / "model.py")
    (other / "demo.yaml").write_text(DEMO_CONFIG.read_text().replace("../share/demo/model.py", "model.py")
                                     .replace("../share/demo/model.pt", str(DEMO_WEIGHTS)))
    code, text = cli("explain", str(other / "demo.yaml"), str(DEMO_DATA), "-o", str(partial), "--max-samples", "8",
                     "--num-workers", "0", "-q", "--resume")
    lines = [line for line in text.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, text
    assert 'model.entrypoint: "/' in lines[0] and '/share/demo/model.py:build" in the file, "/' in lines[0], text
    assert '/other/model.py:build" now' in lines[0], text  # a long path is shortened in its middle


def _images(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.fromarray(np.full((64, 64, 3), 30 * i + 20, np.uint8)).save(folder / name)


def test_empty_class_folders_keep_their_index_and_a_flat_folder_has_none(tmp_path):
    data = tmp_path / "classes"
    _images(data / "b", ["0.png", "1.png"])
    _images(data / "c", ["0.png"])
    (data / "a_empty").mkdir()
    out = tmp_path / "classes.h5"
    code, text = cli("explain", str(DEMO_CONFIG), str(data), "-o", str(out), "--num-workers", "0", "-q")
    assert code == 0, text
    with lrpcli.open_results(out) as r:
        assert r.classes == ["a_empty", "b", "c"]
        assert r.label.tolist() == [1, 1, 2]
        assert [r.classes[i] for i in r.label] == [name.split("/")[0] for name in r.filename]

    flat = tmp_path / "flat"
    _images(flat, ["x.png", "y.png"])
    config = tmp_path / "flat.yaml"
    config.write_text(DEMO_CONFIG.read_text().replace("../share", str(ROOT / "share"))
                      .replace("target: label", "target: prediction"))
    out = tmp_path / "flat.h5"
    code, text = cli("explain", str(config), str(flat), "-o", str(out), "--num-workers", "0", "-q")
    assert code == 0, text
    with lrpcli.open_results(out) as r:
        assert r.classes == [] and r.label.tolist() == [-1, -1]
    with h5py.File(out, "r") as f:
        assert "classes" in f.attrs and f.attrs["classes"].shape == (0,)


def test_a_class_folder_added_before_resuming_is_refused(tmp_path):
    data = tmp_path / "data"
    _images(data / "b", ["0.png", "1.png"])
    _images(data / "c", ["0.png"])
    out = tmp_path / "out.h5"
    code, text = cli("explain", str(DEMO_CONFIG), str(data), "-o", str(out), "--num-workers", "0", "-q")
    assert code == 0, text
    (data / "a").mkdir()  # renumbers b and c
    code, text = cli("explain", str(DEMO_CONFIG), str(data), "-o", str(out), "--num-workers", "0", "-q", "--resume")
    assert code == 2, text
    assert (f"cannot resume {out}: it was written for the classes ['b', 'c'], but {data} now has ['a', 'b', 'c']"
            in text), text
