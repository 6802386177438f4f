"""Time ``lrpcli render`` on a synthetic file: 1,000 samples of 3 x 224 x 224 by default.

Writes an HDF5 file in the lrpcli layout (chunked per sample, compressed, with ``input``) to a temp dir, then
times the function the CLI runs (``lrpcli.commands.render.pipeline.render_file``); file setup is not timed.

    .venv/bin/python share/bench/bench_render.py [--n 1000] [--size 224] [--compression gzip] [--overlay 0.5]
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

from lrpcli.commands.render.pipeline import RenderOptions, render_file


def write_file(path: Path, n: int, size: int, compression: str | None, seed: int = 0) -> None:
    """A file like ``lrpcli explain`` writes: smooth blobs plus noise, so maps compress like real ones."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    kw = {"compression": compression} if compression else {}
    if compression == "gzip":
        kw["compression_opts"] = 1  # faster setup; reading costs the same as at h5py's default level 4
    with h5py.File(path, "w") as f:
        f.attrs["lrpcli_version"] = "bench"
        f.attrs["rows_written"] = n
        att = f.create_dataset("attribution", (n, 3, size, size), "f4", chunks=(1, 3, size, size), **kw)
        inp = f.create_dataset("input", (n, 3, size, size), "u1", chunks=(1, 3, size, size), **kw)
        for start in range(0, n, 50):
            b = min(50, n - start)
            cy, cx = rng.random((2, b, 1, 1)).astype(np.float32)
            blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) * 20)
            noise = rng.standard_normal((b, 3, size, size), dtype=np.float32)
            att[start : start + b] = (blob[:, None] * noise).astype(np.float16).astype(np.float32)
            shade = (yy * 160 + xx * 60)[None, None] + rng.integers(0, 32, (b, 3, 1, 1))
            inp[start : start + b] = (shade + rng.integers(0, 16, (b, 3, size, size))).astype(np.uint8)
        f["label"] = np.arange(n, dtype=np.int64) % 10
        f["target"] = np.arange(n, dtype=np.int64) % 10
        f["index"] = np.arange(n, dtype=np.uint32)
        f.create_dataset("filename", data=[f"class{i % 10}/img_{i:05d}.jpg" for i in range(n)],
                         dtype=h5py.string_dtype())


def _cpu() -> float:
    """CPU seconds of this process and its finished workers: unlike wall time, not moved by other load."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--compression", default="lzf", help="lzf (what explain writes), gzip or none")
    parser.add_argument("--keep", metavar="FILE", help="reuse / keep the synthetic file here (skips setup)")
    parser.add_argument("--format", default="png", choices=["png", "webp", "jpg"])
    parser.add_argument("--overlay", type=float, default=None)
    parser.add_argument("--jobs", type=int, default=0, help="worker processes (0: one per CPU, max 8)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.keep) if args.keep else Path(tmp) / "bench.h5"
        t0 = time.perf_counter()
        if not path.exists():
            write_file(path, args.n, args.size, None if args.compression == "none" else args.compression)
        setup = time.perf_counter() - t0
        opts = RenderOptions(fmt=args.format, overlay=args.overlay, jobs=args.jobs, progress=False)
        t0, c0 = time.perf_counter(), _cpu()
        result = render_file(path, Path(tmp) / "out", opts)
        took, cpu = time.perf_counter() - t0, _cpu() - c0
        n = len(result.files)
        assert all(p.exists() for p in result.files[:: max(1, n // 10)])
        mb = sum(p.stat().st_size for p in result.files) / 1e6
    print(f"setup: {path.name} ({args.compression}) ready in {setup:.1f} s; cpus: {os.cpu_count()}")
    extra = f", overlay {args.overlay}" if args.overlay is not None else ""
    print(f"render: {n} heatmaps {args.size}x{args.size} in {took:.1f} s ({n / took:.0f}/s), "
          f"{args.format}, {mb:.0f} MB, jobs {args.jobs or 'auto'}, cpu {cpu:.1f} s{extra}")

if __name__ == "__main__":
    main()
