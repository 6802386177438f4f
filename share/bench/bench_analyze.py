"""Time ``lrpcli analyze`` (SpRAy) stage by stage for N relevance maps of 224 x 224, with its peak memory.

Stages, as ``lrpcli.commands.analysis.spray.analyse`` reports them: preprocess (read + channel sum + pooling),
graph (kNN), eigen (spectral embedding), clustering (k-means for k = 2..10 and HDBSCAN), embedding (t-SNE).

A file of 50,000 x 3 x 224 x 224 float32 is 30 GB, so preprocess is timed on a synthetic file in the lrpcli
layout (``--file-rows`` rows, lzf-compressed per-row chunks like explain writes) by the function analyze runs
(``lrpcli.commands.analysis.analyze.compute_features``) and scaled to N (it reads one chunk at a time: linear in N).
The other stages run on N synthetic pooled maps split into ``--classes`` equal classes (each a few planted
groups plus noise), through ``spray.analyse`` with analyze's defaults. Wall and process CPU seconds are printed
(CPU time is the check on a shared machine), with the load average and the process's peak RSS; ``--json``
adds one machine-readable line (``make bench``'s analyze section reads it).

    .venv/bin/python share/bench/bench_analyze.py [--n 20000] [--classes 1] [--file-rows 1000] [--threads 1]
                                                  [--no-tsne] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from lrpcli.commands.analysis import spray
from lrpcli.commands.analysis.analyze import compute_features
from lrpcli.store import open_results


def write_file(path: Path, n: int, size: int = 224, seed: int = 0) -> None:
    """A minimal explain-like file: attribution (lzf, one row per chunk), label, target, index, filename."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    with h5py.File(path, "w") as f:
        f.attrs.update({"lrpcli_version": "bench", "config": "{}", "rows_written": n, "n_rows": n,
                        "complete": True, "created": "bench"})
        att = f.create_dataset("attribution", (n, 3, size, size), "f4", chunks=(1, 3, size, size),
                               compression="lzf")
        for start in range(0, n, 50):
            b = min(50, n - start)
            cy, cx = rng.random((2, b, 1, 1)).astype(np.float32)
            blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) * 20)
            att[start: start + b] = blob[:, None] * rng.standard_normal((b, 3, size, size), dtype=np.float32)
        for name in ("prediction",):
            f.create_dataset(name, data=np.zeros((n, 10), np.float32))
        f["label"] = np.zeros(n, np.int64)
        f["target"] = np.zeros(n, np.int64)
        f["index"] = np.arange(n, dtype=np.uint32)
        f.create_dataset("filename", data=[f"c/img_{i:06d}.jpg" for i in range(n)], dtype=h5py.string_dtype())
        for name in ("conservation/layer", "conservation/rule", "conservation/relevance_in",
                     "conservation/relevance_out", "conservation/output_relevance", "skipped/filename",
                     "skipped/reason"):
            f.create_dataset(name, data=np.zeros(0))


def synthetic_features(n: int, side: int = 32, groups: int = 4, seed: int = 0) -> np.ndarray:
    """Pooled, L1-normalised maps: each group a blob at its own place, jittered, plus noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    centres = rng.random((groups, 2)).astype(np.float32)
    g = rng.integers(0, groups, n)
    out = np.empty((n, side * side), np.float32)
    for start in range(0, n, 5000):
        idx = np.arange(start, min(n, start + 5000))
        c = centres[g[idx]] + rng.normal(0, 0.05, (len(idx), 2)).astype(np.float32)
        maps = np.exp(-((yy[None] - c[:, :1, None]) ** 2 + (xx[None] - c[:, 1:, None]) ** 2) * 40)
        maps += rng.normal(0, 0.05, maps.shape).astype(np.float32)
        maps /= np.abs(maps).sum(axis=(1, 2), keepdims=True)
        out[idx] = maps.reshape(len(idx), -1)
    return out


def _timed(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - t0, time.process_time() - c0


def bench_read(rows: int, size: int) -> tuple[float, float]:
    """Wall and CPU seconds per row of reading + preprocessing an lzf-compressed file (setup not timed)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.h5"
        write_file(path, rows, size)
        with open_results(path) as results:
            _, wall, cpu = _timed(lambda: compute_features(results, rows, spray.Params()))
    print(f"preprocess: {rows} rows of 3x{size}x{size} in {wall:.1f} s wall ({cpu:.1f} s CPU): "
          f"{rows / wall:.0f} rows/s")
    return wall / rows, cpu / rows


def bench_spray(n: int, classes: int, params: spray.Params) -> dict[str, list[float]]:
    """``[wall, CPU]`` seconds of each SpRAy stage, summed over ``classes`` classes of ``n // classes`` maps."""
    times: dict[str, list[float]] = {}
    per_class = n // classes
    for c in range(classes):
        feats = synthetic_features(per_class, seed=c)
        result = spray.analyse(feats, params, times)
        if c == 0:
            print(f"  class 0: {per_class} maps, eigengap {spray.eigengap(result.eigenvalues)}, "
                  f"{len(set(result.clusterings['hdbscan'].tolist()) - {-1})} HDBSCAN clusters")
    return times


STAGES = ("preprocess", "graph", "eigen", "clustering", "embedding")


def peak_rss() -> int:
    """Bytes: this process's resident high-water mark. Linux's VmHWM, which starts afresh at exec; ru_maxrss
    keeps the parent's figure in a child forked from a big process (make bench's, with torch loaded)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=20000, help="maps in all (default 20000)")
    p.add_argument("--classes", type=int, default=1, help="classes the maps are split into (default 1)")
    p.add_argument("--file-rows", type=int, default=1000, help="rows of the synthetic file for preprocess")
    p.add_argument("--size", type=int, default=224, help="relevance map side (default 224)")
    p.add_argument("--threads", type=int, default=1, help="BLAS/OpenMP threads, as analyze --threads (default 1)")
    p.add_argument("--no-tsne", action="store_true", help="skip the t-SNE layout, as analyze --no-tsne")
    p.add_argument("--json", action="store_true", help="end with one line 'json: {...}' of the figures")
    args = p.parse_args()
    if args.n < 2 * args.classes or args.classes < 1:
        p.error(f"--n {args.n} --classes {args.classes}: need at least 2 maps per class")
    load_start = os.getloadavg()
    print(f"load average {load_start[0]:.1f} on {os.cpu_count()} CPUs, {args.threads} thread(s)")
    wall_row, cpu_row = bench_read(args.file_rows, args.size)
    times = {"preprocess": [wall_row * args.n, cpu_row * args.n]}
    times.update(bench_spray(args.n, args.classes, spray.Params(tsne=not args.no_tsne, threads=args.threads)))
    for stage in STAGES:
        if stage in times:
            wall, cpu = times[stage]
            note = " (scaled from --file-rows)" if stage == "preprocess" else ""
            print(f"{stage:>10}: {wall:7.1f} s wall ({cpu:6.1f} s CPU){note}")
    total = [sum(v[0] for v in times.values()), sum(v[1] for v in times.values())]
    peak = peak_rss()
    print(f"{'total':>10}: {total[0]:7.1f} s wall ({total[1]:6.1f} s CPU) for {args.n} maps in {args.classes} "
          f"class(es); peak RSS {peak / 2**20:.0f} MiB; load average {os.getloadavg()[0]:.1f} at end")
    if args.json:
        print("json: " + json.dumps({"n": args.n, "classes": args.classes, "stages": times, "total": total,
                                     "peak_rss": peak, "tsne": not args.no_tsne, "load": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
