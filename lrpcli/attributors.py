"""Attributors beyond the single backward: input x gradient, SmoothGrad, Integrated Gradients, Occlusion.

Each returns ``(output, attribution)``, takes the same target forms as ``lrpcli.attribute`` and works with or
without a composite: with one, "gradient" means the signal the rules propagate (relevance for relevance
composites). Noisy copies, integration steps and occlusion windows run as batched forwards in chunks whose size
follows a memory budget, not one sample at a time.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .api import Target, initial_relevance, resolve_composite
from .composites import Composite

METHODS = ("gradient", "input_x_gradient", "smoothgrad", "integrated_gradients", "occlusion")
DEFAULT_BUDGET = 1 << 30  # bytes of activations per chunk, roughly


def _chunk_rows(x: torch.Tensor, budget: int) -> int:
    """Rows per forward: the budget over a rough activation footprint of one row (64x its input)."""
    per_row = max(1, x[0].numel() * x.element_size() * 64)
    return max(1, budget // per_row)


def _expand_target(target: Target, output: torch.Tensor, copies: int) -> Target:
    """The target for ``copies`` stacked copies of a batch (copy-major order)."""
    if isinstance(target, torch.Tensor) and target.dim() >= 1:
        return target.repeat((copies,) + (1,) * (target.dim() - 1))
    return target


class _Signal:
    """Backward signals for arbitrary batches, inside one composite context (entered once)."""

    def __init__(self, model: nn.Module, composite: Composite | None, canonizers: Sequence[Any] | None) -> None:
        self.model = model
        self.composite = composite
        self.canonizers = canonizers
        self._stack: Any = None

    def __enter__(self) -> _Signal:
        if self.composite is not None:
            self._stack = self.composite.context(self.model, canonizers=self.canonizers)
            self.run_model = self._stack.__enter__()
        else:
            self.run_model = self.model
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stack is not None:
            self._stack.__exit__(*exc)

    @property
    def seed(self) -> str:
        return "onehot" if self.composite is None else self.composite.seed

    def __call__(self, x: torch.Tensor, target: Target) -> tuple[torch.Tensor, torch.Tensor]:
        xi = x.detach().requires_grad_(True)
        with torch.enable_grad():
            out = self.run_model(xi)
            (grad,) = torch.autograd.grad(out, xi, initial_relevance(out, target, self.seed))
        return out.detach(), grad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(x)


def _fixed_target(signal: _Signal, x: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
    """The output on the clean input and a target that does not drift with noise or steps (None -> argmax)."""
    output = signal.forward(x)
    if target is None:
        target = output.reshape(output.shape[0], output.shape[1], -1).sum(-1).argmax(1)
    return output, target


def _over_copies(signal: _Signal, x: torch.Tensor, target: Target, copies: int,
                 make: Callable[[torch.Tensor], torch.Tensor], budget: int) -> torch.Tensor:
    """Sum of signals over ``copies`` transformed copies of x (``make(k)`` gives copy k), in chunks."""
    n = x.shape[0]
    rows = max(n, (_chunk_rows(x, budget) // n) * n)
    per_chunk = max(1, rows // n)
    total = torch.zeros_like(x)
    for start in range(0, copies, per_chunk):
        ks = range(start, min(copies, start + per_chunk))
        batch = torch.cat([make(k) for k in ks])
        _, grad = signal(batch, _expand_target(target, x, len(ks)))
        total += grad.view(len(ks), *x.shape).sum(0)
    return total


def gradient(model: nn.Module, x: torch.Tensor, target: Target = None, composite: Any = None,
             canonizers: Sequence[Any] | None = None, **params: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The (modified) gradient: plain without a composite, LRP relevance with one."""
    comp = resolve_composite(composite, **params)
    with _Signal(model, comp, canonizers) as signal:
        return signal(x, target)


def input_x_gradient(model: nn.Module, x: torch.Tensor, target: Target = None, composite: Any = None,
                     canonizers: Sequence[Any] | None = None, **params: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """x times the (modified) gradient."""
    output, grad = gradient(model, x, target, composite, canonizers, **params)
    return output, x.detach() * grad


def smoothgrad(model: nn.Module, x: torch.Tensor, target: Target = None, composite: Any = None,
               canonizers: Sequence[Any] | None = None, *, noise_level: float = 0.1, n_iter: int = 20,
               seed: int | None = 0, memory_budget: int = DEFAULT_BUDGET,
               **params: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean signal over ``n_iter`` noisy copies; noise std = noise_level x each sample's value range."""
    if n_iter < 1 or noise_level < 0:
        raise ValueError(f"smoothgrad: n_iter must be >= 1 and noise_level >= 0, got {n_iter}, {noise_level}")
    comp = resolve_composite(composite, **params)
    flat = x.detach().reshape(x.shape[0], -1)
    scale = (flat.max(1).values - flat.min(1).values).view((-1,) + (1,) * (x.dim() - 1)) * noise_level
    generator = torch.Generator(device=x.device)
    if seed is not None:
        generator.manual_seed(seed)
    noise = [torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) for _ in range(n_iter)]
    with _Signal(model, comp, canonizers) as signal:
        output, target = _fixed_target(signal, x, target)
        total = _over_copies(signal, x, target, n_iter, lambda k: x.detach() + scale * noise[k], memory_budget)
    return output, total / n_iter


def integrated_gradients(model: nn.Module, x: torch.Tensor, target: Target = None, composite: Any = None,
                         canonizers: Sequence[Any] | None = None, *, baseline: torch.Tensor | float | None = None,
                         n_iter: int = 20, memory_budget: int = DEFAULT_BUDGET,
                         **params: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(x - baseline) times the mean signal at the midpoints of ``n_iter`` steps from the baseline to x."""
    if n_iter < 1:
        raise ValueError(f"integrated_gradients: n_iter must be >= 1, got {n_iter}")
    comp = resolve_composite(composite, **params)
    base = torch.zeros_like(x) if baseline is None else torch.as_tensor(baseline, dtype=x.dtype,
                                                                        device=x.device).expand_as(x)
    delta = x.detach() - base
    with _Signal(model, comp, canonizers) as signal:
        output, target = _fixed_target(signal, x, target)
        total = _over_copies(signal, x, target, n_iter, lambda k: base + (k + 0.5) / n_iter * delta, memory_budget)
    return output, delta * total / n_iter


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


def occlusion(model: nn.Module, x: torch.Tensor, target: Target = None, composite: Any = None,
              canonizers: Sequence[Any] | None = None, *, window: int | Sequence[int] = 8,
              stride: int | Sequence[int] | None = None, fill: float = 0.0,
              memory_budget: int = DEFAULT_BUDGET) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop in the target score when a window of the input (all channels) is set to ``fill``, averaged over
    the windows covering each position. Needs no backward; a composite is accepted but has no effect."""
    del composite, canonizers
    spatial = x.shape[2:]
    window = [window] * len(spatial) if isinstance(window, int) else list(window)
    stride = window if stride is None else ([stride] * len(spatial) if isinstance(stride, int) else list(stride))
    if len(window) != len(spatial) or len(stride) != len(spatial) or min(window + stride) < 1:
        raise ValueError(f"occlusion: window and stride need {len(spatial)} positive sizes, got {window}, {stride}")
    with torch.no_grad():
        output = model(x)
        if target is None:
            target = output.reshape(output.shape[0], output.shape[1], -1).sum(-1).argmax(1)
        seed = initial_relevance(output, target, "onehot")
        clean = (seed * output).reshape(x.shape[0], -1).sum(1)
        total = torch.zeros_like(x)
        count = torch.zeros((1, 1) + tuple(spatial), dtype=x.dtype, device=x.device)
        slices = list(_windows(spatial, window, stride))
        per_chunk = max(1, _chunk_rows(x, memory_budget) // x.shape[0])
        for start in range(0, len(slices), per_chunk):
            group = slices[start:start + per_chunk]
            batch = x.detach().repeat((len(group),) + (1,) * (x.dim() - 1))
            for k, sl in enumerate(group):
                batch[(slice(k * x.shape[0], (k + 1) * x.shape[0]), slice(None)) + sl] = fill
            scores = (seed.repeat((len(group),) + (1,) * (seed.dim() - 1)) * model(batch))
            drops = clean.repeat(len(group)) - scores.reshape(batch.shape[0], -1).sum(1)
            for k, sl in enumerate(group):
                d = drops[k * x.shape[0]:(k + 1) * x.shape[0]].view((-1,) + (1,) * (x.dim() - 1))
                total[(slice(None), slice(None)) + sl] += d
                count[(slice(None), slice(None)) + sl] += 1
    return output, total / count.clamp(min=1)


ATTRIBUTORS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {
    "gradient": gradient,
    "input_x_gradient": input_x_gradient,
    "smoothgrad": smoothgrad,
    "integrated_gradients": integrated_gradients,
    "occlusion": occlusion,
}
