"""``render -d DIR`` writes only inside DIR: planted links are replaced, never written through."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lrpcli.commands.render.images import write_new
from lrpcli.commands.render.pipeline import RenderOptions, render_file
from tests.test_render_cli import WRITTEN, rgb, run, write_h5

pytestmark = pytest.mark.skipif(not hasattr(os, "symlink") or os.name == "nt", reason="POSIX links")

VICTIM = b"precious, not an image\n"


@pytest.fixture
def h5(tmp_path: Path) -> Path:
    return write_h5(tmp_path / "out.h5")


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "victim.txt"
    victim.write_bytes(VICTIM)
    return victim


def test_planted_file_link_is_replaced_not_followed(h5: Path, tmp_path: Path) -> None:
    victim = _victim(tmp_path)
    out = tmp_path / "o"
    out.mkdir()
    planted = out / "00100_0_1.png"  # row 0's default name
    planted.symlink_to("../victim.txt")
    res = run(h5, "-d", out, "-q")
    assert res.exit_code == 0, res.output
    assert victim.read_bytes() == VICTIM
    assert not planted.is_symlink() and planted.is_file()
    assert Image.open(planted).format == "PNG"
    # the link's name now holds row 0's heatmap, identical to a render into a clean folder
    run(h5, "-d", tmp_path / "clean", "-q")
    assert np.array_equal(rgb(planted), rgb(tmp_path / "clean" / planted.name))
    # no temporary files left behind
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "clean").iterdir())
    assert len(list(out.iterdir())) == WRITTEN


def test_planted_link_in_parallel_run_and_grid(h5: Path, tmp_path: Path) -> None:
    victim = _victim(tmp_path)
    out = tmp_path / "o"
    out.mkdir()
    (out / "00105_2_0.png").symlink_to(victim)  # absolute link, last row, written by a worker process
    (out / "grid.jpg").symlink_to(victim)
    render_file(h5, out, RenderOptions(jobs=2, batch_size=2, progress=False))
    render_file(h5, out, RenderOptions(grid=True, fmt="jpg", progress=False))
    assert victim.read_bytes() == VICTIM
    for name in ("00105_2_0.png", "grid.jpg"):
        assert not (out / name).is_symlink() and (out / name).is_file()


def test_linked_subfolder_is_refused(h5: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "o"
    out.mkdir()
    (out / "c0").symlink_to(elsewhere)
    res = run(h5, "-d", out, "--name", "c{label}/{row}")
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert lines == [f"lrpcli: error: {out / 'c0'}: is a symbolic link; render writes only into real folders "
                     f"inside -d {out} (remove it or choose another --name)"]
    assert list(elsewhere.iterdir()) == []


def test_linked_output_folder_itself_is_allowed(h5: Path, tmp_path: Path) -> None:
    """-d names the folder: a link the user gives is followed, as for any path they type."""
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    res = run(h5, "-d", tmp_path / "link", "-q", "--select", "0", "--name", "x")
    assert res.exit_code == 0, res.output
    assert [p.name for p in real.iterdir()] == ["x.png"]


def test_write_new_leaves_nothing_on_error(tmp_path: Path) -> None:
    target = tmp_path / "a.png"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), write_new(target) as fh:
        fh.write(b"half")
        raise RuntimeError("encoder failed")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]
    with write_new(target) as fh:
        fh.write(b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]


def test_target_that_is_a_folder_is_one_line(h5: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    (out / "x.png").mkdir(parents=True)
    res = run(h5, "-d", out, "--select", "0", "--name", "x")
    assert res.exit_code == 1, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"lrpcli: error: {out / 'x.png'}: cannot write")
    assert [p.name for p in out.iterdir()] == ["x.png"]
