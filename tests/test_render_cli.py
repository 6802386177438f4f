"""``lrpcli render`` end to end on a tiny HDF5 file in the lrpcli layout: pixels, files, and bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from lrpcli.cli import main
from lrpcli.commands.render import palette
from lrpcli.commands.render.images import grid_geometry, label_height
from lrpcli.commands.render.palettes import PALETTES
from lrpcli.commands.render.pipeline import (
    DEFAULT_GRID_LABEL,
    RenderOptions,
    class_names,
    format_template,
    render_file,
)
from lrpcli.commands.render.reader import Source

N, WRITTEN, H, W = 8, 6, 4, 4
# channel-summed relevance of row 0; channels 1 and 2 cancel out
M0 = np.array([[-4, -2, 0, 2], [4, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=np.float32)


def write_h5(path: Path, *, written: int = WRITTEN, with_input: bool = True, lrpcli: bool = True,
             dtype: str = "f4") -> Path:
    """A file as ``lrpcli explain`` writes it (README, "The HDF5 file"), N rows of which ``written`` are final."""
    rng = np.random.default_rng(0)
    att = rng.normal(size=(N, 3, H, W)).astype(np.float32)
    att[0, 0] = M0
    att[0, 1] = 1.0
    att[0, 2] = -1.0
    with h5py.File(path, "w") as f:
        if lrpcli:
            f.attrs["lrpcli_version"] = "0.1.0"
            f.attrs["rows_written"] = np.int64(written)
            f.attrs["complete"] = written == N
        f.create_dataset("attribution", data=att.astype(dtype), chunks=(1, 3, H, W), compression="lzf")
        f["label"] = (np.arange(N) % 3).astype(np.int64)
        f["target"] = ((np.arange(N) + 1) % 3).astype(np.int64)
        f["index"] = (np.arange(N) + 100).astype(np.uint32)
        f.create_dataset("filename", data=[f"c{i % 3}/img_{i:03d}.jpg" for i in range(N)],
                         dtype=h5py.string_dtype("utf-8"))
        if with_input:
            f["input"] = rng.integers(0, 256, (N, 3, H, W), dtype=np.uint8)
        f["layers/features.0"] = rng.normal(size=(N, 2, 2, 2)).astype(np.float32)
    return path


@pytest.fixture
def h5(tmp_path: Path) -> Path:
    return write_h5(tmp_path / "out.h5")


def run(*args: str | Path) -> object:
    return CliRunner().invoke(main, ["render", *map(str, args)])


def rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def stored(path: Path, name: str) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f[name][()]


def test_default_run_names_and_rows_written(h5: Path) -> None:
    res = run(h5, "-q")
    assert res.exit_code == 0, res.output
    out = h5.with_name("out_heatmaps")
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"{100 + i:05d}_{i % 3}_{(i + 1) % 3}.png" for i in range(WRITTEN)]


def test_exact_colours_symmetric(h5: Path, tmp_path: Path) -> None:
    res = run(h5, "-d", tmp_path / "o", "--select", "0", "--name", "{row}", "--cmap", "coldnhot")
    assert res.exit_code == 0, res.output
    assert "wrote 1 png files" in res.stdout
    img = rgb(tmp_path / "o" / "0.png")
    lut = palette("coldnhot")
    assert img.shape == (H, W, 3)
    assert img[0, 0].tolist() == [255, 255, 255]  # min -> first stop
    assert img[1, 0].tolist() == [255, 255, 255]  # max -> last stop
    assert img[0, 2].tolist() == [0, 0, 0]  # zero -> centre (black)
    assert img[0, 1].tolist() == lut[64].tolist() == [0, 128, 255]  # -0.5 -> between cyan and blue
    assert img[0, 3].tolist() == lut[191].tolist()  # +0.5
    assert img[3, 0].tolist() == lut[159].tolist()  # 0.25: (1.25 / 2) * 255 = 159.375, rounded: 159


def test_norms_level_clip_via_cli(h5: Path, tmp_path: Path) -> None:
    lut = palette("gray")
    run(h5, "-d", tmp_path / "a", "--select", "0", "--name", "x", "--cmap", "gray", "--norm", "absolute")
    img = rgb(tmp_path / "a" / "x.png")
    assert img[0, 0].tolist() == [255] * 3 and img[0, 1].tolist() == lut[128].tolist()
    assert img[0, 2].sum() == 0
    run(h5, "-d", tmp_path / "b", "--select", "0", "--name", "x", "--cmap", "gray", "--level", "2")
    img = rgb(tmp_path / "b" / "x.png")
    assert img[0, 1].tolist() == [0] * 3 and img[0, 3].tolist() == [255] * 3
    run(h5, "-d", tmp_path / "c", "--select", "0", "--name", "x", "--cmap", "gray", "--norm", "unaligned")
    img = rgb(tmp_path / "c" / "x.png")
    assert img[0, 0].tolist() == [0] * 3 and img[1, 0].tolist() == [255] * 3
    assert img[0, 2].tolist() == [128] * 3
    res = run(h5, "-d", tmp_path / "d", "--select", "0", "--name", "x", "--cmap", "gray", "--clip", "50")
    assert res.exit_code == 0, res.output
    img = rgb(tmp_path / "d" / "x.png")  # 50th percentile of |M0| is 0: the scale falls back to 1
    assert img[3, 0].tolist() == [255] * 3


def test_custom_spec_and_float16(tmp_path: Path) -> None:
    path = write_h5(tmp_path / "half.h5", dtype="f2")
    res = run(path, "-d", tmp_path / "o", "--select", "0", "--name", "x", "--cmap", "00f,80:000,f00")
    assert res.exit_code == 0, res.output
    img = rgb(tmp_path / "o" / "x.png")
    assert img[0, 0].tolist() == [0, 0, 255] and img[1, 0].tolist() == [255, 0, 0] and img[0, 2].sum() == 0


def test_overlay_arithmetic_in_files(h5: Path, tmp_path: Path) -> None:
    res = run(h5, "-d", tmp_path / "o", "--overlay", "0.4", "--cmap", "bwr", "--name", "{row}", "-q")
    assert res.exit_code == 0, res.output
    inputs = stored(h5, "input")
    att = stored(h5, "attribution").sum(axis=1)
    lut = palette("bwr")
    for row in range(WRITTEN):
        x = att[row]
        idx = np.floor(np.clip(x / np.abs(x).max(), -1, 1) * 127.5 + 128).astype(int)
        expected = 0.4 * lut[idx].astype(np.float64) + 0.6 * np.moveaxis(inputs[row], 0, -1)
        assert np.abs(rgb(tmp_path / "o" / f"{row}.png") - expected).max() <= 0.5 + 1e-3


def test_grid_geometry_and_tiles(h5: Path, tmp_path: Path) -> None:
    run(h5, "-d", tmp_path / "single", "--name", "{row}", "-q")
    res = run(h5, "-d", tmp_path / "g", "--grid", "--select", "0:5", "--columns", "2")
    assert res.exit_code == 0, res.output
    assert "(5 tiles)" in res.stdout
    grid = rgb(tmp_path / "g" / "grid.png")
    geo = grid_geometry(5, H, W, 2)
    assert geo.label_h == label_height() and (geo.columns, geo.rows) == (2, 3)
    assert grid.shape == (*geo.size, 3)
    for k in range(5):
        y, x = geo.origin(k)
        assert np.array_equal(grid[y : y + H, x : x + W], rgb(tmp_path / "single" / f"{k}.png"))
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["grid.png"]


def test_select_label_and_glob(h5: Path, tmp_path: Path) -> None:
    res = run(h5, "-d", tmp_path / "o", "--select", "label=1,*_000.jpg", "--name", "{stem}")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["img_000.png", "img_001.png", "img_004.png"]


def test_layer_resized_to_input(h5: Path, tmp_path: Path) -> None:
    res = run(h5, "-d", tmp_path / "o", "--layer", "features.0", "--select", "0:2", "--name", "{layer}_{row}")
    assert res.exit_code == 0, res.output
    img = rgb(tmp_path / "o" / "features.0_0.png")
    assert img.shape == (H, W, 3)
    assert np.array_equal(img[0:2, 0:2], np.broadcast_to(img[0, 0], (2, 2, 3)))  # nearest: 2x2 blocks
    layer = stored(h5, "layers/features.0")[0].sum(axis=0)
    lut = palette("coldnhot")
    idx = np.floor(layer / np.abs(layer).max() * 127.5 + 128).astype(int)
    assert img[::2, ::2].tolist() == lut[idx].tolist()
    res = run(h5, "-d", tmp_path / "b", "--layer", "features.0", "--resample", "bilinear", "--overlay", "0.5")
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("fmt", ["jpg", "webp"])
def test_other_formats(h5: Path, tmp_path: Path, fmt: str) -> None:
    res = run(h5, "-d", tmp_path / "o", "--format", fmt, "-q")
    assert res.exit_code == 0, res.output
    files = sorted((tmp_path / "o").iterdir())
    assert len(files) == WRITTEN and all(p.suffix == f".{fmt}" for p in files)
    assert Image.open(files[0]).format == {"jpg": "JPEG", "webp": "WEBP"}[fmt]


def test_parallel_matches_serial(h5: Path, tmp_path: Path) -> None:
    serial = render_file(h5, tmp_path / "s", RenderOptions(jobs=1, batch_size=2, progress=False))
    par = render_file(h5, tmp_path / "p", RenderOptions(jobs=2, batch_size=2, progress=False))
    assert [p.name for p in serial.files] == [p.name for p in par.files] and len(par.files) == WRITTEN
    for a, b in zip(serial.files, par.files):
        assert np.array_equal(rgb(a), rgb(b))


def test_list_cmaps_and_swatches(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["render", "--list-cmaps"])
    assert res.exit_code == 0
    for name in PALETTES:
        assert name in res.stdout
    sw = tmp_path / "sw.png"
    res = CliRunner().invoke(main, ["render", "--list-cmaps", "--swatches", str(sw), "--cmap", "000,f00,fff"])
    assert res.exit_code == 0, res.output
    assert "custom" in res.stdout
    img = Image.open(sw)
    assert img.size[1] == (len(PALETTES) + 1) * 18 + 2


def _text_file(tmp: Path) -> Path:
    p = tmp / "notes.h5"
    p.write_text("not hdf5\n")
    return p


def _foreign_h5(tmp: Path) -> Path:
    return write_h5(tmp / "foreign.h5", lrpcli=False)


def _no_input(tmp: Path) -> Path:
    return write_h5(tmp / "noinput.h5", with_input=False)


def _empty(tmp: Path) -> Path:
    return write_h5(tmp / "empty.h5", written=0)


@pytest.mark.parametrize(
    ("make", "args", "needles"),
    [
        (_text_file, [], ["notes.h5", "not an HDF5 file"]),
        (_foreign_h5, [], ["foreign.h5", "not written by lrpcli"]),
        (_no_input, ["--overlay", "0.5"], ["noinput.h5", "--overlay needs the stored 'input'"]),
        (_empty, [], ["empty.h5", "no rows written"]),
        (None, ["--select", "6"], ["--select '6'", "row 6 is out of range", "has 6 rows"]),
        (None, ["--select", "label=7"], ["label=7"]),
        (None, ["--select", "1:x"], ["'1:x'"]),
        (None, ["--select", "*.png"], ["'*.png'"]),
        (None, ["--cmap", "nope"], ["--cmap", "unknown palette 'nope'", "coldnhot"]),
        (None, ["--cmap", "f00,xyz"], ["--cmap", "colour 'xyz'"]),
        (None, ["--overlay", "1.5"], ["--overlay 1.5", "[0, 1]"]),
        (None, ["--level", "0"], ["--level 0"]),
        (None, ["--clip", "150"], ["--clip 150"]),
        (None, ["--name", "{foo}"], ["--name '{foo}'", "unknown field 'foo'"]),
        (None, ["--name", "{label}"], ["--name '{label}'", "both give"]),
        (None, ["--name", "../x{row}"], ["must stay inside"]),
        (None, ["--layer", "nope"], ["no layer 'nope'", "features.0"]),
        (None, ["--columns", "0", "--grid"], ["--columns 0"]),
        (None, ["--cmap", ""], ["--cmap", "empty palette name ''", "coldnhot"]),
        (None, ["--cmap", "  "], ["--cmap", "empty palette name '  '"]),
        (None, ["--jobs", "-2"], ["--jobs -2", "must be >= 0", "0: one process per CPU"]),
        (None, ["--overlay-alpha", "relevance", "--overlay", "2"], ["--overlay 2.0", "[0, 1]"]),
        (_no_input, ["--overlay-alpha", "relevance"], ["noinput.h5", "--overlay needs the stored 'input'"]),
    ],
)
def test_bad_input_one_line_exit_2(
    h5: Path, tmp_path: Path, make: object, args: list[str], needles: list[str]
) -> None:
    path = make(tmp_path) if make else h5
    res = run(path, "-d", tmp_path / "o", *args)
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lrpcli: error: "), res.stderr
    for needle in needles:
        assert needle in lines[0]
    assert "Traceback" not in res.output
    assert not (tmp_path / "o").exists()  # checked before anything is written


def test_missing_file_and_argument(tmp_path: Path) -> None:
    res = run(tmp_path / "gone.h5")
    assert res.exit_code == 2 and "gone.h5: no such file" in res.stderr
    res = CliRunner().invoke(main, ["render"])
    assert res.exit_code == 2 and "OUT.h5" in res.stderr


def test_help() -> None:
    res = CliRunner().invoke(main, ["render", "--help"])
    assert res.exit_code == 0
    for opt in ("--cmap", "--level", "--norm", "--overlay", "--grid", "--select", "--format", "--name",
                "--layer", "--clip", "--list-cmaps", "--swatches"):
        assert opt in res.stdout


def test_rendering_does_not_import_torch(h5: Path, tmp_path: Path) -> None:
    """The render modules themselves need no torch (the package's own ``__init__`` is bypassed here)."""
    pkg = Path(__file__).resolve().parents[1] / "lrpcli"
    code = (
        f"import sys, types; pkg = types.ModuleType('lrpcli'); pkg.__path__ = [{str(pkg)!r}]; "
        "pkg.__version__ = '0'; sys.modules['lrpcli'] = pkg; from lrpcli.commands.render.command import render; "
        "from lrpcli.commands.render.pipeline import RenderOptions, render_file; "
        f"render_file({str(h5)!r}, {str(tmp_path / 'o')!r}, RenderOptions(overlay=0.5)); "
        f"render_file({str(h5)!r}, {str(tmp_path / 'g')!r}, RenderOptions(grid=True)); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_layer_maps_get_their_own_names(h5: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    assert run(h5, "-d", out, "-q").exit_code == 0
    before = {p.name: rgb(p) for p in out.iterdir()}
    res = run(h5, "-d", out, "-q", "--layer", "features.0")
    assert res.exit_code == 0, res.output
    inputs = [f"{100 + i:05d}_{i % 3}_{(i + 1) % 3}.png" for i in range(WRITTEN)]
    layers = [f"{100 + i:05d}_{i % 3}_{(i + 1) % 3}_features.0.png" for i in range(WRITTEN)]
    assert sorted(p.name for p in out.iterdir()) == sorted(inputs + layers)
    for name in inputs:  # the input maps are still there, unchanged
        assert np.array_equal(rgb(out / name), before[name])
    layer = stored(h5, "layers/features.0")[0].sum(axis=0)
    idx = np.floor(layer / np.abs(layer).max() * 127.5 + 128).astype(int)
    assert rgb(out / layers[0])[::2, ::2].tolist() == palette("coldnhot")[idx].tolist()
    # grids too: grid.png and grid_<layer>.png side by side
    assert run(h5, "-d", out, "-q", "--grid").exit_code == 0
    assert run(h5, "-d", out, "-q", "--grid", "--layer", "features.0").exit_code == 0
    assert {"grid.png", "grid_features.0.png"} <= {p.name for p in out.iterdir()}


def test_nested_layer_name_is_made_safe_in_file_names(tmp_path: Path) -> None:
    path = write_h5(tmp_path / "out.h5")
    with h5py.File(path, "a") as f:
        f["layers/block/conv 1"] = np.ones((N, 1, H, W), dtype=np.float32)
    res = run(path, "-d", tmp_path / "o", "-q", "--layer", "block/conv 1", "--select", "0")
    assert res.exit_code == 0, res.output
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["00100_0_1_block_conv_1.png"]
    res = run(path, "-d", tmp_path / "o", "-q", "--layer", "block/conv 1", "--grid")
    assert (tmp_path / "o" / "grid_block_conv_1.png").is_file()


def _with_classes(path: Path, value: object) -> Path:
    with h5py.File(path, "a") as f:
        f.attrs["classes"] = value
    return path


def test_class_names_in_grid_labels_and_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _with_classes(write_h5(tmp_path / "out.h5"), np.array(["circle", "square", "a/b c"], dtype=object))
    with Source(path) as src:
        classes = class_names(src)
        assert classes == ["circle", "square", "a/b c"]
        assert format_template(DEFAULT_GRID_LABEL, src, 0, "--grid-label", classes) == "#100 y=circle t=square"
        assert format_template(DEFAULT_GRID_LABEL, src, 1, "--grid-label", classes) == "#101 y=square t=a/b c"
        assert format_template("{label_name}", src, 2, "--name", classes) == "a_b_c"  # safe in file names
        assert format_template("{label_name}", src, 0, "--name", ["chat noir é"]) == "chat_noir_é"
    seen: list[list[str]] = []
    real_grid = render_file.__globals__["images"].grid

    def spy(tiles: np.ndarray, labels: list[str], columns: int | None = None) -> np.ndarray:
        seen.append(list(labels))
        return real_grid(tiles, labels, columns)

    monkeypatch.setattr("lrpcli.commands.render.images.grid", spy)
    res = run(path, "-d", tmp_path / "g", "--grid", "--select", "0:3", "-q")
    assert res.exit_code == 0, res.output
    assert seen == [["#100 y=circle t=square", "#101 y=square t=a/b c", "#102 y=a/b c t=circle"]]
    res = run(path, "-d", tmp_path / "n", "-q", "--select", "0:3", "--name", "{label_name}_{row}")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "n").iterdir()) == ["a_b_c_2.png", "circle_0.png", "square_1.png"]


def test_class_names_absent_short_or_json(tmp_path: Path) -> None:
    plain = write_h5(tmp_path / "plain.h5")
    with Source(plain) as src:
        assert class_names(src) is None
        assert format_template(DEFAULT_GRID_LABEL, src, 0, "--grid-label") == "#100 y=0 t=1"
    short = _with_classes(write_h5(tmp_path / "short.h5"), np.array(["circle"], dtype=object))
    with Source(short) as src:  # a target beyond the class list keeps its number
        assert format_template(DEFAULT_GRID_LABEL, src, 0, "--grid-label", class_names(src)) == "#100 y=circle t=1"
    as_json = _with_classes(write_h5(tmp_path / "json.h5"), '["x", "y", "z"]')
    with Source(as_json) as src:
        assert class_names(src) == ["x", "y", "z"]


def _tiny(path: Path) -> Path:
    """One row, one channel, 2 x 2: relevance [[0, 2], [-4, 1]] over a known image."""
    with h5py.File(path, "w") as f:
        f.attrs["lrpcli_version"] = "0.1.0"
        f.attrs["rows_written"] = np.int64(1)
        f["attribution"] = np.array([[[[0, 2], [-4, 1]]]], dtype=np.float32)
        f["input"] = np.array([[[[10, 20], [100, 200]], [[30, 40], [50, 60]], [[70, 80], [201, 255]]]],
                              dtype=np.uint8)
        f["label"] = np.zeros(1, dtype=np.int64)
        f["target"] = np.zeros(1, dtype=np.int64)
    return path


def test_relevance_weighted_overlay_exact_pixels(tmp_path: Path) -> None:
    path = _tiny(tmp_path / "tiny.h5")
    res = run(path, "-d", tmp_path / "o", "--cmap", "bwr", "--overlay", "0.5", "--overlay-alpha", "relevance",
              "--name", "x")
    assert res.exit_code == 0, res.output
    img = rgb(tmp_path / "o" / "x.png")
    lut = palette("bwr").astype(int)
    image = np.moveaxis(stored(path, "input")[0], 0, -1).astype(int)
    # weights |R| / max|R| = [[0, .5], [1, .25]]; alpha = 0.5 * weight; heat index: 128, 191, 0, 159
    assert img[0, 0].tolist() == image[0, 0].tolist()  # zero relevance: the image pixel exactly
    assert img[1, 0].tolist() == ((lut[0] + image[1, 0] + 1) // 2).tolist()  # alpha 1/2
    assert img[0, 1].tolist() == ((lut[191] + 3 * image[0, 1] + 2) // 4).tolist()  # alpha 1/4
    assert img[1, 1].tolist() == ((lut[159] + 7 * image[1, 1] + 4) // 8).tolist()  # alpha 1/8
    assert img[1, 0].tolist() == [50, 25, 228]
    # alone it means --overlay 1: the strongest pixel is the heatmap colour, zero still the image
    res = run(path, "-d", tmp_path / "p", "--cmap", "bwr", "--overlay-alpha", "relevance", "--name", "x")
    assert res.exit_code == 0, res.output
    img = rgb(tmp_path / "p" / "x.png")
    assert img[1, 0].tolist() == lut[0].tolist() and img[0, 0].tolist() == image[0, 0].tolist()
    assert img[0, 1].tolist() == ((lut[191] + image[0, 1] + 1) // 2).tolist()
    api = render_file(path, tmp_path / "api", RenderOptions(cmap="bwr", overlay_alpha="relevance", name="x"))
    assert np.array_equal(rgb(api.files[0]), img)  # the Python API means the same
    # --level 2 saturates the weight as it saturates the colour: |R| = 2 now weighs 1
    res = run(path, "-d", tmp_path / "q", "--cmap", "bwr", "--overlay-alpha", "relevance", "--level", "2",
              "--name", "x")
    assert rgb(tmp_path / "q" / "x.png")[0, 1].tolist() == lut[255].tolist()


def test_constant_overlay_is_the_default(tmp_path: Path) -> None:
    path = _tiny(tmp_path / "tiny.h5")
    run(path, "-d", tmp_path / "o", "--cmap", "bwr", "--overlay", "0.5", "--name", "x")
    img = rgb(tmp_path / "o" / "x.png")
    image = np.moveaxis(stored(path, "input")[0], 0, -1).astype(int)
    lut = palette("bwr").astype(int)
    assert img[0, 0].tolist() == ((lut[128] + image[0, 0] + 1) // 2).tolist()


@pytest.mark.parametrize(
    ("args", "warning"),
    [
        (["--cmap", "hot"], "--cmap hot is sequential (zero at its first colour): with --norm symmetric zero "
         "relevance gets its middle colour #ff8100, a coloured background; use --norm absolute"),
        (["--cmap", "bwr", "--norm", "absolute"], "--cmap bwr is diverging (zero at its centre): with --norm "
         "absolute zero relevance gets its first colour #0000ff and both signs look alike, a coloured "
         "background; use --norm symmetric"),
        (["--cmap", "00f,80:000,f00", "--norm", "unaligned"], "--cmap 00f,80:000,f00 is diverging (zero at its "
         "centre): with --norm unaligned zero relevance gets a colour that depends on each map's min and max, "
         "a coloured background; use --norm symmetric"),
        (["--cmap", "coldnhot"], None),
        (["--cmap", "gray", "--norm", "absolute"], None),
        (["--cmap", "hot", "--norm", "unaligned"], None),
    ],
)
def test_palette_norm_mismatch_warns_once(h5: Path, tmp_path: Path, args: list[str], warning: str | None) -> None:
    res = run(h5, "-d", tmp_path / "o", "-q", *args)
    assert res.exit_code == 0, res.output
    lines = res.stderr.strip().splitlines()
    assert lines == ([f"lrpcli: warning: {warning}"] if warning else [])
