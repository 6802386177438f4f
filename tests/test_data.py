"""DATA folders: layout, labels, order, conversion, preprocessing and undecodable images."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lrpcli.errors import DataError
from lrpcli.explainer.data import Batch, ImageDataset, Skipped, collate, make_loader


def save(path: Path, mode: str = "RGB", size: tuple[int, int] = (40, 30), value: int | tuple = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)
    return path


def gradient_image(path: Path, size: tuple[int, int] = (60, 40)) -> Path:
    w, h = size
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    arr[..., 1] = np.linspace(0, 255, h, dtype=np.uint8)[:, None]
    arr[..., 2] = 77
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def dataset(root: Path, **kw) -> ImageDataset:
    args = {"resize": 16, "crop": 16, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "mode": "RGB"}
    args.update(kw)
    return ImageDataset(root, **args)


# ------------------------------------------------------------------------------------------------ layout
def test_imagefolder_labels_with_empty_class_folder(tmp_path):
    save(tmp_path / "cat" / "b.png")
    save(tmp_path / "cat" / "a.jpg")
    (tmp_path / "dog").mkdir()  # empty class: still index 1
    save(tmp_path / "eel" / "x.JPEG")
    save(tmp_path / "eel" / "sub" / "y.png")  # nested images belong to their class folder
    ds = dataset(tmp_path)
    assert ds.classes == ["cat", "dog", "eel"]
    assert ds.files == ["cat/a.jpg", "cat/b.png", "eel/sub/y.png", "eel/x.JPEG"]
    assert ds.labels == [0, 0, 2, 2]
    assert len(ds) == 4
    sample = ds[3]
    assert (
        sample.label == 2 and sample.index == 3 and sample.filename == "eel/x.JPEG" and sample.error is None
    )


def test_flat_folder_labels_minus_one_and_filters(tmp_path):
    for name in ("b.webp", "a.bmp", "c.PNG"):
        save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    save(tmp_path / ".hidden.png")
    (tmp_path / ".cache").mkdir()  # hidden folders are not classes
    ds = dataset(tmp_path)
    assert ds.files == ["a.bmp", "b.webp", "c.PNG"]
    assert ds.labels == [-1, -1, -1] and ds.classes == []
    assert all(ds[i].label == -1 for i in range(3))


def test_missing_data_folder(tmp_path):
    with pytest.raises(DataError, match=r"nowhere: data folder not found"):
        dataset(tmp_path / "nowhere")


def test_empty_data_folder(tmp_path):
    with pytest.raises(DataError, match=rf"{tmp_path}: no images found"):
        dataset(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no images found or in its 2 class folders"):
        dataset(tmp_path)


def test_data_is_a_file(tmp_path):
    path = save(tmp_path / "one.png")
    with pytest.raises(DataError, match="got a file"):
        dataset(path)


def test_images_and_class_folders_mixed(tmp_path):
    save(tmp_path / "top.png")
    save(tmp_path / "cls" / "x.png")
    with pytest.raises(DataError, match="both images .* and class folders"):
        dataset(tmp_path)


# ---------------------------------------------------------------------------------------- preprocessing
def test_resize_crop_and_normalise(tmp_path):
    gradient_image(tmp_path / "g.png", size=(60, 40))
    ds = dataset(tmp_path, resize=20, crop=16)
    s = ds[0]
    assert s.image.dtype == torch.uint8 and s.image.shape == (3, 16, 16)
    assert s.input.dtype == torch.float32 and s.input.shape == (3, 16, 16)
    assert torch.allclose(s.input, (s.image.float() / 255 - 0.5) / 0.25)
    assert (s.image[2] == 77).all()
    # the same as torchvision's tensor transforms: resize shorter side (bilinear, antialias), center crop
    from torchvision.transforms.v2 import functional as F

    ref = F.pil_to_tensor(Image.open(tmp_path / "g.png").convert("RGB"))
    ref = F.center_crop(F.resize(ref, [20], antialias=True), [16, 16])
    assert torch.equal(s.image, ref)


def test_no_resize_no_crop_keeps_size(tmp_path):
    save(tmp_path / "a.png", size=(40, 30))
    s = dataset(tmp_path, resize=None, crop=None)[0]
    assert s.image.shape == (3, 30, 40)


def test_gray_and_rgba_to_rgb(tmp_path):
    save(tmp_path / "gray.png", mode="L", value=200)
    save(tmp_path / "rgba.png", mode="RGBA", value=(10, 20, 30, 0))
    save(tmp_path / "pal.png", mode="P", value=3)
    ds = dataset(tmp_path)
    gray = ds.files.index("gray.png")
    rgba = ds.files.index("rgba.png")
    assert ds[gray].image.shape == (3, 16, 16) and (ds[gray].image == 200).all()
    assert ds[rgba].image.shape == (3, 16, 16)
    assert ds[rgba].image[:, 0, 0].tolist() == [10, 20, 30]
    assert ds[ds.files.index("pal.png")].image.shape == (3, 16, 16)


def test_rgb_and_16bit_to_gray(tmp_path):
    save(tmp_path / "rgb.png", mode="RGB", value=(255, 255, 255))
    arr = np.full((20, 20), 65535 // 2, dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "deep.png")
    ds = dataset(tmp_path, mode="L", mean=[0.5], std=[0.5])
    white = ds[ds.files.index("rgb.png")]
    assert white.image.shape == (1, 16, 16) and (white.image == 255).all()
    assert torch.allclose(white.input, torch.ones(1, 16, 16))
    deep = ds[ds.files.index("deep.png")].image
    assert deep.shape == (1, 16, 16) and 120 <= int(deep[0, 0, 0]) <= 135  # scaled, not clipped to 255


def test_bad_mean_length(tmp_path):
    save(tmp_path / "a.png")
    with pytest.raises(ValueError, match="need 1 values for mode L"):
        ImageDataset(tmp_path, resize=8, crop=8, mean=[0.5] * 3, std=[0.5] * 3, mode="L")


# ------------------------------------------------------------------------------------ broken images
def test_undecodable_image_is_skipped_and_reported(tmp_path):
    save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"\x89PNG garbage, not an image at all")
    save(tmp_path / "c.png")
    ds = dataset(tmp_path)
    bad = ds[1]
    assert bad.error is not None and bad.filename == "b.png" and bad.input is None
    batch, skipped = collate([ds[i] for i in range(3)])
    assert isinstance(batch, Batch) and len(batch) == 2
    assert batch.filenames == ["a.png", "c.png"] and batch.indices.tolist() == [0, 2]
    assert skipped == [Skipped("b.png", bad.error)]
    assert "UnidentifiedImageError" in skipped[0].reason or "cannot identify" in skipped[0].reason


def test_truncated_image_is_skipped(tmp_path):
    path = gradient_image(tmp_path / "t.png")
    path.write_bytes(path.read_bytes()[:60])
    save(tmp_path / "u.png")
    out = list(make_loader(dataset(tmp_path), batch_size=4, num_workers=0, device="cpu"))
    assert len(out) == 1
    batch, skipped = out[0]
    assert batch.filenames == ["u.png"] and [s.filename for s in skipped] == ["t.png"]


def test_batch_of_only_broken_images(tmp_path):
    (tmp_path / "x.png").write_bytes(b"nope")
    batch, skipped = collate([dataset(tmp_path)[0]])
    assert len(batch) == 0 and batch.inputs.numel() == 0 and len(skipped) == 1


def test_different_sizes_without_crop_is_a_data_error(tmp_path):
    save(tmp_path / "a.png", size=(40, 30))
    save(tmp_path / "b.png", size=(30, 40))
    ds = dataset(tmp_path, resize=None, crop=None)
    with pytest.raises(DataError, match="set input.crop"):
        collate([ds[0], ds[1]])


# ------------------------------------------------------------------------------------------- loader
def make_flat(tmp_path: Path, n: int) -> ImageDataset:
    for i in range(n):
        save(tmp_path / f"img{i:02d}.png", value=(i * 10, 0, 0))
    return dataset(tmp_path)


def test_loader_order_start_stop(tmp_path):
    ds = make_flat(tmp_path, 7)
    batches = list(make_loader(ds, batch_size=3, num_workers=0, device="cpu", start=2, stop=6))
    assert [b.batch.indices.tolist() for b in batches] == [[2, 3, 4], [5]]
    assert batches[0].batch.filenames == ["img02.png", "img03.png", "img04.png"]
    assert batches[0].batch.images[:, 0, 0, 0].tolist() == [20, 30, 40]
    assert batches[0].batch.labels.dtype == torch.int64
    assert batches[0].skipped == []
    assert len(list(make_loader(ds, batch_size=3, num_workers=0, device="cpu", start=7))) == 0
    everything = list(make_loader(ds, batch_size=4, num_workers=0, device="cpu", stop=100))
    assert sum(len(b.batch) for b in everything) == 7


def test_loader_with_workers_keeps_order(tmp_path):
    ds = make_flat(tmp_path, 5)
    loader = make_loader(ds, batch_size=2, num_workers=2, device="cpu")
    assert loader.pin_memory is False and loader.persistent_workers is False
    assert [b.batch.indices.tolist() for b in loader] == [[0, 1], [2, 3], [4]]


def test_loader_pins_memory_for_cuda(tmp_path):
    ds = make_flat(tmp_path, 2)
    assert make_loader(ds, batch_size=2, device="cuda").pin_memory is True
    assert make_loader(ds, batch_size=2, device=torch.device("cuda", 0)).pin_memory is True
    if torch.cuda.is_available():
        batch, skipped = next(iter(make_loader(ds, batch_size=2, num_workers=0, device="cuda")))
        assert batch.inputs.is_pinned() and isinstance(skipped, list)
        assert batch.to("cuda").inputs.device.type == "cuda"


def test_dataset_from_config_input_section(tmp_path):
    from lrpcli.explainer.build import load_config

    (tmp_path / "c.yaml").write_text("model: {name: resnet18}\ninput: {resize: 20, crop: 12, mode: L}\n")
    config = load_config(tmp_path / "c.yaml")
    save(tmp_path / "data" / "a.png")
    ds = ImageDataset(tmp_path / "data", **config.input)
    assert ds[0].input.shape == (1, 12, 12)


# -------------------------------------------------------------------------------------------------- prefetch
def test_prefetch_keeps_order_and_reads_ahead_in_a_thread(tmp_path):
    import threading

    from lrpcli.explainer.data import prefetch

    ds = make_flat(tmp_path, 7)
    loader = make_loader(ds, batch_size=3, num_workers=0, device="cpu")
    direct = [b.batch.indices.tolist() for b in loader]
    assert [b.batch.indices.tolist() for b in prefetch(loader)] == direct == [[0, 1, 2], [3, 4, 5], [6]]

    produced: list[tuple[int, str]] = []

    def items():
        for i in range(5):
            produced.append((i, threading.current_thread().name))
            yield i

    it = prefetch(items(), depth=2)
    assert next(it) == 0
    deadline = time.monotonic() + 5
    # item 0 taken, items 1 and 2 wait in the queue, item 3 waits for a free slot; no further
    while len(produced) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    assert [i for i, _ in produced] == [0, 1, 2, 3] and {name for _, name in produced} == {"lrpcli-reader"}
    assert list(it) == [1, 2, 3, 4]


def test_prefetch_raises_the_producers_error_in_place():
    from lrpcli.explainer.data import prefetch

    def items():
        yield 1
        yield 2
        raise DataError("boom at 3")

    got = []
    with pytest.raises(DataError, match="boom at 3"):
        for item in prefetch(items()):
            got.append(item)
    assert got == [1, 2]
    with pytest.raises(ValueError, match="depth: expected an integer >= 1, got 0"):
        prefetch([1], depth=0)


def _endless(produced: list[int]):
    """0, 1, 2, ... forever, noting each item as it is produced."""
    i = 0
    while True:
        produced.append(i)
        yield i
        i += 1


def test_prefetch_closed_early_stops_its_thread():
    import threading

    from lrpcli.explainer.data import prefetch

    produced: list[int] = []
    before = set(threading.enumerate())
    it = prefetch(_endless(produced), depth=1)
    assert [next(it), next(it)] == [0, 1]
    started = [t for t in threading.enumerate() if t not in before and t.name == "lrpcli-reader"]
    assert len(started) == 1 and started[0].is_alive()
    it.close()
    assert not started[0].is_alive()
    assert len(produced) <= 4  # two taken, one in the queue, one being offered when closed


def test_prefetch_reads_before_the_first_next_and_closes_unstarted():
    """The reader starts at once (the runner creates it before the model loads), and close() stops it also when
    no item was ever taken."""
    import threading

    from lrpcli.explainer.data import prefetch

    produced: list[int] = []
    before = set(threading.enumerate())
    it = prefetch(_endless(produced), depth=2)
    deadline = time.monotonic() + 5
    while len(produced) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert produced[:3] == [0, 1, 2]  # two queued, the third waiting for a slot, before any next()
    started = [t for t in threading.enumerate() if t not in before and t.name == "lrpcli-reader"]
    assert len(started) == 1
    it.close()
    assert not started[0].is_alive() and len(produced) <= 4
    with pytest.raises(StopIteration):
        next(it)


# ------------------------------------------------------------------ what is not an image: rules of the scan
def warned(record) -> list[str]:
    return [str(w.message) for w in record if str(w.message).startswith("lrpcli: ")]


def test_fifo_socket_and_device_named_like_images_are_skipped_with_one_warning_each(tmp_path):
    import socket

    save(tmp_path / "cls" / "a.png")
    os.mkfifo(tmp_path / "cls" / "x.png")
    os.mkfifo(tmp_path / "cls" / "pipe")  # not named like an image: ignored like notes.txt
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "cls" / "s.jpg"))
    (tmp_path / "cls" / "null.png").symlink_to("/dev/null")
    try:
        with pytest.warns(UserWarning) as record:
            ds = dataset(tmp_path)
    finally:
        sock.close()
    assert ds.files == ["cls/a.png"]
    assert warned(record) == [
        f"lrpcli: {tmp_path}/cls/null.png: a character device, not a regular file, skipped",
        f"lrpcli: {tmp_path}/cls/s.jpg: a socket, not a regular file, skipped",
        f"lrpcli: {tmp_path}/cls/x.png: a FIFO, not a regular file, skipped",
    ]


def test_fifo_in_a_flat_folder_is_skipped_and_one_put_in_place_later_does_not_block(tmp_path):
    save(tmp_path / "a.png")
    save(tmp_path / "b.png")
    os.mkfifo(tmp_path / "c.png")
    with pytest.warns(UserWarning, match=r"c\.png: a FIFO, not a regular file, skipped"):
        ds = dataset(tmp_path)
    assert ds.files == ["a.png", "b.png"] and ds.labels == [-1, -1]
    (tmp_path / "b.png").unlink()
    os.mkfifo(tmp_path / "b.png")  # swapped after the scan: the reader must not wait for a writer
    start = time.monotonic()
    sample = ds[1]
    assert time.monotonic() - start < 5
    assert sample.input is None and sample.error == "OSError: a FIFO, not a regular file"


def test_directory_link_loop_is_not_followed(tmp_path):
    save(tmp_path / "cls" / "a.png")
    (tmp_path / "cls" / "loop").symlink_to("..")  # cls/loop/cls/loop/... without the rule
    (tmp_path / "cls" / "self").symlink_to(".")
    with pytest.warns(UserWarning) as record:
        ds = dataset(tmp_path)
    assert ds.files == ["cls/a.png"] and ds.classes == ["cls"]
    assert warned(record) == [
        f"lrpcli: {tmp_path}/cls/loop: link to the folder '..', not followed (links to folders never are; "
        "mirror a folder from elsewhere with file links: cp -rs SRC DATA/)",
        f"lrpcli: {tmp_path}/cls/self: link to the folder '.', not followed (links to folders never are; "
        "mirror a folder from elsewhere with file links: cp -rs SRC DATA/)",
    ]


def test_directory_links_out_of_data_are_not_followed_and_class_links_keep_the_labels(tmp_path):
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    save(elsewhere / "e.png")
    save(data / "a_cls" / "x.png")
    save(data / "c_cls" / "y.png")
    (data / "a_cls" / "more").symlink_to(elsewhere)  # nested link out of DATA
    (data / "b_cls").symlink_to(elsewhere)  # a class folder that is a link: counts, has no images
    with pytest.warns(UserWarning) as record:
        ds = dataset(data)
    assert ds.classes == ["a_cls", "b_cls", "c_cls"]
    assert ds.files == ["a_cls/x.png", "c_cls/y.png"] and ds.labels == [0, 2]
    assert [m.split(": link to the folder")[0] for m in warned(record)] == [
        f"lrpcli: {data}/b_cls", f"lrpcli: {data}/a_cls/more"]  # the top level is listed first


def test_file_links_are_followed_wherever_they_point_and_named_by_the_link(tmp_path):
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    gradient_image(elsewhere / "photo.png")
    save(data / "cls" / "a.png")
    (data / "cls" / "linked.png").symlink_to(elsewhere / "photo.png")  # outside DATA: followed
    (data / "cls" / "twice.png").symlink_to("a.png")  # inside DATA: one more row, under the link's name
    (data / "cls" / "gone.png").symlink_to(elsewhere / "missing.png")
    with pytest.warns(UserWarning) as record:
        ds = dataset(data)
    assert ds.files == ["cls/a.png", "cls/linked.png", "cls/twice.png"]
    assert torch.equal(ds[1].image, ds.load(elsewhere / "photo.png"))
    assert warned(record) == [
        f"lrpcli: {data}/cls/gone.png: link to '{elsewhere}/missing.png' that cannot be read "
        "(No such file or directory), skipped"
    ]


def _scandir_denied(monkeypatch, *denied: Path) -> None:
    """os.scandir raising PermissionError for ``denied`` (tests run as root, where chmod 000 still reads)."""
    real = os.scandir

    def scandir(path="."):
        if Path(path) in denied:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)


def test_unreadable_class_folder_is_named_and_keeps_its_index(tmp_path, monkeypatch):
    save(tmp_path / "a" / "x.png")
    save(tmp_path / "b" / "y.png")
    save(tmp_path / "c" / "sub" / "z.png")
    save(tmp_path / "c" / "w.png")
    _scandir_denied(monkeypatch, tmp_path / "b", tmp_path / "c" / "sub")
    with pytest.warns(UserWarning) as record:
        ds = dataset(tmp_path)
    assert ds.classes == ["a", "b", "c"]
    assert ds.files == ["a/x.png", "c/w.png"] and ds.labels == [0, 2]
    assert warned(record) == [
        f"lrpcli: {tmp_path}/b: cannot read the folder (Permission denied), its images are left out",
        f"lrpcli: {tmp_path}/c/sub: cannot read the folder (Permission denied), its images are left out",
    ]


def test_every_class_folder_unreadable_is_an_error_after_the_warnings(tmp_path, monkeypatch):
    save(tmp_path / "a" / "x.png")
    save(tmp_path / "b" / "y.png")
    _scandir_denied(monkeypatch, tmp_path / "a", tmp_path / "b")
    with pytest.warns(UserWarning) as record, pytest.raises(DataError, match="no images found or in its 2 class"):
        dataset(tmp_path)
    assert len(warned(record)) == 2
    _scandir_denied(monkeypatch, tmp_path)
    with pytest.raises(DataError, match=rf"^{tmp_path}: cannot list the data folder: Permission denied$"):
        dataset(tmp_path)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads chmod 000 folders")
def test_chmod_000_class_folder_is_named(tmp_path):
    save(tmp_path / "a" / "x.png")
    save(tmp_path / "b" / "y.png")
    (tmp_path / "b").chmod(0)
    try:
        with pytest.warns(UserWarning, match=rf"{tmp_path}/b: cannot read the folder \(Permission denied\)"):
            ds = dataset(tmp_path)
    finally:
        (tmp_path / "b").chmod(0o755)
    assert ds.files == ["a/x.png"] and ds.labels == [0]


def test_explain_warns_one_line_each_and_writes_only_the_real_image(tmp_path):
    """The command line end to end: a FIFO and a folder loop next to one image give one row, two warnings."""
    from click.testing import CliRunner

    from lrpcli.cli import main
    from lrpcli.store import open_results

    data = tmp_path / "data"
    save(data / "cls" / "a.png", size=(70, 70))
    os.mkfifo(data / "cls" / "x.png")
    (data / "cls" / "loop").symlink_to(data)
    config = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    result = CliRunner().invoke(main, ["explain", str(config), str(data), "-o", str(tmp_path / "o.h5"), "-q"])
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == [
        f"lrpcli: warning: {data}/cls/loop: link to the folder '{data}', not followed (links to folders never "
        "are; mirror a folder from elsewhere with file links: cp -rs SRC DATA/)",
        f"lrpcli: warning: {data}/cls/x.png: a FIFO, not a regular file, skipped",
    ]
    assert list(open_results(tmp_path / "o.h5").filename) == ["cls/a.png"]


# ---------------------------------------------------------------------------- make demo / make clean
REPO = Path(__file__).resolve().parents[1]


def _make_lines(target: str) -> list[list[str]]:
    """The commands ``make TARGET`` would run (``make -n``, the venv taken as installed), split like a shell."""
    import shlex
    import subprocess

    out = subprocess.run(["make", "-s", "-n", "-o", ".venv/.installed", target], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout
    return [shlex.split(line) for line in out.splitlines() if line.strip()]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_demo_keeps_overlays_and_plain_maps_apart_and_make_clean_removes_it_all(tmp_path, monkeypatch):
    """The demo's lrpcli lines run in an empty folder (on 3 images instead of 64; evaluate's shipped masks fit
    only the shipped images, so it is left to tests/test_evaluate_cli.py): overlays, plain maps, the analysis and
    the ViRelAy project are all there afterwards, and the rm of ``make clean`` leaves the folder empty again."""
    import subprocess

    from click.testing import CliRunner

    from lrpcli.cli import main

    data = tmp_path / "data"
    for i in range(3):
        gradient_image(data / "cls" / f"{i}.png", size=(70 + i, 70))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for argv in _make_lines("demo"):
        tool = Path(argv[0]).name
        if tool == "rm":
            for path in argv[2:]:
                shutil.rmtree(path, ignore_errors=True)
        elif tool == "lrpcli" and argv[1] != "evaluate":
            args = [str(data) if a == "share/demo/images" else str(REPO / a) if a.endswith(".yaml") else a
                    for a in argv[1:]]
            result = CliRunner().invoke(main, args)
            assert result.exit_code == 0, (argv, result.output)
    made = sorted(p.relative_to(work).as_posix() for p in work.rglob("*") if p.is_file())
    names = ["00000_0_0.png", "00001_0_0.png", "00002_0_0.png"]
    project = sorted(p.relative_to(work).as_posix() for p in (work / "demo_virelay").iterdir())
    assert "demo_virelay/demo.yaml" in project
    assert made == sorted(["demo.h5", "demo_analysis.h5", "demo_vit.h5", "demo_heatmaps/grid.png",
                           *(f"demo_heatmaps/overlay/{n}" for n in names), *(f"demo_heatmaps/plain/{n}" for n in names),
                           *project])
    assert Image.open(work / "demo_heatmaps/plain" / names[0]).mode == "P"  # a palette map
    assert Image.open(work / "demo_heatmaps/overlay" / names[0]).mode == "RGB"  # over the input image
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *made], cwd=REPO, capture_output=True, text=True)
    assert ignored.stdout.split() == made
    (clean,) = _make_lines("clean")
    assert clean[:2] == ["rm", "-rf"]
    for path in clean[2:]:
        shutil.rmtree(path, ignore_errors=True) if Path(path).is_dir() else Path(path).unlink(missing_ok=True)
    assert list(work.iterdir()) == []
