"""Result files that are damaged, incomplete or stored small: every lrpcli reader says so in one line.

A truncated copy or random bytes are called damaged (not "locked by another process"), a virtual merge whose
shards are gone names them, merge names a shard given twice, and float16 storage reads back as float32.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from lrpcli.cli import main
from lrpcli.commands.render.reader import Source
from lrpcli.errors import DataError
from lrpcli.runner.distributed import Shard, merge
from lrpcli.store import ResultWriter, open_results

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("_kill_writer", ROOT / "tests" / "_kill_writer.py")
W = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(W)

TOTAL, BATCH = 8, 4


def write(path: Path, samples: list[int], *, attrs: dict | None = None, dtype: str = "float32",
          n_rows: int | None = None):
    """A complete result file holding ``samples`` (values from tests/_kill_writer.py)."""
    w = ResultWriter.create(path, config=W.CONFIG, config_yaml=W.CONFIG_YAML, n_rows=n_rows or len(samples),
                            num_outputs=W.K, sample_shape=W.SHAPE, layers=W.LAYERS, rules=W.RULES,
                            extra_layers=W.EXTRA, dtype=dtype, attrs=attrs)
    rows = W.rows_for(samples)
    rows["attribution"] = rows["attribution"].astype(dtype)
    w.append(**rows)
    w.close(complete=True)
    return path


def shards(folder: Path) -> list[Path]:
    """The two shard files of a 2-rank run over TOTAL samples, batch size BATCH."""
    out = []
    for rank in (0, 1):
        shard = Shard(rank, 2, 0, folder / f"out.rank{rank:05d}.h5")
        start, stop = shard.bounds(TOTAL, BATCH)
        out.append(write(shard.path, list(range(start, stop)), attrs=shard.attrs(TOTAL, BATCH)))
    return out


def cli(*args: str) -> tuple[int, list[str]]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]


def one_error_line(code: int, lines: list[str], exit_code: int = 2) -> str:
    assert code == exit_code and len(lines) == 1 and lines[0].startswith("lrpcli: error: "), lines
    return lines[0]


# ------------------------------------------------------------------------------------ damaged files
@pytest.fixture(scope="module")
def damaged(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("damaged")
    real = write(folder / "real.h5", list(range(6)))
    data = real.read_bytes()
    truncated = folder / "truncated.h5"
    truncated.write_bytes(data[: len(data) // 2])
    random_bytes = folder / "random.h5"
    random_bytes.write_bytes(np.random.default_rng(0).bytes(4096))
    bad_superblock = folder / "bad_superblock.h5"
    bad_superblock.write_bytes(data[:8] + np.random.default_rng(1).bytes(4096))
    return {"real": real, "truncated": truncated, "random": random_bytes, "bad_superblock": bad_superblock,
            "size": len(data)}


EXPECTED = {
    "truncated": "truncated.h5 is truncated or damaged: it has {half} bytes but its HDF5 header says {eoa}",
    "random": "random.h5 is not an HDF5 file",
    "bad_superblock": "bad_superblock.h5 is a damaged HDF5 file (Unable to synchronously open file (bad superblock",
}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_damaged_file_is_called_damaged_by_every_reader(damaged, kind, tmp_path):
    path = damaged[kind]
    head = damaged["real"].read_bytes()[:48]  # the superblock's end of allocation (1.8 format, version 0)
    expected = EXPECTED[kind].format(half=damaged["size"] // 2, eoa=int.from_bytes(head[40:48], "little"))
    for call in (lambda: open_results(path), lambda: ResultWriter.resume(path, config=W.CONFIG)):
        with pytest.raises(DataError) as err:
            call()
        assert expected in str(err.value) and "file lock" not in str(err.value), str(err.value)
    if kind != "random":  # the render reader says "not an HDF5 file" itself, before HDF5 opens it
        with pytest.raises(DataError, match="damaged"):
            Source(path)
    for args in (("debug", str(path)), ("merge", str(path), "-o", str(tmp_path / "m.h5")),
                 ("render", str(path), "-d", str(tmp_path / "maps"))):
        line = one_error_line(*cli(*args))
        assert str(path) in line and "file lock" not in line and ("damaged" in line or "not an HDF5 file" in line), line


def test_a_locked_file_is_still_called_locked(damaged, tmp_path):
    """The lock is told by errno 11, which HDF5 reports for a file another writer holds."""
    copy = shutil.copy(damaged["real"], tmp_path / "busy.h5")
    err = BlockingIOError(11, "Unable to synchronously open file (unable to lock file, errno = 11, error "
                              "message = 'Resource temporarily unavailable')")
    from lrpcli.store import open_error

    assert open_error(copy, err) == (f"{copy} is being written by another process (HDF5 file lock); wait for it "
                                     "or choose another -o")
    assert "truncated or damaged" in open_error(copy, OSError(
        "Unable to synchronously open file (truncated file: eof = 100, sblock->base_addr = 0, stored_eof = 200)"))


# ------------------------------------------------------------------------------------ virtual merge
def test_virtual_merge_with_missing_shards_names_them(tmp_path):
    shard0, shard1 = shards(tmp_path)
    out = tmp_path / "out.h5"
    merge([shard0, shard1], out, virtual=True)
    with open_results(out) as r:
        assert r.index.tolist() == list(range(TOTAL)) and r.filename[7] == W.rows_for([7])["filename"][0]
    shard1.rename(tmp_path / "elsewhere.h5")
    expected = (f"{out} is a virtual file over shard files that are missing: out.rank00001.h5 (looked for in "
                f"{tmp_path}); keep the shards next to it, or merge them into a real file with lrpcli merge")
    for call in (lambda: open_results(out), lambda: ResultWriter.resume(out, config=W.CONFIG), lambda: Source(out)):
        with pytest.raises(DataError) as err:
            call()
        assert expected in str(err.value)
    shard0.unlink()
    line = one_error_line(*cli("render", str(out), "-d", str(tmp_path / "maps")))
    assert "missing: out.rank00000.h5, out.rank00001.h5 (looked" in line
    line = one_error_line(*cli("debug", str(out)))
    assert "missing: out.rank00000.h5, out.rank00001.h5 (looked" in line
    assert not (tmp_path / "maps").exists()


# ------------------------------------------------------------------------------------ merge input
def test_merge_names_a_shard_given_twice(tmp_path):
    shard0, shard1 = shards(tmp_path)
    out = tmp_path / "out.h5"
    line = one_error_line(*cli("merge", str(shard0), str(shard1), str(shard0), "-o", str(out)))
    assert line == f"lrpcli: error: shard {shard0} is given twice; give each shard once"
    alias = tmp_path / "alias.rank00000.h5"
    alias.symlink_to(shard0)
    line = one_error_line(*cli("merge", str(shard0), str(shard1), str(alias), "-o", str(out)))
    assert line == f"lrpcli: error: shard {alias} (the same file as {shard0}) is given twice; give each shard once"
    assert not out.exists() and shard0.exists() and shard1.exists()


# ------------------------------------------------------------------------------------ float16
def test_float16_storage_reads_back_as_float32(tmp_path):
    path = write(tmp_path / "half.h5", [0, 1, 2], dtype="float16")
    with h5py.File(path, "r") as f:  # stored small, as asked
        assert f["attribution"].dtype == np.float16 and f["layers/features.0"].dtype == np.float16
        stored = f["attribution"][()]
    with open_results(path) as r:
        assert r.attribution.dtype == np.float32 and r.layers["features.0"].dtype == np.float32
        assert r.read("attribution", [2, 0]).dtype == np.float32 and r.read("attribution", 1).dtype == np.float32
        np.testing.assert_array_equal(r.attribution, stored.astype(np.float32))
        assert r.prediction.dtype == np.float32 and r.conservation["relevance_in"].dtype == np.float64
    with Source(path) as src:
        maps = src.read_relevance(np.arange(3))
        assert maps.dtype == np.float32
        np.testing.assert_array_equal(maps, stored.sum(axis=1, dtype=np.float32))


def test_merge_on_a_full_disk_is_one_line_and_keeps_the_shards(tmp_path, monkeypatch):
    import lrpcli.store.join as join_module

    shard0, shard1 = shards(tmp_path)
    out = tmp_path / "out.h5"

    def disk_full(*args, **kwargs):  # what h5py raises when the disk fills mid-copy
        raise RuntimeError("Can't synchronously write data (file write failed: time = now, filename = 'x', file "
                           "descriptor = 3, errno = 28, error message = 'No space left on device', buf = 0x0)")

    monkeypatch.setattr(join_module, "copy_rows", disk_full)
    line = one_error_line(*cli("merge", str(shard0), str(shard1), "-o", str(out)), exit_code=1)  # a RunError
    assert line == (f"lrpcli: error: writing {out} failed (No space left on device); nothing was written and the "
                    "shards are kept: free space (or fix the cause) and merge again")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.rank00000.h5", "out.rank00001.h5"]
