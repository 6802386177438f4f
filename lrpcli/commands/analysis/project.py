"""``lrpcli virelay``: a ViRelAy project folder that ``python -m virelay DIR/<name>.yaml`` serves unchanged.

The folder holds (paths in the YAML are relative to it, as ViRelAy resolves them):

- ``label-map.json``: ``[{"index", "word_net_id", "name"}]`` per class in label order; ``word_net_id`` is the
  analysis category key (``00000003``), and label -1 (a flat DATA folder, a skipped image) is an entry
  ``unlabelled`` so such rows are served instead of failing the label lookup;
- ``dataset.h5``: ``data`` uint8 (M, C, H, W) and ``label`` int64 (M,), row ``i`` = dataset index ``i`` (the
  explain file's ``index``), so a skipped image leaves a black row with label -1 and every later image stays
  at its index (ViRelAy indexes this file by position);
- per OUT.h5, ``<name>.attribution.h5`` (``attribution`` a virtual dataset over OUT.h5's rows, placed by
  dataset index; see ``_write_attribution_view``) and ``<name>.yaml``: the project, with method and strategy
  from OUT.h5's stored config, and the analyses of that file.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

import h5py
import numpy as np
import yaml

from lrpcli.commands.analysis import layout, source
from lrpcli.errors import DataError
from lrpcli.store import ATTRIBUTION_DATASET, INPUT_DATASET, N_ROWS_ATTR, PREDICTION_DATASET

LABEL_MAP = "label-map.json"
DATASET = "dataset.h5"
_STRATEGY = {"label": "true_label", "prediction": "predicted_label"}


@dataclass
class _Run:
    path: str
    rows: source.Rows
    config: dict
    image_shape: tuple[int, int, int]
    analyses: list[layout.Analysis] = field(default_factory=list)


def _open_run(path: str) -> _Run:
    with source.open_source(path) as results:
        rows = source.read_rows(results)
        try:
            first = results.read(INPUT_DATASET, slice(0, 1))
        except KeyError:
            raise DataError(f"{path}: no 'input' dataset, which ViRelAy shows as the images; "
                            "run explain with output.store_input: true") from None
        return _Run(path, rows, results.config, tuple(int(s) for s in first.shape[1:]))


def _check_same_data(runs: list[_Run]) -> None:
    """Every OUT.h5 must come from the same DATA: the same file name at each dataset index they share."""
    first = runs[0]
    names = dict(zip(first.rows.index.tolist(), first.rows.filename))
    for run in runs[1:]:
        if run.image_shape != first.image_shape:
            raise DataError(f"{run.path}: images of shape {run.image_shape}, but {first.path} has "
                            f"{first.image_shape}; one project needs the same data and preprocessing")
        for idx, name in zip(run.rows.index.tolist(), run.rows.filename):
            if names.setdefault(idx, name) != name:
                raise DataError(f"{run.path}: index {idx} is {name!r} but {names[idx]!r} in {first.path}; "
                                "a project needs explain runs of the same DATA folder")


def _attach(runs: list[_Run], analyses: list[str]) -> None:
    """Each analysis goes to the OUT.h5 it was computed from (by fingerprint); DataError for any other."""
    for path in analyses:
        ana = layout.read(path)
        run = next((r for r in runs if r.rows.fingerprint == ana.fingerprint), None)
        if run is None:
            given = ", ".join(r.path for r in runs)
            raise DataError(f"--analysis {path}: is an analysis of {ana.source}, a different explain run than "
                            f"{given}; run 'lrpcli analyze' on the file you give")
        have = set(run.rows.index.tolist())
        for key, idx in ana.indices.items():
            missing = [int(i) for i in idx if int(i) not in have]
            if missing:
                raise DataError(f"--analysis {path}: category {key} uses dataset index {missing[0]}, which "
                                f"{run.path} does not have; re-run 'lrpcli analyze'")
        run.analyses.append(ana)


def _label_map(runs: list[_Run]) -> list[dict]:
    classes = runs[0].rows.classes
    entries = [{"index": i, "word_net_id": source.category_key(i), "name": n} for i, n in enumerate(classes)]
    known = {e["index"] for e in entries}
    for run in runs:
        for ana in run.analyses:
            for key in ana.indices:
                if key != source.UNLABELLED and int(key) not in known:
                    known.add(int(key))
                    entries.append({"index": int(key), "word_net_id": key, "name": f"output {int(key)}"})
    entries.append({"index": -1, "word_net_id": source.UNLABELLED, "name": source.UNLABELLED_NAME})
    return entries


def _write_dataset(path: str, runs: list[_Run]) -> int:
    """``data`` and ``label`` by dataset index, copied chunk by chunk from the runs' stored inputs."""
    size = 1 + max(int(r.rows.index.max()) for r in runs)
    c, h, w = runs[0].image_shape
    done = np.zeros(size, dtype=bool)
    with h5py.File(path, "w") as f:
        data = f.create_dataset("data", (size, 3, h, w), dtype=np.uint8, chunks=(1, 3, h, w),
                                compression="lzf")
        labels = np.full(size, -1, dtype=np.int64)
        for run in runs:
            with source.open_source(run.path) as results:
                for start, chunk in source.iter_relevance(results, run.rows.n, INPUT_DATASET):
                    idx = run.rows.index[start: start + len(chunk)]
                    labels[idx] = run.rows.label[start: start + len(chunk)]
                    chunk = np.repeat(chunk, 3, axis=1) if c == 1 else chunk
                    for i, row in zip(idx.tolist(), chunk):
                        if not done[i]:
                            data[i] = row
                            done[i] = True
        f.create_dataset("label", data=labels)
    return size


def _write_attribution_view(path: str, run: _Run, size: int) -> None:
    """ViRelAy's attribution file for one run, by dataset index and without an ``index`` dataset: ViRelAy
    scans ``index`` row by row on every request, while without it row i is simply attribution i.

    ``attribution`` is an HDF5 virtual dataset over OUT.h5 (nothing is copied; one mapping per run of
    consecutive indices, so only skipped images split it); ``prediction`` and ``label`` are small copies.
    Rows without a sample (a skipped image) read as zeros with label -1. The source is named relative to
    this file, so DIR and OUT.h5 can move together.
    """
    idx = run.rows.index
    with source.open_source(run.path) as results:
        att = results.read(ATTRIBUTION_DATASET, slice(0, 1))
        prediction = results.read(PREDICTION_DATASET, slice(0, run.rows.n))
        att_last = results.read(ATTRIBUTION_DATASET, run.rows.n - 1)
        shape = results.attrs.get(N_ROWS_ATTR, run.rows.n)
    shape = (int(shape), *att.shape[1:])
    layout_ = h5py.VirtualLayout(shape=(size, *att.shape[1:]), dtype=att.dtype)
    src = h5py.VirtualSource(os.path.relpath(os.path.abspath(run.path), os.path.dirname(os.path.abspath(path))),
                             ATTRIBUTION_DATASET, shape=shape)
    breaks = np.flatnonzero(np.diff(idx) != 1) + 1
    for start, stop in zip(np.r_[0, breaks], np.r_[breaks, len(idx)]):
        first = int(idx[start])
        layout_[first: first + stop - start] = src[int(start): int(stop)]
    labels = np.full(size, -1, dtype=np.int64)
    labels[idx] = run.rows.label
    preds = np.zeros((size, prediction.shape[1]), dtype=np.float32)
    preds[idx] = prediction
    with h5py.File(path, "w") as f:
        f.create_virtual_dataset("attribution", layout_, fillvalue=0)
        f.create_dataset("label", data=labels)
        f.create_dataset("prediction", data=preds)
    # HDF5 reads an unreachable source as zeros without an error: check that the link resolves now
    last = run.rows.n - 1
    with h5py.File(path, "r") as f:
        ok = np.array_equal(f["attribution"][int(idx[last])], att_last)
    if not ok:
        raise DataError(f"{path}: the virtual attribution dataset does not read {run.path}; "
                        "is the file on a path HDF5 cannot open?")


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]+", "_", text).strip("_") or "analysis"


def _project_yaml(run: _Run, out_dir: str, name: str, dataset_name: str, method_names: list[str],
                  attribution_file: str) -> dict:
    cfg = run.config
    model = cfg.get("model", {}) or {}
    attribution = cfg.get("attribution", {}) or {}
    method = str(attribution.get("method", "lrp"))
    if method == "lrp":
        method = f"lrp {(cfg.get('composite', {}) or {}).get('name', '')}".strip()
    target = attribution.get("target", "label")
    strategy = _STRATEGY.get(str(target), f"output {target}")
    _c, h, w = run.image_shape
    project = {
        "name": name,
        "model": str(model.get("name") or model.get("entrypoint") or "model"),
        "label_map": LABEL_MAP,
        "dataset": {"name": dataset_name, "type": "hdf5", "path": DATASET, "input_width": w, "input_height": h,
                    "up_sampling_method": "none", "down_sampling_method": "none"},
        "attributions": {"attribution_method": method, "attribution_strategy": strategy,
                         "sources": [attribution_file]},
    }
    if run.analyses:
        project["analyses"] = [
            {"analysis_method": m, "sources": [os.path.relpath(os.path.abspath(a.path), os.path.abspath(out_dir))]}
            for m, a in zip(method_names, run.analyses)
        ]
    return {"project": project}


def make_project(files: list[str], analyses: list[str], out_dir: str, name: str | None = None,
                 overwrite: bool = False) -> list[str]:
    """Write the project folder; returns the project YAML paths (one per OUT.h5)."""
    runs = [_open_run(p) for p in files]
    _check_same_data(runs)
    _attach(runs, analyses)
    stems = [_safe(os.path.splitext(os.path.basename(r.path))[0]) for r in runs]
    stems = [s if stems.count(s) == 1 else f"{s}_{i}" for i, s in enumerate(stems)]
    yamls = [os.path.join(out_dir, f"{s}.yaml") for s in stems]
    views = [f"{s}.attribution.h5" for s in stems]
    targets = [os.path.join(out_dir, LABEL_MAP), os.path.join(out_dir, DATASET), *yamls,
               *(os.path.join(out_dir, v) for v in views)]
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise DataError(f"-d {out_dir}: is a file; give a folder for the project")
    clash = [t for t in targets if os.path.lexists(t)]
    if clash and not overwrite:
        raise DataError(f"-d {out_dir}: {clash[0]} already exists; pass --overwrite to replace the project files")
    try:
        os.makedirs(out_dir, exist_ok=True)
        with open(targets[0] + ".partial", "w", encoding="utf-8") as fh:
            json.dump(_label_map(runs), fh, indent=1, ensure_ascii=False)
        os.replace(targets[0] + ".partial", targets[0])
        size = _write_dataset(targets[1] + ".partial", runs)
        os.replace(targets[1] + ".partial", targets[1])
        base = os.path.splitext(os.path.basename(runs[0].path))[0]
        for run, stem, path, view in zip(runs, stems, yamls, views):
            view_path = os.path.join(out_dir, view)
            _write_attribution_view(view_path + ".partial", run, size)
            os.replace(view_path + ".partial", view_path)
            methods, seen = [], set()
            for ana in run.analyses:
                m = _safe(os.path.splitext(os.path.basename(ana.path))[0])
                while m in seen:
                    m += "_2"
                seen.add(m)
                methods.append(m)
            title = name if name and len(runs) == 1 else f"{name or base} {stem}" if len(runs) > 1 else stem
            doc = _project_yaml(run, out_dir, title, name or base, methods, view)
            with open(path + ".partial", "w", encoding="utf-8") as fh:
                yaml.safe_dump(doc, fh, sort_keys=False, allow_unicode=True)
            os.replace(path + ".partial", path)
    except OSError as err:
        raise DataError(f"-d {out_dir}: cannot write ({err.strerror or err})") from None
    return yamls
