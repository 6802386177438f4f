"""The evaluation as a table (metric x file, mean ± std over the compared rows), JSON or CSV.

Files are compared on the same rows: the data set indices present in every file (``index``), in index order.
The ``random`` column is the seeded random-attribution baseline, evaluated with the first file's model.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from lrpcli.commands.evaluate.run import FileResult
from lrpcli.commands.evaluate.settings import FAMILIES
from lrpcli.errors import DataError

#: Which way is better, per table row (shown in the table and the JSON).
BETTER = {"aopc_morf": "higher", "aopc_lerf": "lower", "abpc": "higher", "faithfulness_correlation": "higher",
          "relevance_mass_accuracy": "higher", "relevance_rank_accuracy": "higher", "pointing_game": "higher",
          "sparseness": "higher", "complexity": "lower", "model_randomisation": "lower"}


def labels_of(results: list[FileResult]) -> list[str]:
    """Column names: file names, or their paths where two files share a name."""
    names = [r.source.path.name for r in results]
    if len(set(names)) < len(names):
        names = [str(r.source.path) for r in results]
    return names


def common_rows(results: list[FileResult]) -> list[np.ndarray]:
    """Per file, the rows of the data set indices that every file has, sorted by index.

    Files from different data sets (another input size, or another image at the same index) are refused.
    """
    first = results[0].source
    for r in results[1:]:
        s = r.source
        if s.shape != first.shape:
            raise DataError(f"{s.path} and {first.path} come from different inputs ({s.shape[1]}x{s.shape[2]} vs "
                            f"{first.shape[1]}x{first.shape[2]}); evaluate compares files of one data set")
    common = set(first.index.tolist())
    for r in results[1:]:
        common &= set(r.source.index.tolist())
    if not common:
        raise DataError(f"{results[1].source.path} and {first.path} share no data set index; evaluate compares files "
                        "of one data set")
    keys = np.array(sorted(common), dtype=np.int64)
    rows = []
    for r in results:
        where = {int(i): j for j, i in enumerate(r.source.index)}
        rows.append(np.array([where[int(k)] for k in keys], dtype=np.int64))
    names = [first.filename[int(j)] for j in rows[0]]
    for r, rr in zip(results[1:], rows[1:]):
        for k, name, j in zip(keys, names, rr):
            if r.source.filename[int(j)] != name:
                raise DataError(f"{r.source.path} and {first.path} come from different data sets: index {k} is "
                                f"{r.source.filename[int(j)]!r} in one and {name!r} in the other")
    return rows


def summarise(results: list[FileResult], families: list[str], baseline: bool) -> dict[str, Any]:
    """``{"rows": ..., "columns": [...], "metrics": {row: {column: {mean, std, n}}}}`` over the common rows."""
    rows = common_rows(results)
    cols = labels_of(results)
    table: dict[str, dict[str, dict[str, float]]] = {}
    for fam in families:
        for name in FAMILIES[fam]:
            entry = {}
            for col, res, rr in zip(cols, results, rows):
                entry[col] = _stats(res.values["attribution"][name][rr])
            if baseline:
                entry["random"] = _stats(results[0].values["random"][name][rows[0]])
            table[name] = entry
    return {"rows": len(rows[0]), "columns": cols + (["random"] if baseline else []), "metrics": table,
            "index": results[0].source.index[rows[0]].tolist(), "row_numbers": [r.tolist() for r in rows]}


def _stats(values: np.ndarray) -> dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    ok = v[np.isfinite(v)]
    if not len(ok):
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(ok.mean()), "std": float(ok.std()), "n": int(len(ok))}


def table_text(summary: dict[str, Any]) -> str:
    """The metric x file table, ``mean ± std`` per cell, with the better direction per metric."""
    cols = summary["columns"]
    head = ["metric", *cols, "better"]
    lines = [head]
    for name, entry in summary["metrics"].items():
        cells = [f"{e['mean']:.4g} ± {e['std']:.3g}" if e["n"] else "n/a" for e in (entry[c] for c in cols)]
        lines.append([name, *cells, BETTER[name]])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
           for line in lines]
    out.append(f"({summary['rows']} samples compared by index; mean ± standard deviation over samples)")
    return "\n".join(out)


def per_sample(results: list[FileResult], summary: dict[str, Any], baseline: bool) -> dict[str, Any]:
    """Per-sample values of the compared rows, by column and metric (NaN as null)."""
    out: dict[str, Any] = {}
    for col, res, rr in zip(summary["columns"], results, summary["row_numbers"]):
        out[col] = {name: _nulls(res.values["attribution"][name][rr]) for name in summary["metrics"]}
    if baseline:
        rr = summary["row_numbers"][0]
        out["random"] = {name: _nulls(results[0].values["random"][name][rr]) for name in summary["metrics"]}
    return out


def _nulls(values: np.ndarray) -> list[float | None]:
    return [float(v) if np.isfinite(v) else None for v in np.asarray(values, dtype=np.float64)]


def write_report(path: Path, results: list[FileResult], summary: dict[str, Any], settings: dict[str, Any],
                 baseline: bool) -> None:
    """JSON (everything, per sample included) or CSV (one line per metric and column) by the suffix."""
    if path.suffix.lower() == ".csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["metric", "file", "mean", "std", "n", "better"])
        for name, entry in summary["metrics"].items():
            for col in summary["columns"]:
                e = entry[col]
                w.writerow([name, col, repr(e["mean"]), repr(e["std"]), e["n"], BETTER[name]])
        text = buf.getvalue()
    else:
        doc = {
            "files": [{"column": c, "path": str(r.source.path), "rows": r.source.n}
                      for c, r in zip(summary["columns"], results)],
            "settings": settings,
            "samples": summary["rows"],
            "index": summary["index"],
            "metrics": {name: {col: _json_stats(e) for col, e in entry.items()}
                        for name, entry in summary["metrics"].items()},
            "better": {name: BETTER[name] for name in summary["metrics"]},
            "per_sample": per_sample(results, summary, baseline),
        }
        text = json.dumps(doc, indent=1, allow_nan=False) + "\n"
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as err:
        raise DataError(f"-o {path}: cannot write ({err.strerror or err})") from None


def _json_stats(e: dict[str, float]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in e.items()}
