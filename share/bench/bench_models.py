"""Every built-in composite against the plain input gradient on torchvision models (random weights).

Each composite is timed the way ``lrpcli explain`` uses it: one context for all repeats, then per batch
``out = m(x); grad(out, x, initial_relevance(out, target, seed))``. The baseline is the plain gradient of the
same model and batch, ``out = model(x); grad(out, x, onehot * out)``, outside any context.

The composites run on a twin of the model (a deep copy with the same weights), so that the plain model stays
free of hooks while a context is open: each timed composite run is paired with a gradient run just before it,
and a composite's ratio is the median of its runs over the median of its own paired gradient runs. On a shared
machine with throughput that drifts by 10-20 % over minutes, a ratio of runs taken seconds apart moves far less
than one against a baseline timed at the start (we saw the same code read 1.8x and 2.4x that way).

Order of work, per model: gradient warm-up and memory run; then per composite: enter the context on the twin,
one warm-up run that is also the memory run (the first call of a context also runs the canonizers' probe, which
is why it is never timed), ``repeats`` pairs (gradient, composite), exit. The gradient row is the median of all
its runs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from benchlib import log, median, peak_memory, timed

import lrpcli
from lrpcli.engine.layerops import is_linear_layer

MODELS = {"vgg16": ["vgg"], "resnet50": ["resnet"]}
EPSILON_REFERENCE = "epsilon*"  # not a built-in: Epsilon on every weighted layer (the Epsilon-only reference)


@dataclass
class Case:
    """One row: a composite (or the gradient) on one model."""

    model: str
    name: str
    batch: int
    seconds: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # process CPU seconds of the same runs (CPU device only)
    peak: int = 0
    rules: tuple[str, ...] = ()  # the distinct rules of the weighted layers (from the session's coverage)
    baseline: Case | None = None  # the gradient runs paired with this case's runs

    def add(self, wall_cpu: tuple[float, float]) -> None:
        self.seconds.append(wall_cpu[0])
        self.cpu.append(wall_cpu[1])

    @property
    def ratio(self) -> float:
        """Wall time against the paired gradient runs (the target)."""
        return self.time / self.baseline.time if self.baseline else float("nan")

    @property
    def pair_ratios(self) -> list[float]:
        """Each run against the gradient run paired with it: their spread shows how far the machine moves the
        median ratio."""
        return [s / b for s, b in zip(self.seconds, self.baseline.seconds)] if self.baseline else []

    @property
    def cpu_ratio(self) -> float:
        return self.cpu_time / self.baseline.cpu_time if self.baseline else float("nan")

    @property
    def time(self) -> float:
        return median(self.seconds)

    @property
    def cpu_time(self) -> float:
        return median(self.cpu)

    @property
    def epsilon_only(self) -> bool:
        return bool(self.rules) and set(self.rules) <= {"epsilon"}


@dataclass
class ModelResult:
    model: str
    device: str
    batch: int
    gradient: Case
    cases: list[Case]


def epsilon_reference() -> lrpcli.composites.Composite:
    """Epsilon on every Linear/Conv layer plus the shared rules for the other layers."""
    from lrpcli.engine.composites import LayerMap, Mixture, basics
    from lrpcli.engine.composites import layers as L
    from lrpcli.engine.rules import Epsilon, Stabilizer

    return Mixture([LayerMap([(L.WEIGHTED, Epsilon(1e-6))]), basics(Stabilizer())], name=EPSILON_REFERENCE)


def build_model(name: str, device: torch.device) -> torch.nn.Module:
    """Random weights, seeded; parameters keep requires_grad=True, as ``load_model`` leaves them."""
    import torchvision

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)(weights=None)
    return model.eval().to(device)


def bench_model(name: str, device: torch.device, batch: int, repeats: int, composites: list[str],
                with_reference: bool = True) -> ModelResult:
    model = build_model(name, device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, 224, 224, generator=gen).to(device)
    target = (torch.arange(batch) * 37 % 1000).to(device)

    def gradient() -> torch.Tensor:
        xi = x.detach().requires_grad_(True)
        out = model(xi)
        (r,) = torch.autograd.grad(out, xi, lrpcli.initial_relevance(out, target, "output"))
        return r

    grad = Case(name, "gradient", batch)
    log(f"{name}: gradient, batch {batch}")
    timed(gradient, device)  # warm-up (first call: oneDNN/cuDNN kernel selection)
    grad.peak = peak_memory(gradient, device)
    log(f"{name}: gradient peak {grad.peak / 2**20:.0f} MiB")
    twin = copy.deepcopy(model)  # the composites' copy: the plain model never carries hooks

    todo = [(c, lrpcli.composites.get(c)) for c in composites]
    if with_reference:
        todo.append((EPSILON_REFERENCE, epsilon_reference()))
    cases = []
    for cname, comp in todo:
        case = Case(name, cname, batch, baseline=Case(name, "gradient", batch))
        session = comp.context(twin, canonizers=MODELS[name])
        with session as m:

            def run(m: torch.nn.Module = m, comp: lrpcli.composites.Composite = comp) -> torch.Tensor:
                xi = x.detach().requires_grad_(True)
                out = m(xi)
                (r,) = torch.autograd.grad(out, xi, lrpcli.initial_relevance(out, target, comp.seed))
                return r

            case.peak = peak_memory(run, device)  # also the warm-up
            for _ in range(repeats):
                paired = timed(gradient, device)
                case.baseline.add(paired)
                grad.add(paired)
                case.add(timed(run, device))
            case.rules = tuple(sorted({a.rule.name for a in session.coverage()
                                       if a.rule is not None and a.calls and is_linear_layer(a.module)}))
        cases.append(case)
        log(f"{name}: {cname} {case.time:.3f} s against {case.baseline.time:.3f} s ({case.ratio:.2f}x), "
            f"peak {case.peak / 2**20:.0f} MiB ({case.peak / grad.peak:.2f}x)")
    return ModelResult(name, device.type, batch, grad, cases)
