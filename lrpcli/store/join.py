"""Joining complete result files (the shards of a distributed run) into one, in the layout declared in ``layout``.

Two ways: a copy that has the layout, chunking, dtypes and attributes of a one-process run's file
(:func:`write_joined`), or HDF5 virtual datasets over the parts, which stay next to it (:func:`write_virtual`).
Which files are joined, and the checks that they belong together, are the caller's (``lrpcli.runner.shards``); this
module only writes. Neither writer is crash safe: the caller writes under a temporary name and renames.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import h5py
import numpy as np

from lrpcli import __version__
from lrpcli.store.layout import (
    ATTRIBUTION_DATASET,
    COMPLETE_ATTR,
    CONFIG_ATTR,
    CONFIG_DIR_ATTR,
    CONSERVATION_LAYER,
    CONSERVATION_RULE,
    CREATED_ATTR,
    INPUT_DATASET,
    LAYERS_GROUP,
    LIBVER,
    MODEL_FINGERPRINT_ATTR,
    N_ROWS_ATTR,
    PREDICTION_DATASET,
    ROWS_WRITTEN_ATTR,
    SKIPPED_FILENAME,
    SKIPPED_REASON,
    SKIPPED_WRITTEN_ATTR,
    STR,
    TORCH_VERSION_ATTR,
    VERSION_ATTR,
    VIRTUAL_LIBVER,
    VIRTUAL_SHARDS_ATTR,
    read_classes,
    row_datasets_of,
    write_classes,
)
from lrpcli.store.writer import ResultWriter

__all__ = ["JoinPart", "part_layout", "write_joined", "write_virtual", "copy_rows"]

_MERGE_CHUNK_BYTES = 64 << 20  # rows copied per step of the merge: about this many bytes


class JoinPart(Protocol):
    """One complete file to join: its first ``rows`` rows and its ``skipped`` images are taken. The first
    part's attributes, config, conservation table and ``shapes`` become the joined file's."""

    path: Path
    attrs: dict
    config: dict
    rows: int
    skipped: list[tuple[str, str]]
    layers: list[str]
    rules: list[str]
    shapes: dict[str, tuple[tuple[int, ...], str]]


def part_layout(path: str | os.PathLike) -> tuple[dict[str, tuple[tuple[int, ...], str]], list[str], list[str]]:
    """(per-row dataset -> (shape without rows, dtype name), conservation layers, conservation rules) of a
    result file: what must agree between files before they can be joined."""
    with h5py.File(path, "r") as f:
        shapes = {name: (tuple(f[name].shape[1:]), str(f[name].dtype)) for name in row_datasets_of(f)}
        layers = f[CONSERVATION_LAYER].asstr()[()].tolist()
        rules = f[CONSERVATION_RULE].asstr()[()].tolist()
    return shapes, layers, rules


def write_joined(parts: Sequence[JoinPart], tmp: Path, n_rows: int) -> tuple[int, int]:
    """A real copy with the layout, attributes, chunking and dtypes of a one-process run's file of ``n_rows``
    samples: (rows, skipped images) written.

    ``ResultWriter.create`` builds the file (every dataset, every attribute) exactly as a run does; the rows
    are then copied in: the compressed one-row chunks as they are (raw chunk copy, no decompress/compress;
    40x faster than re-encoding, the bytes are the same), the small per-row datasets as values. The file is
    finished like ``ResultWriter.close(complete=True)`` finishes one: trimmed to its rows, then committed.
    """
    first = parts[0]
    attrs = first.attrs
    shapes = first.shapes
    layer_names = [name[len(LAYERS_GROUP) + 1:] for name in shapes if name.startswith(LAYERS_GROUP + "/")]
    with h5py.File(first.path, "r") as src:  # the first part's choice (output.compression: auto decides per file)
        compressed = {name: src[name].compression is not None for name in shapes}
    ResultWriter.create(
        tmp, config=first.config, config_yaml=str(attrs[CONFIG_ATTR]), n_rows=n_rows,
        num_outputs=shapes[PREDICTION_DATASET][0][0], sample_shape=shapes[ATTRIBUTION_DATASET][0],
        layers=first.layers, rules=first.rules, dtype=shapes[ATTRIBUTION_DATASET][1],
        store_input=INPUT_DATASET in shapes, overwrite=True,
        extra_layers={name: shapes[f"{LAYERS_GROUP}/{name}"][0] for name in layer_names},
        torch_version=str(attrs.get(TORCH_VERSION_ATTR, "")), compressed=compressed, classes=read_classes(attrs),
        config_dir=attrs.get(CONFIG_DIR_ATTR)).close(complete=False)
    skipped = [s for part in parts for s in part.skipped]
    rows = 0
    with h5py.File(tmp, "r+", libver=LIBVER) as out:
        if MODEL_FINGERPRINT_ATTR in attrs:  # the model that wrote the rows, as in a one-process file
            out.attrs[MODEL_FINGERPRINT_ATTR] = attrs[MODEL_FINGERPRINT_ATTR]
        for part in parts:
            with h5py.File(part.path, "r") as src:
                for name in shapes:
                    copy_rows(src[name], out[name], part.rows, rows)
            rows += part.rows
        for i, name in enumerate((SKIPPED_FILENAME, SKIPPED_REASON)):
            dset = out[name]
            if dset.shape[0] < len(skipped):
                dset.resize(len(skipped), axis=0)
            if skipped:
                dset[: len(skipped)] = np.array([s[i] for s in skipped], dtype=object)
            dset.resize(len(skipped), axis=0)
        for name in shapes:
            out[name].resize(rows, axis=0)
        out.flush()
        out.attrs.modify(ROWS_WRITTEN_ATTR, np.int64(rows))
        out.attrs.modify(SKIPPED_WRITTEN_ATTR, np.int64(len(skipped)))
        out.flush()
        out.attrs.modify(COMPLETE_ATTR, np.bool_(True))
    return rows, len(skipped)


def copy_rows(src: Any, dst: Any, n: int, at: int) -> None:
    """Rows ``[0, n)`` of ``src`` into rows ``[at, at + n)`` of ``dst``."""
    same_layout = (src.chunks == dst.chunks and src.chunks is not None and src.chunks[0] == 1
                   and src.dtype == dst.dtype and src.compression == dst.compression
                   and src.compression_opts == dst.compression_opts and src.shuffle == dst.shuffle
                   and tuple(src.chunks[1:]) == src.shape[1:])
    if same_layout:
        rest = (0,) * (src.ndim - 1)
        for i in range(n):
            mask, raw = src.id.read_direct_chunk((i, *rest))
            dst.id.write_direct_chunk((at + i, *rest), raw, mask)
        return
    row_bytes = max(1, src.dtype.itemsize * math.prod(src.shape[1:]))
    step = max(1, _MERGE_CHUNK_BYTES // row_bytes)
    text = h5py.check_string_dtype(src.dtype) is not None
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        dst[at + lo: at + hi] = np.asarray(src.asstr()[lo:hi], dtype=object) if text else src[lo:hi]


def write_virtual(parts: Sequence[JoinPart], tmp: Path, output: Path, n_rows: int) -> tuple[int, int]:
    """``output`` (written as ``tmp``) as virtual datasets over the parts, whose sources are named relative to
    ``output``'s folder: (rows, skipped images) it holds."""
    first = parts[0]
    rows = sum(part.rows for part in parts)
    skipped = [s for part in parts for s in part.skipped]
    text = STR
    with h5py.File(tmp, "w", libver=VIRTUAL_LIBVER) as f:
        for key in (CONFIG_ATTR, TORCH_VERSION_ATTR):
            f.attrs[key] = str(first.attrs.get(key, ""))
        f.attrs[VERSION_ATTR] = __version__
        f.attrs[CREATED_ATTR] = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
        f.attrs[N_ROWS_ATTR] = np.int64(n_rows)
        f.attrs[COMPLETE_ATTR] = np.bool_(True)
        f.attrs[ROWS_WRITTEN_ATTR] = np.int64(rows)
        f.attrs[SKIPPED_WRITTEN_ATTR] = np.int64(len(skipped))
        f.attrs[VIRTUAL_SHARDS_ATTR] = [os.path.relpath(part.path, output.parent) for part in parts]
        for key in (MODEL_FINGERPRINT_ATTR, CONFIG_DIR_ATTR):
            if key in first.attrs:
                f.attrs[key] = first.attrs[key]
        classes = read_classes(first.attrs)
        if classes is not None:
            write_classes(f.attrs, classes)
        for name, (shape, dtype) in first.shapes.items():
            dt = text if dtype == "object" else np.dtype(dtype)
            layout = h5py.VirtualLayout(shape=(rows,) + shape, dtype=dt)
            at = 0
            for part in parts:
                if part.rows:
                    source = h5py.VirtualSource(os.path.relpath(part.path, output.parent), name,
                                                shape=(part.rows,) + shape)
                    layout[at:at + part.rows] = source
                    at += part.rows
            f.create_virtual_dataset(name, layout)
        f.require_group(LAYERS_GROUP)
        f.create_dataset(CONSERVATION_LAYER, data=np.array(first.layers, dtype=object), dtype=text)
        f.create_dataset(CONSERVATION_RULE, data=np.array(first.rules, dtype=object), dtype=text)
        for i, name in enumerate((SKIPPED_FILENAME, SKIPPED_REASON)):
            f.create_dataset(name, data=np.array([s[i] for s in skipped], dtype=object), dtype=text,
                             shape=(len(skipped),))
    return rows, len(skipped)
