"""Per-sample metric values kept in the result file's ``evaluation/`` group, so evaluations resume and repeat.

Layout: ``evaluation/<source>/<family>-<key>/`` with ``source`` = ``attribution`` (the file's maps) or
``random`` (the baseline), ``key`` = the first 12 hex digits of the SHA-256 of the settings as JSON. The group
holds attributes ``settings`` (that JSON), ``family`` and ``lrpcli_version``, a uint8 ``done`` per row and
one float64 dataset per value (``value``, or ``morf``/``lerf`` curves), all ``n_rows`` long and filled with
NaN until computed. Rows are the file's rows (row i = the file's row i).

Writing follows the result file's rules: the group is created in one step with every dataset allocated
(HDF5 1.8 format, early allocation), then only rows are written in place, and the file is closed after each
chunk, so a killed evaluation leaves the file readable and the next call goes on from ``done``. A file that
cannot be written (read-only) is evaluated without being kept, with one warning.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from lrpcli import __version__
from lrpcli.errors import DataError
from lrpcli.store import LIBVER  # the format the result file is written in

GROUP = "evaluation"


def settings_key(family: str, settings: dict[str, Any]) -> str:
    """``<family>-<12 hex digits>``: equal settings give the same group, other settings a new one."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return f"{family}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


class Cache:
    """The stored values of one metric family with one set of settings, for one source of maps in one file."""

    def __init__(self, path: Path, n_rows: int, source: str, family: str, settings: dict[str, Any],
                 columns: dict[str, tuple[int, ...]], enabled: bool = True) -> None:
        self.path, self.n_rows, self.columns = Path(path), int(n_rows), columns
        self.settings, self.family = settings, family
        self.name = f"{GROUP}/{source}/{settings_key(family, settings)}"
        self.enabled = enabled

    def load(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(done per row, stored arrays); nothing done when the group does not exist yet."""
        empty = {c: np.full((self.n_rows, *shape), np.nan) for c, shape in self.columns.items()}
        if not self.enabled:
            return np.zeros(self.n_rows, dtype=bool), empty
        with h5py.File(self.path, "r") as f:
            g = f.get(self.name)
            if not self._complete(g):
                return np.zeros(self.n_rows, dtype=bool), empty
            done = np.zeros(self.n_rows, dtype=bool)
            stored = g["done"][: self.n_rows].astype(bool)
            done[: len(stored)] = stored
            out = {}
            for c in self.columns:
                arr = g[c][: self.n_rows]
                if arr.shape[1:] != empty[c].shape[1:]:
                    return np.zeros(self.n_rows, dtype=bool), empty
                out[c] = empty[c]
                out[c][: len(arr)] = arr
            return done, out

    def write(self, rows: np.ndarray, values: dict[str, np.ndarray]) -> None:
        """Store ``values`` (arrays of ``len(rows)``) at ``rows`` and mark them done; then close the file."""
        if not self.enabled:
            return
        try:
            f = h5py.File(self.path, "a", libver=LIBVER)
        except OSError as err:
            low = str(err).lower()
            if "lock" in low:
                raise DataError(f"{self.path} is open in another process (HDF5 file lock); wait for it") from None
            self.enabled = False
            why = "permission denied" if isinstance(err, PermissionError) or "permission" in low else \
                " ".join(str(err).split())
            warnings.warn(f"lrpcli: cannot keep the evaluation in {self.path} ({why}); it is computed but not "
                          "stored", stacklevel=2)
            return
        with f:
            g = f.get(self.name)
            if not self._complete(g):  # absent, or left half-made by a kill during its creation
                if g is not None:
                    del f[self.name]
                g = self._create(f)
            order = np.argsort(rows)
            sorted_rows = np.asarray(rows)[order]
            for c in self.columns:
                g[c][sorted_rows] = np.asarray(values[c], dtype=np.float64)[order]
            g["done"][sorted_rows] = 1
            f.flush()

    def _complete(self, g: object) -> bool:
        """A group with every dataset at this file's length."""
        return isinstance(g, h5py.Group) and all(
            isinstance(g.get(c), h5py.Dataset) and g[c].shape[0] == self.n_rows for c in (*self.columns, "done"))

    def _create(self, f: h5py.File) -> h5py.Group:
        g = f.require_group(self.name)
        g.attrs["settings"] = json.dumps(self.settings, sort_keys=True, default=str)
        g.attrs["family"] = self.family
        g.attrs["lrpcli_version"] = __version__
        for c, shape in {**self.columns, "done": ()}.items():
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
            dtype = np.uint8 if c == "done" else np.float64
            g.create_dataset(c, shape=(self.n_rows, *shape), dtype=dtype, fillvalue=0 if c == "done" else np.nan,
                             dcpl=dcpl, track_times=False)
        f.flush()
        return g
