"""Shard files of a distributed run: which samples each rank holds, and the merge of the shards into one file.

The split is deterministic and contiguous, in whole batches (see ``lrpcli.distributed`` for why); a shard is an
ordinary result file whose root attributes ``SHARD_ATTRS`` say which samples it holds. ``merge`` reads and checks
the shards (same run, every sample exactly once), writes the joined file (a copy, or HDF5 virtual datasets over
the shards) under a temporary name, verifies it and renames it. Nothing here needs torch (``lrpcli merge`` runs
anywhere h5py does).
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .errors import DataError, RunError
from .store import (
    INPUT_DATASET,
    LAYERS_GROUP,
    ResultWriter,
    config_differences,
    error_text,
    open_results,
    read_classes,
    row_datasets_of,
    write_classes,
)

__all__ = ["SHARD_ATTRS", "shard_bounds", "shard_path", "default_output", "merge", "MergeSummary"]

SHARD_ATTRS = ("shard_rank", "shard_world_size", "shard_start", "shard_stop", "shard_total", "shard_batch_size")
_SHARD_RE = re.compile(r"^(?P<stem>.*)\.rank(?P<rank>\d{5,})(?P<suffix>\.[^.]*)?$")
_MERGE_CHUNK_BYTES = 64 << 20  # rows copied per step of the merge: about this many bytes


# ------------------------------------------------------------------------------------------- the split
def shard_bounds(total: int, world_size: int, rank: int, batch_size: int) -> tuple[int, int]:
    """Rank ``rank``'s samples ``[start, stop)`` of ``total``: a contiguous block of whole batches."""
    n_batches = math.ceil(total / batch_size)
    lo = -(-rank * n_batches // world_size)  # ceil: with fewer batches than ranks, the last ranks idle
    hi = -(-(rank + 1) * n_batches // world_size)
    return min(lo * batch_size, total), min(hi * batch_size, total)


def shard_path(output: str | os.PathLike, rank: int) -> Path:
    """``out.h5`` -> ``out.rank00003.h5`` for rank 3 (next to the output)."""
    output = Path(output)
    return output.with_name(f"{output.stem}.rank{rank:05d}{output.suffix}")



# ------------------------------------------------------------------------------------------- merge
@dataclass
class MergeSummary:
    output: Path
    shards: int
    rows: int
    skipped: int
    seconds: float
    virtual: bool
    removed: bool

    def line(self) -> str:
        what = "wrote a virtual dataset over" if self.virtual else "merged"
        skipped = f", {self.skipped} skipped" if self.skipped else ""
        gone = ", shards removed" if self.removed else ", shards kept"
        return f"{what} {self.shards} shards: {self.rows} rows{skipped} in {self.seconds:.1f} s{gone} -> {self.output}"


@dataclass
class _ShardInfo:
    path: Path
    attrs: dict
    config: dict
    rows: int
    skipped: list[tuple[str, str]]
    index: np.ndarray
    layers: list[str]
    rules: list[str]
    shapes: dict[str, tuple[tuple[int, ...], str]]  # per-row dataset -> (shape without rows, dtype)

    @property
    def rank(self) -> int:
        return int(self.attrs["shard_rank"])


def _read_shard(path: Path) -> _ShardInfo:
    if not path.exists() and not path.is_symlink():
        raise DataError(f"shard {path}: no such file")
    with open_results(path) as r:
        attrs = r.attrs
        missing = [a for a in SHARD_ATTRS if a not in attrs]
        if missing:
            raise DataError(f"{path} is not a shard of a distributed run (no {missing[0]} attribute)")
        rank, world = int(attrs["shard_rank"]), int(attrs["shard_world_size"])
        start, stop = int(attrs["shard_start"]), int(attrs["shard_stop"])
        if not r.complete:
            done = r.rows_written + r.skipped_written
            raise DataError(
                f"{path} is incomplete ({done} of its {stop - start} samples done): finish it with "
                f"RANK={rank} WORLD_SIZE={world} lrpcli explain ... --resume (or rerun torchrun with --resume)")
        info = _ShardInfo(path, attrs, r.config, r.rows_written, list(r.skipped), np.asarray(r.index), [], [], {})
    import h5py


    with h5py.File(path, "r") as f:
        info.shapes = {name: (tuple(f[name].shape[1:]), str(f[name].dtype)) for name in row_datasets_of(f)}
        info.layers = f["conservation/layer"].asstr()[()].tolist()
        info.rules = f["conservation/rule"].asstr()[()].tolist()
    return info


def _check_shards(infos: list[_ShardInfo]) -> list[_ShardInfo]:
    """Same run, no rank twice, none missing, and every sample exactly once: the shards in rank order."""
    first = infos[0]
    world, total, batch = (int(first.attrs[k]) for k in ("shard_world_size", "shard_total", "shard_batch_size"))
    by_rank: dict[int, _ShardInfo] = {}
    for info in infos:
        same = tuple(int(info.attrs[k]) for k in ("shard_world_size", "shard_total", "shard_batch_size"))
        if same != (world, total, batch):
            raise DataError(
                f"{info.path} and {first.path} come from different runs: {info.path.name} is a shard of "
                f"{same[1]} samples over {same[0]} ranks (batch size {same[2]}), {first.path.name} of {total} "
                f"over {world} (batch size {batch})")
        if info.rank in by_rank:
            raise DataError(f"duplicate shard: {by_rank[info.rank].path} and {info.path} are both rank {info.rank} "
                            "(their samples would appear twice)")
        by_rank[info.rank] = info
        diff = config_differences(first.config, info.config)
        if diff:
            raise DataError(f"{info.path} was written with a different config than {first.path} ("
                            + "; ".join(diff) + ")")
        if read_classes(info.attrs) != read_classes(first.attrs):
            raise DataError(f"{info.path} and {first.path} were written for different classes "
                            f"({read_classes(info.attrs)} and {read_classes(first.attrs)}): their labels do not mean "
                            "the same; merge shards of one run over one DATA")
        if (info.layers, info.rules) != (first.layers, first.rules):
            raise DataError(f"{info.path} and {first.path} have different conservation layers or rules")
        if info.shapes != first.shapes:
            theirs = {k: v for k, v in info.shapes.items() if first.shapes.get(k) != v}
            raise DataError(f"{info.path} does not have the layout of {first.path} (differs in "
                            f"{', '.join(sorted(theirs) or sorted(set(first.shapes) - set(info.shapes)))})")
    for rank in range(world):
        start, stop = shard_bounds(total, world, rank, batch)
        info = by_rank.get(rank)
        if info is None:
            if stop > start:
                raise DataError(f"missing shard: rank {rank} of {world} (samples [{start}, {stop})), expected "
                                f"{shard_path(_merged_name(first.path), rank)}")
            continue
        got = (int(info.attrs["shard_start"]), int(info.attrs["shard_stop"]))
        if got != (start, stop):
            raise DataError(f"{info.path} holds samples [{got[0]}, {got[1]}) but rank {rank} of {world} should "
                            f"hold [{start}, {stop})")
        index = info.index.astype(np.int64)
        if len(index) + len(info.skipped) != stop - start:
            raise DataError(f"{info.path}: {len(index)} rows and {len(info.skipped)} skipped images, but its "
                            f"share is {stop - start} samples")
        if len(index):
            if index.min() < start or index.max() >= stop:
                bad = index[(index < start) | (index >= stop)][0]
                raise DataError(f"{info.path}: index {bad} is outside its samples [{start}, {stop})")
            steps = np.diff(index)
            if (steps <= 0).any():
                at = int(np.argmax(steps <= 0))
                what = "duplicate" if steps[at] == 0 else "out-of-order"
                raise DataError(f"{info.path}: {what} index {index[at + 1]} (row {at + 1})")
    return [by_rank[r] for r in sorted(by_rank)]


def _merged_name(shard: Path) -> Path:
    """``out.rank00003.h5`` -> ``out.h5``."""
    m = _SHARD_RE.match(shard.name)
    return shard.with_name(m["stem"] + (m["suffix"] or "")) if m else shard


def default_output(shards: Sequence[str | os.PathLike]) -> Path:
    """The merged file that shard names point to (``out.rank00000.h5`` -> ``out.h5``)."""
    names = {_merged_name(Path(s)) for s in shards}
    if len(names) != 1 or any(not _SHARD_RE.match(Path(s).name) for s in shards):
        raise DataError("cannot tell the merged file's name from the shard names; give -o/--output")
    return names.pop()


def merge(shards: Sequence[str | os.PathLike], output: str | os.PathLike, *, overwrite: bool = False,
          keep_shards: bool = False, virtual: bool = False) -> MergeSummary:
    """Join shard files into ``output`` in data set order, verified, then remove them (unless kept).

    ``virtual=True`` writes ``output`` as HDF5 virtual datasets over the shards (no copy; the shards stay and
    must stay next to it). Either way ``output`` only appears once it is complete: it is written under a
    temporary name and renamed.
    """
    import time

    t0 = time.perf_counter()
    output = Path(output)
    paths = [Path(s) for s in shards]
    if not paths:
        raise DataError("no shard files given")
    seen: dict[Path, Path] = {}
    for p in paths:
        if p.resolve() in seen:
            first = seen[p.resolve()]
            named = f"{p}" if str(first) == str(p) else f"{p} (the same file as {first})"
            raise DataError(f"shard {named} is given twice; give each shard once")
        seen[p.resolve()] = p
    if output.resolve() in seen:
        raise DataError(f"{output} is one of the shards; choose another -o/--output")
    if output.is_dir():
        raise DataError(f"output {output} is a directory; give a file name")
    if os.path.lexists(output) and not overwrite:
        raise DataError(f"output {output} already exists; pass --overwrite to replace it")
    infos = _check_shards([_read_shard(p) for p in paths])
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".merging")
    try:
        if virtual:
            rows, skipped = _write_virtual(infos, tmp, output)
        else:
            rows, skipped = _write_merged(infos, tmp)
        _verify(tmp, infos)
        os.replace(tmp, output)
    except BaseException as err:
        for leftover in (tmp, Path(str(tmp) + ".partial")):
            try:
                leftover.unlink()
            except OSError:
                pass
        if isinstance(err, (OSError, RuntimeError, ValueError)):  # h5py's ways of saying "disk full"

            raise RunError(f"writing {output} failed ({error_text(err)}); nothing was written and the shards are "
                           "kept: free space (or fix the cause) and merge again") from None
        raise
    removed = not virtual and not keep_shards
    if removed:
        for info in infos:
            info.path.unlink()
    return MergeSummary(output, len(infos), rows, skipped, time.perf_counter() - t0, virtual, removed)


def _write_merged(infos: list[_ShardInfo], tmp: Path) -> tuple[int, int]:
    """A real copy with the layout, attributes, chunking and dtypes of a one-process run's file.

    ``ResultWriter.create`` builds the file (every dataset, every attribute) exactly as a run does; the rows
    are then copied in: the compressed one-row chunks as they are (raw chunk copy, no decompress/compress;
    40x faster than re-encoding, the bytes are the same), the small per-row datasets as values. The file is
    finished like ``ResultWriter.close(complete=True)`` finishes one: trimmed to its rows, then committed.
    Crash safety while merging is not needed: ``tmp`` only becomes the output when complete and verified.
    """
    import h5py


    first = infos[0]
    attrs = first.attrs
    shapes = first.shapes
    layer_names = [name[len(LAYERS_GROUP) + 1:] for name in shapes if name.startswith(LAYERS_GROUP + "/")]
    with h5py.File(first.path, "r") as src:  # the first shard's choice (output.compression: auto decides per file)
        compressed = {name: src[name].compression is not None for name in shapes}
    ResultWriter.create(
        tmp, config=first.config, config_yaml=str(attrs["config"]), n_rows=int(attrs["shard_total"]),
        num_outputs=shapes["prediction"][0][0], sample_shape=shapes["attribution"][0],
        layers=first.layers, rules=first.rules, dtype=shapes["attribution"][1],
        store_input=INPUT_DATASET in shapes, overwrite=True,
        extra_layers={name: shapes[f"layers/{name}"][0] for name in layer_names},
        torch_version=str(attrs.get("torch_version", "")), compressed=compressed, classes=read_classes(attrs),
        config_dir=attrs.get("config_dir")).close(complete=False)
    skipped = [s for info in infos for s in info.skipped]
    rows = 0
    with h5py.File(tmp, "r+", libver=("earliest", "v108")) as out:
        if "model_fingerprint" in attrs:  # the model that wrote the rows, as in a one-process file
            out.attrs["model_fingerprint"] = attrs["model_fingerprint"]
        for info in infos:
            with h5py.File(info.path, "r") as src:
                for name in shapes:
                    _copy_rows(src[name], out[name], info.rows, rows)
            rows += info.rows
        for i, key in enumerate(("filename", "reason")):
            dset = out[f"skipped/{key}"]
            if dset.shape[0] < len(skipped):
                dset.resize(len(skipped), axis=0)
            if skipped:
                dset[: len(skipped)] = np.array([s[i] for s in skipped], dtype=object)
            dset.resize(len(skipped), axis=0)
        for name in shapes:
            out[name].resize(rows, axis=0)
        out.flush()
        out.attrs.modify("rows_written", np.int64(rows))
        out.attrs.modify("skipped_written", np.int64(len(skipped)))
        out.flush()
        out.attrs.modify("complete", np.bool_(True))
    return rows, len(skipped)


def _copy_rows(src: Any, dst: Any, n: int, at: int) -> None:
    """Rows ``[0, n)`` of ``src`` into rows ``[at, at + n)`` of ``dst``."""
    import h5py

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


def _write_virtual(infos: list[_ShardInfo], tmp: Path, output: Path) -> tuple[int, int]:
    """``output`` as virtual datasets over the shards (sources named relative to ``output``'s folder)."""
    import h5py


    first = infos[0]
    rows = sum(info.rows for info in infos)
    skipped = [s for info in infos for s in info.skipped]
    text = h5py.string_dtype("utf-8")
    with h5py.File(tmp, "w", libver=("v110", "latest")) as f:
        for key in ("config", "torch_version"):
            f.attrs[key] = str(first.attrs.get(key, ""))
        f.attrs["lrpcli_version"] = __version__
        f.attrs["created"] = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
        f.attrs["n_rows"] = np.int64(first.attrs["shard_total"])
        f.attrs["complete"] = np.bool_(True)
        f.attrs["rows_written"] = np.int64(rows)
        f.attrs["skipped_written"] = np.int64(len(skipped))
        f.attrs["virtual_shards"] = [os.path.relpath(info.path, output.parent) for info in infos]
        for key in ("model_fingerprint", "config_dir"):
            if key in first.attrs:
                f.attrs[key] = first.attrs[key]
        classes = read_classes(first.attrs)
        if classes is not None:
            write_classes(f.attrs, classes)
        for name, (shape, dtype) in first.shapes.items():
            dt = text if dtype == "object" else np.dtype(dtype)
            layout = h5py.VirtualLayout(shape=(rows,) + shape, dtype=dt)
            at = 0
            for info in infos:
                if info.rows:
                    source = h5py.VirtualSource(os.path.relpath(info.path, output.parent), name,
                                                shape=(info.rows,) + shape)
                    layout[at:at + info.rows] = source
                    at += info.rows
            f.create_virtual_dataset(name, layout)
        f.require_group(LAYERS_GROUP)
        f.create_dataset("conservation/layer", data=np.array(first.layers, dtype=object), dtype=text)
        f.create_dataset("conservation/rule", data=np.array(first.rules, dtype=object), dtype=text)
        for i, key in enumerate(("filename", "reason")):
            f.create_dataset(f"skipped/{key}", data=np.array([s[i] for s in skipped], dtype=object), dtype=text,
                             shape=(len(skipped),))
    return rows, len(skipped)


def _verify(path: Path, infos: list[_ShardInfo]) -> None:
    """The written file has exactly the shards' rows: every index once, in order, and is complete."""
    expected = np.concatenate([info.index for info in infos])
    with open_results(path) as r:  # virtual sources are found next to it (named relative to its folder)
        index, complete, rows = r.index, r.complete, r.rows_written
    if not complete or rows != len(expected) or not np.array_equal(index, expected):
        raise RunError(f"the merged file {path} does not hold the shards' rows ({rows} rows, expected "
                       f"{len(expected)}); the shards are kept")
