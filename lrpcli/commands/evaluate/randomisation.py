"""Model parameter randomisation (Adebayo et al. 2018, "Sanity checks for saliency maps", NeurIPS), cascading.

The layers with parameters are re-initialised one after another from the top (the last registered first),
and after each of ``checkpoints`` evenly spaced points of that cascade the attribution is computed again with
the run's method and settings. Each re-attribution is compared with the stored map by the Spearman rank
correlation of the absolute, channel-summed relevance, as in the paper. An explanation that reflects the
model should move away from the original (low correlation) once its parameters are random; one that stays
close mostly shows the input.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch

from lrpcli.explainer.explainer import Explainer


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..D of each row of ``N x D``, ties sharing their average rank (as Spearman's coefficient needs)."""
    v = np.asarray(values, dtype=np.float64)
    out = np.empty_like(v)
    for i, row in enumerate(v):
        order = np.argsort(row, kind="stable")
        srt = row[order]
        starts = np.flatnonzero(np.r_[True, srt[1:] != srt[:-1]])
        ends = np.r_[starts[1:], len(srt)]
        mean_rank = (starts + ends + 1) / 2.0  # ranks starts+1 .. ends averaged
        out[i, order] = np.repeat(mean_rank, ends - starts)
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rank correlation per row of two ``N x D`` arrays (average ranks for ties); NaN where constant."""
    ra, rb = average_ranks(a), average_ranks(b)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    den = np.sqrt((ra * ra).sum(axis=1) * (rb * rb).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (ra * rb).sum(axis=1) / np.where(den > 0, den, 1.0), np.nan)


def parameter_layers(model: torch.nn.Module) -> list[str]:
    """Names of the modules that own parameters directly, top (last registered) first."""
    names = [name for name, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
    return names[::-1]


def cascade(model: torch.nn.Module, checkpoints: int, seed: int) -> list[torch.nn.Module]:
    """Copies of ``model`` with the top 1..L parameter layers re-initialised, at ``checkpoints`` cascade points.

    A layer is re-initialised by its own ``reset_parameters`` (PyTorch's default initialisation; BatchNorm
    also resets its running statistics) or, without one, by drawing its parameters from N(0, 0.01^2); the
    generator is seeded per layer, so the cascade is the same in every call.
    """
    layers = parameter_layers(model)
    if not layers:
        return []
    points = sorted({int(round(p)) for p in np.linspace(1, len(layers), min(checkpoints, len(layers)))})
    out = []
    current = copy.deepcopy(model)
    modules = dict(current.named_modules())
    done = 0
    for point in points:
        for j in range(done, point):
            module = modules[layers[j]]
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                torch.manual_seed(seed * 100003 + j)
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
                else:
                    for p in module.parameters(recurse=False):
                        p.normal_(0.0, 0.01)
        done = point
        out.append(copy.deepcopy(current))
    return out


def attribute_like_the_run(config: Any, model: torch.nn.Module, x: torch.Tensor, targets: torch.Tensor
                           ) -> torch.Tensor:
    """Relevance of ``x`` for ``targets`` with the config's method (its LRP composite or attributor), through the
    same Explainer the run used."""
    explainer = Explainer.from_config(config, model)
    explainer.target = targets
    return explainer(x.detach()).relevance.detach()


def randomisation_curves(config: Any, models: list[torch.nn.Module], x: torch.Tensor, targets: torch.Tensor,
                         original: np.ndarray, batch_size: int) -> np.ndarray:
    """``N x len(models)``: Spearman correlation of |R| between ``original`` (``N x H x W``) and each model's."""
    n = len(x)
    out = np.full((n, len(models)), np.nan)
    flat = np.abs(original.reshape(n, -1))
    for k, model in enumerate(models):
        maps = []
        for start in range(0, n, batch_size):
            r = attribute_like_the_run(config, model, x[start:start + batch_size], targets[start:start + batch_size])
            maps.append(r.double().sum(1).cpu().numpy())
        out[:, k] = spearman(flat, np.abs(np.concatenate(maps).reshape(n, -1)))
    return out
