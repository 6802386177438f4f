"""Shard files of a distributed run: which samples each rank holds, and the merge of the shards into one file.

The split is deterministic and contiguous, in whole batches (see ``lrpcli.runner.distributed`` for why); a shard is an
ordinary result file whose root attributes ``SHARD_ATTRS`` say which samples it holds. ``merge`` reads and checks
the shards (same run, every sample exactly once); ``lrpcli.store.join`` writes the joined file (a copy, or HDF5
virtual datasets over the shards) under a temporary name; ``merge`` verifies it and renames it. Nothing here
needs torch (``lrpcli merge`` runs anywhere h5py does).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lrpcli.errors import DataError, RunError
from lrpcli.store import (
    SHARD_ATTRS,
    SHARD_BATCH_SIZE_ATTR,
    SHARD_RANK_ATTR,
    SHARD_START_ATTR,
    SHARD_STOP_ATTR,
    SHARD_TOTAL_ATTR,
    SHARD_WORLD_SIZE_ATTR,
    config_differences,
    error_text,
    open_results,
    part_layout,
    read_classes,
    write_joined,
    write_virtual,
)

__all__ = ["SHARD_ATTRS", "shard_bounds", "shard_path", "default_output", "merge", "MergeSummary"]

_SHARD_RE = re.compile(r"^(?P<stem>.*)\.rank(?P<rank>\d{5,})(?P<suffix>\.[^.]*)?$")


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
        return int(self.attrs[SHARD_RANK_ATTR])


def _read_shard(path: Path) -> _ShardInfo:
    if not path.exists() and not path.is_symlink():
        raise DataError(f"shard {path}: no such file")
    with open_results(path) as r:
        attrs = r.attrs
        missing = [a for a in SHARD_ATTRS if a not in attrs]
        if missing:
            raise DataError(f"{path} is not a shard of a distributed run (no {missing[0]} attribute)")
        rank, world = int(attrs[SHARD_RANK_ATTR]), int(attrs[SHARD_WORLD_SIZE_ATTR])
        start, stop = int(attrs[SHARD_START_ATTR]), int(attrs[SHARD_STOP_ATTR])
        if not r.complete:
            done = r.rows_written + r.skipped_written
            raise DataError(
                f"{path} is incomplete ({done} of its {stop - start} samples done): finish it with "
                f"RANK={rank} WORLD_SIZE={world} lrpcli explain ... --resume (or rerun torchrun with --resume)")
        info = _ShardInfo(path, attrs, r.config, r.rows_written, list(r.skipped), np.asarray(r.index), [], [], {})
    info.shapes, info.layers, info.rules = part_layout(path)
    return info


def _check_shards(infos: list[_ShardInfo]) -> list[_ShardInfo]:
    """Same run, no rank twice, none missing, and every sample exactly once: the shards in rank order."""
    first = infos[0]
    run_attrs = (SHARD_WORLD_SIZE_ATTR, SHARD_TOTAL_ATTR, SHARD_BATCH_SIZE_ATTR)
    world, total, batch = (int(first.attrs[k]) for k in run_attrs)
    by_rank: dict[int, _ShardInfo] = {}
    for info in infos:
        same = tuple(int(info.attrs[k]) for k in run_attrs)
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
        got = (int(info.attrs[SHARD_START_ATTR]), int(info.attrs[SHARD_STOP_ATTR]))
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
        total = int(infos[0].attrs[SHARD_TOTAL_ATTR])
        if virtual:
            rows, skipped = write_virtual(infos, tmp, output, total)
        else:  # crash safety while merging is not needed: tmp only becomes the output when complete and verified
            rows, skipped = write_joined(infos, tmp, total)
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


def _verify(path: Path, infos: list[_ShardInfo]) -> None:
    """The written file has exactly the shards' rows: every index once, in order, and is complete."""
    expected = np.concatenate([info.index for info in infos])
    with open_results(path) as r:  # virtual sources are found next to it (named relative to its folder)
        index, complete, rows = r.index, r.complete, r.rows_written
    if not complete or rows != len(expected) or not np.array_equal(index, expected):
        raise RunError(f"the merged file {path} does not hold the shards' rows ({rows} rows, expected "
                       f"{len(expected)}); the shards are kept")
