"""The HDF5 result file: one file per run, written batch by batch, safe to kill at any moment.

Layout (DESIGN.md section 3; also a ViRelAy attribution file): ``attribution``, ``prediction``, ``label``,
``target``, ``index``, ``filename``, ``input``, ``conservation/*``, ``layers/<name>`` and ``skipped/*``, plus
root attributes ``classes``, ``config``, ``config_dir``, ``model_fingerprint``, ``lrpcli_version``,
``torch_version``, ``created``, ``complete``, ``rows_written`` (and the bookkeeping attributes ``n_rows`` and
``skipped_written``). ``config`` is the run's config with absolute ``model.entrypoint``/``model.weights`` paths
(:func:`file_config`), so :meth:`Results.load_model` rebuilds the model from the file alone.

Crash safety rests on these rules, because a plain HDF5 file killed mid-write is not guaranteed to open:

1. Creation is atomic: the whole file (every dataset at its full size, every chunk already allocated) is
   built as ``<path>.partial``, flushed, fsync'ed and renamed onto ``<path>``. A kill during creation leaves
   no ``<path>`` (and a stale ``.partial`` that the next ``create`` removes); an existing file given with
   ``overwrite`` is only replaced once the new one is complete.
2. Nothing that a finished row depends on is ever changed again. Chunks are allocated at creation time
   (``H5D_ALLOC_TIME_EARLY``), so appending only updates chunk-index entries in place and never splits a
   B-tree node; compressed chunks hold exactly one row (a row is written once), and chunks holding several
   rows are uncompressed and rewritten in place with their finished rows unchanged.
3. ``rows_written`` (with ``skipped_written``) is the commit record: it is raised only after the batch's data
   and metadata have been flushed, then flushed itself. Readers take only the first ``rows_written`` rows.
4. The file format is kept at the HDF5 1.8 level (``libver=('earliest', 'v108')``): the 1.10 superblock
   carries a "file is open for writing" flag that a killed writer leaves set, after which neither h5py nor
   ViRelAy can open the file without ``h5clear``. The 1.8 format has no such flag.

5. A resume first repairs what a kill can leave past the commit record (see ``_cover_eof`` and
   ``_forget_unfinished_strings``): the superblock's end-of-allocation is raised over the whole file, and
   the string slots of unfinished rows are zeroed, so rewriting those rows never frees space twice.
6. A failed write (disk full, size limit, I/O error) ends like a kill after the last commit: the space a
   commit's flush writes to is reserved first (``_reserve``), so the flush cannot fail half-way through a
   structure that committed rows share (the file-name heap), and after a failure HDF5 is closed without
   writing anything more (``_abandon``). The tests fill "the disk" with RLIMIT_FSIZE.

The crash tests (tests/test_store.py) SIGKILL a writer at random moments, also while it creates the file and
while it closes it, and check after each kill that plain h5py opens the file with its committed rows intact
and that resuming gives the same file as an uninterrupted run.

A flush hands the data to the operating system, which is what survives a killed process; ``create`` and
``close`` also fsync, but a power cut in the middle of a run may still lose the last batches.

This module needs numpy, h5py and PyYAML only (no torch), so files can be read anywhere; only
:meth:`Results.load_model` and :meth:`Results.inputs` import torch (through ``lrpcli.models`` and ``lrpcli.data``).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import yaml

from .. import __version__
from ..config import Config, resolve_path
from ..errors import DataError, RunError

__all__ = ["ATTRIBUTION_DATASET", "CLASSES_ATTR", "COMPRESSIONS", "CONSERVATION_ROWS", "IGNORED_CONFIG_KEYS",
           "INPUT_DATASET", "LAYERS_GROUP", "ROW_DATASETS", "ResultWriter", "Results", "check_sources",
           "choose_compression", "config_differences", "config_yaml", "file_config", "missing_sources", "open_error",
           "open_results", "pays_to_compress", "read_classes", "row_datasets", "row_datasets_of", "write_classes"]

#: Config keys that do not change the numbers in the file: a resume may change them freely.
IGNORED_CONFIG_KEYS = frozenset({"run.num_workers", "run.batch_size", "output.path", "run.device", "run.threads",
                                 "output.compression"})

#: Compression of the per-sample chunks. lzf measured 3-4x faster than gzip level 1 on float32 relevance
#: maps (and 1.2x on sparse ones) at a similar ratio; h5py (hence ViRelAy) always ships the lzf filter.
COMPRESSION = "lzf"
#: ``output.compression`` values: ``auto`` compresses a dataset only where its first rows shrink by MIN_SAVING
COMPRESSIONS = ("auto", "lzf", "none")
MIN_SAVING = 0.1
_PROBE_ROWS = 4

PARTIAL_SUFFIX = ".partial"
_LIBVER = ("earliest", "v108")
_MULTI_ROW_CHUNK_BYTES = 64 * 1024  # target size of the uncompressed chunks of the small per-row datasets
_SKIPPED_CHUNK = 1024
_STR = h5py.string_dtype("utf-8")
_DTYPES = {"float32": np.float32, "float16": np.float16}


# The file format's per-row datasets, in one place: the writer, open_results, the render reader
# (lrpcli.render.reader) and the shard merge (lrpcli.distributed) all take the names from here.
#: The relevance at the input, N x C x H x W
ATTRIBUTION_DATASET = "attribution"
#: Datasets with one row per sample that every result file has
ROW_DATASETS = (ATTRIBUTION_DATASET, "prediction", "label", "target", "index", "filename")
#: The stored input images, one row per sample, where the run kept them (``output.store_input``)
INPUT_DATASET = "input"
#: Per-sample conservation sums, one row per sample
CONSERVATION_ROWS = ("conservation/relevance_in", "conservation/relevance_out", "conservation/output_relevance")
#: The group holding one per-sample dataset per stored layer (``layers/<module name>``)
LAYERS_GROUP = "layers"


def row_datasets(store_input: bool, layer_names: Iterable[str]) -> list[str]:
    """Every dataset with one row per sample, for a file with or without inputs and with these layers."""
    names = list(ROW_DATASETS)
    if store_input:
        names.append(INPUT_DATASET)
    names += CONSERVATION_ROWS
    names += [f"{LAYERS_GROUP}/{name}" for name in layer_names]
    return names


def row_datasets_of(f: h5py.File) -> list[str]:
    """The datasets with one row per sample that the open result file ``f`` holds."""
    return row_datasets(INPUT_DATASET in f, list(f[LAYERS_GROUP]) if LAYERS_GROUP in f else [])


def _clean_str(text: str) -> str:
    """File names with undecodable bytes (surrogate escapes) cannot be utf-8; keep them readable instead."""
    return str(text).encode("utf-8", "backslashreplace").decode("utf-8")


#: The root attribute holding the class names, in label order
CLASSES_ATTR = "classes"


def write_classes(attrs: h5py.AttributeManager, classes: Sequence[str]) -> None:
    """The class names as the root attribute ``classes``: an array of variable-length utf-8 strings.

    An array (not a JSON string) is what h5py and ViRelAy read as a list; an empty array is a flat DATA folder
    (every label -1), which is different from a file without the attribute (class names unknown).
    """
    names = np.array([_clean_str(c) for c in classes], dtype=object)
    attrs.create(CLASSES_ATTR, names, shape=(len(names),), dtype=_STR)


def read_classes(attrs: Mapping[str, Any]) -> list[str] | None:
    """The class names of a file's root attributes, in label order; None where the file has none."""
    raw = attrs.get(CLASSES_ATTR)
    if raw is None:
        return None
    return [_attr_str(v) for v in np.asarray(raw, dtype=object).reshape(-1).tolist()]


def _absolute(value: str, base_dir: str | os.PathLike) -> str | None:
    """``value`` as an absolute, resolved path when it names an existing file (as the model loader finds it)."""
    found = resolve_path(value, base_dir)
    return str(found.resolve()) if found is not None else None


def file_config(config: Config) -> dict[str, Any]:
    """The config as a result file stores it: ``config.to_dict()`` with absolute model file paths.

    ``model.entrypoint`` (``path/to/file.py:function``) and ``model.weights`` (a file) are looked up as the
    model loader does (the config file's folder first, then the current one) and written as absolute paths,
    so that the model can be rebuilt from the file alone, from any folder. Module entrypoints
    (``pkg.module:function``), torchvision weight names and paths that name no file stay as written. A resume
    compares this form, so the same config given from another working folder is the same config.
    """
    out = config.to_dict()
    model = out.get("model")
    if not isinstance(model, dict):
        return out
    base_dir = Path(config.base_dir)
    entry = model.get("entrypoint")
    if isinstance(entry, str) and ":" in entry:
        target, _, fn = entry.rpartition(":")
        if target.endswith(".py") or "/" in target or "\\" in target:
            found = _absolute(target, base_dir)
            if found is not None:
                model["entrypoint"] = f"{found}:{fn}"
    weights = model.get("weights")
    if isinstance(weights, str):
        model["weights"] = _absolute(weights, base_dir) or weights
    return out


def config_yaml(config: Mapping[str, Any]) -> str:
    """A stored config's YAML text (the layout of ``Config.to_yaml``)."""
    return yaml.safe_dump(dict(config), sort_keys=False, default_flow_style=None, allow_unicode=True)


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(f: h5py.File) -> None:
    try:
        os.fsync(f.id.get_vfd_handle())
    except (OSError, ValueError, TypeError):
        pass


def _being_written(path: str) -> bool:
    """True if another process holds HDF5's exclusive lock on ``path`` (a run writing it right now)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
    return False


LOCK_SUFFIX = ".lock"


class _creation_lock:  # noqa: N801 - used like a function: ``with _creation_lock(path):``
    """An exclusive, non-blocking ``flock`` on ``<path>.lock`` while one process creates ``path``.

    Creation removes a stale ``.partial`` and renames its own onto ``path``; two runs doing that at the same
    moment would remove each other's work and both fail. Under this lock one creates and opens the file (and
    so holds HDF5's own lock on it); the other is refused with one line. The lock file is removed while still
    locked; the kernel drops the lock of a killed process, so a leftover ``.lock`` file blocks nothing.
    """

    def __init__(self, path: str) -> None:
        self.path = path + LOCK_SUFFIX
        self.fd: int | None = None

    def __enter__(self) -> None:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not on POSIX: no lock
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:  # an unwritable folder: create() reports it
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise DataError(
                f"output {self.path[: -len(LOCK_SUFFIX)]} is being written by another process (it is creating "
                "it right now); wait for it or choose another -o"
            ) from None
        self.fd = fd

    def __exit__(self, *exc: object) -> None:
        if self.fd is None:
            return
        try:
            os.remove(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


def _why(err: BaseException) -> str:
    """The useful part of an OSError or h5py error message, on one line: for HDF5's own wording ("Unable to
    synchronously create file (unable to open file: name = ..., errno = 2, error message = 'No such file or
    directory', flags = 13, ...)") the system's message only."""
    text = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
    text = " ".join(str(text or type(err).__name__).split())
    system = re.search(r"error message = '([^']+)'", text)
    return system.group(1) if system else text


def _new_dataset(
    group: h5py.Group, name: str, n_rows: int, row_shape: tuple[int, ...], dtype: Any, compressed: bool,
    per_row: bool | None = None,
) -> h5py.Dataset:
    """A per-row dataset with every chunk allocated now, so appends never restructure the chunk index.

    ``per_row`` (default: ``compressed``) gives one chunk per row; else small rows share a chunk of about 64 KiB.
    Compressed float data goes through HDF5's shuffle filter first (exponent bytes together: smaller and
    faster with lzf)."""
    row_shape = tuple(int(s) for s in row_shape)
    itemsize = np.dtype(dtype).itemsize if dtype is not _STR else 16
    if compressed if per_row is None else per_row:
        rows_per_chunk = 1
    else:
        row_bytes = max(1, itemsize * math.prod(row_shape))
        rows_per_chunk = max(1, min(4096, _MULTI_ROW_CHUNK_BYTES // row_bytes))
    chunks = (rows_per_chunk,) + tuple(max(1, s) for s in row_shape)
    maxshape = (None,) + tuple(None if s == 0 else s for s in row_shape)
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    return group.create_dataset(
        name,
        shape=(n_rows,) + row_shape,
        maxshape=maxshape,
        dtype=dtype,
        chunks=chunks,
        compression=COMPRESSION if compressed else None,
        shuffle=bool(compressed and itemsize > 1),
        dcpl=dcpl,
        track_times=False,
    )


def pays_to_compress(rows: np.ndarray, min_saving: float = MIN_SAVING) -> bool:
    """True when the first few rows shrink by at least ``min_saving`` under the file's filters.

    For ``output.compression: auto``: dense float relevance maps and noisy images often do not compress at all
    (lzf measured 1.00 of the raw size on the demo's maps and inputs), and trying costs as much CPU time as a
    quarter of the demo's attribution; exact zeros, smooth images and float16 maps do compress.
    """
    sample = np.ascontiguousarray(rows[:_PROBE_ROWS])
    if sample.size == 0:
        return True
    # an in-memory file (HDF5's core driver, nothing on disk): a Python file object would hold the GIL for
    # every block HDF5 writes, stalling the attribution thread
    with h5py.File(f"lrpcli-probe-{id(sample)}", "w", driver="core", backing_store=False) as f:
        dset = f.create_dataset("probe", data=sample, chunks=(1,) + sample.shape[1:], compression=COMPRESSION,
                                shuffle=sample.dtype.itemsize > 1)
        stored = dset.id.get_storage_size()
    return stored <= (1.0 - min_saving) * sample.nbytes


def choose_compression(mode: str, first_rows: Mapping[str, np.ndarray]) -> dict[str, bool]:
    """Which per-sample datasets to compress: all (``lzf``), none (``none``), or each where it pays (``auto``,
    judged on the first batch's rows)."""
    if mode not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {', '.join(COMPRESSIONS)}, got {mode!r}")
    if mode == "auto":
        return {name: pays_to_compress(rows) for name, rows in first_rows.items()}
    return dict.fromkeys(first_rows, mode == "lzf")


class ResultWriter:
    """Writes one run's results, batch by batch; ``rows_written`` rows are final after every ``append``.

    Obtain one with :meth:`create` (new file) or :meth:`resume` (continue a killed or failed run). Skipped
    images given to :meth:`add_skipped` are committed together with the next ``append`` (or ``close``), so
    after a kill ``rows_written + n_skipped`` is the number of samples fully handled, when the runner
    reports samples in data set order.
    """

    def __init__(self, path: str, f: h5py.File) -> None:
        """Internal: use :meth:`create` or :meth:`resume`."""
        self.path = path
        self._f = f
        attrs = f.attrs
        self.n_rows = int(attrs["n_rows"])
        self._rows = int(attrs["rows_written"])
        self._n_skipped = int(attrs.get("skipped_written", 0))
        self._complete = bool(attrs["complete"])
        self._pending_skipped: list[tuple[str, str]] = []
        self._closed = False
        self.store_input = INPUT_DATASET in f
        self.layer_names = list(f[LAYERS_GROUP]) if LAYERS_GROUP in f else []
        self._names = row_datasets(self.store_input, self.layer_names)
        self._dsets = {name: f[name] for name in self._names}
        self.attribution_dtype = self._dsets["attribution"].dtype
        self.num_outputs = int(self._dsets["prediction"].shape[1])
        self.num_layers = int(f["conservation/layer"].shape[0])
        self._skip_f = f["skipped/filename"]
        self._skip_r = f["skipped/reason"]

    # ------------------------------------------------------------------ opening
    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        *,
        config: dict,
        config_yaml: str,
        n_rows: int,
        num_outputs: int,
        sample_shape: tuple[int, int, int],
        layers: list[str],
        rules: list[str],
        dtype: str = "float32",
        store_input: bool = True,
        overwrite: bool = False,
        extra_layers: dict[str, tuple[int, ...]] | None = None,
        torch_version: str = "",
        compressed: Mapping[str, bool] | None = None,
        classes: Sequence[str] | None = None,
        config_dir: str | os.PathLike | None = None,
        attrs: Mapping[str, Any] | None = None,
    ) -> ResultWriter:
        """Create the result file for ``n_rows`` samples, atomically (see the module docstring).

        ``config`` is the run's config as stored (:func:`file_config`) and ``config_yaml`` its text;
        ``classes`` (the data set's class names in label order, ``[]`` for a flat folder) and ``config_dir``
        (the config file's folder) become the root attributes of the same names; None leaves them out.
        ``attrs`` are further root attributes (a shard's place in its run, the model fingerprint), written inside
        the atomic creation so a kill can never leave a file without them.

        ``compressed``: per-sample datasets (``attribution``, ``prediction``, ``input``, ``layers/<name>``) to
        store uncompressed (False) or compressed (True, the default for names not given); see
        :func:`choose_compression`. Either way they are chunked one row per chunk.

        Refuses an existing ``path`` unless ``overwrite``, and checks that the directory is writable before
        any work, so a bad ``-o`` fails in a second with one line and leaves nothing behind.
        """
        path = os.fspath(path)
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        if len(layers) != len(rules):
            raise ValueError(f"{len(layers)} conservation layers but {len(rules)} rules")
        extra_layers = dict(extra_layers or {})
        for name in extra_layers:
            if not name or "/" in name:
                raise ValueError(f"layer name {name!r} cannot be an HDF5 dataset name")
        n_rows = int(n_rows)
        if n_rows < 0 or num_outputs < 1 or len(sample_shape) != 3:
            raise ValueError(
                f"bad sizes: n_rows={n_rows}, num_outputs={num_outputs}, sample_shape={sample_shape}"
            )

        if os.path.isdir(path):
            raise DataError(
                f"output {path} is a directory; give a file name such as {os.path.join(path, 'out.h5')}"
            )
        with _creation_lock(path):  # two runs started together on one -o: the first to get here wins
            return cls._create_locked(path, overwrite, dict(
                config_yaml=config_yaml, n_rows=n_rows, num_outputs=int(num_outputs),
                sample_shape=tuple(int(s) for s in sample_shape), layers=list(layers), rules=list(rules),
                dtype=_DTYPES[dtype], store_input=store_input, extra_layers=extra_layers,
                torch_version=torch_version, compressed=dict(compressed or {}),
                classes=None if classes is None else list(classes),
                config_dir=None if config_dir is None else os.fspath(config_dir), attrs=dict(attrs or {})))

    @classmethod
    def _create_locked(cls, path: str, overwrite: bool, build: dict[str, Any]) -> ResultWriter:
        """``create`` under the creation lock: the existence checks, the ``.partial`` file and its rename."""
        if os.path.lexists(path):
            if _being_written(path):
                raise DataError(
                    f"output {path} is being written by another process; stop it or choose another -o"
                )
            if not overwrite:
                raise DataError(
                    f"output {path} already exists; pass --resume to continue that run "
                    "or --overwrite to replace it"
                )
        directory = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as err:
            raise DataError(
                f"cannot create the output directory {directory} for {path}: {_why(err)}"
            ) from None
        if not os.access(directory, os.W_OK | os.X_OK):
            raise DataError(
                f"cannot write {path}: the directory {directory} is not writable; choose another -o/--output"
            )

        partial = path + PARTIAL_SUFFIX
        try:
            if os.path.lexists(partial):  # left by a run killed while creating; it is ours
                os.remove(partial)
            with h5py.File(partial, "w", libver=_LIBVER) as f:
                cls._build(f, **build)
                f.flush()
                _fsync_file(f)
            os.replace(partial, path)
            _fsync_dir(directory)
        except BaseException as err:
            try:
                os.remove(partial)
            except OSError:
                pass
            if isinstance(err, _WRITE_ERRORS):  # h5py says "disk full" as OSError, RuntimeError or ValueError
                raise DataError(f"cannot write {path}: {_why(err)}") from None
            raise
        return cls._open_for_append(path, just_created=True)

    @staticmethod
    def _build(
        f: h5py.File,
        *,
        config_yaml: str,
        n_rows: int,
        num_outputs: int,
        sample_shape: tuple[int, ...],
        layers: list[str],
        rules: list[str],
        dtype: Any,
        store_input: bool,
        extra_layers: dict[str, tuple[int, ...]],
        torch_version: str,
        compressed: Mapping[str, bool] | None = None,
        classes: Sequence[str] | None = None,
        config_dir: str | None = None,
        attrs: Mapping[str, Any] | None = None,
    ) -> None:
        """Every dataset at full size, every chunk allocated, every attribute present (rule 1 and 2)."""
        f.attrs["config"] = config_yaml
        for name, value in (attrs or {}).items():
            f.attrs[name] = np.int64(value) if isinstance(value, int) and not isinstance(value, bool) else value
        if config_dir is not None:
            f.attrs["config_dir"] = _clean_str(config_dir)
        if classes is not None:
            write_classes(f.attrs, classes)
        f.attrs["lrpcli_version"] = __version__
        f.attrs["torch_version"] = str(torch_version)
        f.attrs["created"] = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
        f.attrs["n_rows"] = np.int64(n_rows)
        f.attrs["complete"] = np.bool_(False)
        # the commit record: two neighbouring attributes, rewritten in place after each flushed batch
        f.attrs["rows_written"] = np.int64(0)
        f.attrs["skipped_written"] = np.int64(0)

        n_layers = len(layers)
        packed = dict(compressed or {})

        def per_sample(group: h5py.Group, name: str, shape: tuple[int, ...], dt: Any, path: str = "") -> None:
            _new_dataset(group, name, n_rows, shape, dt, compressed=packed.get(path or name, True), per_row=True)

        per_sample(f, "attribution", sample_shape, dtype)
        per_sample(f, "prediction", (num_outputs,), np.float32)
        _new_dataset(f, "label", n_rows, (), np.int64, compressed=False)
        _new_dataset(f, "target", n_rows, (), np.int64, compressed=False)
        _new_dataset(f, "index", n_rows, (), np.uint32, compressed=False)
        _new_dataset(f, "filename", n_rows, (), _STR, compressed=False)
        if store_input:
            per_sample(f, "input", sample_shape, np.uint8)
        cons = f.create_group("conservation")
        cons.create_dataset("layer", data=np.array([_clean_str(s) for s in layers], dtype=object), dtype=_STR)
        cons.create_dataset("rule", data=np.array([_clean_str(s) for s in rules], dtype=object), dtype=_STR)
        _new_dataset(cons, "relevance_in", n_rows, (n_layers,), np.float64, compressed=False)
        _new_dataset(cons, "relevance_out", n_rows, (n_layers,), np.float64, compressed=False)
        _new_dataset(cons, "output_relevance", n_rows, (), np.float64, compressed=False)
        grp = f.create_group("layers")
        for name, shape in extra_layers.items():
            per_sample(grp, name, tuple(shape), dtype, f"layers/{name}")
        skipped = f.create_group("skipped")
        for name in ("filename", "reason"):
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
            # room for every sample to fail, allocated now so that recording a skip moves nothing
            skipped.create_dataset(
                name,
                shape=(n_rows,),
                maxshape=(None,),
                dtype=_STR,
                chunks=(_SKIPPED_CHUNK,),
                dcpl=dcpl,
                track_times=False,
            )

    @classmethod
    def resume(cls, path: str | os.PathLike, *, config: dict) -> ResultWriter:
        """Reopen a run's file to continue it after ``rows_written`` rows; refuses a different config.

        Only keys that change the results are compared (not :data:`IGNORED_CONFIG_KEYS`), and the error names
        every differing key, so the user can see at once whether ``--overwrite`` is what they want.
        """
        path = os.fspath(path)
        if not os.path.lexists(path):
            raise DataError(f"cannot resume: {path} does not exist; run without --resume to start it")
        f = _open_h5(path, "r")
        try:
            stored = _check_lrpcli(f, path)
        finally:
            f.close()
        differences = config_differences(stored, config)
        if differences:
            raise DataError(
                f"cannot resume {path}: it was written with a different config ("
                + "; ".join(differences)
                + "); use --overwrite to start again"
            )
        return cls._open_for_append(path, after_crash=True)

    @classmethod
    def _open_for_append(cls, path: str, after_crash: bool = False, just_created: bool = False) -> ResultWriter:
        if after_crash:
            if _being_written(path):
                raise DataError(f"{path} is being written by another process; wait for it or stop it")
            _cover_eof(path)
        f = _open_h5(path, "r+")
        try:
            if not just_created:  # a file made by _build a moment ago needs no check (parsing its config: ms)
                _check_lrpcli(f, path)
            writer = cls(path, f)
            if after_crash and not writer._complete:
                writer._forget_unfinished_strings()
                writer._restore_sizes()
        except BaseException:
            f.close()
            raise
        return writer

    def _forget_unfinished_strings(self) -> None:
        """Zero the string slots after the commit record before anything is written again.

        A killed run may have left heap references there that point at space it never got to declare (past
        the file's end-of-allocation); HDF5 frees the old string of a slot it overwrites, and freeing those
        would fail or, worse, hand out space twice. Zeroed slots are empty strings and free nothing.
        """
        for dset, start in (
            (self._dsets["filename"], self._rows),
            (self._skip_f, self._n_skipped),
            (self._skip_r, self._n_skipped),
        ):
            _zero_tail(dset, start)
        self._f.flush()

    def _restore_sizes(self) -> None:
        """A kill inside ``close(complete=True)`` may have left datasets shrunk; give them back their rows."""
        changed = False
        for dset in self._dsets.values():
            if dset.shape[0] < self.n_rows:
                dset.resize(self.n_rows, axis=0)
                changed = True
        for dset in (self._skip_f, self._skip_r):
            if dset.shape[0] < max(self.n_rows, self._n_skipped):
                dset.resize(max(self.n_rows, self._n_skipped), axis=0)
                changed = True
        if changed:
            self._f.flush()

    # ------------------------------------------------------------------ state
    @property
    def rows_written(self) -> int:
        """Rows that are final: a kill from now on keeps them."""
        return self._rows

    @property
    def complete(self) -> bool:
        """True once the run was closed with ``complete=True``."""
        return self._complete

    @property
    def n_skipped(self) -> int:
        """Skipped images already committed (pending ones are written with the next append or close)."""
        return self._n_skipped

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """Committed skipped images as (filename, reason)."""
        n = self._n_skipped
        if n == 0:
            return []
        return list(zip(self._skip_f.asstr()[:n].tolist(), self._skip_r.asstr()[:n].tolist()))

    def committed_index(self) -> np.ndarray:
        """The ``index`` (data set position) of each final row, e.g. to find where a resumed run continues."""
        return self._dsets["index"][: self._rows]

    # ------------------------------------------------------------------ writing
    def add_skipped(self, filename: str, reason: str) -> None:
        """Record an image that could not be used; committed with the next ``append`` or ``close(True)``.

        Report skips in data set order, before the ``append`` of the rows that follow them: then after any
        kill, ``rows_written + n_skipped`` samples from the start of the data set are done.
        """
        self._check_open()
        self._pending_skipped.append((_clean_str(filename), " ".join(_clean_str(reason).split())))

    def append(
        self,
        *,
        attribution: np.ndarray,
        prediction: np.ndarray,
        label: np.ndarray,
        target: np.ndarray,
        index: np.ndarray,
        filename: Sequence[str],
        input: np.ndarray | None = None,
        relevance_in: np.ndarray,
        relevance_out: np.ndarray,
        output_relevance: np.ndarray,
        layers: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """Write one batch of B rows after the final ones, then make them final (flush, commit, flush).

        When this returns, a kill at any later moment keeps these rows; a kill during it keeps the rows
        that were final before it.
        """
        self._check_open()
        if self._complete:
            raise ValueError(f"{self.path} is complete; nothing more can be appended")
        b = len(filename)
        start, stop = self._rows, self._rows + b
        if stop > self.n_rows:
            raise ValueError(
                f"{self.path} was created for {self.n_rows} rows; cannot write rows {start}:{stop}"
            )
        layers = dict(layers or {})
        if set(layers) != set(self.layer_names):
            raise ValueError(f"layers given {sorted(layers)}, file has {self.layer_names}")
        if self.store_input and input is None:
            raise ValueError("this file stores inputs (store_input=True) but append() got input=None")
        values: dict[str, Any] = {
            "attribution": attribution,
            "prediction": prediction,
            "label": label,
            "target": target,
            "index": index,
            "conservation/relevance_in": relevance_in,
            "conservation/relevance_out": relevance_out,
            "conservation/output_relevance": output_relevance,
        }
        if self.store_input:
            values["input"] = input
        values.update({f"layers/{k}": v for k, v in layers.items()})
        arrays = {}
        for name, value in values.items():
            dset = self._dsets[name]
            arr = np.ascontiguousarray(value, dtype=dset.dtype)
            if arr.shape != (b,) + dset.shape[1:]:
                raise ValueError(f"{name}: expected shape {(b,) + dset.shape[1:]}, got {arr.shape}")
            arrays[name] = arr
        names = np.array([_clean_str(s) for s in filename], dtype=object)
        if b == 0 and not self._pending_skipped:
            return
        try:
            if b:
                for name, arr in arrays.items():
                    self._dsets[name][start:stop] = arr
                self._dsets["filename"][start:stop] = names
            n_skipped = self._write_pending_skipped()
            self._commit(stop, n_skipped)
        except _WRITE_ERRORS as err:
            raise self._failed(err, "writing") from None

    def _write_pending_skipped(self) -> int:
        pending = self._pending_skipped
        start = self._n_skipped
        if not pending:
            return start
        stop = start + len(pending)
        if stop > self._skip_f.shape[0]:  # more failures than samples announced: grow (rare)
            size = max(stop, 2 * self._skip_f.shape[0], _SKIPPED_CHUNK)
            self._skip_f.resize(size, axis=0)
            self._skip_r.resize(size, axis=0)
        self._skip_f[start:stop] = np.array([p[0] for p in pending], dtype=object)
        self._skip_r[start:stop] = np.array([p[1] for p in pending], dtype=object)
        return stop

    def _commit(self, rows: int, n_skipped: int) -> None:
        """Rule 3: data first, on disk; only then the counters that declare it final."""
        f = self._f
        _reserve(f, list(self._dsets.values()))
        f.flush()
        f.attrs.modify("rows_written", np.int64(rows))
        f.attrs.modify("skipped_written", np.int64(n_skipped))
        f.flush()
        self._rows = rows
        self._n_skipped = n_skipped
        self._pending_skipped = []

    def close(self, complete: bool) -> None:
        """Mark the run complete (or not) and close the file; a second call does nothing.

        ``complete=True`` commits the pending skips (the images after the last row) and trims the datasets
        to ``rows_written`` rows (fewer than ``n_rows`` when images were skipped), so that h5py and ViRelAy
        see exactly the rows that exist. ``complete=False`` (a failed or interrupted run) drops the pending
        skips: they may sit between rows that were never written, and the resumed run meets them again.
        """
        if self._closed:
            return
        f = self._f
        try:
            if not self._complete:
                if not complete:
                    self._pending_skipped = []
                n_skipped = self._write_pending_skipped()
                self._commit(self._rows, n_skipped)
                if complete:
                    for dset in self._dsets.values():
                        if dset.shape[0] != self._rows:
                            dset.resize(self._rows, axis=0)
                    for dset in (self._skip_f, self._skip_r):
                        if dset.shape[0] != self._n_skipped:
                            dset.resize(self._n_skipped, axis=0)
                    _reserve(f, list(self._dsets.values()))
                    f.flush()
                    f.attrs.modify("complete", np.bool_(True))
                    f.flush()
                    self._complete = True
            _fsync_file(f)
        except _WRITE_ERRORS as err:
            raise self._failed(err, "closing") from None
        finally:
            if not self._closed:
                self._closed = True
                f.close()

    def _failed(self, err: BaseException, doing: str) -> RunError:
        """After a failed write (disk full, file too large, I/O error): stop like a kill, and say so.

        HDF5 keeps what it could not write in memory and would try again when the file is closed, writing
        part of it (a shared string heap that grew, but not the superblock that declares the growth): that
        once made committed file names unreadable by plain h5py. So the handle is closed without writing
        anything more, and the superblock's end of allocation is made to cover what the file holds; the file
        is then what a kill after the last commit leaves, which the crash tests check.
        """
        self._closed = True
        self._dsets, self._skip_f, self._skip_r = {}, None, None
        _abandon(self._f, self.path)
        what = "run again with --resume to continue" if doing == "writing" else "run again with --resume to finish it"
        return RunError(
            f"{doing} {self.path} failed ({_why(err)}); its first {self._rows} rows are saved and readable; "
            f"free space (or fix the cause) and {what}"
        )

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"the result writer for {self.path} is closed")

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        """Leaving the block without ``close(True)`` keeps the file resumable (``complete`` stays false)."""
        self.close(complete=False)


# ---------------------------------------------------------------------- crash repair
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
#: What h5py raises for a failed write: OSError, or RuntimeError/ValueError carrying HDF5's "errno = 28"
_WRITE_ERRORS = (OSError, RuntimeError, ValueError)


def _reserve(f: h5py.File, datasets: Sequence[h5py.Dataset] = ()) -> None:
    """Before a flush: give the file all the disk space HDF5 has allocated in memory (its end of allocation).

    Compressed chunks get their final place only when written, so the ``datasets`` with filters are flushed
    first (a failure there touches nothing committed: new chunks go to new space). The file flush then
    overwrites space the file already owns, so a full disk or a size limit fails here, before HDF5 has
    written a part of the batch's metadata (such as a string heap shared with committed rows), instead of
    in the middle of the flush. Where the file system cannot preallocate, the flush goes ahead as before.
    """
    for dset in datasets:
        if dset.compression is not None:
            dset.id.flush()
    try:
        fd = f.id.get_vfd_handle()
        need = int(f.id.get_filesize())  # max(end of file, end of allocation), as HDF5 sees them
        have = os.fstat(fd).st_size
    except (OSError, ValueError, TypeError):
        return
    if need > have and hasattr(os, "posix_fallocate"):  # not on macOS or Windows
        try:
            os.posix_fallocate(fd, have, need - have)
        except OSError as err:
            if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise


def _abandon(f: h5py.File, path: str) -> None:
    """Close ``f`` after a failed write without letting HDF5 write anything more, then repair the superblock.

    HDF5 flushes on close; its file descriptor is first pointed at an anonymous in-memory file, so that the
    flush succeeds (HDF5 then releases the file cleanly) and writes nothing to ``path``. ``_cover_eof`` then
    makes the end of allocation cover everything HDF5 had allocated (extending the file sparsely where a
    partial write left it shorter), so every structure the committed rows use lies inside it.
    """
    try:
        allocated = int(f.id.get_filesize())
    except (OSError, ValueError, TypeError, RuntimeError):
        allocated = 0
    try:
        fd = f.id.get_vfd_handle()
        sink = os.memfd_create("lrpcli-abandoned") if hasattr(os, "memfd_create") else os.open(path, os.O_RDONLY)
        try:
            os.dup2(sink, fd)
        finally:
            os.close(sink)
    except (OSError, ValueError, TypeError, RuntimeError):
        pass
    with _no_size_limit():  # a size limit (RLIMIT_FSIZE) applies to the in-memory file too
        try:
            f.close()
        except Exception:  # noqa: BLE001 - best effort: the output is not written either way
            pass
    try:
        _cover_eof(path, at_least=allocated, margin=0)
    except OSError:
        pass


@contextlib.contextmanager
def _no_size_limit() -> Iterator[None]:
    """Lift this process's soft file size limit to its hard limit for a moment, if it has one.

    HDF5 closes a file by flushing at the file's own offsets; a close that fails leaves the HDF5 file half
    closed, and h5py retries it when the handle is garbage-collected, which can crash the interpreter."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft == hard:
        yield
        return
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def _cover_eof(path: str, at_least: int = 0, margin: int = 1 << 20) -> None:
    """``h5clear --increment`` for our own files: make the end-of-allocation cover everything in the file.

    The superblock's end-of-allocation (EOA) is written last in each flush, so a kill can leave data past it
    that the killed run had allocated: chunks and strings of rows after the commit record. Reopened as is,
    HDF5 would allocate that space anew while the unfinished rows still point into it, and rewriting those
    rows frees their old space, possibly past the EOA. Raising the EOA to past the file's end (plus 1 MiB,
    as h5clear does) makes all of it ordinary allocated space. Only the 1.8-format superblock (version 0 or
    1, no checksum) that this module writes is touched; anything else is left alone.

    After a failed write (``_abandon``), ``at_least`` is HDF5's own end of allocation, which a write that
    failed part-way may have left beyond the end of the file; the file is extended (sparsely) to cover it.
    """
    with open(path, "r+b") as fh:
        head = fh.read(64)
        if len(head) < 56 or head[:8] != _HDF5_SIGNATURE or head[8] not in (0, 1) or head[13] != 8:
            return
        pos = 40 if head[8] == 0 else 44  # v1 adds 4 bytes (indexed storage K) before the addresses
        base = int.from_bytes(head[pos - 16 : pos - 8], "little")
        eoa = int.from_bytes(head[pos : pos + 8], "little")
        size = os.fstat(fh.fileno()).st_size
        if size < base + eoa:  # a write that failed part-way: HDF5 refuses a file shorter than its EOA
            fh.truncate(base + eoa)
            size = base + eoa
        eof = max(size, at_least)
        if base + eoa >= eof:
            return
        new_end = -(-eof // 4096) * 4096 + margin
        fh.truncate(new_end)  # HDF5 refuses an EOA past the end of the file
        fh.seek(pos)
        fh.write((new_end - base).to_bytes(8, "little"))
        fh.flush()
        os.fsync(fh.fileno())


def _zero_tail(dset: h5py.Dataset, start: int) -> None:
    """Set the raw bytes of rows ``start:`` of an uncompressed 1-D dataset to zero, without HDF5's type
    conversion (which would read and free the heap objects they refer to)."""
    rows = dset.chunks[0]
    for first in range((start // rows) * rows, dset.shape[0], rows):
        info = dset.id.get_chunk_info_by_coord((first,))
        if info.byte_offset is None:
            continue
        mask, raw = dset.id.read_direct_chunk((first,))
        lo = max(0, start - first) * (len(raw) // rows)  # on disk a string is 16 bytes; H5Tget_size says 8
        if raw[lo:].strip(b"\0"):
            dset.id.write_direct_chunk((first,), raw[:lo] + bytes(len(raw) - lo), mask)


# ---------------------------------------------------------------------- reading
def _open_h5(path: str, mode: str) -> h5py.File:
    """Open with h5py, turning its errors into one line that says what is wrong with the file."""
    # HDF5's default file locking: a file that a run is writing cannot be opened elsewhere (and one process
    # cannot open a file twice with different locking settings, so there is no reason to deviate)
    kwargs: dict[str, Any] = {} if mode == "r" else {"libver": _LIBVER}
    try:
        return h5py.File(path, mode, **kwargs)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except PermissionError:
        raise DataError(f"{path}: permission denied") from None
    except OSError as err:
        raise DataError(open_error(path, err)) from None


#: HDF5's wording for a file whose structure is broken (a copy cut short, a damaged disk), as whole words
_DAMAGED = re.compile(r"\b(truncated file|bad (superblock|object header|heap|symbol table|b-tree)\w*|"
                      r"wrong (b-tree|heap) signature|addr overflow|address of object past end of allocation)\b")


def open_error(path: str | os.PathLike, err: OSError) -> str:
    """One line saying why HDF5 could not open ``path``: locked by a writer, not HDF5, or damaged.

    The lock is told by its errno (EAGAIN/EWOULDBLOCK) or HDF5's whole phrase "unable to lock file", never by
    a substring: HDF5's message for a truncated file mentions ``sblock->base_addr``.
    """
    text = _why(err)
    low = " ".join(str(err).split()).lower()  # HDF5's whole wording, for telling the cases apart
    if getattr(err, "errno", None) in (errno.EAGAIN, errno.EWOULDBLOCK) or re.search(r"\bunable to lock file\b", low):
        return f"{path} is being written by another process (HDF5 file lock); wait for it or choose another -o"
    if re.search(r"\b(file signature not found|not an hdf5 file)\b", low):
        return f"{path} is not an HDF5 file"
    truncated = re.search(r"\btruncated file: eof = (\d+),.*?stored_eof = (\d+)", low)
    if truncated:
        return (f"{path} is truncated or damaged: it has {truncated.group(1)} bytes but its HDF5 header says "
                f"{truncated.group(2)} (a copy cut short?); copy it again, or start the run again with --overwrite")
    if _DAMAGED.search(low):
        return f"{path} is a damaged HDF5 file ({text}); copy it again, or start the run again with --overwrite"
    return f"{path} cannot be opened as an HDF5 file ({text})"


_REQUIRED = (
    *ROW_DATASETS,
    "conservation/layer",
    "conservation/rule",
    *CONSERVATION_ROWS,
    "skipped/filename",
    "skipped/reason",
)
_REQUIRED_ATTRS = ("lrpcli_version", "config", "rows_written", "n_rows", "complete")


def missing_sources(f: h5py.File, path: str | os.PathLike) -> list[str]:
    """Source files of ``f``'s virtual datasets that do not exist (as HDF5 looks for them: a relative name
    next to ``path``), in the order first used. HDF5 reads a missing source as fill values (zeros, empty
    file names) without an error, so a virtual merge whose shards were moved away would look complete."""
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    prefix = os.environ.get("HDF5_VDS_PREFIX", "")
    missing: list[str] = []

    def check(name: str, obj: Any) -> None:
        if not (isinstance(obj, h5py.Dataset) and obj.is_virtual):
            return
        for source in obj.virtual_sources():
            file_name = source.file_name
            if file_name == "." or file_name in missing:
                continue
            candidates = [file_name] if os.path.isabs(file_name) else [os.path.join(folder, file_name)]
            if prefix and not os.path.isabs(file_name):
                candidates.append(os.path.join(prefix.replace("${ORIGIN}", folder), file_name))
            if not any(os.path.isfile(c) for c in candidates):
                missing.append(file_name)

    f.visititems(check)
    return missing


def check_sources(f: h5py.File, path: str | os.PathLike) -> None:
    """Refuse a virtual file (``lrpcli merge --virtual``) whose shard files are gone, naming them."""
    missing = missing_sources(f, path)
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        folder = os.path.dirname(os.path.abspath(os.fspath(path)))
        raise DataError(
            f"{path} is a virtual file over shard files that are missing: {shown} (looked for in {folder}); "
            "keep the shards next to it, or merge them into a real file with lrpcli merge"
        )


def _check_lrpcli(f: h5py.File, path: str) -> dict:
    """Refuse an HDF5 file that lrpcli did not write, or a virtual one with missing shards; return its config."""
    if "lrpcli_version" not in f.attrs:
        raise DataError(
            f"{path} is an HDF5 file but not an lrpcli result file (no 'lrpcli_version' attribute)"
        )
    missing = [a for a in _REQUIRED_ATTRS if a not in f.attrs] + [d for d in _REQUIRED if d not in f]
    if missing:
        raise DataError(f"{path} is not a complete lrpcli result file: missing {', '.join(missing)}")
    check_sources(f, path)
    try:
        config = yaml.safe_load(_attr_str(f.attrs["config"])) or {}
    except yaml.YAMLError as err:
        raise DataError(
            f"{path}: its 'config' attribute is not valid YAML ({' '.join(str(err).split())})"
        ) from None
    if not isinstance(config, dict):
        raise DataError(f"{path}: its 'config' attribute is not a YAML mapping")
    return config


def _attr_str(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _plain(value: Any) -> Any:
    """Attribute values as plain Python (str, int, float, bool, lists) for ``Results.attrs``."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value


class Results:
    """The first ``rows_written`` rows of a result file, as numpy arrays read when first used.

    Usable plainly or as a context manager (``with open_results(p) as r:``). The big arrays
    (``attribution``, ``input``, ``layers``) are read on first access, all of them; use :meth:`read` for a
    subset of rows of a large file.
    """

    def __init__(self, path: str, f: h5py.File, config: dict) -> None:
        """Internal: use :func:`open_results`."""
        self.path = path
        self._f: h5py.File | None = f
        self._cache: dict[str, Any] = {}
        self.config = config
        self.attrs = {k: _plain(v) for k, v in f.attrs.items()}
        self.rows_written = int(self.attrs["rows_written"])
        self.complete = bool(self.attrs["complete"])
        self.skipped_written = int(self.attrs.get("skipped_written", 0))

    def __len__(self) -> int:
        return self.rows_written

    def _file(self) -> h5py.File:
        if self._f is None:
            raise ValueError(f"results of {self.path} are closed; read what you need inside the with-block")
        return self._f

    def read(self, name: str, rows: slice | Sequence[int] | np.ndarray | int = slice(None)) -> np.ndarray:
        """Rows of one dataset (e.g. ``'attribution'``, ``'conservation/relevance_in'``, ``'layers/x'``).

        ``rows`` counts from 0 to ``rows_written``: a slice, an int, or integer indices in any order. Data
        stored as float16 (``output.dtype: float16``) is returned as float32.
        """
        dset = self._file()[name]
        n = self.rows_written
        if isinstance(rows, slice):
            start, stop, step = rows.indices(n)
            if step == 1:
                data = dset[start:stop] if stop > start else dset[0:0]
            else:
                idx = np.arange(start, stop, step)
                data = self._take(dset, idx)
        elif np.ndim(rows) == 0:
            i = int(rows)
            if not -n <= i < n:
                raise IndexError(f"row {i} out of range: {self.path} has {n} final rows")
            data = dset[i % n]
        else:
            idx = np.asarray(rows, dtype=np.int64)
            if idx.size and (idx.min() < -n or idx.max() >= n):
                raise IndexError(f"rows out of range: {self.path} has {n} final rows")
            data = self._take(dset, idx % max(n, 1))
        if h5py.check_string_dtype(dset.dtype) is not None:
            data = np.asarray(data, dtype=object)
            return np.vectorize(_attr_str, otypes=[object])(data) if data.size else data
        if data.dtype == np.float16:  # float16 is a storage format: sums and logs of it overflow or underflow
            return data.astype(np.float32)
        return data

    @staticmethod
    def _take(dset: h5py.Dataset, idx: np.ndarray) -> np.ndarray:
        if idx.size == 0:
            return dset[0:0]
        order, inverse = np.unique(idx, return_inverse=True)
        return dset[order][inverse]  # h5py wants increasing, unique indices

    def _rows_of(self, name: str) -> np.ndarray:
        if name not in self._cache:
            self._cache[name] = self.read(name)
        return self._cache[name]

    @property
    def attribution(self) -> np.ndarray:
        """float32, N x C x H x W: relevance at the input (upcast when stored as float16)."""
        return self._rows_of("attribution")

    @property
    def prediction(self) -> np.ndarray:
        """float32, N x K: model outputs."""
        return self._rows_of("prediction")

    @property
    def label(self) -> np.ndarray:
        """int64, N: data set label, -1 where none."""
        return self._rows_of("label")

    @property
    def target(self) -> np.ndarray:
        """int64, N: the output index explained."""
        return self._rows_of("target")

    @property
    def index(self) -> np.ndarray:
        """uint32, N: position of each row in the data set."""
        return self._rows_of("index")

    @property
    def filename(self) -> list[str]:
        """Path of each row's image, relative to DATA."""
        return list(self._rows_of("filename"))

    @property
    def input(self) -> np.ndarray | None:
        """uint8, N x C x H x W: the preprocessed, un-normalised image; None if the run did not store it."""
        if INPUT_DATASET not in self._cache and INPUT_DATASET not in self._file():
            return None
        return self._rows_of(INPUT_DATASET)

    @property
    def conservation(self) -> dict[str, Any]:
        """'layer', 'rule' (lists of str) and 'relevance_in', 'relevance_out', 'output_relevance' arrays."""
        if "conservation" not in self._cache:
            f = self._file()
            self._cache["conservation"] = {
                "layer": f["conservation/layer"].asstr()[()].tolist(),
                "rule": f["conservation/rule"].asstr()[()].tolist(),
                "relevance_in": self._rows_of("conservation/relevance_in"),
                "relevance_out": self._rows_of("conservation/relevance_out"),
                "output_relevance": self._rows_of("conservation/output_relevance"),
            }
        return self._cache["conservation"]

    @property
    def layers(self) -> dict[str, np.ndarray]:
        """Per-layer relevance maps stored with the run, by module name."""
        if "layers" not in self._cache:
            f = self._file()
            names = list(f[LAYERS_GROUP]) if LAYERS_GROUP in f else []
            self._cache["layers"] = {name: self._rows_of(f"{LAYERS_GROUP}/{name}") for name in names}
        return self._cache["layers"]

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """Images that could not be used, as (filename, reason)."""
        if "skipped" not in self._cache:
            f, n = self._file(), self.skipped_written
            if n == 0:
                self._cache["skipped"] = []
            else:
                self._cache["skipped"] = list(
                    zip(f["skipped/filename"].asstr()[:n].tolist(), f["skipped/reason"].asstr()[:n].tolist())
                )
        return self._cache["skipped"]

    @property
    def classes(self) -> list[str] | None:
        """The data set's class names in label order (``label`` ``i`` is ``classes[i]``, empty folders included);
        ``[]`` for a flat folder (every label -1); None for a file without the attribute."""
        return read_classes(self.attrs)

    @property
    def config_dir(self) -> str | None:
        """The folder of the run's config file (where relative model paths were looked up); None if unknown."""
        value = self.attrs.get("config_dir")
        return None if value is None else str(value)

    def inputs(self, normalised: bool = True, rows: slice | Sequence[int] | np.ndarray | int = slice(None)) -> Any:
        """The stored ``input`` rows as a float32 torch tensor: the tensors the run explained.

        ``normalised=True`` applies the config's ``input.mean``/``input.std`` exactly as the run did
        (``(x / 255 - mean) / std``); ``normalised=False`` gives the images scaled to [0, 1]. ``rows`` as in
        :meth:`read`. A file written without ``output.store_input`` raises DataError. Imports torch.
        """
        from ..data import to_model_input  # lazy: the store stays importable without torch

        if INPUT_DATASET not in self._cache and INPUT_DATASET not in self._file():
            raise DataError(f"{self.path} has no 'input' dataset (the run had output.store_input: false), so the "
                            "inputs cannot be restored; rerun with output.store_input: true")
        images = self.read(INPUT_DATASET, rows) if INPUT_DATASET not in self._cache else self.input[rows]
        if not normalised:
            return to_model_input(images)
        section = self.config.get("input")
        mean, std = (section.get(key) if isinstance(section, dict) else None for key in ("mean", "std"))
        if not isinstance(mean, list) or not isinstance(std, list):
            raise DataError(f"{self.path}: its stored config has no input.mean/input.std to normalise with; "
                            "use inputs(normalised=False)")
        return to_model_input(images, [float(v) for v in mean], [float(v) for v in std])

    def load_model(self, device: Any = "cpu") -> Any:
        """The run's model, rebuilt from the stored config: weights loaded, eval mode, on ``device``.

        The stored config holds absolute model file paths and the file keeps the config's folder, so this
        works from any working folder (as long as the model files are still where the run found them). A file
        with a ``model_fingerprint`` is checked against the rebuilt model, and a different model (a changed
        weights file, another model.py) raises DataError: its attributions would not be this model's.
        Imports torch.
        """
        from ..models import load_model, model_fingerprint  # lazy: the store stays importable without torch

        base_dir = self.config_dir
        config = Config(self.config, source=f"{self.path} (stored config)", base_dir=base_dir or ".")
        seed = (self.config.get("run") or {}).get("seed", 0)
        model = load_model(config["model"], base_dir, seed=int(seed))
        stored = self.attrs.get("model_fingerprint")
        if stored is not None:
            now = model_fingerprint(model)
            if now != stored:
                raise DataError(f"{self.path}: the model built from its stored config is not the one that wrote "
                                f"it (parameters and buffers differ: {str(stored)[:19]}... in the file, {now[:19]}... "
                                "now); were model.weights or the model file changed since the run?")
        return model.to(device)

    def load(self) -> Results:
        """Read every array now (so they stay usable after ``close``); returns self."""
        _ = (
            self.attribution,
            self.prediction,
            self.label,
            self.target,
            self.index,
            self.filename,
            self.input,
            self.conservation,
            self.layers,
            self.skipped,
        )
        return self

    def close(self) -> None:
        """Close the file; arrays already read stay usable."""
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self) -> Results:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "complete" if self.complete else "incomplete"
        return f"<Results {self.path!r}: {self.rows_written} rows, {state}>"


def open_results(path: str | os.PathLike) -> Results:
    """Open a result file for reading: only its first ``rows_written`` rows, which are final.

    Raises DataError (one line naming the file) for a missing file, a file that is not HDF5, or an HDF5 file
    that lrpcli did not write. Works on the file of a killed run; a file that a run is writing right
    now is locked by HDF5 and refused with a DataError.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise DataError(f"{path} is a directory, not a result file")
    if not os.path.exists(path):
        hint = (
            " (a run killed while creating it leaves only the .partial file)"
            if os.path.exists(path + PARTIAL_SUFFIX)
            else ""
        )
        raise DataError(f"{path}: no such file{hint}")
    f = _open_h5(path, "r")
    try:
        config = _check_lrpcli(f, path)
        return Results(path, f, config)
    except BaseException:
        f.close()
        raise


# ---------------------------------------------------------------------- config comparison
def _normalise(value: Any) -> Any:
    """Tuples, paths and numpy scalars as YAML would give them back."""
    return json.loads(json.dumps(value, default=lambda v: v.item() if isinstance(v, np.generic) else str(v)))


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if a == b:
        return True
    try:  # PyYAML reads '1e-6' as a string; the config loader reads it as a number
        return isinstance(a, (int, float, str)) and isinstance(b, (int, float, str)) and float(a) == float(b)
    except (TypeError, ValueError):
        return False


def _show(value: Any, limit: int = 80) -> str:
    """A value as JSON, at most ``limit`` characters; a long string keeps its end (where two paths differ)."""
    text = json.dumps(value, default=str, ensure_ascii=False)
    if len(text) <= limit:
        return text
    if isinstance(value, str):
        return text[: limit // 2 - 2] + "..." + text[-(limit - limit // 2 - 1):]
    return text[: limit - 3] + "..."


def config_differences(stored: Any, current: Any, ignore: frozenset[str] = IGNORED_CONFIG_KEYS) -> list[str]:
    """Dotted key paths whose values differ, as 'key: A in the file, B now' (ignored keys skipped)."""
    out: list[str] = []

    def walk(a: Any, b: Any, key: str) -> None:
        if key in ignore:
            return
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b), key=str):
                sub = f"{key}.{k}" if key else str(k)
                if sub in ignore:
                    continue
                if k not in a and isinstance(b[k], dict):
                    walk({}, b[k], sub)  # one line per key, and ignored keys stay ignored
                elif k not in b and isinstance(a[k], dict):
                    walk(a[k], {}, sub)
                elif k not in a:
                    out.append(f"{sub}: absent in the file, {_show(b[k])} now")
                elif k not in b:
                    out.append(f"{sub}: {_show(a[k])} in the file, absent now")
                else:
                    walk(a[k], b[k], sub)
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b)):
                walk(x, y, f"{key}[{i}]")
        elif not _same(a, b):
            out.append(f"{key or '(config)'}: {_show(a)} in the file, {_show(b)} now")

    walk(_normalise(stored), _normalise(current), "")
    return out
