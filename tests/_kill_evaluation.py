"""A loop of evaluation-cache writes for the crash test in tests/test_evaluate_cli.py, which SIGKILLs it.

``python tests/_kill_evaluation.py FILE.h5 N`` stores made-up per-row values for rows 0..N-1 of FILE.h5, one
row per write (group created by the first write, as ``lrpcli evaluate`` does), skipping rows already done,
and prints ``row R`` after each write, flushed. The value of row R is R + 0.5.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from lrpcli.commands.evaluate.cache import Cache

COLUMNS = {"value": ()}
SETTINGS = {"version": 1, "family": "sparseness", "test": "kill"}


def cache(path: Path, n: int) -> Cache:
    return Cache(path, n, "attribution", "sparseness", SETTINGS, COLUMNS)


if __name__ == "__main__":
    path, n = Path(sys.argv[1]), int(sys.argv[2])
    c = cache(path, n)
    done, _ = c.load()
    for row in np.flatnonzero(~done):
        c.write(np.array([row]), {"value": np.array([row + 0.5])})
        print(f"row {row}", flush=True)
