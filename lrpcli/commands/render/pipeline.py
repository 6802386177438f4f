"""The render run: file -> selected rows -> batches of heatmaps -> image files (or one grid montage).

Kept apart from the click command so the bench and tests call exactly what the CLI runs. Work is batched:
normalisation and palette lookup are vectorised over a batch of rows.
"""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.context
import os
import posixpath
import re
import string
import sys
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from lrpcli.commands.render import images, normalize, palettes, select
from lrpcli.commands.render.reader import Source
from lrpcli.errors import DataError, RunError
from lrpcli.store import ATTRIBUTION_DATASET, CLASSES_ATTR

DEFAULT_NAME = "{index:05d}_{label}_{target}"
DEFAULT_LAYER_NAME = "{index:05d}_{label}_{target}_{layer}"
DEFAULT_GRID_LABEL = "#{index} y={label_name} t={target_name}"
PARALLEL_FROM = 128
FIELDS = ("row", "index", "label", "target", "label_name", "target_name", "file", "stem", "layer")
OVERLAY_ALPHAS = ("constant", "relevance")
_UNSAFE = re.compile(r"[^\w.-]+")


@dataclass
class RenderOptions:
    """Everything ``lrpcli render`` can be told; the defaults are the CLI's."""

    cmap: str = "coldnhot"
    norm: str = "symmetric"
    level: float = 1.0
    clip: float | None = None
    overlay: float | None = None
    overlay_alpha: str = "constant"  # or "relevance": each pixel's alpha is overlay * its |R| weight
    grid: bool = False
    columns: int | None = None
    select: str | None = None
    fmt: str = "png"
    name: str | None = None  # None: DEFAULT_NAME, or DEFAULT_LAYER_NAME with a layer
    grid_label: str = DEFAULT_GRID_LABEL
    layer: str | None = None
    resample: str = "nearest"
    batch_size: int = 64
    jobs: int = 0  # worker processes; 0 = one per CPU (max 8) from PARALLEL_FROM files on
    progress: bool | None = None  # None: a bar on a terminal when there are 50 files or more


@dataclass
class RenderResult:
    """What was written: the files, how many samples they show, and where."""

    files: list[Path]
    samples: int
    out_dir: Path


def safe_name(text: str) -> str:
    """``text`` with every run of characters other than letters, digits, ``.``, ``_`` and ``-`` as one ``_``:
    a file-name part without separators, spaces or control characters."""
    return _UNSAFE.sub("_", text)


def class_names(src: Source) -> list[str] | None:
    """The root attribute ``classes`` (class names in label order) as str, or None where the file has none.

    Accepted as an array of strings (how h5py stores a list) or as a JSON list in one string.
    """
    raw = src.h5.attrs.get(CLASSES_ATTR)
    if raw is None:
        return None
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            return None
    values = np.asarray(raw, dtype=object).reshape(-1)
    names = [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in values]
    return names or None


class _Fields(Mapping):
    """The fields a ``--name`` / ``--grid-label`` template may use for one row, computed on demand.

    For file names (``for_name``) the text fields that come from the file's metadata other than the stored
    path (``layer``, the class names) are made safe with ``safe_name``.
    """

    def __init__(self, src: Source, row: int, classes: list[str] | None = None, for_name: bool = False) -> None:
        self.src, self.row, self.classes, self.for_name = src, int(row), classes, for_name

    def _class(self, value: int) -> object:
        if self.classes is None or not 0 <= value < len(self.classes):
            return value
        return safe_name(self.classes[value]) if self.for_name else self.classes[value]

    def __getitem__(self, key: str) -> object:
        if key == "row":
            return self.row
        if key == "index":
            return int(self.src.indices[self.row])
        if key == "label":
            return int(self.src.labels[self.row])
        if key == "target":
            return int(self.src.targets[self.row])
        if key == "label_name":
            return self._class(int(self.src.labels[self.row]))
        if key == "target_name":
            return self._class(int(self.src.targets[self.row]))
        if key == "file":
            return str(self.src.filenames[self.row])
        if key == "stem":
            base = posixpath.basename(str(self.src.filenames[self.row]).replace("\\", "/"))
            return posixpath.splitext(base)[0]
        if key == "layer":
            layer = self.src.layer or ATTRIBUTION_DATASET
            return safe_name(layer) if self.for_name else layer
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(FIELDS)

    def __len__(self) -> int:
        return len(FIELDS)


def format_template(
    template: str, src: Source, row: int, option: str, classes: list[str] | None = None
) -> str:
    """Fill a template for one row; a bad template is a one-line error naming the option and the fields."""
    try:
        return string.Formatter().vformat(template, (), _Fields(src, row, classes, for_name=option == "--name"))
    except KeyError as err:
        raise DataError(
            f"{option} '{template}': unknown field {err}; use {', '.join('{' + f + '}' for f in FIELDS)}"
        ) from None
    except (ValueError, IndexError, TypeError) as err:
        raise DataError(f"{option} '{template}': {err}") from None


def _file_names(src: Source, rows: np.ndarray, opts: RenderOptions) -> list[str]:
    """Relative output paths for every row; clashes and paths leaving the output folder are errors."""
    ext = "." + opts.fmt
    template = name_template(opts, src.layer)
    classes = class_names(src)
    names: list[str] = []
    seen: dict[str, int] = {}
    for row in rows:
        stem = format_template(template, src, int(row), "--name", classes)
        name = stem if stem.lower().endswith(ext) else stem + ext
        parts = name.replace("\\", "/").split("/")
        if not stem or name.startswith(("/", "\\")) or ".." in parts or any(not p for p in parts):
            raise DataError(
                f"--name '{template}': gives '{name}' for row {row}; names must stay inside -d DIR"
            )
        if name in seen:
            raise DataError(
                f"--name '{template}': rows {seen[name]} and {row} both give '{name}'; "
                "add {row} or {index}"
            )
        seen[name] = int(row)
        names.append(name)
    return names


def name_template(opts: RenderOptions, layer: str | None) -> str:
    """``--name`` as given, else the default; a layer's default adds ``{layer}`` so that its maps and the
    input maps can share a folder without overwriting each other."""
    if opts.name is not None:
        return opts.name
    return DEFAULT_NAME if layer is None else DEFAULT_LAYER_NAME


def grid_file(opts: RenderOptions) -> str:
    """``grid.FORMAT``, or ``grid_LAYER.FORMAT`` (layer name made safe) for ``--layer``."""
    return f"grid.{opts.fmt}" if opts.layer is None else f"grid_{safe_name(opts.layer)}.{opts.fmt}"


def _target_size(src: Source) -> tuple[int, int] | None:
    """Size the maps are shown at: the input image's, else the attribution's; None keeps the map's own."""
    if src.input is not None:
        return src.image_size
    att = src.h5.get(ATTRIBUTION_DATASET)
    if src.layer is not None and att is not None and getattr(att, "ndim", 0) == 4:
        return int(att.shape[2]), int(att.shape[3])
    return None


def _batches(rows: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def check_options(opts: RenderOptions) -> None:
    """Validate option values before touching the file, so errors name the option."""
    normalize.check(opts.norm, opts.level, opts.clip)
    if opts.overlay is not None and not (0.0 <= opts.overlay <= 1.0):
        raise DataError(f"--overlay {opts.overlay}: ALPHA must be in [0, 1] (the heatmap's weight)")
    if opts.overlay_alpha not in OVERLAY_ALPHAS:
        raise DataError(f"--overlay-alpha '{opts.overlay_alpha}': use one of {', '.join(OVERLAY_ALPHAS)}")
    if opts.jobs < 0:
        raise DataError(
            f"--jobs {opts.jobs}: must be >= 0 (0: one process per CPU, at most 8, from {PARALLEL_FROM} files; "
            "N >= 1: N processes)"
        )
    if opts.batch_size < 1:
        raise DataError(f"batch_size {opts.batch_size}: must be >= 1")
    if opts.fmt not in images.FORMATS:
        raise DataError(f"--format '{opts.fmt}': use one of {', '.join(images.FORMATS)}")
    if opts.columns is not None and opts.columns < 1:
        raise DataError(f"--columns {opts.columns}: must be >= 1")
    if opts.resample not in ("nearest", "bilinear"):
        raise DataError(f"--resample '{opts.resample}': use nearest or bilinear")


def render_file(path: str | os.PathLike, out_dir: str | os.PathLike, opts: RenderOptions) -> RenderResult:
    """Render the selected rows of an lrpcli HDF5 file into ``out_dir``; returns the files written."""
    check_options(opts)
    if opts.overlay is None and opts.overlay_alpha == "relevance":
        opts = replace(opts, overlay=1.0)  # the weight alone: full heatmap at the strongest pixels
    try:
        lut = palettes.palette(opts.cmap)
    except DataError as err:
        raise DataError(f"--cmap: {err}") from None
    advice = palettes.norm_mismatch(opts.cmap, opts.norm)
    if advice is not None:
        warnings.warn(f"lrpcli: {advice}", stacklevel=2)
    if opts.select is not None:
        select.parse(opts.select)  # syntax errors before opening the file

    with Source(path, layer=opts.layer) as src:
        rows = select.resolve(opts.select, src.n, src.column, source=str(src.path))
        if opts.overlay is not None and src.input is None:
            raise DataError(
                f"{src.path}: --overlay needs the stored 'input' images but the file has none "
                "(explain with output.store_input: true)"
            )
        size = _target_size(src)
        out = Path(out_dir)
        if opts.grid:
            classes = class_names(src)
            labels = [format_template(opts.grid_label, src, int(r), "--grid-label", classes) for r in rows]
            _mkdir(out)
            tiles = np.concatenate(
                [_render_batch(src, b, lut, size, opts) for b in _batches(rows, opts.batch_size)]
            )
            target = out / grid_file(opts)
            _save(images.grid(tiles, labels, opts.columns), target, opts.fmt)
            return RenderResult([target], len(rows), out)

        names = _file_names(src, rows, opts)  # template errors before anything is created
        _mkdir(out)
        for sub in sorted({Path(n).parent for n in names}):
            _subfolder(out, sub)
        files = [out / n for n in names]
        _write_all(src, rows, files, lut, size, opts)
        return RenderResult(files, len(rows), out)


def _mkdir(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"-d {folder}: cannot create the output folder ({err.strerror or err})") from None


def _subfolder(out: Path, sub: Path) -> None:
    """Create ``out/sub`` one level at a time, refusing a level that is a link or not a folder.

    Why: a link planted inside the output folder (``DIR/c0 -> /elsewhere``) would carry the images written
    under it out of DIR. ``-d DIR`` itself may be a link: the user named it.
    """
    here = out
    for part in sub.parts:
        here = here / part
        try:
            here.mkdir()
        except FileExistsError:
            pass
        except OSError as err:
            raise DataError(f"{here}: cannot create the output folder ({err.strerror or err})") from None
        if here.is_symlink() or not here.is_dir():
            what = "a symbolic link" if here.is_symlink() else "not a folder"
            raise DataError(
                f"{here}: is {what}; render writes only into real folders inside -d {out} (remove it or "
                "choose another --name)"
            )


def _render_batch(
    src: Source, rows: np.ndarray, lut: np.ndarray, size: tuple[int, int] | None, opts: RenderOptions,
    rgb: bool = True,
) -> np.ndarray:
    """Heatmaps for a batch of rows: sum channels, resize, normalise, then palette lookup and overlay.

    With ``rgb=False`` (PNG without overlay) the palette indices ``(B, H, W)`` are returned instead: they are
    saved as palette PNGs, a third of the bytes to compress and bit-identical colours once decoded.
    """
    maps = src.read_relevance(rows)
    if size is not None and maps.shape[1:] != size:
        maps = images.resize_maps(maps, size, opts.resample)
    index = normalize.to_index(maps, opts.norm, opts.level, opts.clip)
    if not rgb:
        return index
    out = images.colorize(index, lut)
    if opts.overlay is not None:
        alpha: float | np.ndarray = opts.overlay
        if opts.overlay_alpha == "relevance":
            alpha = normalize.magnitude(maps, opts.level, opts.clip) * np.float32(opts.overlay)
        out = images.overlay(out, src.read_input(rows), alpha)
    return out


def _save(image: np.ndarray, target: Path, fmt: str, lut: np.ndarray | None = None) -> None:
    try:
        images.save(image, target, fmt, lut)
    except OSError as err:
        raise RunError(f"{target}: cannot write ({err.strerror or err})") from None


def cpu_count() -> int:
    """CPUs this process may use (affinity-aware where the OS says)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


def _jobs(opts: RenderOptions, n_files: int) -> int:
    """Worker processes: ``opts.jobs`` if given, else one per CPU (at most 8) once there is enough work."""
    if opts.jobs:
        return max(1, opts.jobs)
    return min(cpu_count(), 8) if n_files >= PARALLEL_FROM else 1


def _write_batch(
    src: Source, rows: np.ndarray, files: list[Path], lut: np.ndarray, size: tuple[int, int] | None,
    opts: RenderOptions,
) -> int:
    """Render and save one batch; palette PNGs when the output is PNG without overlay."""
    indexed = opts.fmt == "png" and opts.overlay is None
    pixels = _render_batch(src, rows, lut, size, opts, rgb=not indexed)
    for k, target in enumerate(files):
        _save(pixels[k], target, opts.fmt, lut if indexed else None)
    return len(files)


_WORKER_SOURCES: dict[tuple[str, str | None], Source] = {}


def _worker(
    path: str, rows: np.ndarray, files: list[str], lut: np.ndarray, size: tuple[int, int] | None,
    opts: RenderOptions,
) -> int:
    """One batch in a worker process; the file stays open in the worker for its next batches."""
    key = (path, opts.layer)
    if key not in _WORKER_SOURCES:
        _WORKER_SOURCES[key] = Source(path, layer=opts.layer)
    return _write_batch(_WORKER_SOURCES[key], rows, [Path(f) for f in files], lut, size, opts)


def _pool_context() -> multiprocessing.context.BaseContext:
    """fork on Linux: workers inherit the imported modules (importing lrpcli again costs seconds); spawn
    elsewhere, where fork is unsafe. The parent closes its HDF5 handle before the workers start."""
    return multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")


def _write_all(
    src: Source, rows: np.ndarray, files: list[Path], lut: np.ndarray, size: tuple[int, int] | None,
    opts: RenderOptions,
) -> None:
    """Render batch by batch, one file per row, with a progress bar for long runs.

    Neither h5py reads nor Pillow's PNG encoder release the GIL, so threads would not help; many files are
    spread over worker processes, each opening the file itself and rendering whole batches.
    """
    from tqdm import tqdm

    batches = list(_batches(np.arange(len(rows)), opts.batch_size))
    jobs = min(_jobs(opts, len(files)), len(batches))
    # tqdm: disable=None means "only on a terminal"
    disable = (None if len(files) >= 50 else True) if opts.progress is None else not opts.progress
    if jobs <= 1:
        with tqdm(total=len(files), unit="img", desc="render", disable=disable, leave=False) as bar:
            for b in batches:
                bar.update(_write_batch(src, rows[b], [files[i] for i in b], lut, size, opts))
        return

    from concurrent.futures import ProcessPoolExecutor, as_completed

    path = str(src.path)
    src.close()  # no HDF5 state shared with forked workers
    with ProcessPoolExecutor(jobs, mp_context=_pool_context()) as pool:
        # submitting before the bar exists: workers are forked while this process has one thread
        futures = [
            pool.submit(_worker, path, rows[b], [str(files[i]) for i in b], lut, size, opts) for b in batches
        ]
        with tqdm(total=len(files), unit="img", desc="render", disable=disable, leave=False) as bar:
            try:
                for fut in as_completed(futures):
                    bar.update(fut.result())
            except BaseException:
                for fut in futures:
                    fut.cancel()
                raise
