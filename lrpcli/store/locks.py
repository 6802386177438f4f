"""Who may write an output file: a run writing it right now, or two runs creating it at the same moment."""

from __future__ import annotations

import os

from lrpcli.errors import DataError


def being_written(path: str | os.PathLike) -> bool:
    """True if another process holds HDF5's exclusive lock on ``path`` (a run writing it right now).

    HDF5 locks a file it opens for writing with ``flock``; a shared, non-blocking ``flock`` of our own fails
    exactly while such a writer is alive (the kernel drops the lock of a killed one), so a crashed run's file
    reads as not being written and can be resumed or replaced.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
    return False


#: The lock file next to an output while it is being created
LOCK_SUFFIX = ".lock"


class creation_lock:  # noqa: N801 - used like a function: ``with creation_lock(path):``
    """An exclusive, non-blocking ``flock`` on ``<path>.lock`` while one process creates ``path``.

    Creation removes a stale ``.partial`` and renames its own onto ``path``; two runs doing that at the same
    moment would remove each other's work and both fail. Under this lock one creates and opens the file (and
    so holds HDF5's own lock on it); the other is refused with one line. The lock file is removed while still
    locked; the kernel drops the lock of a killed process, so a leftover ``.lock`` file blocks nothing.
    """

    def __init__(self, path: str) -> None:
        self.path = path + LOCK_SUFFIX
        self.fd: int | None = None

    def __enter__(self) -> None:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not on POSIX: no lock
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:  # an unwritable folder: create() reports it
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise DataError(
                f"output {self.path[: -len(LOCK_SUFFIX)]} is being written by another process (it is creating "
                "it right now); wait for it or choose another -o"
            ) from None
        self.fd = fd

    def __exit__(self, *exc: object) -> None:
        if self.fd is None:
            return
        try:
            os.remove(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


def refuse_existing_output(path: str | os.PathLike, overwrite: bool) -> None:
    """Refuse to start a new file at ``path`` where one exists: always while another run writes it, and
    without ``overwrite`` also a finished or killed run's file (which ``--resume`` continues).

    The runner calls this before it reads any data or loads the model, so that a wrong ``-o`` fails at once;
    ``ResultWriter.create`` calls it again under the creation lock, where a run started meanwhile is caught.
    One function, so both say the same thing.
    """
    path = os.fspath(path)
    if not os.path.lexists(path):
        return
    if being_written(path):
        raise DataError(f"output {path} is being written by another process; stop it or choose another -o")
    if not overwrite:
        raise DataError(f"{path} exists; pass --resume to continue it or --overwrite to replace it")
