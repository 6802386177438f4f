"""Batched region perturbation: many perturbed copies of the inputs per forward pass, chunked to a budget.

Every perturbed image is ``x + (b - x) * M``: the input ``x`` (normalised, as the model sees it), a
replacement image ``b`` of the same shape and a pixel mask ``M``. A *job* is one (sample, mask) pair; jobs of
many samples are stacked into one batch of ``batch_size`` images, so the model runs on full batches whatever
the number of steps per sample. The masks are made on the device from small integer maps (the rank of each
pixel's patch), never stored per step.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from lrpcli.commands.evaluate.settings import REPLACEMENTS, SCORES

__all__ = ["REPLACEMENTS", "SCORES", "auto_batch_size", "masked_scores", "perturbation_curves", "replacement",
           "subset_scores"]



def replacement(x: torch.Tensor, kind: str, mean: list[float], std: list[float], indices: np.ndarray,
                seed: int = 0, sigma: float = 4.0) -> torch.Tensor:
    """The image a removed region is taken from, per sample, in the model's normalised space.

    ``mean``: the data set mean of the config (0 after normalisation); ``black``: pixel value 0; ``uniform``:
    uniform noise in [0, 1] pixel space, seeded per data set index (same noise in every file); ``blur``: the
    image under a Gaussian blur of standard deviation ``sigma`` pixels (edges replicated).
    """
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    if kind == "mean":
        return torch.zeros_like(x)
    if kind == "black":
        return ((0.0 - m) / s).expand_as(x).clone()
    if kind == "uniform":
        noise = np.stack([np.random.default_rng([int(seed), int(i), 1]).random(tuple(x.shape[1:]))
                          for i in np.asarray(indices, dtype=np.int64)]) if len(x) else np.zeros(tuple(x.shape))
        return (torch.from_numpy(noise).to(x.device, x.dtype) - m) / s
    if kind == "blur":
        return gaussian_blur(x, sigma)
    raise ValueError(f"replacement: expected one of {', '.join(REPLACEMENTS)}, got {kind!r}")


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``N x C x H x W``, kernel radius ceil(3 sigma), edges replicated."""
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    out = torch.nn.functional.pad(x, (radius, radius, 0, 0), mode="replicate")
    out = torch.nn.functional.conv2d(out, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    out = torch.nn.functional.pad(out, (0, 0, radius, radius), mode="replicate")
    return torch.nn.functional.conv2d(out, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def _score(output: torch.Tensor, targets: torch.Tensor, score: str) -> torch.Tensor:
    out = output.reshape(output.shape[0], output.shape[1], -1).sum(-1)
    if score == "probability":
        out = torch.softmax(out, dim=1)
    return out.gather(1, targets.view(-1, 1)).view(-1)


def masked_scores(model: torch.nn.Module, x: torch.Tensor, base: torch.Tensor, targets: torch.Tensor,
                  job_sample: torch.Tensor, job_masks: Callable[[torch.Tensor], torch.Tensor], *,
                  batch_size: int, score: str = "logit") -> torch.Tensor:
    """The score of every job, in job order: ``len(job_sample)`` values on ``x``'s device.

    ``job_sample[j]`` is the sample of job j; ``job_masks(jobs)`` gives the ``len(jobs) x H x W`` masks of a
    slice of job numbers (True = replaced). Forwards run on ``batch_size`` perturbed images at a time.
    """
    n = len(job_sample)
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    with torch.no_grad():
        for start in range(0, n, batch_size):
            jobs = torch.arange(start, min(n, start + batch_size), device=x.device)
            s = job_sample[jobs]
            mask = job_masks(jobs).unsqueeze(1).to(x.dtype)
            xs = x[s]
            images = xs + (base[s] - xs) * mask
            out[start:start + len(jobs)] = _score(model(images), targets[s], score)
    return out


def perturbation_curves(model: torch.nn.Module, x: torch.Tensor, base: torch.Tensor, targets: torch.Tensor,
                        ranks: torch.Tensor, steps: int, *, batch_size: int, score: str = "logit"
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """MoRF and LeRF curves (Samek et al. 2017): ``N x (steps + 1)`` scores each, after 0..steps patches.

    ``ranks`` is ``N x 2 x H x W``: for MoRF (0) and LeRF (1), the position of each pixel's patch in that
    order; after k steps the pixels with rank < k are replaced.
    """
    n, per = len(x), steps + 1
    job_sample = torch.arange(n, device=x.device).repeat_interleave(2 * per)
    flat = ranks.reshape(n * 2, *ranks.shape[2:])

    def masks(jobs: torch.Tensor) -> torch.Tensor:
        k = (jobs % per).view(-1, 1, 1)
        return flat[jobs // per] < k

    scores = masked_scores(model, x, base, targets, job_sample, masks, batch_size=batch_size, score=score)
    scores = scores.view(n, 2, per)
    return scores[:, 0], scores[:, 1]


def subset_scores(model: torch.nn.Module, x: torch.Tensor, base: torch.Tensor, targets: torch.Tensor,
                  subsets: torch.Tensor, ids: torch.Tensor, *, batch_size: int, score: str = "logit"
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(``N`` unperturbed scores, ``N x R`` scores with each random patch subset replaced).

    ``subsets`` is boolean ``N x R x P`` (R subsets of the P patches per sample); ``ids`` the ``H x W`` patch
    map. The unperturbed input is job 0 of each sample (an empty subset).
    """
    n, runs = subsets.shape[0], subsets.shape[1]
    per = runs + 1
    table = torch.cat([torch.zeros_like(subsets[:, :1]), subsets], dim=1).reshape(n * per, -1)
    job_sample = torch.arange(n, device=x.device).repeat_interleave(per)

    def masks(jobs: torch.Tensor) -> torch.Tensor:
        return table[jobs][:, ids]

    scores = masked_scores(model, x, base, targets, job_sample, masks, batch_size=batch_size, score=score)
    scores = scores.view(n, per)
    return scores[:, 0], scores[:, 1:]


def auto_batch_size(model: torch.nn.Module, sample: torch.Tensor, budget_bytes: int) -> int:
    """Perturbed images per forward that fit ``budget_bytes``: one probe forward of ``sample`` (1 x C x H x W).

    Under no_grad, the memory a forward holds at once is about the input plus the two largest activations
    side by side; three copies of the input (x, replacement, mask blend) are added. Clamped to 1..1024.
    """
    sizes: list[int] = []

    def hook(_module: torch.nn.Module, _inputs: object, output: object) -> None:
        if isinstance(output, torch.Tensor):
            sizes.append(output.numel() * output.element_size())

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model(sample)
    finally:
        for h in handles:
            h.remove()
    largest = sorted(sizes, reverse=True)[:2]
    per_image = 4 * sample.numel() * sample.element_size() + 2 * sum(largest)
    return int(min(1024, max(1, budget_bytes // max(per_image, 1))))
