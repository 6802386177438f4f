"""One result file as evaluate needs it: its rows, its stored config, the rebuilt model and normalised inputs.

The stored ``config`` attribute keeps model paths as the user wrote them (relative to the run's config
file); they are looked up next to ``--config`` when given, then next to the result file, then in the current
folder, and the first folder where all of them exist is used. Where the file records a ``model_fingerprint``,
the rebuilt model must match it. The inputs are the stored uint8 ``input`` rows, normalised with the config's
``input.mean``/``std`` exactly as the run normalised them (``ImageDataset.normalize``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lrpcli.errors import ConfigError, DataError
from lrpcli.explainer.models import load_model, model_fingerprint
from lrpcli.spec.config import validate
from lrpcli.store import (
    ATTRIBUTION_DATASET,
    CONFIG_DIR_ATTR,
    FILENAME_DATASET,
    INDEX_DATASET,
    INPUT_DATASET,
    MODEL_FINGERPRINT_ATTR,
    N_ROWS_ATTR,
    TARGET_DATASET,
    open_results,
)


@dataclass
class Source:
    """What evaluate reads from one file, once: metadata of its first ``n`` rows and the stored config."""

    path: Path
    config: Any  # the validated Config
    n: int  # rows evaluated (rows_written, or --max-samples)
    n_rows: int  # capacity of the file's per-row datasets
    index: np.ndarray
    filename: list[str]
    target: np.ndarray
    shape: tuple[int, int, int]  # C, H, W of the input
    fingerprint: str | None
    _model: Any = field(default=None, repr=False)

    @property
    def model_key(self) -> str:
        """Equal for files whose model and input sections agree (they can share one loaded model)."""
        cfg = self.config.to_dict()
        return repr((cfg["model"], str(self.config.base_dir)))

    def read(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Rows of ``attribution`` or ``input`` (file opened for this read only, so a cache write can follow)."""
        with open_results(self.path) as r:
            return r.read(name, rows)

    def relevance(self, rows: np.ndarray) -> np.ndarray:
        """Channel-summed relevance of ``rows`` as float64 ``len(rows) x H x W``."""
        return self.read(ATTRIBUTION_DATASET, rows).astype(np.float64).sum(axis=1)

    def inputs(self, rows: np.ndarray, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The model's inputs of ``rows``: (uint8 / 255 - mean) / std, as the run computed them
        (``Results.inputs``, the run's own normalisation)."""
        with open_results(self.path) as r:
            return r.inputs(normalised=True, rows=np.asarray(rows)).to(device, dtype)


def open_source(path: str | os.PathLike, max_samples: int | None = None,
                config_file: str | os.PathLike | None = None) -> Source:
    """Validate ``path`` for evaluation and read its metadata; DataError/ConfigError lines for bad input."""
    p = Path(path)
    with open_results(p) as r:
        try:
            first = r.read(INPUT_DATASET, slice(0, 1))
        except KeyError:
            first = None
        if first is None:
            raise DataError(f"{p}: no 'input' dataset (the run had output.store_input: false); evaluate needs the "
                            "inputs: run explain again with output.store_input: true")
        n = len(r) if max_samples is None else min(len(r), int(max_samples))
        if n == 0:
            raise DataError(f"{p}: no rows written yet; nothing to evaluate")
        shape = tuple(int(s) for s in first.shape[1:])
        att = tuple(int(s) for s in r.read(ATTRIBUTION_DATASET, slice(0, 1)).shape[1:])
        if att[1:] != shape[1:]:
            raise DataError(f"{p}: attribution maps are {att[1]}x{att[2]} but inputs {shape[1]}x{shape[2]}; "
                            "evaluate needs relevance at the input")
        index = np.asarray(r.read(INDEX_DATASET, slice(0, n)), dtype=np.int64)
        names = [str(s) for s in r.read(FILENAME_DATASET, slice(0, n))]
        target = np.asarray(r.read(TARGET_DATASET, slice(0, n)), dtype=np.int64)
        raw, n_rows = r.config, int(r.attrs.get(N_ROWS_ATTR, len(r)))
        fingerprint = r.attrs.get(MODEL_FINGERPRINT_ATTR)
        run_dir = r.attrs.get(CONFIG_DIR_ATTR)  # the run's config folder (files written since it was recorded)
    base = _base_dir(raw, p, config_file, None if run_dir is None else Path(str(run_dir)))
    try:
        config = validate(raw, source=f"{p} (stored config)", base_dir=base)
    except ConfigError as err:
        raise DataError(f"{p}: its stored config is not valid with this lrpcli: {err}") from None
    return Source(p, config, n, max(n_rows, n), index, names, target, shape, fingerprint)


def _relative_model_paths(raw: dict) -> list[str]:
    model = raw.get("model") or {}
    out = []
    entry = model.get("entrypoint")
    if isinstance(entry, str) and ":" in entry:
        target = entry.rpartition(":")[0]
        if target.endswith(".py") or "/" in target:
            out.append(target)
    weights = model.get("weights")
    if isinstance(weights, str) and ("/" in weights or Path(weights).suffix):
        out.append(weights)
    return [q for q in out if not Path(q).expanduser().is_absolute()]


def _base_dir(raw: dict, path: Path, config_file: str | os.PathLike | None, run_dir: Path | None) -> Path:
    """The first folder from which every relative model path of the stored config exists: ``--config``'s, the
    run's (root attribute ``config_dir``), the result file's, the current one."""
    candidates = [Path(config_file).resolve().parent] if config_file is not None else []
    candidates += ([run_dir] if run_dir is not None else []) + [path.resolve().parent, Path.cwd()]
    wanted = _relative_model_paths(raw)
    for base in candidates:
        if all((base / q).exists() for q in wanted):
            return base
    if wanted:
        raise DataError(f"{path}: the stored config names {', '.join(repr(q) for q in wanted)} relative to the "
                        f"run's config file, not found from {', '.join(str(c) for c in candidates)}; pass "
                        "--config with the config file the run used")
    return candidates[0]


def load_model_of(source: Source, device: torch.device) -> torch.nn.Module:
    """The model of ``source``'s stored config on ``device``, checked against the file's fingerprint if any."""
    model = load_model(source.config).to(device)
    if source.fingerprint:
        if model_fingerprint(model) != str(source.fingerprint):
            raise DataError(f"{source.path}: the model built from its stored config differs from the one that wrote "
                            "the file (model_fingerprint differs: weights changed?); evaluate would measure another "
                            "model")
    return model


# ------------------------------------------------------------------------------------------------- masks
_MASK_SUFFIXES = (".png", ".bmp", ".gif", ".tif", ".tiff", ".jpg", ".jpeg", ".webp")


def _mask_file(root: Path, name: str) -> Path | None:
    exact = root / name
    if exact.is_file():
        return exact
    stem = exact.with_suffix("")
    for suffix in _MASK_SUFFIXES:
        if stem.with_suffix(suffix).is_file():
            return stem.with_suffix(suffix)
    return None


def load_masks(masks_dir: str | os.PathLike, source: Source, rows: np.ndarray) -> np.ndarray:
    """Boolean ``len(rows) x H x W`` object masks from DIR, by each row's ``filename`` (DATA's layout).

    A mask is read as gray, resized and cropped as the run resized and cropped the image (input.resize:
    shorter side, input.crop: centre square; nearest-neighbour so it stays binary), and thresholded at 128.
    A missing file or a size that does not match the stored input is a DataError.
    """
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    root = Path(masks_dir)
    inp = source.config.input
    h, w = source.shape[1:]
    names = [source.filename[int(i)] for i in rows]
    files = [_mask_file(root, name) for name in names]
    missing = [name for name, f in zip(names, files) if f is None]
    if missing:
        raise DataError(f"--masks {root}: no mask for {len(missing)} of {len(names)} images, e.g. {missing[0]!r} "
                        f"(expected {root / missing[0]}, DATA's layout)")
    out = np.zeros((len(rows), h, w), dtype=bool)
    for j, f in enumerate(files):
        try:
            with Image.open(f) as im:
                t = F.pil_to_tensor(im.convert("L"))
        except Exception as err:  # noqa: BLE001 - any decoder failure is the user's file
            raise DataError(f"--masks: {f}: cannot read ({' '.join(str(err).split())})") from None
        if inp.resize is not None:
            t = F.resize(t, [int(inp.resize)], interpolation=InterpolationMode.NEAREST)
        if inp.crop is not None:
            t = F.center_crop(t, [int(inp.crop), int(inp.crop)])
        if tuple(t.shape[1:]) != (h, w):
            raise DataError(f"--masks: {f} is {t.shape[2]}x{t.shape[1]} after the run's resize/crop, but the "
                            f"input is {w}x{h}: the mask does not belong to {names[j]!r}")
        out[j] = t[0].numpy() >= 128
    return out
