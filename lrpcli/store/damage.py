"""Opening a result file: one line saying what is wrong with a locked, foreign, damaged or incomplete file."""

from __future__ import annotations

import errno
import os
import re
from typing import Any

import h5py
import yaml

from lrpcli.errors import DataError
from lrpcli.store.layout import CONFIG_ATTR, LIBVER, REQUIRED_ATTRS, REQUIRED_DATASETS, VERSION_ATTR, attr_str


def error_text(err: BaseException) -> str:
    """The useful part of an OSError or h5py error message, on one line, for messages about a file.

    For HDF5's own wording ("Unable to synchronously create file (unable to open file: name = ..., errno = 2,
    error message = 'No such file or directory', flags = 13, ...)") the system's message only.
    """
    text = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
    text = " ".join(str(text or type(err).__name__).split())
    system = re.search(r"error message = '([^']+)'", text)
    return system.group(1) if system else text


def open_h5(path: str, mode: str) -> h5py.File:
    """Open with h5py, turning its errors into one line that says what is wrong with the file."""
    # HDF5's default file locking: a file that a run is writing cannot be opened elsewhere (and one process
    # cannot open a file twice with different locking settings, so there is no reason to deviate)
    kwargs: dict[str, Any] = {} if mode == "r" else {"libver": LIBVER}
    try:
        return h5py.File(path, mode, **kwargs)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except PermissionError:
        raise DataError(f"{path}: permission denied") from None
    except OSError as err:
        raise DataError(open_error(path, err)) from None


#: HDF5's wording for a file whose structure is broken (a copy cut short, a damaged disk), as whole words
_DAMAGED = re.compile(r"\b(truncated file|bad (superblock|object header|heap|symbol table|b-tree)\w*|"
                      r"wrong (b-tree|heap) signature|addr overflow|address of object past end of allocation)\b")


def open_error(path: str | os.PathLike, err: OSError) -> str:
    """One line saying why HDF5 could not open ``path``: locked by a writer, not HDF5, or damaged.

    The lock is told by its errno (EAGAIN/EWOULDBLOCK) or HDF5's whole phrase "unable to lock file", never by
    a substring: HDF5's message for a truncated file mentions ``sblock->base_addr``.
    """
    text = error_text(err)
    low = " ".join(str(err).split()).lower()  # HDF5's whole wording, for telling the cases apart
    if getattr(err, "errno", None) in (errno.EAGAIN, errno.EWOULDBLOCK) or re.search(r"\bunable to lock file\b", low):
        return f"{path} is being written by another process (HDF5 file lock); wait for it or choose another -o"
    if re.search(r"\b(file signature not found|not an hdf5 file)\b", low):
        return f"{path} is not an HDF5 file"
    truncated = re.search(r"\btruncated file: eof = (\d+),.*?stored_eof = (\d+)", low)
    if truncated:
        return (f"{path} is truncated or damaged: it has {truncated.group(1)} bytes but its HDF5 header says "
                f"{truncated.group(2)} (a copy cut short?); copy it again, or start the run again with --overwrite")
    if _DAMAGED.search(low):
        return f"{path} is a damaged HDF5 file ({text}); copy it again, or start the run again with --overwrite"
    return f"{path} cannot be opened as an HDF5 file ({text})"



def missing_sources(f: h5py.File, path: str | os.PathLike) -> list[str]:
    """Source files of ``f``'s virtual datasets that do not exist (as HDF5 looks for them: a relative name
    next to ``path``), in the order first used. HDF5 reads a missing source as fill values (zeros, empty
    file names) without an error, so a virtual merge whose shards were moved away would look complete."""
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    prefix = os.environ.get("HDF5_VDS_PREFIX", "")
    missing: list[str] = []

    def check(name: str, obj: Any) -> None:
        if not (isinstance(obj, h5py.Dataset) and obj.is_virtual):
            return
        for source in obj.virtual_sources():
            file_name = source.file_name
            if file_name == "." or file_name in missing:
                continue
            candidates = [file_name] if os.path.isabs(file_name) else [os.path.join(folder, file_name)]
            if prefix and not os.path.isabs(file_name):
                candidates.append(os.path.join(prefix.replace("${ORIGIN}", folder), file_name))
            if not any(os.path.isfile(c) for c in candidates):
                missing.append(file_name)

    f.visititems(check)
    return missing


def check_sources(f: h5py.File, path: str | os.PathLike) -> None:
    """Refuse a virtual file (``lrpcli merge --virtual``) whose shard files are gone, naming them."""
    missing = missing_sources(f, path)
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        folder = os.path.dirname(os.path.abspath(os.fspath(path)))
        raise DataError(
            f"{path} is a virtual file over shard files that are missing: {shown} (looked for in {folder}); "
            "keep the shards next to it, or merge them into a real file with lrpcli merge"
        )


def check_lrpcli(f: h5py.File, path: str) -> dict:
    """Refuse an HDF5 file that lrpcli did not write, or a virtual one with missing shards; return its config."""
    if VERSION_ATTR not in f.attrs:
        raise DataError(
            f"{path} is an HDF5 file but not an lrpcli result file (no 'lrpcli_version' attribute)"
        )
    missing = [a for a in REQUIRED_ATTRS if a not in f.attrs] + [d for d in REQUIRED_DATASETS if d not in f]
    if missing:
        raise DataError(f"{path} is not a complete lrpcli result file: missing {', '.join(missing)}")
    check_sources(f, path)
    try:
        config = yaml.safe_load(attr_str(f.attrs[CONFIG_ATTR])) or {}
    except yaml.YAMLError as err:
        raise DataError(
            f"{path}: its 'config' attribute is not valid YAML ({' '.join(str(err).split())})"
        ) from None
    if not isinstance(config, dict):
        raise DataError(f"{path}: its 'config' attribute is not a YAML mapping")
    return config
