"""The result file's layout, declared once: dataset and attribute names, dtypes, chunking, and the empty file.

Layout (README, "The HDF5 file"; also a ViRelAy attribution file): ``attribution``, ``prediction``, ``label``,
``target``, ``index``, ``filename``, ``input``, ``conservation/*``, ``layers/<name>`` and ``skipped/*``, plus
root attributes ``classes``, ``config``, ``config_dir``, ``model_fingerprint``, ``lrpcli_version``,
``torch_version``, ``created``, ``complete``, ``rows_written`` (and the bookkeeping attributes ``n_rows`` and
``skipped_written``). The writer, the reader, the render reader (lrpcli.commands.render.reader), the shard merge
(lrpcli.runner.shards, lrpcli.store.join) and the commands that read result files take the names from here.
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import h5py
import numpy as np

from lrpcli import __version__

#: Compression of the per-sample chunks. lzf measured 3-4x faster than gzip level 1 on float32 relevance
#: maps (and 1.2x on sparse ones) at a similar ratio; h5py (hence ViRelAy) always ships the lzf filter.
COMPRESSION = "lzf"

#: A file being created is built under this name and renamed onto the output when complete
PARTIAL_SUFFIX = ".partial"
#: The HDF5 1.8 file format (see rule 4 in lrpcli.store): no "open for writing" flag a kill could leave set
LIBVER = ("earliest", "v108")
#: A file of virtual datasets needs the HDF5 1.10 format (it is written whole, then renamed into place)
VIRTUAL_LIBVER = ("v110", "latest")
_MULTI_ROW_CHUNK_BYTES = 64 * 1024  # target size of the uncompressed chunks of the small per-row datasets
#: Rows per chunk of the ``skipped/*`` datasets
SKIPPED_CHUNK = 1024
#: Variable-length utf-8 strings (file names, reasons, layer and rule names)
STR = h5py.string_dtype("utf-8")
#: ``output.dtype`` values and the numpy type of the relevance datasets they give
DTYPES = {"float32": np.float32, "float16": np.float16}


# ---------------------------------------------------------------------- dataset names
#: The relevance at the input, N x C x H x W
ATTRIBUTION_DATASET = "attribution"
#: The model outputs, N x K
PREDICTION_DATASET = "prediction"
#: The data set label of each row, -1 where none
LABEL_DATASET = "label"
#: The output index explained for each row
TARGET_DATASET = "target"
#: The position of each row in the data set
INDEX_DATASET = "index"
#: The image file of each row, relative to DATA
FILENAME_DATASET = "filename"
#: Datasets with one row per sample that every result file has
ROW_DATASETS = (ATTRIBUTION_DATASET, PREDICTION_DATASET, LABEL_DATASET, TARGET_DATASET, INDEX_DATASET,
                FILENAME_DATASET)
#: The stored input images, one row per sample, where the run kept them (``output.store_input``)
INPUT_DATASET = "input"
#: The group of the conservation check's datasets
CONSERVATION_GROUP = "conservation"
#: The conserved layers' names and rules, one entry per layer (not per sample)
CONSERVATION_LAYER = f"{CONSERVATION_GROUP}/layer"
CONSERVATION_RULE = f"{CONSERVATION_GROUP}/rule"
#: Per-sample conservation sums, one row per sample: the names in the group, which are also the keys of a
#: batch given to ``ResultWriter.append`` and of ``Results.conservation``
RELEVANCE_IN = "relevance_in"
RELEVANCE_OUT = "relevance_out"
OUTPUT_RELEVANCE = "output_relevance"
CONSERVATION_ROWS = tuple(f"{CONSERVATION_GROUP}/{name}" for name in (RELEVANCE_IN, RELEVANCE_OUT, OUTPUT_RELEVANCE))
#: The group holding one per-sample dataset per stored layer (``layers/<module name>``)
LAYERS_GROUP = "layers"
#: The images that could not be used, and why; the first ``skipped_written`` entries are final
SKIPPED_GROUP = "skipped"
SKIPPED_FILENAME = f"{SKIPPED_GROUP}/filename"
SKIPPED_REASON = f"{SKIPPED_GROUP}/reason"

# ---------------------------------------------------------------------- root attribute names
#: The root attribute holding the class names, in label order
CLASSES_ATTR = "classes"
#: The run's config as YAML text (:func:`lrpcli.store.file_config` form)
CONFIG_ATTR = "config"
#: The folder of the run's config file
CONFIG_DIR_ATTR = "config_dir"
#: The fingerprint of the model's parameters and buffers (``lrpcli.explainer.models.model_fingerprint``)
MODEL_FINGERPRINT_ATTR = "model_fingerprint"
#: The lrpcli version that wrote the file; its presence marks an lrpcli result file
VERSION_ATTR = "lrpcli_version"
TORCH_VERSION_ATTR = "torch_version"
CREATED_ATTR = "created"
#: The samples the file was created for
N_ROWS_ATTR = "n_rows"
#: True once the run was closed complete
COMPLETE_ATTR = "complete"
#: The commit record: rows (and skipped images) that are final
ROWS_WRITTEN_ATTR = "rows_written"
SKIPPED_WRITTEN_ATTR = "skipped_written"
#: A file of virtual datasets over shards: the shards' paths, relative to its folder
VIRTUAL_SHARDS_ATTR = "virtual_shards"
#: A shard of a distributed run: its rank, the run's world size, the samples ``[start, stop)`` it holds of the
#: run's ``total``, and the run's batch size (lrpcli.runner.shards)
SHARD_RANK_ATTR = "shard_rank"
SHARD_WORLD_SIZE_ATTR = "shard_world_size"
SHARD_START_ATTR = "shard_start"
SHARD_STOP_ATTR = "shard_stop"
SHARD_TOTAL_ATTR = "shard_total"
SHARD_BATCH_SIZE_ATTR = "shard_batch_size"
SHARD_ATTRS = (SHARD_RANK_ATTR, SHARD_WORLD_SIZE_ATTR, SHARD_START_ATTR, SHARD_STOP_ATTR, SHARD_TOTAL_ATTR,
               SHARD_BATCH_SIZE_ATTR)

#: What a file needs to be an lrpcli result file (checked when it is opened)
REQUIRED_DATASETS = (
    *ROW_DATASETS,
    CONSERVATION_LAYER,
    CONSERVATION_RULE,
    *CONSERVATION_ROWS,
    SKIPPED_FILENAME,
    SKIPPED_REASON,
)
REQUIRED_ATTRS = (VERSION_ATTR, CONFIG_ATTR, ROWS_WRITTEN_ATTR, N_ROWS_ATTR, COMPLETE_ATTR)


def row_datasets(store_input: bool, layer_names: Iterable[str]) -> list[str]:
    """Every dataset with one row per sample, for a file with or without inputs and with these layers."""
    names = list(ROW_DATASETS)
    if store_input:
        names.append(INPUT_DATASET)
    names += CONSERVATION_ROWS
    names += [f"{LAYERS_GROUP}/{name}" for name in layer_names]
    return names


def row_datasets_of(f: h5py.File) -> list[str]:
    """The datasets with one row per sample that the open result file ``f`` holds."""
    return row_datasets(INPUT_DATASET in f, list(f[LAYERS_GROUP]) if LAYERS_GROUP in f else [])


def clean_str(text: str) -> str:
    """``text`` as it is stored: file names with undecodable bytes (surrogate escapes) cannot be utf-8, so
    they are kept readable with backslash escapes instead. Compare names with a file's names in this form."""
    return str(text).encode("utf-8", "backslashreplace").decode("utf-8")


def attr_str(value: Any) -> str:
    """A string attribute or dataset value as str (h5py gives bytes for some string types)."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def write_classes(attrs: h5py.AttributeManager, classes: Sequence[str]) -> None:
    """The class names as the root attribute ``classes``: an array of variable-length utf-8 strings.

    An array (not a JSON string) is what h5py and ViRelAy read as a list; an empty array is a flat DATA folder
    (every label -1), which is different from a file without the attribute (class names unknown).
    """
    names = np.array([clean_str(c) for c in classes], dtype=object)
    attrs.create(CLASSES_ATTR, names, shape=(len(names),), dtype=STR)


def read_classes(attrs: Mapping[str, Any]) -> list[str] | None:
    """The class names of a file's root attributes, in label order; None where the file has none."""
    raw = attrs.get(CLASSES_ATTR)
    if raw is None:
        return None
    return [attr_str(v) for v in np.asarray(raw, dtype=object).reshape(-1).tolist()]


def new_dataset(
    group: h5py.Group, name: str, n_rows: int, row_shape: tuple[int, ...], dtype: Any, compressed: bool,
    per_row: bool | None = None,
) -> h5py.Dataset:
    """A per-row dataset with every chunk allocated now, so appends never restructure the chunk index.

    ``per_row`` (default: ``compressed``) gives one chunk per row; else small rows share a chunk of about 64 KiB.
    Compressed float data goes through HDF5's shuffle filter first (exponent bytes together: smaller and
    faster with lzf)."""
    row_shape = tuple(int(s) for s in row_shape)
    itemsize = np.dtype(dtype).itemsize if dtype is not STR else 16
    if compressed if per_row is None else per_row:
        rows_per_chunk = 1
    else:
        row_bytes = max(1, itemsize * math.prod(row_shape))
        rows_per_chunk = max(1, min(4096, _MULTI_ROW_CHUNK_BYTES // row_bytes))
    chunks = (rows_per_chunk,) + tuple(max(1, s) for s in row_shape)
    maxshape = (None,) + tuple(None if s == 0 else s for s in row_shape)
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    return group.create_dataset(
        name,
        shape=(n_rows,) + row_shape,
        maxshape=maxshape,
        dtype=dtype,
        chunks=chunks,
        compression=COMPRESSION if compressed else None,
        shuffle=bool(compressed and itemsize > 1),
        dcpl=dcpl,
        track_times=False,
    )


def _write_root_attrs(f: h5py.File, config_yaml: str, n_rows: int, torch_version: str,
                      classes: Sequence[str] | None, config_dir: str | None, attrs: Mapping[str, Any]) -> None:
    """Every root attribute of a new file; the commit record says nothing is final yet."""
    f.attrs[CONFIG_ATTR] = config_yaml
    for name, value in attrs.items():
        f.attrs[name] = np.int64(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if config_dir is not None:
        f.attrs[CONFIG_DIR_ATTR] = clean_str(config_dir)
    if classes is not None:
        write_classes(f.attrs, classes)
    f.attrs[VERSION_ATTR] = __version__
    f.attrs[TORCH_VERSION_ATTR] = str(torch_version)
    f.attrs[CREATED_ATTR] = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    f.attrs[N_ROWS_ATTR] = np.int64(n_rows)
    f.attrs[COMPLETE_ATTR] = np.bool_(False)
    # the commit record: two neighbouring attributes, rewritten in place after each flushed batch
    f.attrs[ROWS_WRITTEN_ATTR] = np.int64(0)
    f.attrs[SKIPPED_WRITTEN_ATTR] = np.int64(0)


def build_file(
    f: h5py.File,
    *,
    config_yaml: str,
    n_rows: int,
    num_outputs: int,
    sample_shape: tuple[int, ...],
    layers: list[str],
    rules: list[str],
    dtype: Any,
    store_input: bool,
    extra_layers: dict[str, tuple[int, ...]],
    torch_version: str,
    compressed: Mapping[str, bool] | None = None,
    classes: Sequence[str] | None = None,
    config_dir: str | None = None,
    attrs: Mapping[str, Any] | None = None,
) -> None:
    """Every dataset at full size, every chunk allocated, every attribute present (rules 1 and 2 of
    lrpcli.store): the empty file that ``ResultWriter.create`` renames into place."""
    _write_root_attrs(f, config_yaml, n_rows, torch_version, classes, config_dir, attrs or {})
    n_layers = len(layers)
    packed = dict(compressed or {})

    def per_sample(group: h5py.Group, name: str, shape: tuple[int, ...], dt: Any, path: str = "") -> None:
        new_dataset(group, name, n_rows, shape, dt, compressed=packed.get(path or name, True), per_row=True)

    per_sample(f, ATTRIBUTION_DATASET, sample_shape, dtype)
    per_sample(f, PREDICTION_DATASET, (num_outputs,), np.float32)
    new_dataset(f, LABEL_DATASET, n_rows, (), np.int64, compressed=False)
    new_dataset(f, TARGET_DATASET, n_rows, (), np.int64, compressed=False)
    new_dataset(f, INDEX_DATASET, n_rows, (), np.uint32, compressed=False)
    new_dataset(f, FILENAME_DATASET, n_rows, (), STR, compressed=False)
    if store_input:
        per_sample(f, INPUT_DATASET, sample_shape, np.uint8)
    f.create_group(CONSERVATION_GROUP)
    f.create_dataset(CONSERVATION_LAYER, data=np.array([clean_str(s) for s in layers], dtype=object), dtype=STR)
    f.create_dataset(CONSERVATION_RULE, data=np.array([clean_str(s) for s in rules], dtype=object), dtype=STR)
    for name, shape in zip(CONSERVATION_ROWS, ((n_layers,), (n_layers,), ())):
        new_dataset(f, name, n_rows, shape, np.float64, compressed=False)
    grp = f.create_group(LAYERS_GROUP)
    for name, shape in extra_layers.items():
        per_sample(grp, name, tuple(shape), dtype, f"{LAYERS_GROUP}/{name}")
    f.create_group(SKIPPED_GROUP)
    for name in (SKIPPED_FILENAME, SKIPPED_REASON):
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
        # room for every sample to fail, allocated now so that recording a skip moves nothing
        f.create_dataset(
            name,
            shape=(n_rows,),
            maxshape=(None,),
            dtype=STR,
            chunks=(SKIPPED_CHUNK,),
            dcpl=dcpl,
            track_times=False,
        )
