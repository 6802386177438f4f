"""The attribution methods beyond one backward pass, over a backward signal they are handed.

``signal(x, target) -> (output, gradient)`` is one forward and backward of the (modified) model; the
``Explainer`` supplies it (with a composite: the relevance the rules propagate), so these functions know
nothing of composites, hooks or targets' forms. ``target`` is already resolved: class indices or a tensor shaped
like the output (see ``lrpcli.explainer.explainer.resolve_target``), or a callable the signal applies to each output.
Noisy copies, integration steps and occlusion windows run as batched forwards in chunks whose size follows a
memory budget, not one sample at a time.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

Signal = Callable[[torch.Tensor, Any], tuple[torch.Tensor, torch.Tensor]]

DEFAULT_BUDGET = 1 << 30  # bytes of activations per chunk, roughly


def chunk_rows(x: torch.Tensor, budget: int) -> int:
    """Rows per forward: the budget over a rough activation footprint of one row (64x its input)."""
    per_row = max(1, x[0].numel() * x.element_size() * 64)
    return max(1, budget // per_row)


def _expand_target(target: Any, copies: int) -> Any:
    """The target for ``copies`` stacked copies of a batch (copy-major order)."""
    if isinstance(target, torch.Tensor) and target.dim() >= 1:
        return target.repeat((copies,) + (1,) * (target.dim() - 1))
    return target


def over_copies(signal: Signal, x: torch.Tensor, target: Any, copies: int,
                make: Callable[[int], torch.Tensor], budget: int) -> torch.Tensor:
    """Sum of signals over ``copies`` transformed copies of x (``make(k)`` gives copy k), in chunks."""
    n = x.shape[0]
    rows = max(n, (chunk_rows(x, budget) // n) * n)
    per_chunk = max(1, rows // n)
    total = torch.zeros_like(x)
    for start in range(0, copies, per_chunk):
        ks = range(start, min(copies, start + per_chunk))
        batch = torch.cat([make(k) for k in ks])
        _, grad = signal(batch, _expand_target(target, len(ks)))
        total += grad.view(len(ks), *x.shape).sum(0)
    return total


def check_smoothgrad(noise_level: float, n_iter: int) -> None:
    if n_iter < 1 or noise_level < 0:
        raise ValueError(f"smoothgrad: n_iter must be >= 1 and noise_level >= 0, got {n_iter}, {noise_level}")


def smoothgrad_noise(x: torch.Tensor, noise_level: float, n_iter: int, seed: int | None
                     ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(scale, noise): noise std = noise_level x each sample's value range, drawn from its own generator."""
    flat = x.detach().reshape(x.shape[0], -1)
    scale = (flat.max(1).values - flat.min(1).values).view((-1,) + (1,) * (x.dim() - 1)) * noise_level
    generator = torch.Generator(device=x.device)
    if seed is not None:
        generator.manual_seed(seed)
    noise = [torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) for _ in range(n_iter)]
    return scale, noise


def smoothgrad(signal: Signal, x: torch.Tensor, target: Any, scale: torch.Tensor, noise: list[torch.Tensor],
               budget: int = DEFAULT_BUDGET) -> torch.Tensor:
    """Mean signal over the noisy copies ``x + scale * noise[k]``."""
    total = over_copies(signal, x, target, len(noise), lambda k: x.detach() + scale * noise[k], budget)
    return total / len(noise)


def check_integrated_gradients(n_iter: int) -> None:
    if n_iter < 1:
        raise ValueError(f"integrated_gradients: n_iter must be >= 1, got {n_iter}")


def integrated_gradients(signal: Signal, x: torch.Tensor, target: Any, baseline: torch.Tensor | float | None,
                         n_iter: int, budget: int = DEFAULT_BUDGET) -> torch.Tensor:
    """(x - baseline) times the mean signal at the midpoints of ``n_iter`` steps from the baseline to x."""
    base = torch.zeros_like(x) if baseline is None else torch.as_tensor(baseline, dtype=x.dtype,
                                                                        device=x.device).expand_as(x)
    delta = x.detach() - base
    total = over_copies(signal, x, target, n_iter, lambda k: base + (k + 0.5) / n_iter * delta, budget)
    return delta * total / n_iter


def _windows(shape: Sequence[int], window: Sequence[int], stride: Sequence[int]) -> Iterator[tuple[slice, ...]]:
    starts = []
    for size, w, s in zip(shape, window, stride):
        last = max(size - w, 0)
        positions = list(range(0, last + 1, s))
        if positions[-1] != last:
            positions.append(last)
        starts.append(positions)
    for corner in itertools.product(*starts):
        yield tuple(slice(c, c + w) for c, w in zip(corner, window))


def occlusion_windows(x: torch.Tensor, window: int | Sequence[int], stride: int | Sequence[int] | None
                      ) -> tuple[list[int], list[int]]:
    """Window and stride as one size per spatial dimension of x (stride defaults to the window)."""
    spatial = x.shape[2:]
    window = [window] * len(spatial) if isinstance(window, int) else list(window)
    stride = window if stride is None else ([stride] * len(spatial) if isinstance(stride, int) else list(stride))
    if len(window) != len(spatial) or len(stride) != len(spatial) or min(window + stride) < 1:
        raise ValueError(f"occlusion: window and stride need {len(spatial)} positive sizes, got {window}, {stride}")
    return window, stride


def occlusion(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, output: torch.Tensor,
              onehot: torch.Tensor, window: list[int], stride: list[int], fill: float,
              budget: int = DEFAULT_BUDGET) -> torch.Tensor:
    """Drop in the target score (``onehot`` x output) when a window of the input (all channels) is set to
    ``fill``, averaged over the windows covering each position. Forwards only, under no_grad."""
    spatial = x.shape[2:]
    with torch.no_grad():
        clean = (onehot * output).reshape(x.shape[0], -1).sum(1)
        total = torch.zeros_like(x)
        count = torch.zeros((1, 1) + tuple(spatial), dtype=x.dtype, device=x.device)
        slices = list(_windows(spatial, window, stride))
        per_chunk = max(1, chunk_rows(x, budget) // x.shape[0])
        for start in range(0, len(slices), per_chunk):
            group = slices[start:start + per_chunk]
            batch = x.detach().repeat((len(group),) + (1,) * (x.dim() - 1))
            for k, sl in enumerate(group):
                batch[(slice(k * x.shape[0], (k + 1) * x.shape[0]), slice(None)) + sl] = fill
            scores = (onehot.repeat((len(group),) + (1,) * (onehot.dim() - 1)) * model(batch))
            drops = clean.repeat(len(group)) - scores.reshape(batch.shape[0], -1).sum(1)
            for k, sl in enumerate(group):
                d = drops[k * x.shape[0]:(k + 1) * x.shape[0]].view((-1,) + (1,) * (x.dim() - 1))
                total[(slice(None), slice(None)) + sl] += d
                count[(slice(None), slice(None)) + sl] += 1
    return total / count.clamp(min=1)
