"""The batch runner behind ``lrpcli explain``: data -> model + composite -> attribution -> store.

One composite context is entered for the whole run (canonizers are applied once), batches flow from a
DataLoader, and each finished batch is handed to the store: to a writer thread, so that HDF5 compression and
writing overlap the next batch's attribution, where a core is free for it (``background_threads_help``), else
at once. The per-layer conservation sums come from the same backward pass. The checks and set-up before the
first batch (output folder, resume, model, signals, threads) are ``lrpcli.runner.setup``.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lrpcli.engine.recorder import Recorder, vanishing_layer
from lrpcli.errors import ConfigError, DataError, LrpcliError, RunError
from lrpcli.explainer.data import make_loader, open_image_folder, prefetch
from lrpcli.explainer.explainer import Explainer
from lrpcli.explainer.runtime import available_cpus, resolve_device, resolve_num_workers
from lrpcli.runner.setup import (
    Status,
    check_output_dir,
    check_resume,
    load_model_on,
    resume_writer,
    sigterm_as_interrupt,
    torch_threads,
)
from lrpcli.spec.config import Config
from lrpcli.store import (
    ATTRIBUTION_DATASET,
    CLASSES_ATTR,
    FILENAME_DATASET,
    INDEX_DATASET,
    INPUT_DATASET,
    LABEL_DATASET,
    LAYERS_GROUP,
    MODEL_FINGERPRINT_ATTR,
    OUTPUT_RELEVANCE,
    PREDICTION_DATASET,
    RELEVANCE_IN,
    RELEVANCE_OUT,
    TARGET_DATASET,
    ResultWriter,
    choose_compression,
    config_yaml,
    file_config,
    refuse_existing_output,
)


@dataclass
class RunSummary:
    """What a run did, for the closing line and for callers."""

    path: Path
    rows: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    resumed_from: int = 0
    complete: bool = False
    already_complete: bool = False  # a --resume of a finished file: nothing to do

    @property
    def images_per_second(self) -> float:
        return (self.rows - self.resumed_from) / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        if self.already_complete:
            return f"already complete: {self.rows} rows in {self.path}"
        done = self.rows - self.resumed_from
        skipped = f", {len(self.skipped)} skipped" if self.skipped else ""
        resumed = f" (resumed after {self.resumed_from})" if self.resumed_from else ""
        return (f"explained {done} samples{resumed}{skipped} in {self.seconds:.1f} s "
                f"({self.images_per_second:.1f} images/s) -> {self.path}")


class _BatchWriter:
    """Appends batches to the store in order, in a background thread (``threaded``) or at once in ``put``;
    errors surface in the main thread either way."""

    def __init__(self, threaded: bool = True) -> None:
        self.queue: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.writer: Any = None
        self.pending: list[tuple[str, str]] = []  # skipped images seen before the file exists
        self.thread = threading.Thread(target=self._work, name="lrpcli-writer", daemon=True) if threaded else None
        if self.thread is not None:
            self.thread.start()

    def _work(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            self._handle(item)

    def _handle(self, item: Any) -> None:
        if self.error is not None:
            return
        try:
            make_writer, skipped, arrays = item
            self.pending.extend(skipped)
            if self.writer is None:
                self.writer = make_writer()
                if self.writer is None:
                    return
            for filename, reason in self.pending:
                self.writer.add_skipped(filename, reason)
            self.pending.clear()
            if arrays is not None:
                self.writer.append(**arrays)
        except BaseException as err:  # noqa: BLE001 - re-raised in the main thread
            self.error = err

    def put(self, item: Any) -> None:
        self.raise_error()
        if self.thread is None:
            self._handle(item)
        else:
            self.queue.put(item)

    def raise_error(self) -> None:
        if self.error is not None:
            err, self.error = self.error, None
            raise err

    def finish(self) -> None:
        if self.thread is not None:
            self.queue.put(None)
            self.thread.join()


def background_threads_help(device: torch.device) -> bool:
    """True where decoding and writing in background threads overlap the attribution instead of slowing it.

    With a GPU they do. On the CPU only when a core is left over by torch's threads: an extra busy thread on a
    core that an OpenMP team uses stalls parallel operations at their barriers (on 2 cores, one test saw the
    demo's attribution run 5-6x slower while a thread decoded images; end to end, threads gained nothing on the
    demo: 71 % of attribution alone against 73 % inline). Then the main process decodes and writes between
    batches, which costs only the work itself.
    """
    if device.type != "cpu":
        return True
    return available_cpus() > torch.get_num_threads()


def run(config: Config, data: str | Path, *, resume: bool = False, overwrite: bool = False,
        progress: bool | None = None, shard: Any = None) -> RunSummary:
    """Run the configured attribution over every image of ``data`` and write one HDF5 file.

    ``shard`` (a :class:`lrpcli.runner.distributed.Shard`) restricts the run to one rank's block of the data set: its
    samples, its device and its own file (``out.rank00003.h5``); see ``lrpcli.runner.distributed``. ``run.threads``
    applies for the run and the caller's thread count comes back after it; SIGTERM stops it like Ctrl-C.
    """
    t0 = time.perf_counter()  # the summary's time includes start-up (scan, model, first batch)
    if resume and overwrite:
        raise LrpcliError("--resume and --overwrite exclude each other: --resume continues the file, "
                          "--overwrite replaces it; give one of them")
    show = sys.stderr.isatty() if progress is None else progress
    with sigterm_as_interrupt(), torch_threads(config.run.threads):
        return _explain(config, Path(data), resume, overwrite, show, shard, t0)


def _explain(config: Config, data: Path, resume: bool, overwrite: bool, show: bool, shard: Any,
             t0: float) -> RunSummary:
    """The run: inputs, then the model (before anything else draws random numbers), checks, then batches."""
    out_path = Path(config.output.path) if shard is None else shard.path
    resuming = resume and out_path.exists()
    if not (resume or overwrite):
        refuse_existing_output(out_path, overwrite=False)
    check_output_dir(out_path)
    with Status(show) as status:
        status(f"reading {data}")
        dataset = open_image_folder(data, config.input)
        if config.attribution.target == "label" and not dataset.classes:
            raise DataError(f"{data} has no class folders, so there are no labels to explain: set "
                            "attribution.target to prediction or a class index")
        device = resolve_device(config.run.device) if shard is None else shard.device(config.run.device)
        total = len(dataset) if config.run.max_samples is None else min(len(dataset), config.run.max_samples)
        # this run's samples are [first, stop): everything, or one rank's block
        first, stop = (0, total) if shard is None else shard.bounds(total, config.run.batch_size)
        if first == stop:  # a rank with nothing to do (more ranks than batches) writes no file
            return RunSummary(out_path, complete=True)
        if resuming:
            if shard is not None:
                shard.check_file(out_path, total, config.run.batch_size)
            check_resume(out_path, config, data, dataset.files, first, stop, dataset.classes)
        status(f"loading model {config.model.get('name') or config.model.get('entrypoint')}")
        model, fingerprint = load_model_on(config, device)
        file_attrs = {MODEL_FINGERPRINT_ATTR: fingerprint, CLASSES_ATTR: list(dataset.classes)}
        if shard is not None:
            file_attrs.update(shard.attrs(total, config.run.batch_size))
        writer_for_resume = None
        if resuming:
            writer_for_resume = resume_writer(out_path, config, fingerprint)
            if writer_for_resume.complete:
                rows = writer_for_resume.rows_written
                writer_for_resume.close(complete=True)
                return RunSummary(out_path, rows, resumed_from=rows, complete=True, already_complete=True,
                                  seconds=time.perf_counter() - t0)
    run = _Run(config, data, dataset, device, model, out_path, first, stop, overwrite, file_attrs, shard)
    return run.go(writer_for_resume, show, t0)


class _Run:
    """The batch loop of one run: loader, composite, attribution, writer thread and progress bar."""

    def __init__(self, config: Config, data: Path, dataset: Any, device: torch.device, model: torch.nn.Module,
                 out_path: Path, first: int, stop: int, overwrite: bool, file_attrs: dict[str, Any],
                 shard: Any) -> None:
        self.config, self.data, self.dataset, self.device, self.model = config, data, dataset, device, model
        self.out_path, self.first, self.stop, self.overwrite = out_path, first, stop, overwrite
        self.file_attrs, self.shard = file_attrs, shard

    def _batches(self, start: int) -> tuple[Any, Any, bool]:
        """(loader, what to iterate, threads): the loader draws its seeds from its own generator, not torch's."""
        config, device = self.config, self.device
        workers = resolve_num_workers(config.run.num_workers, samples=self.stop - start,
                                      batch_size=config.run.batch_size, device=device)
        loader = make_loader(self.dataset, batch_size=config.run.batch_size, num_workers=workers, device=device,
                             start=start, stop=self.stop)
        loader.generator = torch.Generator().manual_seed(int(config.run.seed))
        # without worker processes the next batch is decoded in a thread while this one is attributed (where
        # that helps, see background_threads_help)
        threads = background_threads_help(device)
        return loader, (prefetch(loader) if threads and not workers else loader), threads

    def go(self, writer_for_resume: Any, show: bool, t0: float) -> RunSummary:
        from tqdm import tqdm

        config, first, stop, out_path = self.config, self.first, self.stop, self.out_path
        start = first if writer_for_resume is None else (
            first + writer_for_resume.rows_written + writer_for_resume.n_skipped)
        layer_patterns = list(config.output.layers or [])
        recorder = Recorder(layer_patterns) if config.attribution.method == "lrp" else None
        if recorder is not None:
            recorder.measure_scales = True
        try:
            explainer = Explainer.from_config(config, self.model, recorder=recorder)
            loader, batches, threads = self._batches(start)
        except BaseException:
            if writer_for_resume is not None:
                writer_for_resume.close(complete=False)
            raise
        summary = RunSummary(out_path, rows=start - first, resumed_from=start - first)
        batch_writer = _BatchWriter(threaded=threads)
        batch_writer.writer = writer_for_resume
        layer_shapes: dict[str, tuple[int, ...]] = {}
        bar = tqdm(total=stop - first, initial=start - first, unit="img", disable=not show, dynamic_ncols=True,
                   leave=False, desc=None if self.shard is None else f"rank {self.shard.rank}")
        completed = False
        checked = False
        vanishing_warned = False
        try:
            with explainer, warnings.catch_warnings():
                warnings.simplefilter("once")
                for collated in batches:
                    batch, skipped = collated.batch, collated.skipped
                    for s in skipped:
                        warnings.warn(f"lrpcli: skipped {s.filename}: {s.reason}", stacklevel=1)
                        summary.skipped.append((s.filename, s.reason))
                    arrays, table = None, ([], [])
                    if len(batch):
                        check = None if checked else self._check_output
                        arrays, table = _attribute_batch(config, explainer, batch, self.device, layer_patterns,
                                                         layer_shapes, check)
                        checked = True
                        summary.rows += len(batch)
                        if not vanishing_warned and table[0]:
                            vanishing_warned = _warn_vanishing(explainer, arrays, table[0])
                            recorder.measure_scales = False  # the first batch's activation sizes are enough
                    make_writer = _writer_factory(config, out_path, stop - first, arrays, table, self.overwrite,
                                                  layer_shapes, self.file_attrs)
                    batch_writer.put((make_writer, [(s.filename, s.reason) for s in skipped], arrays))
                    bar.update(len(batch) + len(skipped))
            completed = True
        except KeyboardInterrupt:
            raise RunError(f"interrupted; the rows written so far are kept in {out_path}: run again with --resume "
                           "to continue") from None
        finally:
            if batches is not loader:
                batches.close()
            bar.close()
            batch_writer.finish()
            writer = batch_writer.writer
            if writer is not None:
                try:
                    writer.close(complete=completed and batch_writer.error is None)
                except Exception:  # noqa: BLE001 - the first error is the one to report
                    if batch_writer.error is None and completed:
                        raise
            summary.seconds = time.perf_counter() - t0
        batch_writer.raise_error()
        if batch_writer.writer is None:
            raise DataError(f"no image under {self.data} could be read ({len(summary.skipped)} skipped); "
                            "nothing written")
        summary.complete = True
        return summary

    def _check_output(self, output: torch.Tensor) -> None:
        """Before the first row is written: the model's outputs fit attribution.target and DATA's classes."""
        config = self.config
        if output.dim() < 2:
            raise RunError(f"{config.source}: the model output has shape {tuple(output.shape)}; explain needs a "
                           "class dimension (dim 1) to pick the target")
        k = int(output.shape[1])
        target = config.attribution.target
        if target not in ("label", "prediction") and not 0 <= int(target) < k:
            raise ConfigError(f"{config.source}: attribution.target: {target} is out of range for a model with "
                              f"{k} outputs (allowed: label, prediction or a class index from 0 to {k - 1})")
        classes = len(self.dataset.classes)
        if target == "label" and classes > k:
            raise DataError(f"{self.data} has {classes} class folders but the model has {k} outputs: a label is the "
                            "index of its folder (sorted by name), so each folder needs an output; give a folder "
                            f"with at most {k} classes, or set attribution.target to prediction or a class index")


def _writer_factory(config: Config, path: Path, total: int, arrays: dict | None,
                    table: tuple[list[str], list[str]], overwrite: bool, layer_shapes: dict[str, tuple[int, ...]],
                    file_attrs: dict[str, Any] | None = None):
    """Creates the store on the first batch, when the layer list and shapes are known.

    ``file_attrs`` are extra root attributes written with the file, atomically (the data set's ``classes``, the
    model fingerprint, a shard's place in its run). The config is stored with absolute model paths
    (``store.file_config``) next to its folder, so the file alone rebuilds the model.
    """
    layers, rules = table
    layer_shapes = dict(layer_shapes)

    def make():
        if arrays is None:
            return None
        first_rows = {ATTRIBUTION_DATASET: arrays[ATTRIBUTION_DATASET], PREDICTION_DATASET: arrays[PREDICTION_DATASET]}
        if config.output.store_input:
            first_rows[INPUT_DATASET] = arrays[INPUT_DATASET]
        first_rows.update({f"{LAYERS_GROUP}/{name}": value for name, value in arrays[LAYERS_GROUP].items()})
        attrs = dict(file_attrs or {})
        classes = attrs.pop(CLASSES_ATTR, None)
        stored = file_config(config)
        return ResultWriter.create(
            path, config=stored, config_yaml=config_yaml(stored), classes=classes, attrs=attrs,
            config_dir=Path(config.base_dir).resolve(), n_rows=total,
            num_outputs=arrays[PREDICTION_DATASET].shape[1], sample_shape=tuple(arrays[ATTRIBUTION_DATASET].shape[1:]),
            layers=layers, rules=rules, dtype=config.output.dtype, store_input=config.output.store_input,
            overwrite=overwrite, extra_layers=dict(layer_shapes), torch_version=torch.__version__,
            compressed=choose_compression(config.output.compression, first_rows))

    return make


def _attribute_batch(config: Config, explainer: Explainer, batch: Any, device: torch.device,
                     layer_patterns: list[str], layer_shapes: dict[str, tuple[int, ...]], check=None
                     ) -> tuple[dict[str, Any], tuple[list[str], list[str]]]:
    """Attribution and conservation sums of one batch, as numpy arrays for the store, and the layer table.

    ``check`` (the first batch only) is called with the model's output before anything else happens, and a
    model that fails on these inputs is one line naming input.mode and the input shape.
    """
    non_blocking = device.type == "cuda"
    x = batch.inputs.to(device, non_blocking=non_blocking)
    labels = batch.labels
    n = x.shape[0]
    first = {} if check is None else {"check": check, "forward_error": lambda err: _model_failed(config, x, err)}
    result = explainer(x, labels, **first)
    relevance, output = result.relevance, result.output
    recorder = explainer.recorder
    if recorder is not None:
        layers, rules, r_in, r_out = recorder.table()
        relevance_in, relevance_out = r_in.cpu().numpy(), r_out.cpu().numpy()
        output_relevance = result.initial.detach().reshape(n, -1).sum(1, dtype=torch.float64).cpu().numpy()
        maps = {}
        for key, value in result.layers.items():
            maps[key] = value.detach().to(torch.float32).cpu().numpy()
            layer_shapes.setdefault(key, tuple(value.shape[1:]))
        if layer_patterns and not maps:
            raise DataError(f"output.layers: no module matched {layer_patterns}")
    else:
        layers, rules = [], []
        relevance_in = np.zeros((n, 0))
        relevance_out = np.zeros((n, 0))
        output_relevance = np.full(n, np.nan)
        maps = {}
    if torch.isnan(relevance).any():
        warnings.warn("lrpcli: NaN in the relevance of this batch; see `lrpcli debug` for the layer", stacklevel=2)
    return {
        ATTRIBUTION_DATASET: relevance.detach().cpu().numpy(),
        PREDICTION_DATASET: output.detach().reshape(n, -1).to(torch.float32).cpu().numpy(),
        LABEL_DATASET: labels.numpy(),
        TARGET_DATASET: result.target.cpu().numpy(),
        INDEX_DATASET: batch.indices.numpy().astype(np.uint32),
        FILENAME_DATASET: list(batch.filenames),
        INPUT_DATASET: batch.images.numpy() if config.output.store_input else None,
        RELEVANCE_IN: relevance_in,
        RELEVANCE_OUT: relevance_out,
        OUTPUT_RELEVANCE: output_relevance,
        LAYERS_GROUP: maps,
    }, (layers, rules)


def _warn_vanishing(explainer: Explainer, arrays: dict[str, Any], layers: list[str]) -> bool:
    """Warn (and return True) when an absolute stabilizer swallowed most of a layer's relevance in this batch
    (``recorder.vanishing_layer``): the attribution is then mostly zeros for a reason the user can fix."""
    session = explainer.session
    if session is None:
        return False
    rules = {a.name: a.rule for a in session.assignments.values()}
    found = vanishing_layer(layers, rules, torch.from_numpy(arrays[RELEVANCE_IN]),
                            torch.from_numpy(arrays[RELEVANCE_OUT]), float(np.nansum(arrays[OUTPUT_RELEVANCE])),
                            explainer.recorder.scales)
    if found is None:
        return False
    layer, rule, lost = found
    warnings.warn(f"lrpcli: layer {layer!r} ({type(rule).__name__}) loses {lost:.1%} of its relevance to the "
                  f"stabilizer (its activations are far below the absolute epsilon "
                  f"{rule.stabilizer.epsilon:g}); use the scale-relative stabilizer, composite.stabilizer: "
                  "{mode: rms}, or composite: auto", stacklevel=2)
    return True


def _model_failed(config: Config, x: torch.Tensor, err: Exception) -> ConfigError:
    """The first batch's forward failed: a model that does not take these inputs (a gray ``input.mode: L`` for
    a colour model, a crop too small for its layers) is one line naming the input keys, not a traceback."""
    text = " ".join(str(err).split())[:300]
    return ConfigError(
        f"{config.source}: the model failed on the first batch, inputs of shape {tuple(x.shape)} (input.mode: "
        f"{config.input.mode}, {3 if config.input.mode == 'RGB' else 1} channels; input.crop: "
        f"{config.input.crop}): {type(err).__name__}: {text}; set input.mode and input.crop to what the model "
        "takes (--debug shows the traceback)")
