"""Time ``lrpcli analyze`` (SpRAy) for N samples of 224 x 224 relevance, one category (the worst case).

Two parts, because a file of 50,000 x 3 x 224 x 224 float32 is 30 GB:

1. reading + preprocessing: a synthetic file in the lrpcli layout (``--file-rows`` rows, lzf-compressed
   per-row chunks like explain writes) is read and pooled by the function analyze runs
   (``lrpcli.analysis.analyze.compute_features``); the figure is rows per second, which scales linearly;
2. SpRAy proper on N synthetic pooled maps (32 x 32, a few planted groups plus noise): kNN graph, spectral
   embedding, k-means for k = 2..10, HDBSCAN, and t-SNE (``--tsne-max``: skipped above that N).

The estimate for N is part 1 extrapolated to N plus part 2 measured at N. Wall and process CPU seconds are
printed (CPU time is the check on a shared machine), with the load average and peak RSS.

    .venv/bin/python share/bench/bench_analyze.py [--n 5000,50000] [--file-rows 1000] [--tsne-max 50000]
                                                  [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from lrpcli.analysis import spray
from lrpcli.analysis.analyze import compute_features
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


def bench_read(rows: int, size: int) -> float:
    """Rows per second of reading + preprocessing from an lzf-compressed file (setup not timed)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.h5"
        write_file(path, rows, size)
        with open_results(path) as results:
            _, wall, cpu = _timed(lambda: compute_features(results, rows, spray.Params()))
    print(f"read+preprocess: {rows} rows of 3x{size}x{size} in {wall:.1f} s wall ({cpu:.1f} s CPU): "
          f"{rows / wall:.0f} rows/s")
    return rows / wall


def bench_spray(n: int, tsne_max: int, threads: int) -> float:
    """Seconds of each SpRAy step on n synthetic features; returns the total wall time."""
    with spray.limit_threads(threads):
        return _bench_spray(n, tsne_max)


def _bench_spray(n: int, tsne_max: int) -> float:
    feats = synthetic_features(n)
    params = spray.Params()
    total = 0.0
    graph, w, c = _timed(lambda: spray.knn_affinity(feats, params.neighbors))
    total += w
    print(f"  n={n}: kNN graph {w:.1f} s ({c:.1f} CPU), {graph.nnz} edges, {graph.data.nbytes * 3 / 2**20:.0f} MiB")
    (ev, emb), w, c = _timed(lambda: spray.spectral_embedding(graph, params.eigenvalues))
    total += w
    print(f"  n={n}: spectral embedding ({params.eigenvalues} eigenpairs) {w:.1f} s ({c:.1f} CPU)")
    _, w, c = _timed(lambda: [spray.kmeans(emb, k) for k in params.clusters])
    total += w
    print(f"  n={n}: k-means k=2..10 {w:.1f} s ({c:.1f} CPU)")
    _, w, c = _timed(lambda: spray.hdbscan(emb, min(8, max(4, spray.eigengap(ev) + 1))))
    total += w
    print(f"  n={n}: HDBSCAN {w:.1f} s ({c:.1f} CPU)")
    if n <= tsne_max:
        _, w, c = _timed(lambda: spray.tsne(emb))
        total += w
        print(f"  n={n}: t-SNE {w:.1f} s ({c:.1f} CPU)")
    else:
        print(f"  n={n}: t-SNE skipped (--tsne-max {tsne_max}); analyze --no-tsne skips it too")
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", default="5000,50000", help="sample counts, comma-separated (default 5000,50000)")
    p.add_argument("--file-rows", type=int, default=1000, help="rows of the synthetic file for part 1")
    p.add_argument("--size", type=int, default=224, help="relevance map side (default 224)")
    p.add_argument("--tsne-max", type=int, default=50000, help="largest n that also runs t-SNE")
    p.add_argument("--threads", type=int, default=1, help="BLAS/OpenMP threads, as analyze --threads (default 1)")
    args = p.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs, {args.threads} thread(s)")
    rate = bench_read(args.file_rows, args.size)
    for n in (int(v) for v in args.n.split(",")):
        spray_s = bench_spray(n, args.tsne_max, args.threads)
        print(f"n={n}: SpRAy {spray_s:.0f} s + read/preprocess {n / rate:.0f} s (extrapolated) = "
              f"{spray_s + n / rate:.0f} s estimated for analyze")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak:.0f} MiB")


if __name__ == "__main__":
    main()
