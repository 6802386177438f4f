"""A run of tests/_kill_writer.py whose disk fills up: the test in tests/test_store_damage.py runs it.

``python tests/_full_disk_writer.py OUT.h5 BYTES`` creates OUT.h5, then limits the size of any file this
process writes to OUT.h5's size plus BYTES (RLIMIT_FSIZE, with SIGXFSZ ignored, so a write past it fails
with EFBIG as a full disk fails with ENOSPC) and writes until a write fails. It prints ``rows R`` after
every append and, for the failure, ``error <message>`` (the one line the user sees); exit code 0 either way.
"""

from __future__ import annotations

import os
import resource
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "tests"), ROOT]
if "lrpcli" not in sys.modules:  # the store without the torch engine, as tests/_kill_writer.py runs it
    import re
    import types

    _pkg = types.ModuleType("lrpcli")
    _pkg.__path__ = [os.path.join(ROOT, "lrpcli")]
    with open(os.path.join(ROOT, "lrpcli", "__init__.py"), encoding="utf-8") as _fh:
        _pkg.__version__ = re.search(r"__version__\s*=\s*[\"']([^\"']+)", _fh.read()).group(1)
    sys.modules["lrpcli"] = _pkg

import _kill_writer as W  # noqa: E402

from lrpcli.errors import LrpcliError  # noqa: E402


def main(path: str, room: int) -> None:
    writer = W.open_writer(path)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(path) + room, resource.RLIM_INFINITY))
    try:
        sample, batch = 0, []
        while sample < W.SAMPLES:
            if W.is_bad(sample):
                writer.add_skipped(f"broken/bild_{sample}.jpg", f"cannot identify image file (sample {sample})")
            else:
                batch.append(sample)
            sample += 1
            if len(batch) == W.BATCH or (sample == W.SAMPLES and batch):
                writer.append(**W.rows_for(batch))
                batch = []
                print(f"rows {writer.rows_written}", flush=True)
        writer.close(complete=True)
        print("done", flush=True)
    except LrpcliError as err:
        print(f"error {err}", flush=True)
        writer.close(complete=False)  # what the runner does after a failed append: nothing more to write


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
