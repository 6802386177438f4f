"""The HDF5 result store: layout, round trip, refusals, and crash safety under SIGKILL.

The crash test runs tests/_kill_writer.py in a subprocess and kills it at random moments (also while it
creates the file); set LRPCLI_KILL_STRESS=N to kill it N times instead of the default handful.
"""

from __future__ import annotations

import ast
import errno
import importlib.util
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from lrpcli import store
from lrpcli.errors import DataError
from lrpcli.store import ResultWriter, choose_compression, config_differences, open_results, pays_to_compress

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("_kill_writer", ROOT / "tests" / "_kill_writer.py")
W = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(W)

ROW_FIELDS = ("attribution", "prediction", "label", "target", "index", "input")
CONS_FIELDS = {
    "relevance_in": "conservation/relevance_in",
    "relevance_out": "conservation/relevance_out",
    "output_relevance": "conservation/output_relevance",
}


def make_writer(path, **kw):
    args = dict(
        config=W.CONFIG,
        config_yaml=W.CONFIG_YAML,
        n_rows=12,
        num_outputs=W.K,
        sample_shape=W.SHAPE,
        layers=W.LAYERS,
        rules=W.RULES,
        extra_layers=W.EXTRA,
        torch_version="2.5.1",
    )
    args.update(kw)
    return ResultWriter.create(path, **args)


def batch(samples, dtype=np.float32):
    rows = W.rows_for(samples)
    rows["attribution"] = rows["attribution"].astype(dtype)
    return rows


# ---------------------------------------------------------------------------------------------- layout
def test_round_trip_all_fields_float16_and_unicode(tmp_path):
    path = tmp_path / "out.h5"
    with make_writer(path, dtype="float16", n_rows=7) as w:
        w.add_skipped("kaputt/ä.jpg", "cannot identify image file\n(truncated)")
        w.append(**batch([0, 1, 2], np.float16))
        assert (w.rows_written, w.n_skipped) == (3, 1)
        first = batch([4, 5], np.float16)
        first["filename"] = ["日本語/猫.png", "ordner mit leerzeichen/é.png"]
        w.append(**first)
        w.add_skipped("b.png", "zero-size image")
        w.close(complete=True)
        assert w.complete
    expected = batch([0, 1, 2, 4, 5], np.float16)
    expected["filename"][3:] = ["日本語/猫.png", "ordner mit leerzeichen/é.png"]

    with open_results(path) as r:
        assert r.rows_written == len(r) == 5 and r.complete
        for name in ROW_FIELDS:
            got = getattr(r, name)
            np.testing.assert_array_equal(got, expected[name])
            # float16 is stored small and read back as float32 (tests/test_store_damage.py)
            assert got.dtype == (np.float32 if name == "attribution" else expected[name].dtype), name
        assert r.filename == expected["filename"]
        assert r.conservation["layer"] == W.LAYERS and r.conservation["rule"] == W.RULES
        for key in CONS_FIELDS:
            np.testing.assert_array_equal(r.conservation[key], expected[key])
        np.testing.assert_array_equal(
            r.layers["features.0"], expected["layers"]["features.0"].astype(np.float16).astype(np.float32)
        )
        assert r.skipped == [
            ("kaputt/ä.jpg", "cannot identify image file (truncated)"),
            ("b.png", "zero-size image"),
        ]
        assert r.config == W.CONFIG
        assert r.attrs["lrpcli_version"] and r.attrs["torch_version"] == "2.5.1" and "T" in r.attrs["created"]
        np.testing.assert_array_equal(r.read("attribution", [4, 0]), expected["attribution"][[4, 0]])
        assert list(r.read("filename", slice(3, None))) == expected["filename"][3:]

    # the raw layout, as ViRelAy and h5py see it: exactly the complete rows, the documented dtypes
    with h5py.File(path, "r") as f:
        assert f.attrs["complete"] and f.attrs["rows_written"] == 5
        for name in ("config", "lrpcli_version", "torch_version", "created"):
            assert isinstance(f.attrs[name], str)
        dtypes = {
            "attribution": np.float16,
            "prediction": np.float32,
            "label": np.int64,
            "target": np.int64,
            "index": np.uint32,
            "input": np.uint8,
            "conservation/relevance_in": np.float64,
            "conservation/relevance_out": np.float64,
            "conservation/output_relevance": np.float64,
        }
        for name, dt in dtypes.items():
            assert f[name].dtype == dt and f[name].shape[0] == 5, name
        assert f["attribution"].shape == (5,) + W.SHAPE and f["prediction"].shape == (5, W.K)
        assert f["attribution"].chunks == (1,) + W.SHAPE and f["attribution"].compression == "lzf"
        assert f["input"].chunks == (1,) + W.SHAPE and f["input"].compression == "lzf"
        assert f["layers/features.0"].chunks == (1, 2, 8, 8)
        for name in ("filename", "conservation/layer", "conservation/rule", "skipped/filename"):
            assert h5py.check_string_dtype(f[name].dtype).encoding == "utf-8"
        assert f["filename"].asstr()[3] == "日本語/猫.png"
        assert f["conservation/relevance_in"].shape == (5, 3) and f["skipped/reason"].shape == (2,)
        assert f.id.get_create_plist().get_version()[0] == 0  # 1.8-era superblock: no 'open for write' flag


def test_without_input_and_extra_layers(tmp_path):
    path = tmp_path / "o.h5"
    with make_writer(path, store_input=False, extra_layers=None, layers=[], rules=[], n_rows=2) as w:
        rows = batch([7, 8])
        rows.pop("input")
        rows.pop("layers")
        rows["relevance_in"] = rows["relevance_out"] = np.zeros((2, 0))
        w.append(**rows)
        w.close(True)
    with open_results(path) as r:
        assert r.input is None and r.layers == {} and r.conservation["relevance_in"].shape == (2, 0)
        np.testing.assert_array_equal(r.index, [7, 8])
    with h5py.File(path, "r") as f:
        assert "input" not in f


def test_classes_and_config_dir_are_root_attributes(tmp_path):
    names = ["chat noir é", "a/b", "日本語", "empty"]
    with make_writer(tmp_path / "c.h5", classes=names, config_dir=str(tmp_path)) as w:
        w.close(True)
    with make_writer(tmp_path / "flat.h5", classes=[]) as w:
        w.close(True)
    with make_writer(tmp_path / "none.h5") as w:
        w.close(True)
    with h5py.File(tmp_path / "c.h5", "r") as f:
        info = h5py.check_string_dtype(f.attrs.get_id("classes").dtype)
        assert (info.encoding, info.length) == ("utf-8", None)  # variable length
        assert f.attrs["classes"].tolist() == names
        assert f.attrs["config_dir"] == str(tmp_path)
    with open_results(tmp_path / "c.h5") as r:
        assert r.classes == names and r.config_dir == str(tmp_path)
    with open_results(tmp_path / "flat.h5") as r:  # a flat folder: known to have no classes
        assert r.classes == [] and r.config_dir is None
    with open_results(tmp_path / "none.h5") as r:  # not given: unknown
        assert r.classes is None and "classes" not in r.attrs
    assert store.read_classes({"classes": np.array([b"x", "y"], dtype=object)}) == ["x", "y"]


def test_file_config_makes_model_paths_absolute(tmp_path, monkeypatch):
    from lrpcli.spec.config import validate

    (tmp_path / "cfg").mkdir()
    (tmp_path / "share").mkdir()
    (tmp_path / "share" / "net.py").write_text("")
    (tmp_path / "share" / "w.pt").write_text("")
    (tmp_path / "cwd").mkdir()
    (tmp_path / "cwd" / "local.pt").write_text("")
    monkeypatch.chdir(tmp_path / "cwd")
    raw = {"model": {"entrypoint": "../share/net.py:build", "weights": "../share/w.pt"}}
    config = validate(raw, base_dir=tmp_path / "cfg")
    stored = store.file_config(config)
    assert stored["model"]["entrypoint"] == f"{tmp_path / 'share' / 'net.py'}:build"
    assert stored["model"]["weights"] == str(tmp_path / "share" / "w.pt")
    assert {k: v for k, v in stored.items() if k != "model"} == {k: v for k, v in config.to_dict().items()
                                                                   if k != "model"}
    # found in the current folder (the loader's second place); a module, a weights name and a missing file stay
    local = store.file_config(validate({"model": {"entrypoint": "pkg.mod:build", "weights": "local.pt"}},
                                       base_dir=tmp_path / "cfg"))
    assert local["model"]["entrypoint"] == "pkg.mod:build"
    assert local["model"]["weights"] == str(tmp_path / "cwd" / "local.pt")
    named = store.file_config(validate({"model": {"name": "resnet18", "weights": "IMAGENET1K_V1"}}))
    assert named["model"]["weights"] == "IMAGENET1K_V1"
    missing = store.file_config(validate({"model": {"entrypoint": "gone/net.py:build"}}, base_dir=tmp_path))
    assert missing["model"]["entrypoint"] == "gone/net.py:build"
    assert yaml.safe_load(store.config_yaml(stored)) == stored


def test_compression_pays_only_where_rows_shrink():
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((4, 3, 16, 16)).astype(np.float32)
    sparse = np.where(rng.random((4, 3, 16, 16)) < 0.05, noise, 0).astype(np.float32)
    pixels = rng.integers(0, 256, (4, 3, 16, 16), dtype=np.uint8)
    flat = np.full((4, 3, 16, 16), 7, dtype=np.uint8)
    assert not pays_to_compress(noise) and not pays_to_compress(pixels)
    assert pays_to_compress(sparse) and pays_to_compress(flat)
    first = {"attribution": noise, "input": flat, "layers/a": sparse}
    assert choose_compression("auto", first) == {"attribution": False, "input": True, "layers/a": True}
    assert choose_compression("lzf", first) == dict.fromkeys(first, True)
    assert choose_compression("none", first) == dict.fromkeys(first, False)
    with pytest.raises(ValueError, match="auto, lzf, none"):
        choose_compression("zstd", first)


def test_uncompressed_datasets_keep_one_row_chunks_and_read_back_the_same(tmp_path):
    paths = {}
    for packed in (True, False):
        paths[packed] = path = tmp_path / f"{packed}.h5"
        flags = {"attribution": packed, "input": packed, "prediction": packed, "layers/features.0": packed}
        with make_writer(path, n_rows=3, compressed=flags) as w:
            w.append(**batch([4, 5, 6]))
            w.close(True)
        with h5py.File(path, "r") as f:
            for name in flags:
                dset = f[name]
                assert dset.chunks[0] == 1 and dset.chunks[1:] == dset.shape[1:]
                assert dset.compression == ("lzf" if packed else None)
                assert dset.shuffle == (packed and dset.dtype.itemsize > 1)
    with open_results(paths[True]) as a, open_results(paths[False]) as b:
        for field in ROW_FIELDS:
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
        np.testing.assert_array_equal(a.layers["features.0"], b.layers["features.0"])


def test_append_checks_shapes_and_capacity(tmp_path):
    with make_writer(tmp_path / "o.h5", n_rows=4) as w:
        bad = batch([0, 1])
        bad["attribution"] = bad["attribution"][:, :2]
        with pytest.raises(ValueError, match="attribution"):
            w.append(**bad)
        no_input = batch([0, 1])
        no_input["input"] = None
        with pytest.raises(ValueError, match="input"):
            w.append(**no_input)
        w.append(**batch([0, 1, 2]))
        with pytest.raises(ValueError, match="4 rows"):
            w.append(**batch([3, 4]))
        assert w.rows_written == 3


def test_skips_pending_at_a_failed_close_are_dropped(tmp_path):
    path = tmp_path / "o.h5"
    with make_writer(path, n_rows=4) as w:
        w.add_skipped("before.png", "broken")
        w.append(**batch([1]))
        w.add_skipped("between.png", "broken")  # its batch never comes: the run fails here
    with ResultWriter.resume(path, config=W.CONFIG) as w:
        assert w.skipped == [("before.png", "broken")] and w.rows_written == 1
        w.add_skipped("between.png", "broken")
        w.append(**batch([3]))
        w.add_skipped("last.png", "broken")
        w.close(True)
    with open_results(path) as r:
        assert [s[0] for s in r.skipped] == ["before.png", "between.png", "last.png"]
        assert r.index.tolist() == [1, 3]


def test_more_skipped_than_rows_grows(tmp_path):
    path = tmp_path / "o.h5"
    with make_writer(path, n_rows=2) as w:
        for i in range(1500):
            w.add_skipped(f"x{i}.png", "broken")
        w.append(**batch([0]))
        w.close(True)
    with open_results(path) as r:
        assert len(r.skipped) == 1500 and r.skipped[-1] == ("x1499.png", "broken") and r.rows_written == 1


# ---------------------------------------------------------------------------------------------- refusals
def test_existing_output_needs_resume_or_overwrite(tmp_path):
    path = tmp_path / "out.h5"
    with make_writer(path) as w:
        w.append(**batch([0]))
        w.close(True)
    with pytest.raises(DataError, match=r"out\.h5 exists; pass --resume.*--overwrite"):
        make_writer(path)
    with open_results(path) as r:  # untouched
        assert r.rows_written == 1
    with make_writer(path, overwrite=True, n_rows=3) as w:
        assert w.rows_written == 0
    with open_results(path) as r:
        assert r.rows_written == 0 and r.attrs["n_rows"] == 3 and not r.complete


def test_resume_refuses_other_config_and_ignores_run_keys(tmp_path):
    path = tmp_path / "out.h5"
    with make_writer(path) as w:
        w.append(**batch([0, 1]))
    other = {
        **W.CONFIG,
        "composite": {"name": "epsilon_gamma_box", "gamma": 0.5},
        "model": {"name": "tiny"},
        "attribution": {"method": "lrp"},
    }
    with pytest.raises(DataError) as err:
        ResultWriter.resume(path, config=other)
    msg = str(err.value)
    assert "composite.gamma: 0.25 in the file, 0.5 now" in msg
    assert 'attribution.method: absent in the file, "lrp" now' in msg
    assert str(path) in msg and "\n" not in msg and "model" not in msg
    harmless = {
        **W.CONFIG,
        "run": {**W.CONFIG["run"], "batch_size": 64, "num_workers": 8, "device": "cuda:1"},
        "output": {**W.CONFIG["output"], "path": "elsewhere.h5"},
    }
    with ResultWriter.resume(path, config=harmless) as w:
        assert w.rows_written == 2 and not w.complete


def test_config_differences_paths():
    a = {
        "composite": {"gamma": 0.25, "epsilon": "1e-6", "rules": [{"match": "features.0", "rule": "zbox"}]},
        "run": {"batch_size": 1},
    }
    b = {
        "composite": {"gamma": 0.25, "epsilon": 1e-6, "rules": [{"match": "features.1", "rule": "zbox"}]},
        "run": {"batch_size": 2},
        "output": {"path": "x"},
    }
    assert config_differences(a, b) == [
        'composite.rules[0].match: "features.0" in the file, "features.1" now'
    ]
    assert config_differences({"x": True}, {"x": 1}) == ["x: true in the file, 1 now"]


def test_unreadable_inputs_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="nope.h5: no such file"):
        open_results(tmp_path / "nope.h5")
    with pytest.raises(DataError, match="does not exist"):
        ResultWriter.resume(tmp_path / "nope.h5", config={})
    text = tmp_path / "notes.h5"
    text.write_text("hello")
    with pytest.raises(DataError, match="notes.h5 is not an HDF5 file"):
        open_results(text)
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["attribution"] = np.zeros((2, 3))
    with pytest.raises(DataError, match="foreign.h5 is an HDF5 file but not an lrpcli result file"):
        open_results(foreign)
    with pytest.raises(DataError, match="not an lrpcli result file"):
        ResultWriter.resume(foreign, config={})
    with pytest.raises(DataError, match="is a directory"):
        make_writer(tmp_path)


def _no_leftovers(directory: Path, name: str) -> None:
    assert sorted(p.name for p in directory.iterdir() if p.name.startswith(name)) == []


def test_unwritable_directory_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "ro"
    target.mkdir()
    if os.geteuid() != 0:  # a real read-only directory; root writes anywhere, so simulate it there
        target.chmod(0o555)
    else:
        real_access = os.access
        monkeypatch.setattr(
            os, "access", lambda p, mode: False if str(p) == str(target) else real_access(p, mode)
        )
    try:
        with pytest.raises(DataError) as err:
            make_writer(target / "out.h5")
        assert (
            "not writable" in str(err.value) and str(target) in str(err.value) and "\n" not in str(err.value)
        )
        _no_leftovers(target, "out.h5")
    finally:
        target.chmod(0o755)


def test_an_hdf5_error_is_reported_by_its_system_message(tmp_path):
    missing = tmp_path / "no" / "such" / "dir" / "out.h5"
    with pytest.raises(OSError) as raw:  # what h5py says: HDF5's call chain with the system's message inside
        h5py.File(missing, "w")
    assert "error message = 'No such file or directory'" in str(raw.value)
    assert store.error_text(raw.value) == "No such file or directory"
    assert store.error_text(OSError("Unable to open file (file signature not found)")) == (
        "Unable to open file (file signature not found)")


def test_failure_while_creating_leaves_nothing_and_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "out.h5"
    with make_writer(path, n_rows=1) as w:
        w.append(**batch([3]))
        w.close(True)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ResultWriter, "_build", staticmethod(disk_full))
    with pytest.raises(DataError, match="cannot write .*out.h5: No space left on device"):
        make_writer(path, overwrite=True)
    assert not Path(str(path) + ".partial").exists()
    with open_results(path) as r:  # the old run is intact: replacing happens only after a complete build
        assert r.rows_written == 1 and r.index.tolist() == [3]
    with pytest.raises(DataError):
        make_writer(tmp_path / "new.h5")
    _no_leftovers(tmp_path, "new.h5")


def test_stale_partial_from_a_killed_creation_is_replaced(tmp_path):
    path = tmp_path / "out.h5"
    Path(str(path) + ".partial").write_bytes(b"half a file")
    with pytest.raises(DataError, match="only the .partial file"):
        open_results(path)
    with make_writer(path) as w:
        w.close(False)
    assert not Path(str(path) + ".partial").exists()


def test_refuse_existing_output_is_the_one_check_of_runner_and_writer(tmp_path):
    """The runner's early check and ResultWriter.create refuse an existing output with the same words."""
    path = tmp_path / "out.h5"
    store.refuse_existing_output(path, overwrite=False)  # nothing there yet
    with make_writer(path) as w:  # an open writer holds HDF5's lock on the file
        with pytest.raises(DataError) as held:
            store.refuse_existing_output(path, overwrite=True)
        assert str(held.value) == f"output {path} is being written by another process; stop it or choose another -o"
        w.close(True)
    with pytest.raises(DataError) as exists:
        store.refuse_existing_output(path, overwrite=False)
    assert str(exists.value) == f"{path} exists; pass --resume to continue it or --overwrite to replace it"
    with pytest.raises(DataError) as again:
        make_writer(path)
    assert str(again.value) == str(exists.value)
    store.refuse_existing_output(path, overwrite=True)  # a finished file may be replaced


def test_store_imports_no_torch():
    """The store reads and writes with numpy, h5py and PyYAML only (the kill test runs it without torch)."""
    trees = [ast.parse(p.read_text(encoding="utf-8")) for p in sorted((ROOT / "lrpcli" / "store").glob("*.py"))]
    modules = {a.name.split(".")[0] for t in trees for n in ast.walk(t) if isinstance(n, ast.Import) for a in n.names}
    modules |= {
        n.module.split(".")[0]
        for tree in trees
        for n in ast.walk(tree)
        if isinstance(n, ast.ImportFrom) and n.module and n.level == 0
    }
    assert "torch" not in modules and {"h5py", "numpy"} <= modules


# ---------------------------------------------------------------------------------------------- resume
def _file_contents(path) -> dict:
    """Everything in a result file except its creation time, for 'equals an uninterrupted run'."""
    out = {}
    with h5py.File(path, "r") as f:
        for k, v in f.attrs.items():
            if k != "created":
                out[f"@{k}"] = v
        f.visititems(
            lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None
        )
    return out


def assert_same_file(a, b) -> None:
    ca, cb = _file_contents(a), _file_contents(b)
    assert sorted(ca) == sorted(cb)
    for key in ca:
        va, vb = np.asarray(ca[key]), np.asarray(cb[key])
        assert va.dtype == vb.dtype and va.shape == vb.shape, key
        np.testing.assert_array_equal(va, vb, err_msg=key)


def test_resume_in_process_equals_uninterrupted(tmp_path):
    ref, out = tmp_path / "ref.h5", tmp_path / "out.h5"
    W.run(str(ref))
    # a run that stopped after some batches, with rows and a skip written beyond its commit record
    W.run(str(out), crash_after=12)
    with ResultWriter.resume(out, config=W.CONFIG) as w:
        assert (w.rows_written, w.n_skipped, w.complete) == (12, 1, False)
        assert w.skipped == W.expected_skipped(13) and w.committed_index().tolist() == W.good_samples()[:12]
    W.run(str(out))
    assert_same_file(ref, out)
    with ResultWriter.resume(out, config=W.CONFIG) as w:
        assert w.complete and w.rows_written == len(W.good_samples())


# ---------------------------------------------------------------------------------------------- crash safety
def check_committed_prefix(path: Path, at_least: int) -> int:
    """After a kill: the file opens with plain h5py and its first rows_written rows are exactly right."""
    if not path.exists():  # killed while creating: nothing was published
        assert at_least == 0
        return 0
    with h5py.File(path, "r") as f:  # plain h5py, default locking: what ViRelAy does
        n = int(f.attrs["rows_written"])
        n_skipped = int(f.attrs["skipped_written"])
        assert n >= at_least, f"rows_written {n} < {at_least} rows whose append() had returned"
        exp = W.expected_rows(n)
        for name in ROW_FIELDS:
            np.testing.assert_array_equal(f[name][:n], exp[name], err_msg=name)
        for key, name in CONS_FIELDS.items():
            np.testing.assert_array_equal(f[name][:n], exp[key], err_msg=name)
        np.testing.assert_array_equal(f["layers/features.0"][:n], exp["layers"]["features.0"])
        assert f["filename"].asstr()[:n].tolist() == exp["filename"]
        assert f["conservation/layer"].asstr()[()].tolist() == W.LAYERS
        skipped = list(
            zip(
                f["skipped/filename"].asstr()[:n_skipped].tolist(),
                f["skipped/reason"].asstr()[:n_skipped].tolist(),
            )
        )
        # skips are committed with the rows after them: together they are a prefix of the data set
        assert skipped == W.expected_skipped(n + n_skipped)
        assert sum(not W.is_bad(s) for s in range(n + n_skipped)) == n
    with open_results(path) as r:
        assert r.rows_written == n
        np.testing.assert_array_equal(r.index, W.expected_rows(n)["index"])
    return n


def _kill_run(path: Path, trigger: str, delay: float, rng: random.Random) -> tuple[int, list[str]]:
    """Start the writer, wait for a line starting with ``trigger`` (and ``delay`` s), SIGKILL it."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "_kill_writer.py"), str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=str(ROOT),
    )
    lines: list[str] = []
    try:
        for line in proc.stdout:
            lines.append(line.strip())
            if line.startswith(trigger) and (trigger != "rows" or rng.random() < 0.15):
                break
        if delay:
            time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        rest, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines += rest.splitlines()
    done = max([int(x.split()[1]) for x in lines if x.startswith(("rows", "created"))], default=0)
    assert proc.returncode in (-signal.SIGKILL, 0), err
    return done, lines


def _kill_until_done(path: Path, plan: list[tuple[str, float]], rng: random.Random) -> list[int]:
    """Kill the writer once per plan entry (resuming it each time), then let it finish; returns the
    rows_written found after each kill."""
    rows_seen: list[int] = []
    for trigger, delay in plan:
        done, lines = _kill_run(path, trigger, delay, rng)
        if any(x.startswith("done") for x in lines):  # it finished before the kill
            return rows_seen
        rows_seen.append(check_committed_prefix(path, done))
        assert rows_seen == sorted(rows_seen), f"a kill lost rows that were final: {rows_seen}"
    out = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "_kill_writer.py"), str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(ROOT),
    )
    assert out.returncode == 0, out.stderr
    assert "done torch=False" in out.stdout  # the store ran without torch
    return rows_seen


def test_sigkill_at_random_moments_then_resume_equals_uninterrupted(tmp_path):
    """Kill the writer while it creates the file, right after, after a batch and at random times; after
    every kill the file opens with plain h5py and its committed rows are right; resuming to the end gives
    the same file as an uninterrupted run. LRPCLI_KILL_STRESS=N runs rounds of random kills until N."""
    stress = int(os.environ.get("LRPCLI_KILL_STRESS", "0"))
    rng = random.Random(int(os.environ.get("LRPCLI_KILL_SEED", "1234")))
    ref = tmp_path / "ref.h5"
    W.run(str(ref))  # the uninterrupted run

    def random_kill() -> tuple[str, float]:
        if rng.random() < 0.05:
            return ("closing", rng.uniform(0.0, 0.01))
        if rng.random() < 0.15:
            return ("creating", rng.uniform(0.0, 0.05))
        return ("created", rng.uniform(0.0, 0.5)) if rng.random() < 0.7 else ("rows", 0.0)

    plan = [("creating", 0.0), ("creating", 0.01), ("creating", 0.03), ("created", 0.0), ("rows", 0.0)]
    plan += [("created", rng.uniform(0.0, 0.15)) for _ in range(3)] + [("closing", 0.0)]
    kills, report = 0, []
    for round_ in range(10_000):
        path = tmp_path / f"out{round_}.h5"
        rows_seen = _kill_until_done(path, plan, rng)
        kills += len(rows_seen)
        report.append(rows_seen)
        assert_same_file(ref, path)
        with open_results(path) as r:
            assert r.complete and r.rows_written == len(W.good_samples())
            assert r.skipped == W.expected_skipped(W.SAMPLES)
        path.unlink()
        if kills >= max(stress, 5):
            break
        plan = [random_kill() for _ in range(8)]
    print(f"\n{kills} kills in {len(report)} rounds; rows_written after each kill: {report}")


# ---------------------------------------------------------------------------------------------- full disk
@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    ref = tmp_path_factory.mktemp("reference") / "ref.h5"
    W.run(str(ref))
    return ref


@pytest.mark.parametrize("room", [1_000, 20_000, 200_000])
def test_full_disk_stops_with_one_line_keeps_committed_rows_and_resumes(tmp_path, room, uninterrupted):
    """A write that fails (here EFBIG from a file size limit, as ENOSPC from a full disk) ends the run with
    one line naming the file and the cause; plain h5py reads every committed row; and after the limit is
    lifted, --resume gives the same file as an uninterrupted run. ``room`` bytes past the created file put
    the failure at the first batch, in the middle, or late (different HDF5 structures fail to grow)."""
    path = tmp_path / "out.h5"
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "_full_disk_writer.py"), str(path), str(room)],
                         capture_output=True, text=True, timeout=120, cwd=str(ROOT))
    assert out.returncode == 0 and out.stderr == "", out.stderr[-3000:]  # no traceback, no h5py noise
    lines = out.stdout.splitlines()
    errors = [line for line in lines if line.startswith("error ")]
    committed = max([int(x.split()[1]) for x in lines if x.startswith("rows ")], default=0)
    assert errors == [
        f"error writing {path} failed (File too large); its first {committed} rows are saved and readable; "
        "free space (or fix the cause) and run again with --resume to continue"
    ], lines[-3:]
    assert check_committed_prefix(path, committed) == committed
    with h5py.File(path, "r") as f:  # every dataset's committed rows, not only the ones checked by value
        n = int(f.attrs["rows_written"])
        f.visititems(lambda name, obj: obj[:n] if isinstance(obj, h5py.Dataset) and obj.shape else None)
    W.run(str(path))  # what --resume does, without the limit
    assert_same_file(uninterrupted, path)


# ---------------------------------------------------------------------------------------------- speed
def test_append_speed_16x3x224x224(tmp_path):
    """Report MB/s for the real-size case; the bound is loose (shared CI machines), the number is printed."""
    b, shape, n_batches = 16, (3, 224, 224), 4
    rng = np.random.default_rng(0)
    rel = (rng.standard_normal((b,) + shape) * rng.random((b, 1) + shape[1:]) ** 4).astype(np.float32)
    img = rng.integers(0, 256, (b,) + shape, dtype=np.uint8)
    rows = {
        "attribution": rel,
        "input": img,
        "prediction": rng.standard_normal((b, 1000)).astype(np.float32),
        "label": np.zeros(b, np.int64),
        "target": np.zeros(b, np.int64),
        "index": np.arange(b),
        "filename": [f"n01440764/ILSVRC2012_val_{i:08d}.JPEG" for i in range(b)],
        "relevance_in": np.zeros((b, 16)),
        "relevance_out": np.zeros((b, 16)),
        "output_relevance": np.zeros(b),
    }
    with ResultWriter.create(
        tmp_path / "big.h5",
        config={},
        config_yaml="{}\n",
        n_rows=b * n_batches,
        num_outputs=1000,
        sample_shape=shape,
        layers=[f"l{i}" for i in range(16)],
        rules=["Epsilon"] * 16,
    ) as w:
        start = time.perf_counter()
        for i in range(n_batches):
            rows["index"] = np.arange(b) + i * b
            w.append(**rows)
        seconds = time.perf_counter() - start
        w.close(True)
    mb = n_batches * (rel.nbytes + img.nbytes) / 1e6
    print(
        f"\nappend: {mb / seconds:.0f} MB/s ({seconds / n_batches * 1000:.0f} ms per batch of 16x3x224x224)"
    )
    assert mb / seconds > 5
