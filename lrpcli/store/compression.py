"""Which per-sample datasets to compress (``output.compression``): all, none, or each where it pays."""

from __future__ import annotations

from collections.abc import Mapping

import h5py
import numpy as np

from lrpcli.store.layout import COMPRESSION

#: ``output.compression`` values: ``auto`` compresses a dataset only where its first rows shrink by MIN_SAVING
COMPRESSIONS = ("auto", "lzf", "none")
MIN_SAVING = 0.1
_PROBE_ROWS = 4


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
