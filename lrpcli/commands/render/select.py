"""``--select`` specs: which rows of the file to render.

A spec is comma-separated items; the result is their union, in the order the items give it, without
duplicates. Rows are positions in the file (0 = first row written), not dataset indices.

- ``7``, ``-1``            one row (negative counts from the end); out of range is an error
- ``0:16``, ``10:``, ``::4``  a Python slice of rows (clipped to the rows that exist)
- ``label=3``, ``target=3``, ``index=3``   rows whose stored label / explained target / dataset index is 3
- ``file=GLOB`` or a bare item with ``* ? [``   rows whose stored file name matches the glob (fnmatch, case
  sensitive); a pattern without ``/`` is also tried against the base name, so ``*_001.jpg`` and
  ``cat/*`` both work. A bare item without wildcards that is not a number is an exact file name.

An item that selects nothing is an error (it is almost always a typo), as is an empty spec.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatchcase

import numpy as np

from lrpcli.errors import DataError

_INT = re.compile(r"^-?\d+$")
_SLICE = re.compile(r"^(-?\d*):(-?\d*)(?::(-?\d*))?$")
_KEYS = ("label", "target", "index", "file")


@dataclass(frozen=True)
class Item:
    """One parsed item: ``kind`` is row, slice, label, target, index or file; ``text`` as written."""

    kind: str
    text: str
    value: object


def _int(text: str, item: str, spec: str, what: str) -> int:
    if not _INT.match(text):
        raise DataError(f"--select '{spec}': {what} in '{item}' must be an integer, got '{text}'")
    return int(text)


def parse(spec: str) -> list[Item]:
    """Parse a spec into items, checking syntax only (the file is not needed yet)."""
    items = [s.strip() for s in spec.split(",")]
    if not spec.strip() or any(not s for s in items):
        raise DataError(
            f"--select '{spec}': empty item; use rows (3,7), ranges (0:16), label=N or a file glob"
        )
    out: list[Item] = []
    for item in items:
        if _INT.match(item):
            out.append(Item("row", item, int(item)))
            continue
        m = _SLICE.match(item)
        if m:
            start, stop, step = (int(g) if g not in (None, "") else None for g in m.groups())
            if step == 0:
                raise DataError(f"--select '{spec}': step 0 in '{item}'")
            out.append(Item("slice", item, slice(start, stop, step)))
            continue
        key, eq, rest = item.partition("=")
        if eq and re.match(r"^[A-Za-z_]+$", key.strip()):
            key = key.strip().lower()
            if key not in _KEYS:
                raise DataError(f"--select '{spec}': unknown key '{key}' in '{item}'; use {', '.join(_KEYS)}")
            if key == "file":
                if not rest:
                    raise DataError(f"--select '{spec}': empty file pattern in '{item}'")
                out.append(Item("file", item, rest))
            else:
                out.append(Item(key, item, _int(rest.strip(), item, spec, key)))
            continue
        if ":" in item:
            raise DataError(f"--select '{spec}': '{item}' is not a range like 0:16 or 10: or ::2")
        out.append(Item("file", item, item))
    return out


def _match_file(names: np.ndarray, pattern: str) -> np.ndarray:
    """Rows whose stored name (or, for a pattern without '/', base name) matches."""
    base = "/" not in pattern
    hits = [
        i
        for i, name in enumerate(names)
        if fnmatchcase(name, pattern) or (base and fnmatchcase(posixpath.basename(name), pattern))
    ]
    return np.asarray(hits, dtype=np.int64)


def resolve(spec: str | None, n: int, column: Callable[[str], np.ndarray], source: str = "") -> np.ndarray:
    """Turn a spec into row numbers (int64, order kept, no duplicates) for a file with ``n`` valid rows.

    ``column(name)`` returns the first ``n`` values of ``label``, ``target``, ``index`` or ``filename``; it is
    only called for the columns the spec needs. ``source`` (the file) is named in errors.
    """
    if spec is None:
        return np.arange(n, dtype=np.int64)
    where = f" in {source}" if source else ""
    owner = source or "the file"
    rows_txt = f"{owner} has {n} rows (0-{n - 1})" if n else f"{owner} has no rows"
    chosen: list[np.ndarray] = []
    for item in parse(spec):
        if item.kind == "row":
            r = int(item.value)
            if not -n <= r < n:
                raise DataError(f"--select '{spec}': row {r} is out of range; {rows_txt}")
            rows = np.asarray([r % n], dtype=np.int64)
        elif item.kind == "slice":
            rows = np.arange(n, dtype=np.int64)[item.value]
            if rows.size == 0:
                raise DataError(f"--select '{spec}': '{item.text}' selects no rows; {rows_txt}")
        elif item.kind == "file":
            rows = _match_file(column("filename"), str(item.value))
            if rows.size == 0:
                raise DataError(f"--select '{spec}': no stored file name{where} matches '{item.value}'")
        else:
            rows = np.flatnonzero(np.asarray(column(item.kind)) == item.value).astype(np.int64)
            if rows.size == 0:
                raise DataError(f"--select '{spec}': no row{where} has {item.kind}={item.value}")
        chosen.append(rows)
    merged = np.concatenate(chosen)
    _, first = np.unique(merged, return_index=True)
    return merged[np.sort(first)]
