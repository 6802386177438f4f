"""``lrpcli analyze``'s work: one pass over OUT.h5 for the features, then SpRAy per category, then one write."""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from lrpcli.commands.analysis import layout, source, spray
from lrpcli.errors import DataError


def compute_features(results, n: int, params: spray.Params,
                     progress: Callable[[int], None] | None = None) -> np.ndarray:
    """SpRAy features of the first ``n`` rows, read sequentially in chunks (memory: one chunk + features)."""
    feats: np.ndarray | None = None
    for start, chunk in source.iter_relevance(results, n):
        f = spray.preprocess(chunk, params.size, params.absolute)
        if feats is None:
            feats = np.empty((n, f.shape[1]), dtype=np.float32)
        feats[start: start + len(f)] = f
        if progress is not None:
            progress(len(f))
    assert feats is not None
    return feats


def analyze_file(path: str, out: str, params: spray.Params, by: str = "label", wanted: tuple[str, ...] = (),
                 overwrite: bool = False, log: Callable[[str], None] | None = None) -> list[layout.Category]:
    """Analyse the explain output ``path`` and write ViRelAy's analysis layout to ``out``.

    ``by`` groups rows by ``label`` (the data set's class) or ``target`` (the output explained); ``wanted``
    restricts to some classes. Output problems are checked before the (long) computation starts.
    """
    if os.path.lexists(out) and not overwrite:
        raise DataError(f"-o {out} already exists; pass --overwrite to replace it")
    with source.open_source(path) as results:
        rows = source.read_rows(results)
        chosen = source.select_categories(rows, by, wanted)
        feats = compute_features(results, rows.n, params)
    categories = []
    for value, members in chosen.items():
        name = source.category_name(value, rows.classes, by)
        if log is not None:
            log(f"analyze: {name}: {len(members)} samples")
        result = spray.analyse(feats[members], params)
        categories.append(layout.Category(source.category_key(value), name, value, rows.index[members], result))
    prov = layout.Provenance(source=os.path.abspath(path), fingerprint=rows.fingerprint, rows=rows.n,
                             complete=rows.complete, by=by, params=params, classes=rows.classes)
    layout.write(out, categories, prov, overwrite=overwrite)
    return categories
