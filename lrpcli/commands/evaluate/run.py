"""Evaluate one result file: every requested metric family, chunk by chunk, kept in its ``evaluation/`` group.

For each chunk of rows the inputs and maps are read once; each (source, family) whose rows are not stored yet
is computed and written before the next chunk, so a killed evaluation loses at most one chunk.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from lrpcli.commands.evaluate import metrics as M
from lrpcli.commands.evaluate.cache import Cache
from lrpcli.commands.evaluate.perturb import auto_batch_size, perturbation_curves, replacement, subset_scores
from lrpcli.commands.evaluate.settings import MASK_FAMILIES, MODEL_FAMILIES, SOURCES, Settings
from lrpcli.commands.evaluate.source import Source, load_masks, load_model_of
from lrpcli.errors import LrpcliError


@dataclass
class FileResult:
    """Per-sample values of one file's first ``n`` rows: ``values[source][row name]``, curves per source."""

    source: Source
    values: dict[str, dict[str, np.ndarray]]
    curves: dict[str, dict[str, np.ndarray]]  # source -> {"morf", "lerf"}: n x (steps + 1)
    seconds: float = 0.0


def evaluate_file(src: Source, families: list[str], settings: Settings, *, masks: str | None, device: torch.device,
                  batch_size: int | None, sources: tuple[str, ...] = SOURCES, model: Any = None,
                  progress: Any = None) -> FileResult:
    """All ``families`` for ``src``'s rows, from its ``evaluation/`` group where stored, else computed.

    ``model``: the model, a function giving it (called only when something must be computed), or None to
    build it from the stored config. ``progress(k)`` is called after each chunk of k samples.
    """
    h, w = src.shape[1:]
    steps = settings.steps_for(h, w)
    caches = {}
    for s in sources:
        for fam in families:
            columns = {"morf": (steps + 1,), "lerf": (steps + 1,)} if fam == "region_perturbation" else \
                {"curve": (settings.mpr_checkpoints,)} if fam == "model_randomisation" else {"value": ()}
            caches[s, fam] = Cache(src.path, src.n_rows, s, fam, settings.of(fam, h, w, masks), columns)
    state = {key: cache.load() for key, cache in caches.items()}
    todo = np.flatnonzero(~np.all([done[: src.n] for done, _ in state.values()], axis=0))
    t0 = time.perf_counter()
    if len(todo):
        needs_model = any(not state[key][0][: src.n].all() for key in state if key[1] in MODEL_FAMILIES)
        if needs_model:
            model = _the_model(src, model, device)
            if batch_size is None:
                batch_size = auto_batch_size(model, src.inputs(np.array([0]), device), _budget(device))
        jobs = 2 * (steps + 1) if "region_perturbation" in families else settings.fc_runs + 1
        chunk = int(min(256, max(8, math.ceil(4 * (batch_size or 64) / jobs))))
        for start in range(0, len(todo), chunk):
            rows = todo[start:start + chunk]
            _chunk(src, rows, families, settings, caches, state, masks=masks, device=device, model=model,
                   batch_size=batch_size or 64, steps=steps)
            if progress is not None:
                progress(len(rows))
    values: dict[str, dict[str, np.ndarray]] = {}
    curves: dict[str, dict[str, np.ndarray]] = {}
    for s in sources:
        values[s] = {}
        for fam in families:
            stored = state[s, fam][1]
            if fam == "region_perturbation":
                morf, lerf = stored["morf"][: src.n], stored["lerf"][: src.n]
                curves[s] = {"morf": morf, "lerf": lerf}
                values[s].update(aopc_morf=M.aopc(morf), aopc_lerf=M.aopc(lerf), abpc=M.abpc(morf, lerf))
            elif fam == "model_randomisation":
                curve = stored["curve"][: src.n]
                with np.errstate(invalid="ignore"), warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: the random baseline
                    values[s][fam] = np.nanmean(curve, axis=1)
            else:
                values[s][fam] = stored["value"][: src.n]
    return FileResult(src, values, curves, time.perf_counter() - t0)


def _the_model(src: Source, model: Any, device: torch.device) -> torch.nn.Module:
    """``model`` as given, from the function that gives it, or built from ``src``'s stored config."""
    if model is None:
        return load_model_of(src, device)
    if isinstance(model, torch.nn.Module):
        return model
    return model()


def _budget(device: torch.device) -> int:
    """Bytes the perturbed batches may take: 1 GiB on the CPU, half the free memory (at most 8 GiB) on CUDA."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(min(8 << 30, free // 2))
    return 1 << 30


def maps_of(src: Source, source: str, rows: np.ndarray, relevance: np.ndarray | None, seed: int) -> np.ndarray:
    """Channel-summed maps of ``rows``: the file's relevance or the seeded random baseline."""
    if source == "attribution":
        return relevance if relevance is not None else src.relevance(rows)
    return M.random_relevance(src.index[rows], src.shape[1], src.shape[2], seed)


def _chunk(src: Source, rows: np.ndarray, families: list[str], settings: Settings, caches: dict, state: dict, *,
           masks: str | None, device: torch.device, model: Any, batch_size: int, steps: int) -> None:
    """Compute and store every unfinished (source, family) on ``rows``."""
    relevance = src.relevance(rows)
    x = base = None
    mask_arr = load_masks(masks, src, rows) if masks and any(f in MASK_FAMILIES for f in families) else None
    ids = M.patch_ids(src.shape[1], src.shape[2], settings.patch_size)
    for (s, fam), cache in caches.items():
        done, stored = state[s, fam]
        if done[rows].all():
            continue
        r = maps_of(src, s, rows, relevance, settings.seed)
        if fam in MODEL_FAMILIES and x is None:
            x = src.inputs(rows, device)
            base = replacement(x, settings.replacement, list(src.config.input.mean), list(src.config.input.std),
                               src.index[rows], settings.seed, settings.blur_sigma)
        targets = torch.from_numpy(src.target[rows]).to(device)
        if fam == "region_perturbation":
            ranks = pixel_ranks(r, ids)
            morf, lerf = perturbation_curves(model, x, base, targets, torch.from_numpy(ranks).to(device), steps,
                                             batch_size=batch_size, score=settings.score)
            out = {"morf": morf.double().cpu().numpy(), "lerf": lerf.double().cpu().numpy()}
        elif fam == "faithfulness_correlation":
            sums = M.patch_sums(r, ids)
            subsets = random_subsets(src.index[rows], sums.shape[1], settings.fc_runs, settings.fc_subset,
                                     settings.seed)
            full, scores = subset_scores(model, x, base, targets, torch.from_numpy(subsets).to(device),
                                         torch.from_numpy(ids).to(device), batch_size=batch_size,
                                         score=settings.score)
            drops = (full[:, None] - scores).double().cpu().numpy()
            out = {"value": M.faithfulness_correlation(np.einsum("np,nrp->nr", sums, subsets), drops)}
        elif fam == "model_randomisation":
            out = {"curve": _randomisation(src, s, rows, r, x, targets, settings, model, batch_size, state)}
        elif fam in MASK_FAMILIES:
            if mask_arr is None:
                raise LrpcliError(f"metric {fam} needs --masks DIR")
            fn = {"relevance_mass_accuracy": M.relevance_mass_accuracy,
                  "relevance_rank_accuracy": M.relevance_rank_accuracy, "pointing_game": M.pointing_game}[fam]
            out = {"value": fn(r, mask_arr)}
        else:
            out = {"value": {"sparseness": M.sparseness, "complexity": M.complexity}[fam](r)}
        for col, arr in out.items():
            stored[col][rows] = arr
        done[rows] = True
        cache.write(rows, out)


def _randomisation(src: Source, source: str, rows: np.ndarray, r: np.ndarray, x: torch.Tensor,
                   targets: torch.Tensor, settings: Settings, model: Any, batch_size: int, state: dict) -> np.ndarray:
    """``len(rows) x checkpoints`` Spearman curves; NaN for the random baseline, which no parameter changes."""
    from lrpcli.commands.evaluate.randomisation import (  # lazy: keeps the engine out of lrpcli --help
        cascade,
        randomisation_curves,
    )

    out = np.full((len(rows), settings.mpr_checkpoints), np.nan)
    if source == "random":
        return out
    if "_cascade" not in state:  # built once per file
        state["_cascade"] = cascade(model, settings.mpr_checkpoints, settings.seed)
    models = state["_cascade"]
    size = max(1, min(batch_size, int(src.config.run.batch_size)))
    out[:, : len(models)] = randomisation_curves(src.config, models, x, targets, r, size)
    return out


def pixel_ranks(relevance: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """``N x 2 x H x W`` int64: each pixel's patch position in the MoRF (0) and LeRF (1) order."""
    sums = M.patch_sums(relevance, ids)
    out = np.empty((len(sums), 2, *ids.shape), dtype=np.int64)
    for o, most_first in enumerate((True, False)):
        order = M.patch_order(sums, most_first)
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.arange(order.shape[1])[None, :].repeat(len(order), 0), axis=1)
        out[:, o] = rank[:, ids]
    return out


def random_subsets(indices: np.ndarray, patches: int, runs: int, share: float, seed: int) -> np.ndarray:
    """``N x runs x P`` boolean: for each sample (seeded by its data set index) ``runs`` random patch subsets
    of ``max(1, round(share * P))`` patches each (Bhatt et al. 2020's random subsets S)."""
    k = max(1, min(patches, round(share * patches)))
    out = np.zeros((len(indices), runs, patches), dtype=bool)
    for i, index in enumerate(np.asarray(indices, dtype=np.int64)):
        rng = np.random.default_rng([int(seed), int(index), 2])
        for r in range(runs):
            out[i, r, rng.choice(patches, size=k, replace=False)] = True
    return out


def settings_dict(settings: Settings) -> dict[str, Any]:
    """The settings as plain JSON values (for the report)."""
    return asdict(settings)
