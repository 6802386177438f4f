"""Opening an lrpcli HDF5 file for rendering: validation with one-line errors, and batched reads.

A file is recognised by its root attribute ``lrpcli_version``. Only the first ``rows_written`` rows are read
(an interrupted run leaves later rows unfinished). ``layer`` picks ``layers/<name>`` instead of
``attribution``; both are ``N x C x H x W``.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path

import h5py
import numpy as np

from lrpcli.errors import DataError
from lrpcli.store import (
    ATTRIBUTION_DATASET,
    FILENAME_DATASET,
    INDEX_DATASET,
    INPUT_DATASET,
    LABEL_DATASET,
    LAYERS_GROUP,
    ROWS_WRITTEN_ATTR,
    TARGET_DATASET,
    VERSION_ATTR,
    check_sources,
    open_error,
)


class Source:
    """An open, validated lrpcli file; use as a context manager so the HDF5 handle is closed."""

    def __init__(self, path: str | os.PathLike, layer: str | None = None) -> None:
        self.path = Path(path)
        p = str(self.path)
        if not self.path.exists():
            raise DataError(f"{p}: no such file")
        if self.path.is_dir():
            raise DataError(f"{p}: is a directory, expected an HDF5 file written by 'lrpcli explain'")
        try:
            ok = h5py.is_hdf5(p)
        except OSError as err:
            raise DataError(f"{p}: cannot read ({err.strerror or err})") from None
        if not ok:
            raise DataError(f"{p}: not an HDF5 file; expected the output of 'lrpcli explain -o FILE.h5'")
        try:
            self.h5 = h5py.File(p, "r")
        except PermissionError:
            raise DataError(f"{p}: permission denied") from None
        except OSError as err:
            raise DataError(open_error(p, err)) from None
        try:
            self._validate(layer)
        except BaseException:
            self.h5.close()
            raise

    def _validate(self, layer: str | None) -> None:
        p = str(self.path)
        if VERSION_ATTR not in self.h5.attrs:
            raise DataError(f"{p}: an HDF5 file not written by lrpcli (no 'lrpcli_version' root attribute)")
        check_sources(self.h5, p)
        self.layer = layer
        if layer is None:
            name = ATTRIBUTION_DATASET
            if not isinstance(self.h5.get(name), h5py.Dataset):
                raise DataError(f"{p}: no 'attribution' dataset; the file is incomplete or not from lrpcli")
        else:
            name = f"{LAYERS_GROUP}/{layer}"
            if not isinstance(self.h5.get(name), h5py.Dataset):
                have = self.layers()
                listing = ", ".join(have) if have else "none stored"
                raise DataError(f"{p}: no layer '{layer}' (datasets under layers/: {listing})")
        self.relevance = self.h5[name]
        if self.relevance.ndim != 4 or self.relevance.dtype.kind != "f":
            raise DataError(
                f"{p}: '{name}' has shape {self.relevance.shape} and dtype {self.relevance.dtype}, "
                "expected float N x C x H x W"
            )
        total = self.relevance.shape[0]
        written = self.h5.attrs.get(ROWS_WRITTEN_ATTR, total)
        try:
            written = int(written)
        except (TypeError, ValueError):
            raise DataError(f"{p}: root attribute rows_written is {written!r}, expected an integer") from None
        self.n = max(0, min(written, total))
        if self.n == 0:
            raise DataError(f"{p}: no rows written yet (rows_written = {written}); nothing to render")
        self.input = self.h5.get(INPUT_DATASET)
        if self.input is not None:
            ok = (
                isinstance(self.input, h5py.Dataset)
                and self.input.ndim == 4
                and self.input.shape[0] >= self.n
                and self.input.shape[1] in (1, 3)
            )
            if not ok:
                raise DataError(
                    f"{p}: 'input' has shape {getattr(self.input, 'shape', '?')}, "
                    "expected uint8 N x C x H x W with C = 1 or 3"
                )

    def layers(self) -> list[str]:
        """Names of the per-layer relevance datasets under ``layers/`` (nested groups joined by '/')."""
        grp = self.h5.get(LAYERS_GROUP)
        if not isinstance(grp, h5py.Group):
            return []
        names: list[str] = []
        grp.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
        return sorted(names)

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the HDF5 handle (idempotent)."""
        self.h5.close()

    @property
    def map_size(self) -> tuple[int, int]:
        """(H, W) of the stored relevance maps."""
        return int(self.relevance.shape[2]), int(self.relevance.shape[3])

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the stored input images, or of the relevance maps when no input is stored."""
        if self.input is not None:
            return int(self.input.shape[2]), int(self.input.shape[3])
        return self.map_size

    def _column(self, name: str, default: np.ndarray) -> np.ndarray:
        ds = self.h5.get(name)
        if not isinstance(ds, h5py.Dataset) or ds.ndim != 1 or ds.shape[0] < self.n:
            return default
        return ds[: self.n]

    @cached_property
    def labels(self) -> np.ndarray:
        """``label`` of the valid rows (-1 where the file has none)."""
        return self._column(LABEL_DATASET, np.full(self.n, -1, dtype=np.int64)).astype(np.int64)

    @cached_property
    def targets(self) -> np.ndarray:
        """``target`` of the valid rows (-1 where the file has none)."""
        return self._column(TARGET_DATASET, np.full(self.n, -1, dtype=np.int64)).astype(np.int64)

    @cached_property
    def indices(self) -> np.ndarray:
        """``index`` (dataset index) of the valid rows; the row number where the file has none."""
        return self._column(INDEX_DATASET, np.arange(self.n, dtype=np.int64)).astype(np.int64)

    @cached_property
    def filenames(self) -> np.ndarray:
        """``filename`` of the valid rows as str (empty where the file has none)."""
        ds = self.h5.get(FILENAME_DATASET)
        if not isinstance(ds, h5py.Dataset) or ds.ndim != 1 or ds.shape[0] < self.n:
            return np.full(self.n, "", dtype=object)
        try:
            values = ds.asstr()[: self.n]
        except (TypeError, ValueError):
            values = ds[: self.n]
        return np.asarray(
            [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in values], dtype=object
        )

    def column(self, name: str) -> np.ndarray:
        """One metadata column by its dataset name (``label``, ``target``, ``index``, ``filename``)."""
        return {LABEL_DATASET: lambda: self.labels, TARGET_DATASET: lambda: self.targets,
                INDEX_DATASET: lambda: self.indices, FILENAME_DATASET: lambda: self.filenames}[name]()

    @staticmethod
    def _read(ds: h5py.Dataset, rows: np.ndarray) -> np.ndarray:
        """Rows in any order: one slice when they are contiguous and increasing, else a sorted fancy read."""
        if rows.size and rows[-1] - rows[0] == rows.size - 1 and np.all(np.diff(rows) == 1):
            return ds[int(rows[0]) : int(rows[-1]) + 1]
        order = np.argsort(rows, kind="stable")
        data = ds[rows[order]]
        out = np.empty_like(data)
        out[order] = data
        return out

    def read_relevance(self, rows: np.ndarray) -> np.ndarray:
        """Relevance of the given rows summed over channels: float32 ``(len(rows), H, W)``."""
        return self._read(self.relevance, rows).sum(axis=1, dtype=np.float32)

    def read_input(self, rows: np.ndarray) -> np.ndarray:
        """Stored input images of the given rows as uint8 ``(len(rows), H, W, 3)`` (gray expanded to RGB)."""
        if self.input is None:
            raise DataError(f"{self.path}: no 'input' dataset")
        data = self._read(self.input, rows)
        if data.dtype != np.uint8:
            data = np.clip(data, 0, 255).astype(np.uint8)
        data = np.moveaxis(data, 1, -1)
        if data.shape[-1] == 1:
            data = np.repeat(data, 3, axis=-1)
        return np.ascontiguousarray(data)
