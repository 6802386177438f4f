"""Reading a result file: ``open_results`` and ``Results``, its first ``rows_written`` rows as numpy arrays.

Needs numpy, h5py and PyYAML only; :meth:`Results.load_model` and :meth:`Results.inputs` import torch (through
``lrpcli.explainer.models`` and ``lrpcli.explainer.data``) when called.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import h5py
import numpy as np

from lrpcli.errors import DataError
from lrpcli.spec.config import Config
from lrpcli.store.damage import check_lrpcli, open_h5
from lrpcli.store.layout import (
    ATTRIBUTION_DATASET,
    COMPLETE_ATTR,
    CONFIG_DIR_ATTR,
    CONSERVATION_LAYER,
    CONSERVATION_ROWS,
    CONSERVATION_RULE,
    FILENAME_DATASET,
    INDEX_DATASET,
    INPUT_DATASET,
    LABEL_DATASET,
    LAYERS_GROUP,
    MODEL_FINGERPRINT_ATTR,
    PARTIAL_SUFFIX,
    PREDICTION_DATASET,
    ROWS_WRITTEN_ATTR,
    SKIPPED_FILENAME,
    SKIPPED_REASON,
    SKIPPED_WRITTEN_ATTR,
    TARGET_DATASET,
    attr_str,
    read_classes,
)


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
        self.rows_written = int(self.attrs[ROWS_WRITTEN_ATTR])
        self.complete = bool(self.attrs[COMPLETE_ATTR])
        self.skipped_written = int(self.attrs.get(SKIPPED_WRITTEN_ATTR, 0))

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
            return np.vectorize(attr_str, otypes=[object])(data) if data.size else data
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
        return self._rows_of(ATTRIBUTION_DATASET)

    @property
    def prediction(self) -> np.ndarray:
        """float32, N x K: model outputs."""
        return self._rows_of(PREDICTION_DATASET)

    @property
    def label(self) -> np.ndarray:
        """int64, N: data set label, -1 where none."""
        return self._rows_of(LABEL_DATASET)

    @property
    def target(self) -> np.ndarray:
        """int64, N: the output index explained."""
        return self._rows_of(TARGET_DATASET)

    @property
    def index(self) -> np.ndarray:
        """uint32, N: position of each row in the data set."""
        return self._rows_of(INDEX_DATASET)

    @property
    def filename(self) -> list[str]:
        """Path of each row's image, relative to DATA."""
        return list(self._rows_of(FILENAME_DATASET))

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
                "layer": f[CONSERVATION_LAYER].asstr()[()].tolist(),
                "rule": f[CONSERVATION_RULE].asstr()[()].tolist(),
                **{name.rpartition("/")[2]: self._rows_of(name) for name in CONSERVATION_ROWS},
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
                    zip(f[SKIPPED_FILENAME].asstr()[:n].tolist(), f[SKIPPED_REASON].asstr()[:n].tolist())
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
        value = self.attrs.get(CONFIG_DIR_ATTR)
        return None if value is None else str(value)

    def inputs(self, normalised: bool = True, rows: slice | Sequence[int] | np.ndarray | int = slice(None)) -> Any:
        """The stored ``input`` rows as a float32 torch tensor: the tensors the run explained.

        ``normalised=True`` applies the config's ``input.mean``/``input.std`` exactly as the run did
        (``(x / 255 - mean) / std``); ``normalised=False`` gives the images scaled to [0, 1]. ``rows`` as in
        :meth:`read`. A file written without ``output.store_input`` raises DataError. Imports torch.
        """
        from lrpcli.explainer.data import to_model_input  # lazy: the store stays importable without torch

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
        from lrpcli.explainer.models import (  # lazy: the store stays importable without torch
            load_model,
            model_fingerprint,
        )

        base_dir = self.config_dir
        config = Config(self.config, source=f"{self.path} (stored config)", base_dir=base_dir or ".")
        seed = (self.config.get("run") or {}).get("seed", 0)
        model = load_model(config["model"], base_dir, seed=int(seed))
        stored = self.attrs.get(MODEL_FINGERPRINT_ATTR)
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
    f = open_h5(path, "r")
    try:
        config = check_lrpcli(f, path)
        return Results(path, f, config)
    except BaseException:
        f.close()
        raise

