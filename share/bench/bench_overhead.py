"""Attribution time against a plain gradient per torchvision family, small mobile networks included.

Small networks run many cheap modules, so the hooks' fixed cost per module call (not the rules' arithmetic)
decides their ratio. Each model is built with random weights (eval mode), and a deep copy (same weights)
runs inside one ``Explainer`` context for all repeats, as ``lrpcli explain`` does; the plain gradient runs
on the untouched model. Runs are paired and interleaved (gradient, attribution, gradient, ...): a row's ratio
is the median of the per-pair ratios, which drift on a shared machine moves far less than a ratio of medians.

Usage: python share/bench/bench_overhead.py [--models a,b] [--batches 1,8] [--pairs 7] [--threads 1]
       [--composites auto,epsilon_gamma_box] [--against lrpcli_base] [--profile MODEL]

``--composites 'epsilon*'`` times Epsilon on every weighted layer: the same hooks with the cheapest rule, which
shows how much of a ratio is the per-module cost rather than a rule's arithmetic.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
from collections.abc import Callable

import torch
from bench_models import EPSILON_REFERENCE, epsilon_reference

import lrpcli
from lrpcli.explainer.explainer import Explainer

FAMILIES = ["mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "mnasnet0_5", "shufflenet_v2_x0_5",
            "efficientnet_b0", "efficientnet_b1", "squeezenet1_0", "regnet_y_400mf", "resnet50", "vgg16"]
COMPOSITES = ["auto", "epsilon_gamma_box"]
#: the targets: AlphaBeta composites may take a little longer, Epsilon alone a little less
TARGET = {"epsilon_alpha2_beta1": 2.2, "epsilon_alpha2_beta1_flat": 2.2, EPSILON_REFERENCE: 1.3}


def build(name: str) -> torch.nn.Module:
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None).eval()


def gradient_step(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], object]:
    """The baseline: out = model(x); grad(out, x, onehot) for the predicted class."""

    def run() -> object:
        xi = x.detach().requires_grad_(True)
        out = model(xi)
        onehot = torch.zeros_like(out).scatter_(1, out.detach().argmax(1, keepdim=True), 1.0)
        return torch.autograd.grad(out, xi, onehot)[0]

    return run


def composite_in(package: str, name: str) -> object:
    """The composite ``name`` of ``package`` (an importable lrpcli copy); ``epsilon*``: Epsilon on every weighted
    layer and the shared rules elsewhere, the floor of the hooks' cost (this package only, as ``make bench``'s
    reference row)."""
    import importlib

    if name == EPSILON_REFERENCE:
        if package != "lrpcli":
            raise SystemExit(f"--composites {EPSILON_REFERENCE}: not with --against")
        return epsilon_reference()
    return importlib.import_module(f"{package}.engine.composites").get(name)


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(name: str, batch: int, composite: str, pairs: int, against: str | None = None
            ) -> tuple[float, list[float], list[float]]:
    """(median gradient s, [median attribution s per engine], [median of per-pair ratios per engine]).

    ``against``: the name of an importable copy of an older lrpcli package (e.g. ``lrpcli_base``), timed in the
    same rounds as this one: rounds of (gradient, each engine) in rotating order."""
    import importlib

    model = build(name)
    x = torch.randn(batch, 3, 224, 224)
    grad = gradient_step(model, x)
    packages = ["lrpcli"] + ([against] if against else [])
    with contextlib.ExitStack() as stack:
        runs = [grad]
        for package in packages:
            explainer_cls = importlib.import_module(f"{package}.explainer.explainer").Explainer
            explainer = stack.enter_context(explainer_cls(copy.deepcopy(model), composite_in(package, composite),
                                                          canonizers=["auto"]))
            runs.append(lambda e=explainer: e(x))
        for _ in range(2):  # the first call also runs the canonizers' probe
            for run in runs:
                run()
        times: list[list[float]] = [[] for _ in runs]
        for k in range(pairs):
            order = list(range(len(runs)))
            order = order[k % len(order):] + order[:k % len(order)]
            for i in order:
                times[i].append(timed(runs[i]))
    ratios = [statistics.median(a / g for a, g in zip(t, times[0])) for t in times[1:]]
    return statistics.median(times[0]), [statistics.median(t) for t in times[1:]], ratios


def profile(name: str, batch: int, composite: str) -> None:
    """cProfile of attribution calls: where the per-module Python time goes."""
    import cProfile
    import pstats

    model = build(name)
    x = torch.randn(batch, 3, 224, 224)
    with Explainer(model, composite_in("lrpcli", composite), canonizers=["auto"]) as explainer:
        explainer(x)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(3):
            explainer(x)
        prof.disable()
    pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(30)


def fixed_cost(name: str, batch: int, composite: str, package: str, repeats: int = 3) -> tuple[float, float, int]:
    """(Python ms per attribution, torch-op ms per attribution, hooked calls per attribution) under cProfile.

    Time inside torch's built-in functions and tensor methods is the arithmetic (and its dispatch); everything
    else is Python: the hooks, the rules' bookkeeping, autograd's calls into Python nodes. cProfile inflates the
    Python share alike for every package, so compare packages with each other, not with unprofiled runs."""
    import cProfile
    import importlib
    import pstats

    explainer_cls = importlib.import_module(f"{package}.explainer.explainer").Explainer
    model = build(name)
    x = torch.randn(batch, 3, 224, 224)
    with explainer_cls(model, composite_in(package, composite), canonizers=["auto"]) as explainer:
        explainer(x)
        explainer(x)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(repeats):
            explainer(x)
        prof.disable()
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (cc, nc, tt, ct, callers)
    ops = python = 0.0
    hooked = 0
    for (file, _, func), (_, ncalls, tottime, _, _) in stats.items():
        if file == "~" and ("torch" in func or "of 'torch._C" in func):
            ops += tottime
        else:
            python += tottime
        if func == "_forward_hook":
            hooked = ncalls // repeats
    return 1e3 * python / repeats, 1e3 * ops / repeats, hooked


def print_fixed(models: list[str], batches: list[int], composites: list[str], against: str | None) -> None:
    """One row per model: Python and op time per attribution (cProfile) and the Python time per hooked call."""
    packages = [against, "lrpcli"] if against else ["lrpcli"]
    print("| model | batch | composite | " + " | ".join(f"{p}: python ms, ops ms, us per hooked call"
                                                         for p in packages) + " |")
    print("|---|---|---|" + "---|" * len(packages))
    for name in models:
        for batch in batches:
            for composite in composites:
                cells = []
                for package in packages:
                    python, ops, hooked = fixed_cost(name, batch, composite, package)
                    cells.append(f"{python:.0f}, {ops:.0f}, {1e3 * python / max(hooked, 1):.0f} ({hooked} calls)")
                print(f"| {name} | {batch} | {composite} | " + " | ".join(cells) + " |", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(FAMILIES))
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--composites", default=",".join(COMPOSITES))
    parser.add_argument("--pairs", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--against", default=None, help="an importable copy of an older lrpcli package to time "
                        "in the same rounds (its ratio is the 'before' column)")
    parser.add_argument("--fixed", action="store_true", help="the Python time per attribution under cProfile "
                        "(this package, and --against's), instead of the timing table")
    parser.add_argument("--profile", default=None, help="profile this model (first batch, first composite)")
    args = parser.parse_args(argv)
    lrpcli.keep_freed_memory()  # as the lrpcli command runs
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    composites = args.composites.split(",")
    if args.profile:
        profile(args.profile, batches[0], composites[0])
        return
    if args.fixed:
        print_fixed(args.models.split(","), batches, composites, args.against)
        return
    against = args.against
    print(f"torch {torch.__version__}, lrpcli {lrpcli.__version__}, {args.threads} thread(s), "
          f"{args.pairs} rounds, median of per-round ratios" + (f"; 'before' is package {against}" if against else ""))
    before = " before | " if against else ""
    print(f"| {'model':<20} | batch | {'composite':<18} | gradient s | attribution s |{before} ratio | target |")
    print(f"|{'-' * 22}|-------|{'-' * 20}|------------|---------------|{'--------|' if against else ''}"
          f"-------|--------|")
    for name in args.models.split(","):
        for batch in batches:
            for composite in composites:
                g, a, r = measure(name, batch, composite, args.pairs, against)
                target = TARGET.get(composite, 2.0)
                ok = "ok" if r[0] <= target else "MISS"
                old = f" {r[1]:>6.2f} |" if against else ""
                print(f"| {name:<20} | {batch:>5} | {composite:<18} | {g:>10.4f} | {a[0]:>13.4f} |{old} {r[0]:>5.2f} | "
                      f"{ok:<6} |", flush=True)

if __name__ == "__main__":
    main()
