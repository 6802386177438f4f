"""ViRelAy's analysis HDF5 layout, written (and read back) in this one place.

One group per category at the root (ViRelAy lists every root key as a category, so nothing else lives
there; the provenance is in root attributes)::

    /<category>                  attrs: name (human-readable), value (label or target), by
        index                    uint32 (n,)   dataset index of each sample (the explain file's ``index``)
        embedding/spectral       float32 (n, e) spectral embedding; attrs: eigenvalue float32 (e,)
        embedding/tsne           float32 (n, 2) t-SNE of the spectral embedding; attrs: embedding, index
        cluster/kmeans-KK        int64 (n,)    k-means with k = KK on the spectral embedding; attrs: embedding, k
        cluster/hdbscan          int64 (n,)    HDBSCAN (-1 = noise); attrs: embedding

    root attrs: lrpcli_analysis ("spray"), lrpcli_version, source (absolute path of OUT.h5),
    source_fingerprint, source_rows, source_complete, by, params (JSON), classes (JSON)

Every category carries the same clustering and embedding names, because ViRelAy takes the names of the
first category for all. The file is written to ``<path>.partial`` and renamed, so a killed analyze leaves
no half file under the final name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import h5py
import numpy as np

from lrpcli import __version__
from lrpcli.commands.analysis.spray import Params, Result
from lrpcli.errors import DataError

KIND = "spray"


@dataclass
class Category:
    """One analysed category: its key, readable name, label/target value, dataset indices and result."""

    key: str
    name: str
    value: int
    index: np.ndarray
    result: Result


@dataclass
class Provenance:
    """Where an analysis came from, kept as root attributes."""

    source: str
    fingerprint: str
    rows: int
    complete: bool
    by: str
    params: Params
    classes: list[str]


def write(path: str, categories: list[Category], prov: Provenance, overwrite: bool = False) -> None:
    """Write the analysis file atomically (see the module docstring); DataError for an unwritable path."""
    if os.path.isdir(path):
        raise DataError(f"-o {path} is a directory; give a file name such as {os.path.join(path, 'analysis.h5')}")
    if os.path.lexists(path) and not overwrite:
        raise DataError(f"-o {path} already exists; pass --overwrite to replace it")
    partial = path + ".partial"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with h5py.File(partial, "w") as f:
            _fill(f, categories, prov)
        os.replace(partial, path)
    except OSError as err:
        try:
            os.remove(partial)
        except OSError:
            pass
        raise DataError(f"cannot write {path}: {err.strerror or err}") from None


def _fill(f: h5py.File, categories: list[Category], prov: Provenance) -> None:
    f.attrs["lrpcli_analysis"] = KIND
    f.attrs["lrpcli_version"] = __version__
    f.attrs["source"] = prov.source
    f.attrs["source_fingerprint"] = prov.fingerprint
    f.attrs["source_rows"] = np.int64(prov.rows)
    f.attrs["source_complete"] = np.bool_(prov.complete)
    f.attrs["by"] = prov.by
    f.attrs["params"] = json.dumps(asdict(prov.params))
    f.attrs["classes"] = json.dumps(prov.classes)
    for cat in categories:
        g = f.create_group(cat.key)
        g.attrs["name"] = cat.name
        g.attrs["value"] = np.int64(cat.value)
        g.attrs["by"] = prov.by
        g.create_dataset("index", data=np.asarray(cat.index, dtype=np.uint32))
        emb = g.create_group("embedding")
        spectral = emb.create_dataset("spectral", data=cat.result.embedding.astype(np.float32))
        spectral.attrs["eigenvalue"] = cat.result.eigenvalues.astype(np.float32)
        spectral.attrs["name"] = "spectral embedding of the kNN graph (normalised Laplacian)"
        for name, layout in cat.result.layouts.items():
            d = emb.create_dataset(name, data=layout.astype(np.float32))
            d.attrs["embedding"] = "spectral"
            d.attrs["index"] = np.arange(cat.result.embedding.shape[1], dtype=np.uint32)
        clu = g.create_group("cluster")
        for name, labels in cat.result.clusterings.items():
            d = clu.create_dataset(name, data=np.asarray(labels, dtype=np.int64))
            d.attrs["embedding"] = "spectral"
            if name.startswith("kmeans-"):
                d.attrs["k"] = np.int64(int(name.split("-", 1)[1]))


@dataclass
class Analysis:
    """An analysis file read back: provenance and, per category key, its dataset indices."""

    path: str
    source: str
    fingerprint: str
    rows: int
    by: str
    indices: Mapping[str, np.ndarray]


def read(path: str) -> Analysis:
    """Open an analysis file written by ``lrpcli analyze``; DataError (one line) for anything else."""
    if not os.path.isfile(path):
        raise DataError(f"--analysis {path}: no such file")
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise DataError(f"--analysis {path}: cannot open as HDF5 ({' '.join(str(err).split())})") from None
    with f:
        if f.attrs.get("lrpcli_analysis") != KIND:
            raise DataError(f"--analysis {path}: not written by 'lrpcli analyze' (no lrpcli_analysis attribute)")
        indices = {key: np.asarray(g["index"][()], dtype=np.int64) for key, g in f.items()}
        return Analysis(path=path, source=str(f.attrs["source"]), fingerprint=str(f.attrs["source_fingerprint"]),
                        rows=int(f.attrs["source_rows"]), by=str(f.attrs["by"]), indices=indices)
