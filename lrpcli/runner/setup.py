"""What a run sets up and checks before its first batch: SIGTERM as Ctrl-C, torch's threads, the output
folder, the model on its device, and that a file to resume was written by this config, data set and model.

Each is a step of ``lrpcli.runner.local``'s start-up that needs no batch; a refusal is one ``DataError`` line that
names the file and what to do.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lrpcli.errors import DataError
from lrpcli.explainer import models
from lrpcli.spec.config import Config
from lrpcli.store import (
    IGNORED_CONFIG_KEYS,
    MODEL_FINGERPRINT_ATTR,
    N_ROWS_ATTR,
    ResultWriter,
    clean_str,
    config_differences,
    file_config,
    open_results,
)

__all__ = ["sigterm_as_interrupt", "torch_threads", "load_model_on", "check_resume", "resume_writer", "Status",
           "check_output_dir"]


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt in the main thread, so ``kill`` says what Ctrl-C says; restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


@contextlib.contextmanager
def torch_threads(threads: int | str) -> Iterator[None]:
    """torch's intra-op threads for the run (``run.threads``; auto keeps torch's default), restored after."""
    before = torch.get_num_threads()
    if threads != "auto" and int(threads) != before:
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def load_model_on(config: Config, device: torch.device) -> tuple[torch.nn.Module, str]:
    """The model on ``device`` and its fingerprint (taken on the CPU copy, so it does not depend on the device).

    Called before any DataLoader exists: a random init is seeded from ``run.seed`` inside ``load_model``, and
    nothing else in the process may draw from torch's global generator meanwhile.
    """
    model = models.load_model(config)
    return model.to(device), models.model_fingerprint(model)


def check_resume(path: Path, config: Config, data: Path, files: list[str], first: int, stop: int,
                  classes: list[str]) -> None:
    """Refuse to continue ``path`` with another config (batch size included), data set or data set size.

    The rows already written must be the same files at the same places of DATA's listing: a different folder
    with as many images would otherwise pass, and the file would mix two data sets. The class folders must be
    the same too: a class folder added or removed renumbers the labels of the rows still to come.
    """
    with open_results(path) as stored:
        # the batch size is compared too: it decides how rows are batched through the model
        ignored = IGNORED_CONFIG_KEYS - {"run.batch_size"}
        differences = config_differences(stored.config, file_config(config), ignored)
        if differences:
            raise DataError(f"cannot resume {path}: it was written with a different config ("
                            + "; ".join(differences) + "); use --overwrite to start again")
        before = stored.classes
        if before is not None and before != [clean_str(c) for c in classes]:
            raise DataError(f"cannot resume {path}: it was written for the classes {before}, but {data} now has "
                            f"{list(classes)}; give the DATA the file was started with, or use --overwrite")
        n_rows = int(stored.attrs[N_ROWS_ATTR])
        if n_rows != stop - first:
            raise DataError(f"cannot resume {path}: it was started for {n_rows} samples, but {data} now gives "
                            f"{stop - first}; give the same DATA, or use --overwrite to start again")
        names, index = stored.filename, stored.index
        skipped = [name for name, _ in stored.skipped]
    for row, (name, i) in enumerate(zip(names, index.tolist())):
        listed = clean_str(files[i]) if first <= i < stop else None
        if listed != name:
            where = f"lists {listed!r} there" if listed is not None else "has no such sample"
            raise DataError(f"cannot resume {path}: row {row} is {name!r} (sample {i} of DATA), but {data} {where}; "
                            "give the DATA the file was started with, or use --overwrite to start again")
    done = {clean_str(f) for f in files[first:stop]}
    for name in skipped:
        if name not in done:
            raise DataError(f"cannot resume {path}: it lists {name!r} as skipped, but {data} has no such image; "
                            "give the DATA the file was started with, or use --overwrite to start again")


def resume_writer(path: Path, config: Config, fingerprint: str) -> Any:
    """The store reopened for appending, after checking that this run builds the model that wrote it."""
    with open_results(path) as stored:
        before = stored.attrs.get(MODEL_FINGERPRINT_ATTR)
    if before is not None and before != fingerprint:
        raise DataError(f"cannot resume {path}: the model is not the one that wrote its rows (parameters and buffers "
                        f"differ: {before[:19]}... in the file, {fingerprint[:19]}... now); check model.weights and "
                        "run.seed, or use --overwrite to start again")
    return ResultWriter.resume(path, config=file_config(config))


class Status:
    """A one-line note on stderr of what is loading (transient: it goes when the progress bar comes)."""

    def __init__(self, show: bool) -> None:
        self.bar: Any = None
        if show:
            from tqdm import tqdm

            self.bar = tqdm(total=0, bar_format="lrpcli: {desc} ...", leave=False, file=sys.stderr)

    def __call__(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description_str(text)

    def __enter__(self) -> Status:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


def check_output_dir(path: Path) -> None:
    """Fail before any work when the output cannot be written (the store checks again when it creates)."""
    import os

    parent = path.parent if str(path.parent) else Path(".")
    existing = parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise DataError(f"cannot write {path}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DataError(f"cannot write {path}: folder {existing} is not writable")
