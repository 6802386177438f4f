"""The HDF5 result file: one file per run, written batch by batch, safe to kill at any moment.

Layout (README, "The HDF5 file"; also a ViRelAy attribution file): ``attribution``, ``prediction``, ``label``,
``target``, ``index``, ``filename``, ``input``, ``conservation/*``, ``layers/<name>`` and ``skipped/*``, plus
root attributes ``classes``, ``config``, ``config_dir``, ``model_fingerprint``, ``lrpcli_version``,
``torch_version``, ``created``, ``complete``, ``rows_written`` (and the bookkeeping attributes ``n_rows`` and
``skipped_written``). ``config`` is the run's config with absolute ``model.entrypoint``/``model.weights`` paths
(:func:`file_config`), so :meth:`Results.load_model` rebuilds the model from the file alone.

Crash safety rests on these rules, because a plain HDF5 file killed mid-write is not guaranteed to open:

1. Creation is atomic: the whole file (every dataset at its full size, every chunk already allocated) is
   built as ``<path>.partial``, flushed, fsync'ed and renamed onto ``<path>``. A kill during creation leaves
   no ``<path>`` (and a stale ``.partial`` that the next ``create`` removes); an existing file given with
   ``overwrite`` is only replaced once the new one is complete.
2. Nothing that a finished row depends on is ever changed again. Chunks are allocated at creation time
   (``H5D_ALLOC_TIME_EARLY``), so appending only updates chunk-index entries in place and never splits a
   B-tree node; compressed chunks hold exactly one row (a row is written once), and chunks holding several
   rows are uncompressed and rewritten in place with their finished rows unchanged.
3. ``rows_written`` (with ``skipped_written``) is the commit record: it is raised only after the batch's data
   and metadata have been flushed, then flushed itself. Readers take only the first ``rows_written`` rows.
4. The file format is kept at the HDF5 1.8 level (``libver=('earliest', 'v108')``): the 1.10 superblock
   carries a "file is open for writing" flag that a killed writer leaves set, after which neither h5py nor
   ViRelAy can open the file without ``h5clear``. The 1.8 format has no such flag.

5. A resume first repairs what a kill can leave past the commit record (see ``recovery.cover_eof`` and
   ``ResultWriter._forget_unfinished_strings``): the superblock's end-of-allocation is raised over the whole
   file, and the string slots of unfinished rows are zeroed, so rewriting those rows never frees space twice.
6. A failed write (disk full, size limit, I/O error) ends like a kill after the last commit: the space a
   commit's flush writes to is reserved first (``recovery.reserve``), so the flush cannot fail half-way through
   a structure that committed rows share (the file-name heap), and after a failure HDF5 is closed without
   writing anything more (``recovery.abandon``). The tests fill "the disk" with RLIMIT_FSIZE.

The crash tests (tests/test_store.py) SIGKILL a writer at random moments, also while it creates the file and
while it closes it, and check after each kill that plain h5py opens the file with its committed rows intact
and that resuming gives the same file as an uninterrupted run.

A flush hands the data to the operating system, which is what survives a killed process; ``create`` and
``close`` also fsync, but a power cut in the middle of a run may still lose the last batches.

The package, one job per module: ``layout`` (names, dtypes, chunking, the empty file: the only place that
knows the format), ``writer`` (``ResultWriter``), ``reader`` (``open_results``, ``Results``), ``damage``
(opening a file, one-line errors for locked, foreign, damaged or incomplete ones), ``recovery`` (crash repair),
``locks`` (who may write an output), ``join`` (shards joined into one file: a copy or virtual datasets),
``compression`` and ``stored_config`` (the config as stored, and the
comparison a resume makes). Other lrpcli modules import from ``lrpcli.store`` only.

It needs numpy, h5py and PyYAML only (no torch), so files can be read anywhere; only
:meth:`Results.load_model` and :meth:`Results.inputs` import torch (through ``lrpcli.explainer.models`` and
``lrpcli.explainer.data``).
"""

from __future__ import annotations

from lrpcli.store.compression import COMPRESSIONS, choose_compression, pays_to_compress
from lrpcli.store.damage import check_sources, error_text, missing_sources, open_error
from lrpcli.store.join import copy_rows, part_layout, write_joined, write_virtual
from lrpcli.store.layout import (
    ATTRIBUTION_DATASET,
    CLASSES_ATTR,
    COMPLETE_ATTR,
    CONFIG_ATTR,
    CONFIG_DIR_ATTR,
    CONSERVATION_LAYER,
    CONSERVATION_ROWS,
    CONSERVATION_RULE,
    CREATED_ATTR,
    FILENAME_DATASET,
    INDEX_DATASET,
    INPUT_DATASET,
    LABEL_DATASET,
    LAYERS_GROUP,
    LIBVER,
    MODEL_FINGERPRINT_ATTR,
    N_ROWS_ATTR,
    OUTPUT_RELEVANCE,
    PARTIAL_SUFFIX,
    PREDICTION_DATASET,
    RELEVANCE_IN,
    RELEVANCE_OUT,
    ROW_DATASETS,
    ROWS_WRITTEN_ATTR,
    SHARD_ATTRS,
    SHARD_BATCH_SIZE_ATTR,
    SHARD_RANK_ATTR,
    SHARD_START_ATTR,
    SHARD_STOP_ATTR,
    SHARD_TOTAL_ATTR,
    SHARD_WORLD_SIZE_ATTR,
    SKIPPED_FILENAME,
    SKIPPED_REASON,
    SKIPPED_WRITTEN_ATTR,
    TARGET_DATASET,
    TORCH_VERSION_ATTR,
    VERSION_ATTR,
    VIRTUAL_SHARDS_ATTR,
    clean_str,
    read_classes,
    row_datasets,
    row_datasets_of,
    write_classes,
)
from lrpcli.store.locks import being_written, refuse_existing_output
from lrpcli.store.reader import Results, open_results
from lrpcli.store.stored_config import IGNORED_CONFIG_KEYS, config_differences, config_yaml, file_config
from lrpcli.store.writer import ResultWriter

__all__ = [
    "ATTRIBUTION_DATASET", "CLASSES_ATTR", "COMPLETE_ATTR", "COMPRESSIONS", "CONFIG_ATTR", "CONFIG_DIR_ATTR",
    "CONSERVATION_LAYER", "CONSERVATION_ROWS", "CONSERVATION_RULE", "CREATED_ATTR", "FILENAME_DATASET",
    "IGNORED_CONFIG_KEYS", "INDEX_DATASET", "INPUT_DATASET", "LABEL_DATASET", "LAYERS_GROUP", "LIBVER",
    "MODEL_FINGERPRINT_ATTR", "N_ROWS_ATTR", "OUTPUT_RELEVANCE", "PARTIAL_SUFFIX", "PREDICTION_DATASET",
    "RELEVANCE_IN", "RELEVANCE_OUT", "ROWS_WRITTEN_ATTR", "ROW_DATASETS", "SHARD_ATTRS", "SHARD_BATCH_SIZE_ATTR",
    "SHARD_RANK_ATTR", "SHARD_START_ATTR", "SHARD_STOP_ATTR", "SHARD_TOTAL_ATTR", "SHARD_WORLD_SIZE_ATTR",
    "SKIPPED_FILENAME", "SKIPPED_REASON", "SKIPPED_WRITTEN_ATTR", "TARGET_DATASET", "TORCH_VERSION_ATTR",
    "VERSION_ATTR", "VIRTUAL_SHARDS_ATTR", "ResultWriter", "Results", "being_written", "check_sources",
    "choose_compression", "clean_str", "config_differences", "config_yaml", "copy_rows", "error_text",
    "file_config", "missing_sources", "open_error", "open_results", "part_layout", "pays_to_compress",
    "read_classes", "refuse_existing_output", "row_datasets", "row_datasets_of", "write_classes", "write_joined",
    "write_virtual",
]
