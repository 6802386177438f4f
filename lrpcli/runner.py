"""The batch runner behind ``lrpcli explain``: data -> model + composite -> attribution -> store.

One composite context is entered for the whole run (canonizers are applied once), batches flow from a
DataLoader, and each finished batch is handed to the store: to a writer thread, so that HDF5 compression and
writing overlap the next batch's attribution, where a core is free for it (``background_threads_help``), else
at once. The per-layer conservation sums come from the same backward pass.
"""

from __future__ import annotations

import contextlib
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

from .api import initial_relevance
from .build import composite_kwargs, resolve_baseline
from .config import Config
from .errors import DataError, LrpcliError, RunError
from .recorder import Recorder
from .runtime import available_cpus, resolve_device, resolve_num_workers


@dataclass
class RunSummary:
    """What a run did, for the closing line and for callers."""

    path: Path
    rows: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    resumed_from: int = 0
    complete: bool = False

    @property
    def images_per_second(self) -> float:
        return (self.rows - self.resumed_from) / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
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


def _targets(config: Config, labels: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    target = config.attribution.target
    if target == "label":
        return labels
    if target == "prediction":
        return output.detach().reshape(output.shape[0], output.shape[1], -1).sum(-1).argmax(1)
    return torch.full_like(labels, int(target))


def _method(config: Config):
    """A function (model, composite, x, target) -> (output, attribution) for non-LRP methods."""
    from . import attributors

    att = config.attribution
    method = att.method
    fn = attributors.ATTRIBUTORS[method]
    extra: dict[str, Any] = {}
    if method == "smoothgrad":
        extra = {"noise_level": att.noise_level, "n_iter": att.n_iter, "seed": config.run.seed}
    elif method == "integrated_gradients":
        extra = {"n_iter": att.n_iter, "baseline": resolve_baseline(config)}
    elif method == "occlusion":
        extra = {"window": list(att.window), "stride": list(att.stride), "fill": att.fill}
    return lambda model, x, target: fn(model, x, target, **extra)


def explain(config: Config, data: str | Path, *, resume: bool = False, overwrite: bool = False,
            progress: bool | None = None, shard: Any = None) -> RunSummary:
    """Run the configured attribution over every image of ``data`` and write one HDF5 file.

    ``shard`` (a :class:`lrpcli.distributed.Shard`) restricts the run to one rank's block of the data set: its
    samples, its device and its own file (``out.rank00003.h5``); see ``lrpcli.distributed``.
    """
    from . import composites
    from .data import make_loader, open_image_folder, prefetch
    from .models import load_model
    from .store import ResultWriter

    out_path = Path(config.output.path) if shard is None else shard.path
    if resume and overwrite:
        raise LrpcliError("--resume and --overwrite exclude each other")
    resuming = resume and out_path.exists()
    if out_path.exists() and not (resume or overwrite):
        raise DataError(f"{out_path} exists; pass --resume to continue it or --overwrite to replace it")
    _check_output_dir(out_path)
    data = Path(data)
    dataset = open_image_folder(data, config.input)
    if config.attribution.target == "label" and not dataset.classes:
        raise DataError(f"{data} has no class folders, so there are no labels to explain: set "
                        "attribution.target to prediction or a class index")
    device = resolve_device(config.run.device) if shard is None else shard.device(config.run.device)
    total = len(dataset) if config.run.max_samples is None else min(len(dataset), config.run.max_samples)
    # this run's samples are [first, stop): everything, or one rank's block
    first, stop = (0, total) if shard is None else shard.bounds(total, config.run.batch_size)
    file_attrs = None if shard is None else shard.attrs(total, config.run.batch_size)
    if first == stop:  # a rank with nothing to do (more ranks than batches) writes no file
        return RunSummary(out_path, complete=True)

    writer_for_resume = None
    start = first
    if resuming:
        if shard is not None:
            shard.check_file(out_path, total, config.run.batch_size)
        writer_for_resume = ResultWriter.resume(out_path, config=config.to_dict())
        if writer_for_resume.complete:
            writer_for_resume.close(complete=True)
            summary = RunSummary(out_path, writer_for_resume.rows_written, resumed_from=writer_for_resume.rows_written,
                                 complete=True)
            return summary
        start = first + writer_for_resume.rows_written + writer_for_resume.n_skipped

    workers = resolve_num_workers(config.run.num_workers, samples=stop - start, batch_size=config.run.batch_size,
                                  device=device)
    loader = make_loader(dataset, batch_size=config.run.batch_size, num_workers=workers, device=device,
                         start=start, stop=stop)
    # without worker processes the next batch is decoded in a thread while this one is attributed (where that
    # helps, see background_threads_help); started before the model loads, so the first batches are ready
    threads = background_threads_help(device)
    batches = prefetch(loader) if threads and not workers else loader
    try:
        model = load_model(config).to(device)
        lrp = config.attribution.method == "lrp"
        comp = composites.get(config.composite.name, **composite_kwargs(config)) if lrp else None
        method = None if lrp else _method(config)
    except BaseException:  # the reader thread must not outlive a run that never started
        if batches is not loader:
            batches.close()
        raise
    layer_patterns = list(config.output.layers or [])
    show = sys.stderr.isatty() if progress is None else progress
    summary = RunSummary(out_path, rows=start - first, resumed_from=start - first)
    recorder = Recorder(layer_patterns) if lrp else None
    batch_writer = _BatchWriter(threaded=threads)
    if writer_for_resume is not None:
        batch_writer.writer = writer_for_resume
    layer_shapes: dict[str, tuple[int, ...]] = {}
    t0 = time.perf_counter()

    from tqdm import tqdm

    bar = tqdm(total=stop - first, initial=start - first, unit="img", disable=not show, dynamic_ncols=True,
               leave=False, desc=None if shard is None else f"rank {shard.rank}")
    context = comp.context(model, recorder=recorder) if lrp else contextlib.nullcontext(model)
    completed = False
    try:
        with context as run_model, warnings.catch_warnings():
            warnings.simplefilter("once")
            for collated in batches:
                batch, skipped = collated.batch, collated.skipped
                for s in skipped:
                    warnings.warn(f"lrpcli: skipped {s.filename}: {s.reason}", stacklevel=1)
                    summary.skipped.append((s.filename, s.reason))
                arrays, table = None, ([], [])
                if len(batch):
                    arrays, table = _attribute_batch(config, run_model, model, comp, method, recorder, batch,
                                                     device, layer_patterns, layer_shapes)
                    summary.rows += len(batch)
                make_writer = _writer_factory(config, out_path, stop - first, arrays, table, overwrite, layer_shapes,
                                              file_attrs)
                batch_writer.put((make_writer, [(s.filename, s.reason) for s in skipped], arrays))
                bar.update(len(batch) + len(skipped))
                if show:
                    elapsed = time.perf_counter() - t0
                    bar.set_postfix_str(f"{(summary.rows - summary.resumed_from) / max(elapsed, 1e-9):.1f} images/s")
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
        raise DataError(f"no image under {data} could be read ({len(summary.skipped)} skipped); nothing written")
    summary.complete = True
    return summary


def _check_output_dir(path: Path) -> None:
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


def _writer_factory(config: Config, path: Path, total: int, arrays: dict | None,
                    table: tuple[list[str], list[str]], overwrite: bool, layer_shapes: dict[str, tuple[int, ...]],
                    file_attrs: dict[str, Any] | None = None):
    """Creates the store on the first batch, when the layer list and shapes are known.

    ``file_attrs`` are extra root attributes written with the file, atomically (a shard's place in its run).
    """
    layers, rules = table
    layer_shapes = dict(layer_shapes)

    def make():
        from .store import ResultWriter, choose_compression

        if arrays is None:
            return None
        first_rows = {"attribution": arrays["attribution"], "prediction": arrays["prediction"]}
        if config.output.store_input:
            first_rows["input"] = arrays["input"]
        first_rows.update({f"layers/{name}": value for name, value in arrays["layers"].items()})
        cls = ResultWriter
        if file_attrs:
            from .distributed import writer_with_attrs

            cls = writer_with_attrs(file_attrs)
        return cls.create(
            path, config=config.to_dict(), config_yaml=config.to_yaml(), n_rows=total,
            num_outputs=arrays["prediction"].shape[1], sample_shape=tuple(arrays["attribution"].shape[1:]),
            layers=layers, rules=rules, dtype=config.output.dtype, store_input=config.output.store_input,
            overwrite=overwrite, extra_layers=dict(layer_shapes), torch_version=torch.__version__,
            compressed=choose_compression(config.output.compression, first_rows))

    return make


def _attribute_batch(config: Config, run_model, model, comp, method, recorder: Recorder | None, batch, device,
                     layer_patterns: list[str], layer_shapes: dict[str, tuple[int, ...]]
                     ) -> tuple[dict[str, Any], tuple[list[str], list[str]]]:
    """Attribution and conservation sums of one batch, as numpy arrays for the store, and the layer table."""
    non_blocking = device.type == "cuda"
    x = batch.inputs.to(device, non_blocking=non_blocking)
    labels = batch.labels
    n = x.shape[0]
    if method is None:
        xi = x.requires_grad_(True)
        with torch.enable_grad():
            output = run_model(xi)
            target = _targets(config, labels.to(device), output)
            seed = initial_relevance(output, target, comp.seed)
            (relevance,) = torch.autograd.grad(output, xi, seed)
        layers, rules, r_in, r_out = recorder.table()
        relevance_in, relevance_out = r_in.cpu().numpy(), r_out.cpu().numpy()
        output_relevance = seed.detach().reshape(n, -1).sum(1, dtype=torch.float64).cpu().numpy()
        maps = {}
        for key, value in recorder.ordered_maps().items():
            maps[key] = value.detach().to(torch.float32).cpu().numpy()
            layer_shapes.setdefault(key, tuple(value.shape[1:]))
        if layer_patterns and not maps:
            raise DataError(f"output.layers: no module matched {layer_patterns}")
    else:
        with torch.no_grad():
            target = _targets(config, labels.to(device), model(x))
        output, relevance = method(model, x, target)
        layers, rules = [], []
        relevance_in = np.zeros((n, 0))
        relevance_out = np.zeros((n, 0))
        output_relevance = np.full(n, np.nan)
        maps = {}
    if torch.isnan(relevance).any():
        warnings.warn("lrpcli: NaN in the relevance of this batch; see `lrpcli debug` for the layer", stacklevel=2)
    return {
        "attribution": relevance.detach().cpu().numpy(),
        "prediction": output.detach().reshape(n, -1).to(torch.float32).cpu().numpy(),
        "label": labels.numpy(),
        "target": target.cpu().numpy(),
        "index": batch.indices.numpy().astype(np.uint32),
        "filename": list(batch.filenames),
        "input": batch.images.numpy() if config.output.store_input else None,
        "relevance_in": relevance_in,
        "relevance_out": relevance_out,
        "output_relevance": output_relevance,
        "layers": maps,
    }, (layers, rules)
