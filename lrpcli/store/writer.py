"""``ResultWriter``: a run's result file, created atomically, written batch by batch, resumed after a kill.

The rules that make it safe to kill at any moment are in the docstring of lrpcli.store; the file's layout is
declared in :mod:`lrpcli.store.layout`, the crash repair is in :mod:`lrpcli.store.recovery`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import h5py
import numpy as np

from lrpcli.errors import DataError, RunError
from lrpcli.store.damage import check_lrpcli, error_text, open_h5
from lrpcli.store.layout import (
    ATTRIBUTION_DATASET,
    COMPLETE_ATTR,
    CONSERVATION_LAYER,
    CONSERVATION_ROWS,
    DTYPES,
    FILENAME_DATASET,
    INDEX_DATASET,
    INPUT_DATASET,
    LABEL_DATASET,
    LAYERS_GROUP,
    LIBVER,
    N_ROWS_ATTR,
    PARTIAL_SUFFIX,
    PREDICTION_DATASET,
    ROWS_WRITTEN_ATTR,
    SKIPPED_CHUNK,
    SKIPPED_FILENAME,
    SKIPPED_REASON,
    SKIPPED_WRITTEN_ATTR,
    TARGET_DATASET,
    build_file,
    clean_str,
    row_datasets,
)
from lrpcli.store.locks import being_written, creation_lock, refuse_existing_output
from lrpcli.store.recovery import WRITE_ERRORS, abandon, cover_eof, fsync_dir, fsync_file, reserve, zero_tail
from lrpcli.store.stored_config import config_differences


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
        self.n_rows = int(attrs[N_ROWS_ATTR])
        self._rows = int(attrs[ROWS_WRITTEN_ATTR])
        self._n_skipped = int(attrs.get(SKIPPED_WRITTEN_ATTR, 0))
        self._complete = bool(attrs[COMPLETE_ATTR])
        self._pending_skipped: list[tuple[str, str]] = []
        self._closed = False
        self.store_input = INPUT_DATASET in f
        self.layer_names = list(f[LAYERS_GROUP]) if LAYERS_GROUP in f else []
        self._names = row_datasets(self.store_input, self.layer_names)
        self._dsets = {name: f[name] for name in self._names}
        self.attribution_dtype = self._dsets[ATTRIBUTION_DATASET].dtype
        self.num_outputs = int(self._dsets[PREDICTION_DATASET].shape[1])
        self.num_layers = int(f[CONSERVATION_LAYER].shape[0])
        self._skip_f = f[SKIPPED_FILENAME]
        self._skip_r = f[SKIPPED_REASON]

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
        """Create the result file for ``n_rows`` samples, atomically (see the docstring of lrpcli.store).

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
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
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
        with creation_lock(path):  # two runs started together on one -o: the first to get here wins
            return cls._create_locked(path, overwrite, dict(
                config_yaml=config_yaml, n_rows=n_rows, num_outputs=int(num_outputs),
                sample_shape=tuple(int(s) for s in sample_shape), layers=list(layers), rules=list(rules),
                dtype=DTYPES[dtype], store_input=store_input, extra_layers=extra_layers,
                torch_version=torch_version, compressed=dict(compressed or {}),
                classes=None if classes is None else list(classes),
                config_dir=None if config_dir is None else os.fspath(config_dir), attrs=dict(attrs or {})))

    @classmethod
    def _create_locked(cls, path: str, overwrite: bool, build: dict[str, Any]) -> ResultWriter:
        """``create`` under the creation lock: the existence checks, the ``.partial`` file and its rename."""
        refuse_existing_output(path, overwrite)
        directory = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as err:
            raise DataError(
                f"cannot create the output directory {directory} for {path}: {error_text(err)}"
            ) from None
        if not os.access(directory, os.W_OK | os.X_OK):
            raise DataError(
                f"cannot write {path}: the directory {directory} is not writable; choose another -o/--output"
            )

        partial = path + PARTIAL_SUFFIX
        try:
            if os.path.lexists(partial):  # left by a run killed while creating; it is ours
                os.remove(partial)
            with h5py.File(partial, "w", libver=LIBVER) as f:
                cls._build(f, **build)
                f.flush()
                fsync_file(f)
            os.replace(partial, path)
            fsync_dir(directory)
        except BaseException as err:
            try:
                os.remove(partial)
            except OSError:
                pass
            if isinstance(err, WRITE_ERRORS):  # h5py says "disk full" as OSError, RuntimeError or ValueError
                raise DataError(f"cannot write {path}: {error_text(err)}") from None
            raise
        return cls._open_for_append(path, just_created=True)

    #: Builds the empty file inside the ``.partial`` (the layout module's job; a seam for the failure tests)
    _build = staticmethod(build_file)

    @classmethod
    def resume(cls, path: str | os.PathLike, *, config: dict) -> ResultWriter:
        """Reopen a run's file to continue it after ``rows_written`` rows; refuses a different config.

        Only keys that change the results are compared (not :data:`IGNORED_CONFIG_KEYS`), and the error names
        every differing key, so the user can see at once whether ``--overwrite`` is what they want.
        """
        path = os.fspath(path)
        if not os.path.lexists(path):
            raise DataError(f"cannot resume: {path} does not exist; run without --resume to start it")
        f = open_h5(path, "r")
        try:
            stored = check_lrpcli(f, path)
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
            if being_written(path):
                raise DataError(f"{path} is being written by another process; wait for it or stop it")
            cover_eof(path)
        f = open_h5(path, "r+")
        try:
            if not just_created:  # a file made by _build a moment ago needs no check (parsing its config: ms)
                check_lrpcli(f, path)
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
            (self._dsets[FILENAME_DATASET], self._rows),
            (self._skip_f, self._n_skipped),
            (self._skip_r, self._n_skipped),
        ):
            zero_tail(dset, start)
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
        return self._dsets[INDEX_DATASET][: self._rows]

    # ------------------------------------------------------------------ writing
    def add_skipped(self, filename: str, reason: str) -> None:
        """Record an image that could not be used; committed with the next ``append`` or ``close(True)``.

        Report skips in data set order, before the ``append`` of the rows that follow them: then after any
        kill, ``rows_written + n_skipped`` samples from the start of the data set are done.
        """
        self._check_open()
        self._pending_skipped.append((clean_str(filename), " ".join(clean_str(reason).split())))

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
        values: dict[str, Any] = dict(zip(
            (ATTRIBUTION_DATASET, PREDICTION_DATASET, LABEL_DATASET, TARGET_DATASET, INDEX_DATASET,
             *CONSERVATION_ROWS),
            (attribution, prediction, label, target, index, relevance_in, relevance_out, output_relevance)))
        if self.store_input:
            values[INPUT_DATASET] = input
        values.update({f"{LAYERS_GROUP}/{k}": v for k, v in layers.items()})
        arrays = {}
        for name, value in values.items():
            dset = self._dsets[name]
            arr = np.ascontiguousarray(value, dtype=dset.dtype)
            if arr.shape != (b,) + dset.shape[1:]:
                raise ValueError(f"{name}: expected shape {(b,) + dset.shape[1:]}, got {arr.shape}")
            arrays[name] = arr
        names = np.array([clean_str(s) for s in filename], dtype=object)
        if b == 0 and not self._pending_skipped:
            return
        try:
            if b:
                for name, arr in arrays.items():
                    self._dsets[name][start:stop] = arr
                self._dsets[FILENAME_DATASET][start:stop] = names
            n_skipped = self._write_pending_skipped()
            self._commit(stop, n_skipped)
        except WRITE_ERRORS as err:
            raise self._failed(err, "writing") from None

    def _write_pending_skipped(self) -> int:
        pending = self._pending_skipped
        start = self._n_skipped
        if not pending:
            return start
        stop = start + len(pending)
        if stop > self._skip_f.shape[0]:  # more failures than samples announced: grow (rare)
            size = max(stop, 2 * self._skip_f.shape[0], SKIPPED_CHUNK)
            self._skip_f.resize(size, axis=0)
            self._skip_r.resize(size, axis=0)
        self._skip_f[start:stop] = np.array([p[0] for p in pending], dtype=object)
        self._skip_r[start:stop] = np.array([p[1] for p in pending], dtype=object)
        return stop

    def _commit(self, rows: int, n_skipped: int) -> None:
        """Rule 3: data first, on disk; only then the counters that declare it final."""
        f = self._f
        reserve(f, list(self._dsets.values()))
        f.flush()
        f.attrs.modify(ROWS_WRITTEN_ATTR, np.int64(rows))
        f.attrs.modify(SKIPPED_WRITTEN_ATTR, np.int64(n_skipped))
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
                    reserve(f, list(self._dsets.values()))
                    f.flush()
                    f.attrs.modify(COMPLETE_ATTR, np.bool_(True))
                    f.flush()
                    self._complete = True
            fsync_file(f)
        except WRITE_ERRORS as err:
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
        abandon(self._f, self.path)
        what = "run again with --resume to continue" if doing == "writing" else "run again with --resume to finish it"
        return RunError(
            f"{doing} {self.path} failed ({error_text(err)}); its first {self._rows} rows are saved and readable; "
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


