"""What analyze and virelay need from an explain output file: its rows, class names, categories and identity.

The file is opened with the store's reader (``open_results``), so only its first ``rows_written`` rows are
used. Class names come from the root attribute ``classes`` when the file has it; older files lack it, and
then they are derived from each row's ``filename`` (its first path component is the class folder) and
``label``. Derived names cannot cover a class folder that had no image (it has no row); such a label is
named ``class <i>``.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from lrpcli.errors import DataError
from lrpcli.store import (
    ATTRIBUTION_DATASET,
    CLASSES_ATTR,
    CONFIG_ATTR,
    CREATED_ATTR,
    N_ROWS_ATTR,
    Results,
    open_results,
)

#: Category key for rows without a label (a flat DATA folder) or skipped rows in the dataset file.
UNLABELLED = "unlabelled"
UNLABELLED_NAME = "(no label)"
#: Bytes of relevance read per chunk while computing features.
CHUNK_BYTES = 64 * 1024 * 1024


def category_key(value: int) -> str:
    """The analysis group name (and label-map ``word_net_id``) of a label or target: zero-padded like
    CoRelAy's class-wise analyses, so HDF5 keys, URLs and sort order stay plain."""
    return UNLABELLED if value < 0 else f"{value:08d}"


def fingerprint(results: Results) -> str:
    """A short id of one explain run (its config text, creation time and size), stored in each analysis so
    that an analysis of another file is recognised."""
    attrs = results.attrs
    text = json.dumps([str(attrs.get(CONFIG_ATTR, "")), str(attrs.get(CREATED_ATTR, "")),
                       int(attrs.get(N_ROWS_ATTR, 0))])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass
class Rows:
    """The metadata of the final rows of an explain output file."""

    path: str
    n: int
    n_rows: int
    complete: bool
    label: np.ndarray
    target: np.ndarray
    index: np.ndarray
    filename: list[str]
    classes: list[str]
    classes_stored: bool
    fingerprint: str


def open_source(path: str | os.PathLike) -> Results:
    """``open_results`` plus the checks analyze needs: rows written and an ``attribution`` of N x C x H x W."""
    results = open_results(path)
    try:
        if results.rows_written <= 0:
            raise DataError(f"{path}: no rows written yet (rows_written = 0); nothing to analyse")
        att = results.read(ATTRIBUTION_DATASET, slice(0, 1))
        if att.ndim != 4 or att.dtype.kind != "f":
            raise DataError(f"{path}: 'attribution' has rows of shape {att.shape[1:]} and dtype {att.dtype}, "
                            "expected float N x C x H x W")
    except BaseException:
        results.close()
        raise
    return results


def read_rows(results: Results, warn: bool = True) -> Rows:
    """Metadata of the final rows; warns (once) when the run is incomplete, since only part of it is used."""
    n, n_rows = results.rows_written, int(results.attrs.get(N_ROWS_ATTR, results.rows_written))
    complete = results.complete
    if warn and not complete:
        warnings.warn(
            f"lrpcli: {results.path} is incomplete (its run was interrupted or is still going): using its first "
            f"{n} of {n_rows} rows; run 'lrpcli explain --resume' to finish it", stacklevel=2)
    label = np.asarray(results.label, dtype=np.int64)
    filename = [str(f) for f in results.filename]
    stored = _stored_classes(results)
    classes = stored if stored is not None else derive_classes(label, filename)
    return Rows(
        path=str(results.path), n=n, n_rows=n_rows, complete=complete, label=label,
        target=np.asarray(results.target, dtype=np.int64), index=np.asarray(results.index, dtype=np.int64),
        filename=filename, classes=classes, classes_stored=stored is not None, fingerprint=fingerprint(results),
    )


def _stored_classes(results: Results) -> list[str] | None:
    """The root attribute ``classes`` as a list of str (an array of strings or a JSON list), else None."""
    raw = results.attrs.get(CLASSES_ATTR)
    if raw is None:
        return None
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            return None
    return [str(v) for v in np.asarray(raw, dtype=object).reshape(-1)]


def derive_classes(label: np.ndarray, filename: list[str]) -> list[str]:
    """Class names by label from the rows' class folders (first path component); ``class <i>`` for a label
    with no row; [] for a flat folder (every label -1)."""
    top = int(label.max()) if label.size else -1
    names = [f"class {i}" for i in range(top + 1)]
    seen = [False] * (top + 1)
    for lab, name in zip(label.tolist(), filename):
        if lab >= 0 and not seen[lab]:
            seen[lab] = True
            names[lab] = name.split("/", 1)[0] if "/" in name else f"class {lab}"
    return names


def category_name(value: int, classes: list[str], by: str) -> str:
    """Human-readable name of a category: the class name, ``(no label)`` or ``output <i>``."""
    if value < 0:
        return UNLABELLED_NAME
    if 0 <= value < len(classes):
        return classes[value]
    return f"output {value}" if by == "target" else f"class {value}"


def select_categories(rows: Rows, by: str, wanted: tuple[str, ...]) -> dict[int, np.ndarray]:
    """Row numbers of each category (label or target value) to analyse, in ascending value order.

    ``wanted`` names classes by name or number; an unknown one, or one without rows, is a DataError.
    """
    values = rows.label if by == "label" else rows.target
    present = {int(v): np.flatnonzero(values == v) for v in np.unique(values)}
    if not wanted:
        return dict(sorted(present.items()))
    chosen: dict[int, np.ndarray] = {}
    for item in wanted:
        value = _resolve(item, rows.classes)
        if value is None:
            listing = ", ".join(rows.classes) if rows.classes else "none: the data was a flat folder"
            raise DataError(f"--class {item}: {rows.path} has no such class (classes: {listing}); "
                            "give a class name or number")
        if value not in present:
            raise DataError(f"--class {item}: {rows.path} has no rows with {by} {value} "
                            f"({category_name(value, rows.classes, by)}); nothing to analyse")
        chosen[value] = present[value]
    return dict(sorted(chosen.items()))


def _resolve(item: str, classes: list[str]) -> int | None:
    if item in classes:
        return classes.index(item)
    if item.lstrip("-").isdigit():
        return int(item)
    return None


def iter_relevance(results: Results, n: int, name: str = ATTRIBUTION_DATASET) -> Iterator[tuple[int, np.ndarray]]:
    """``(start, rows)`` chunks of the first ``n`` rows of a relevance dataset, about CHUNK_BYTES each."""
    first = results.read(name, slice(0, 1))
    step = max(1, CHUNK_BYTES // max(1, first.nbytes))
    for start in range(0, n, step):
        yield start, results.read(name, slice(start, min(n, start + step)))
