"""``lrpcli explain`` end to end: the demo, the HDF5 layout, resume after SIGKILL, and every bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from lrpcli.cli import main
from lrpcli.store import open_results, pays_to_compress

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"
DEMO_DATA = ROOT / "share" / "demo" / "images"
sys.path.insert(0, str(ROOT / "share" / "demo"))
from masks_share import load_masks, mask_area_share, mask_share  # noqa: E402


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def explain(out: Path, *extra: str, config: Path = DEMO_CONFIG, data: Path = DEMO_DATA) -> tuple[int, str, str]:
    return run("explain", str(config), str(data), "-o", str(out), "--num-workers", "0", "-q", *extra)


@pytest.fixture(scope="module")
def demo_h5(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "demo.h5"
    code, _, err = explain(out)
    assert code == 0, err
    return out


def test_demo_layout_and_dtypes(demo_h5):
    with h5py.File(demo_h5, "r") as f:
        n = 96
        assert f["attribution"].shape == (n, 3, 64, 64) and f["attribution"].dtype == np.float32
        assert f["prediction"].shape == (n, 4) and f["prediction"].dtype == np.float32
        assert f["label"].dtype == np.int64 and f["target"].dtype == np.int64
        assert f["index"].dtype == np.uint32 and list(f["index"][:]) == list(range(n))
        assert f["input"].dtype == np.uint8 and f["input"].shape == (n, 3, 64, 64)
        assert f["filename"].asstr()[0] == "circle/circle_0000.png"
        layers = f["conservation/layer"].asstr()[:]
        assert list(layers[:3]) == ["features.0", "features.1", "features.2"]
        assert f["conservation/rule"].asstr()[0].startswith("ZBox")
        assert f["conservation/relevance_in"].shape == (n, len(layers))
        assert f["conservation/relevance_in"].dtype == np.float64
        assert bool(f.attrs["complete"]) and int(f.attrs["rows_written"]) == n
        assert "composite:" in f.attrs["config"] and f.attrs["lrpcli_version"]
        # labels are the sorted class folders; the shipped model predicts them
        assert np.bincount(f["label"][:]).tolist() == [16, 16, 16, 48]
        assert (f["prediction"][:].argmax(1) == f["label"][:]).mean() > 0.9
        # conservation: the first layer's input relevance equals the stored attribution's sum
        first = f["conservation/relevance_in"][:, 0]
        np.testing.assert_allclose(first, f["attribution"][:].reshape(n, -1).sum(1), rtol=1e-4)
        np.testing.assert_allclose(f["conservation/relevance_out"][:, -1], f["conservation/output_relevance"][:],
                                   rtol=1e-6)


def _share(path: Path) -> tuple[float, float]:
    r = open_results(path)
    masks = load_masks(ROOT / "share" / "demo" / "masks", r.filename)
    return float(np.nanmean(mask_share(r.attribution, masks))), float(mask_area_share(masks).mean())


def test_lrp_relevance_sits_on_the_objects(demo_h5, tmp_path):
    share, area = _share(demo_h5)
    assert share > 1.6 * area, f"LRP puts {share:.0%} of positive relevance in masks covering {area:.0%}"
    cfg = tmp_path / "gradient.yaml"
    cfg.write_text(DEMO_CONFIG.read_text().replace("method: lrp", "method: gradient")
                   .replace("../share", str(ROOT / "share")))
    code, _, err = explain(tmp_path / "grad.h5", config=cfg)
    assert code == 0, err
    gradient_share, _ = _share(tmp_path / "grad.h5")
    assert share > gradient_share, (share, gradient_share)


def test_existing_output_needs_resume_or_overwrite(demo_h5, tmp_path):
    copy = tmp_path / "copy.h5"
    copy.write_bytes(demo_h5.read_bytes())
    code, _, err = explain(copy)
    assert code == 2 and "--resume" in err and "--overwrite" in err
    code, out, err = explain(copy, "--resume")
    assert code == 0, err
    code, _, err = explain(copy, "--overwrite", "--max-samples", "4")
    assert code == 0 and open_results(copy).attribution.shape[0] == 4


def test_resume_with_other_config_names_the_key(demo_h5, tmp_path):
    partial = tmp_path / "p.h5"
    assert explain(partial, "--max-samples", "8")[0] == 0
    cfg = tmp_path / "other.yaml"
    text = DEMO_CONFIG.read_text().replace("gamma: 0.25", "gamma: 0.5")
    cfg.write_text(text.replace("../share", str(ROOT / "share")))
    code, _, err = explain(partial, "--resume", config=cfg)
    assert code == 2 and "composite.gamma" in err


def test_sigkill_then_resume_equals_uninterrupted_run(demo_h5, tmp_path):
    out = tmp_path / "killed.h5"
    cmd = [sys.executable, "-m", "lrpcli.cli", "explain", str(DEMO_CONFIG), str(DEMO_DATA), "-o", str(out),
           "--batch-size", "4", "--num-workers", "0", "-q"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    rows = 0
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
        if out.exists():
            try:
                with h5py.File(out, "r", locking=False) as f:
                    rows = int(f.attrs["rows_written"])
            except OSError:
                continue
            if rows >= 12:
                break
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    _, stderr = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, stderr.decode(errors="replace")[-2000:]
    with h5py.File(out, "r", locking=False) as f:
        kept = int(f.attrs["rows_written"])
        assert not bool(f.attrs["complete"]) or kept == 96
    assert kept >= 12
    code, _, err = explain(out, "--resume", "--batch-size", "4")
    assert code == 0, err
    a, b = open_results(out), open_results(demo_h5)
    assert a.filename == b.filename and np.array_equal(a.index, b.index) and np.array_equal(a.label, b.label)
    np.testing.assert_allclose(a.attribution, b.attribution, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(a.prediction, b.prediction, rtol=1e-5, atol=1e-6)
    assert np.array_equal(a.input, b.input)


def _tree(tmp_path: Path, bad: bool = False) -> Path:
    data = tmp_path / "data"
    for cls in ("a", "b"):
        (data / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((70, 70, 3), 40 * i + 60 * (cls == "b"), np.uint8)).save(data / cls / f"{i}.png")
    (data / "empty_class").mkdir()
    if bad:
        (data / "a" / "broken.png").write_bytes(b"not a png at all")
    return data


def test_undecodable_image_is_skipped_and_recorded(tmp_path):
    data = _tree(tmp_path, bad=True)
    out = tmp_path / "o.h5"
    code, _, err = explain(out, data=data)
    assert code == 0, err
    r = open_results(out)
    assert r.attribution.shape[0] == 4 and [s[0] for s in r.skipped] == ["a/broken.png"]
    assert sorted(set(r.label.tolist())) == [0, 1]


def test_warnings_are_one_line_on_the_command_line_and_python_style_with_debug(tmp_path):
    import warnings

    data = _tree(tmp_path, bad=True)
    before = warnings.showwarning
    code, _, err = explain(tmp_path / "o.h5", data=data)
    assert code == 0 and warnings.showwarning is before  # restored for the caller
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("lrpcli: warning: skipped a/broken.png: UnidentifiedImageError: ")
    with pytest.warns(UserWarning, match="lrpcli: skipped a/broken.png"):  # --debug: Python's own handling
        code, _, err = run("--debug", "explain", str(DEMO_CONFIG), str(data), "-o", str(tmp_path / "d.h5"), "-q")
    assert code == 0 and "lrpcli: warning" not in err


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text.replace("../share", str(ROOT / "share")))
    return path


BASE = DEMO_CONFIG.read_text()
BAD_INPUTS = {
    "missing config": (None, "does-not-exist.yaml"),
    "yaml syntax": (BASE.replace("  resize: 64", "  resize: [64"), "line"),
    "unknown key": (BASE.replace("  gamma: 0.25", "  gama: 0.25"), "did you mean"),
    "wrong type": (BASE.replace("  gamma: 0.25", "  gamma: high"), "composite.gamma"),
    "unknown composite": (BASE.replace("name: epsilon_gamma_box", "name: epsilon_gama"), "epsilon_plus"),
    "unknown canonizer": (BASE.replace("canonizers: [vgg]", "canonizers: [vg]"), "resnet"),
    "unknown rule": (BASE.replace("  gamma: 0.25", "  gamma: 0.25\n  rules:\n    - {match: 'x', rule: gama}"),
                     "gamma"),
    "unknown model": (BASE.replace('  entrypoint: "../share/demo/model.py:build"', "  name: resnet5O")
                      .replace("  weights: ../share/demo/model.pt\n", ""), "resnet50"),
    "weights missing": (BASE.replace("model.pt", "nope.pt"), "nope.pt"),
    "weights mismatched": (BASE.replace("kwargs", "x").replace("  weights:", "  kwargs: {num_classes: 3}\n  weights:"),
                           "classifier"),
    "cuda absent": (BASE.replace("device: auto", "device: cuda"), "cuda"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_config_inputs_give_one_line_and_exit_2(case, tmp_path):
    text, needle = BAD_INPUTS[case]
    if case == "cuda absent":
        import torch

        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
    config = tmp_path / needle if text is None else _config(tmp_path, text)
    out = tmp_path / "o.h5"
    code, stdout, err = explain(out, config=config)
    assert code == 2, (case, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lrpcli: error:") and needle in lines[0], lines
    assert "Traceback" not in stdout + err
    assert not out.exists() and not list(tmp_path.glob("*.partial"))


def test_num_workers_auto_and_processes_give_the_same_file(demo_h5, tmp_path):
    """auto (no worker process on the CPU: a reader thread) and 2 worker processes write what --num-workers 0
    wrote; a bad --num-workers is a one-line usage error."""
    with h5py.File(demo_h5, "r") as f:
        expected = {k: f[k][:] for k in ("attribution", "prediction", "index", "conservation/relevance_in")}
    for workers in ("auto", "2"):
        out = tmp_path / f"w{workers}.h5"
        code, _, err = run("explain", str(DEMO_CONFIG), str(DEMO_DATA), "-o", str(out), "--num-workers", workers,
                           "-q")
        assert code == 0, err
        with h5py.File(out, "r") as f:
            assert f.attrs["rows_written"] == 96
            for key, value in expected.items():
                np.testing.assert_array_equal(f[key][:], value, err_msg=f"{workers}: {key}")
    code, _, err = run("explain", str(DEMO_CONFIG), str(DEMO_DATA), "-o", str(tmp_path / "x.h5"),
                       "--num-workers", "lots", "-q")
    assert code == 2 and "--num-workers" in err and "expected auto or an integer >= 0, got 'lots'" in err
    assert not (tmp_path / "x.h5").exists()


def test_compression_choice_changes_no_value(demo_h5, tmp_path):
    """output.compression lzf and none store the same arrays as the default auto, which compresses a dataset
    only where its first rows shrink by 10 % (the demo's dense float maps do not)."""
    keys = ("attribution", "prediction", "input", "conservation/relevance_in")
    with h5py.File(demo_h5, "r") as f:
        expected = {k: f[k][:] for k in keys}
        assert f["attribution"].compression == ("lzf" if pays_to_compress(expected["attribution"]) else None)
        assert f["input"].compression == ("lzf" if pays_to_compress(expected["input"]) else None)
    for mode in ("lzf", "none"):
        out = tmp_path / f"{mode}.h5"
        config = _config(tmp_path, BASE.replace("  store_input: true", f"  store_input: true\n  compression: {mode}"))
        code, _, err = explain(out, config=config)
        assert code == 0, err
        with h5py.File(out, "r") as f:
            assert {f[k].compression for k in ("attribution", "prediction", "input")} == {
                "lzf" if mode == "lzf" else None}
            for key, value in expected.items():
                np.testing.assert_array_equal(f[key][:], value, err_msg=f"{mode}: {key}")


def test_bad_data_and_output(tmp_path):
    out = tmp_path / "o.h5"
    code, _, err = explain(out, data=tmp_path / "nope")
    assert code == 2 and "nope" in err
    (tmp_path / "empty").mkdir()
    code, _, err = explain(out, data=tmp_path / "empty")
    assert code == 2 and "no images" in err
    code, _, err = explain(tmp_path / "new_dir" / "o.h5", "--max-samples", "2")   # created on the way
    assert code == 0 and (tmp_path / "new_dir" / "o.h5").exists(), err
    (tmp_path / "a_file").write_text("x")
    code, _, err = explain(tmp_path / "a_file" / "o.h5")
    assert code == 2 and "a_file" in err
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        code, _, err = explain(locked / "o.h5")
        assert code == 2 and "locked" in err
    finally:
        locked.chmod(0o700)
    assert not out.exists()


def test_layer_maps_are_stored_and_rendered(tmp_path):
    cfg = tmp_path / "layers.yaml"
    text = DEMO_CONFIG.read_text().replace("../share", str(ROOT / "share"))
    cfg.write_text(text.replace("  store_input: true", "  store_input: true\n  layers: [features.18, 'classifier.*']"))
    out = tmp_path / "layers.h5"
    code, _, err = explain(out, "--max-samples", "6", "--batch-size", "4", config=cfg)
    assert code == 0, err
    r = open_results(out)
    assert set(r.layers) == {"features.18", "classifier.0", "classifier.1", "classifier.2"}
    assert r.layers["features.18"].shape == (6, 64, 8, 8) and r.layers["classifier.2"].shape == (6, 4)
    # the map at the classifier's output is the relevance put in: the target logit
    np.testing.assert_allclose(r.layers["classifier.2"].sum(1), r.conservation["output_relevance"], rtol=1e-6)
    code, _, err = run("render", str(out), "--layer", "features.18", "-d", str(tmp_path / "maps"), "-q")
    assert code == 0, err
    images = sorted((tmp_path / "maps").glob("*.png"))
    assert len(images) == 6 and Image.open(images[0]).size == (64, 64)


def test_model_that_fails_to_load_leaves_no_reader_thread(tmp_path, monkeypatch):
    """The reader thread starts only once the model is built (a seeded init must be the only draw from torch's
    generator meanwhile): a model that cannot load leaves no thread and no file."""
    import threading

    import lrpcli.runner.local
    from lrpcli.errors import LrpcliError
    from lrpcli.explainer.build import load_config
    from lrpcli.runner.local import run as run_explain

    monkeypatch.setattr(lrpcli.runner.local, "background_threads_help", lambda device: True)

    config = load_config(_config(tmp_path, BASE.replace("model.pt", "missing.pt")),
                         {"output.path": str(tmp_path / "o.h5")})
    with pytest.raises(LrpcliError, match="missing.pt"):
        run_explain(config, DEMO_DATA)
    time.sleep(0.05)
    assert not [t for t in threading.enumerate() if t.name == "lrpcli-reader" and t.is_alive()]
    assert not (tmp_path / "o.h5").exists()


def test_threads_only_where_a_core_is_free_and_same_file_either_way(demo_h5, tmp_path, monkeypatch):
    """Decoding and writing go to background threads only with a GPU or a CPU core that torch's threads leave
    free; the file is the same whichever way it was written."""
    import threading

    import torch

    import lrpcli.runner.local
    from lrpcli.explainer.build import load_config

    monkeypatch.setattr(lrpcli.runner.local, "available_cpus", lambda: 4)
    monkeypatch.setattr(lrpcli.runner.local.torch, "get_num_threads", lambda: 4)
    assert not lrpcli.runner.local.background_threads_help(torch.device("cpu"))
    assert lrpcli.runner.local.background_threads_help(torch.device("cuda"))
    monkeypatch.setattr(lrpcli.runner.local.torch, "get_num_threads", lambda: 3)
    assert lrpcli.runner.local.background_threads_help(torch.device("cpu"))
    monkeypatch.undo()

    keys = ("attribution", "prediction", "input", "index", "conservation/relevance_in", "conservation/relevance_out")
    with h5py.File(demo_h5, "r") as f:
        expected = {k: f[k][:] for k in keys}
    seen = {}
    original = threading.Thread.start

    def start(thread):
        seen.setdefault(helps, set()).add(thread.name)
        return original(thread)

    monkeypatch.setattr(threading.Thread, "start", start)
    for helps in (True, False):
        monkeypatch.setattr(lrpcli.runner.local, "background_threads_help", lambda device, helps=helps: helps)
        out = tmp_path / f"{helps}.h5"
        lrpcli.runner.local.run(load_config(DEMO_CONFIG, {"output.path": str(out)}), DEMO_DATA)
        with h5py.File(out, "r") as f:
            for key, value in expected.items():
                np.testing.assert_array_equal(f[key][:], value, err_msg=f"threads {helps}: {key}")
    assert {"lrpcli-reader", "lrpcli-writer"} <= seen[True]
    assert not {"lrpcli-reader", "lrpcli-writer"} & seen.get(False, set())
