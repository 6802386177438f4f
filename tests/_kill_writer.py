"""A deterministic run for the crash tests of tests/test_store.py: the test SIGKILLs it at random moments.

``python tests/_kill_writer.py OUT.h5`` creates OUT.h5 (or resumes it when it exists, as ``--resume`` does),
writes ``SAMPLES`` samples in batches of ``BATCH`` rows (every 17th sample is an undecodable image that goes
to the skipped list) and prints ``creating``, ``created R``, ``rows R`` after every append, ``closing`` and
``done`` at the end, each line flushed, so the test knows which rows were final before it killed the process.

The test imports this module too, for the expected contents (``expected_rows``) and an in-process
uninterrupted reference run (``run``).
"""

from __future__ import annotations

import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _without_package_init() -> None:
    """Import ``lrpcli.store`` without running ``lrpcli/__init__.py``.

    The package's __init__ imports the torch engine (seconds per process); the store needs none of it, and
    running without it here also shows that the store works where torch is not installed.
    """
    if "lrpcli" in sys.modules:
        return
    import re
    import types

    pkg = types.ModuleType("lrpcli")
    pkg.__path__ = [os.path.join(ROOT, "lrpcli")]
    with open(os.path.join(ROOT, "lrpcli", "__init__.py"), encoding="utf-8") as fh:
        pkg.__version__ = re.search(r"__version__\s*=\s*[\"']([^\"']+)", fh.read()).group(1)
    sys.modules["lrpcli"] = pkg


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    _without_package_init()

from lrpcli.store import ResultWriter  # noqa: E402

SAMPLES = 850
BATCH = 4
SHAPE = (3, 32, 32)
K = 10
LAYERS = ["features.0", "features.2", "classifier.0"]
RULES = ["ZBox(low=-3, high=3)", "Gamma(0.25)", "Epsilon(1e-06)"]
EXTRA = {"features.0": (2, 8, 8)}
CONFIG = {
    "model": {"name": "tiny"},
    "composite": {"name": "epsilon_gamma_box", "gamma": 0.25},
    "run": {"batch_size": BATCH, "num_workers": 0, "device": "cpu", "seed": 0},
    "output": {"path": "out.h5", "dtype": "float32", "store_input": True},
}
CONFIG_YAML = """model: {name: tiny}
composite: {name: epsilon_gamma_box, gamma: 0.25}
run: {batch_size: 4, num_workers: 0, device: cpu, seed: 0}
output: {path: out.h5, dtype: float32, store_input: true}
"""
_PATTERN = (np.arange(int(np.prod(SHAPE))) % 251).reshape(SHAPE)
_PATTERN_L = (np.arange(int(np.prod(EXTRA["features.0"]))) % 13).reshape(EXTRA["features.0"])


def is_bad(sample: int) -> bool:
    """Samples the 'decoder' cannot read."""
    return sample % 17 == 3


def good_samples() -> list[int]:
    return [s for s in range(SAMPLES) if not is_bad(s)]


def rows_for(samples: list[int]) -> dict:
    """The arrays append() gets for these samples: every value derived from the sample number."""
    s = np.asarray(samples, dtype=np.int64)
    col = s[:, None]
    return {
        "attribution": (s[:, None, None, None] * 1000 + _PATTERN).astype(np.float32),
        "prediction": (col + np.arange(K) * 0.5).astype(np.float32),
        "label": np.where(s % 5 == 0, -1, s % 7),
        "target": s % K,
        "index": s.astype(np.uint32),
        "filename": [f"klasse_{v % 3}/bild_{v}_ü.png" for v in samples],
        "input": ((s[:, None, None, None] + _PATTERN) % 256).astype(np.uint8),
        "relevance_in": col + np.arange(len(LAYERS)) * 0.25,
        "relevance_out": col + np.arange(len(LAYERS)) * 0.5 + 0.125,
        "output_relevance": s + 0.0625,
        "layers": {"features.0": (s[:, None, None, None] + _PATTERN_L).astype(np.float32)},
    }


def expected_rows(n: int) -> dict:
    """What the first n rows of the file must hold."""
    return rows_for(good_samples()[:n])


def expected_skipped(samples_done: int) -> list[tuple[str, str]]:
    return [
        (f"broken/bild_{s}.jpg", f"cannot identify image file (sample {s})")
        for s in range(samples_done)
        if is_bad(s)
    ]


def open_writer(path: str) -> ResultWriter:
    """What the runner does: resume when the file exists, otherwise create it."""
    if os.path.exists(path):
        return ResultWriter.resume(path, config=CONFIG)
    return ResultWriter.create(
        path,
        config=CONFIG,
        config_yaml=CONFIG_YAML,
        n_rows=SAMPLES,
        num_outputs=K,
        sample_shape=SHAPE,
        layers=LAYERS,
        rules=RULES,
        extra_layers=EXTRA,
        torch_version="test",
        compressed={"attribution": False},  # both layouts under the kills: one-row chunks plain and lzf
    )


def run(path: str, say=lambda line: None, crash_after: int | None = None) -> None:
    """Write (or finish) the whole run, reporting progress through ``say``.

    ``crash_after=R``: stop once R rows are final, leaving what a kill in the next append would leave (rows
    and a skip written but not committed) and closing the file without ``close()``.
    """
    say("creating")
    writer = open_writer(path)
    say(f"created {writer.rows_written}")
    if writer.complete:
        writer.close(True)
        return
    sample = writer.rows_written + writer.n_skipped  # samples fully handled so far
    batch: list[int] = []
    while sample < SAMPLES:
        if is_bad(sample):
            writer.add_skipped(f"broken/bild_{sample}.jpg", f"cannot identify image file (sample {sample})")
        else:
            batch.append(sample)
        sample += 1
        if len(batch) == BATCH or (sample == SAMPLES and batch):
            writer.append(**rows_for(batch))
            batch = []
            say(f"rows {writer.rows_written}")
            if crash_after is not None and writer.rows_written >= crash_after:
                writer.add_skipped("never/committed.png", "lost with the crash")
                n = writer.rows_written
                writer._f["attribution"][n : n + 2] = -1
                writer._f["skipped/filename"][writer.n_skipped] = "never/committed.png"
                writer._f.flush()
                writer._f.close()
                return
    say("closing")
    writer.close(True)


if __name__ == "__main__":
    run(sys.argv[1], say=lambda line: print(line, flush=True))
    print(f"done torch={'torch' in sys.modules}", flush=True)
