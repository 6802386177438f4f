"""Crash repair: fsync, disk space reserved before a flush, a failed writer closed like a kill, a killed one's
file made safe to continue (rules 5 and 6 of lrpcli.store)."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator, Sequence

import h5py


def fsync_dir(directory: str) -> None:
    """Make a rename in ``directory`` durable (best effort: some file systems cannot fsync a folder)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(f: h5py.File) -> None:
    """Hand what HDF5 flushed to the disk, not only to the operating system (best effort)."""
    try:
        os.fsync(f.id.get_vfd_handle())
    except (OSError, ValueError, TypeError):
        pass


_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
#: What h5py raises for a failed write: OSError, or RuntimeError/ValueError carrying HDF5's "errno = 28"
WRITE_ERRORS = (OSError, RuntimeError, ValueError)


def reserve(f: h5py.File, datasets: Sequence[h5py.Dataset] = ()) -> None:
    """Before a flush: give the file all the disk space HDF5 has allocated in memory (its end of allocation).

    Compressed chunks get their final place only when written, so the ``datasets`` with filters are flushed
    first (a failure there touches nothing committed: new chunks go to new space). The file flush then
    overwrites space the file already owns, so a full disk or a size limit fails here, before HDF5 has
    written a part of the batch's metadata (such as a string heap shared with committed rows), instead of
    in the middle of the flush. Where the file system cannot preallocate, the flush goes ahead as before.
    """
    for dset in datasets:
        if dset.compression is not None:
            dset.id.flush()
    try:
        fd = f.id.get_vfd_handle()
        need = int(f.id.get_filesize())  # max(end of file, end of allocation), as HDF5 sees them
        have = os.fstat(fd).st_size
    except (OSError, ValueError, TypeError):
        return
    if need > have and hasattr(os, "posix_fallocate"):  # not on macOS or Windows
        try:
            os.posix_fallocate(fd, have, need - have)
        except OSError as err:
            if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise


def abandon(f: h5py.File, path: str) -> None:
    """Close ``f`` after a failed write without letting HDF5 write anything more, then repair the superblock.

    HDF5 flushes on close; its file descriptor is first pointed at an anonymous in-memory file, so that the
    flush succeeds (HDF5 then releases the file cleanly) and writes nothing to ``path``. ``cover_eof`` then
    makes the end of allocation cover everything HDF5 had allocated (extending the file sparsely where a
    partial write left it shorter), so every structure the committed rows use lies inside it.
    """
    try:
        allocated = int(f.id.get_filesize())
    except (OSError, ValueError, TypeError, RuntimeError):
        allocated = 0
    try:
        fd = f.id.get_vfd_handle()
        sink = os.memfd_create("lrpcli-abandoned") if hasattr(os, "memfd_create") else os.open(path, os.O_RDONLY)
        try:
            os.dup2(sink, fd)
        finally:
            os.close(sink)
    except (OSError, ValueError, TypeError, RuntimeError):
        pass
    with _no_size_limit():  # a size limit (RLIMIT_FSIZE) applies to the in-memory file too
        try:
            f.close()
        except Exception:  # noqa: BLE001 - best effort: the output is not written either way
            pass
    try:
        cover_eof(path, at_least=allocated, margin=0)
    except OSError:
        pass


@contextlib.contextmanager
def _no_size_limit() -> Iterator[None]:
    """Lift this process's soft file size limit to its hard limit for a moment, if it has one.

    HDF5 closes a file by flushing at the file's own offsets; a close that fails leaves the HDF5 file half
    closed, and h5py retries it when the handle is garbage-collected, which can crash the interpreter."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft == hard:
        yield
        return
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def cover_eof(path: str, at_least: int = 0, margin: int = 1 << 20) -> None:
    """``h5clear --increment`` for our own files: make the end-of-allocation cover everything in the file.

    The superblock's end-of-allocation (EOA) is written last in each flush, so a kill can leave data past it
    that the killed run had allocated: chunks and strings of rows after the commit record. Reopened as is,
    HDF5 would allocate that space anew while the unfinished rows still point into it, and rewriting those
    rows frees their old space, possibly past the EOA. Raising the EOA to past the file's end (plus 1 MiB,
    as h5clear does) makes all of it ordinary allocated space. Only the 1.8-format superblock (version 0 or
    1, no checksum) that lrpcli.store writes is touched; anything else is left alone.

    After a failed write (``abandon``), ``at_least`` is HDF5's own end of allocation, which a write that
    failed part-way may have left beyond the end of the file; the file is extended (sparsely) to cover it.
    """
    with open(path, "r+b") as fh:
        head = fh.read(64)
        if len(head) < 56 or head[:8] != _HDF5_SIGNATURE or head[8] not in (0, 1) or head[13] != 8:
            return
        pos = 40 if head[8] == 0 else 44  # v1 adds 4 bytes (indexed storage K) before the addresses
        base = int.from_bytes(head[pos - 16 : pos - 8], "little")
        eoa = int.from_bytes(head[pos : pos + 8], "little")
        size = os.fstat(fh.fileno()).st_size
        if size < base + eoa:  # a write that failed part-way: HDF5 refuses a file shorter than its EOA
            fh.truncate(base + eoa)
            size = base + eoa
        eof = max(size, at_least)
        if base + eoa >= eof:
            return
        new_end = -(-eof // 4096) * 4096 + margin
        fh.truncate(new_end)  # HDF5 refuses an EOA past the end of the file
        fh.seek(pos)
        fh.write((new_end - base).to_bytes(8, "little"))
        fh.flush()
        os.fsync(fh.fileno())


def zero_tail(dset: h5py.Dataset, start: int) -> None:
    """Set the raw bytes of rows ``start:`` of an uncompressed 1-D dataset to zero, without HDF5's type
    conversion (which would read and free the heap objects they refer to)."""
    rows = dset.chunks[0]
    for first in range((start // rows) * rows, dset.shape[0], rows):
        info = dset.id.get_chunk_info_by_coord((first,))
        if info.byte_offset is None:
            continue
        mask, raw = dset.id.read_direct_chunk((first,))
        lo = max(0, start - first) * (len(raw) // rows)  # on disk a string is 16 bytes; H5Tget_size says 8
        if raw[lo:].strip(b"\0"):
            dset.id.write_direct_chunk((first,), raw[:lo] + bytes(len(raw) - lo), mask)

