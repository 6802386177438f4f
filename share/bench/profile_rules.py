"""Where a composite's time goes, against the plain gradient: torch.profiler on one batch of each.

    .venv/bin/python share/bench/profile_rules.py [--model vgg16] [--composite epsilon_gamma_box] [--batch 8]

Every rule's ``relevance`` is wrapped (in this process only, the engine is not changed) in a
``record_function("rule:<name>")`` range, so the report splits the composite's run into forward, each rule's
backward and the rest of autograd, and lists the ATen ops inside each rule by self time, next to the ops of
the plain gradient. Self times of the ops are summed over all calls (``count`` = calls).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import sys
from collections.abc import Iterator

import torch
from bench_models import MODELS, build_model
from benchlib import stderr_silenced, timed
from torch.profiler import ProfilerActivity, profile, record_function

import lrpcli
from lrpcli.engine.rules.base import Rule


@contextlib.contextmanager
def labelled_rules() -> Iterator[None]:
    """Wrap ``relevance`` of every Rule subclass in a profiler range named after the rule (undone on exit)."""
    saved = {}

    def subclasses(cls: type) -> Iterator[type]:
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    for cls in set(subclasses(Rule)):
        if "relevance" in vars(cls):
            original = vars(cls)["relevance"]

            def wrapped(self, call, relevance, _original=original):
                with record_function(f"rule:{self.name}"):
                    return _original(self, call, relevance)

            saved[cls] = original
            cls.relevance = wrapped
    try:
        yield
    finally:
        for cls, original in saved.items():
            cls.relevance = original


def _profile(fn) -> profile:
    with stderr_silenced(), profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return prof


def _ancestor(event, prefix: str):
    e = event.cpu_parent
    while e is not None:
        if e.name.startswith(prefix):
            return e
        e = e.cpu_parent
    return None


def op_table(events, title: str, total: float, top: int) -> None:
    by_op: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for e in events:
        if e.name.startswith(("rule:", "phase:")):
            continue
        by_op[e.name][0] += e.self_cpu_time_total
        by_op[e.name][1] += 1
    rows = sorted(by_op.items(), key=lambda kv: -kv[1][0])
    print(f"\n{title} (self time, ms; share of the run)")
    for name, (us, n) in rows[:top]:
        print(f"  {name:<44} {us / 1e3:10.1f}  {us / total:6.1%}  x{n}")


def memory_report(label: str, fn) -> None:
    """Live tensor bytes (PyTorch's CPU allocator, as in benchlib.peak_memory) at the end of the forward and at
    the peak, and the rule range that was running at the peak."""
    with stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    mem = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                 if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    ranges = [(e.name(), e.start_ns(), e.end_ns()) for e in prof.profiler.kineto_results.events()
              if e.name().startswith(("phase:", "rule:"))]
    forward_end = max((end for name, _, end in ranges if name == "phase:forward"), default=0)
    current = peak = at_forward_end = 0
    peak_time = 0
    for t, nbytes in mem:
        current += nbytes
        if t <= forward_end:
            at_forward_end = current
        if current > peak:
            peak, peak_time = current, t
    inside = [name for name, start, end in ranges if name.startswith("rule:") and start <= peak_time <= end]
    print(f"\n{label}: memory: {at_forward_end / 2**20:,.0f} MiB live at the end of the forward, peak "
          f"{peak / 2**20:,.0f} MiB during {', '.join(inside) or 'no rule'}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vgg16", choices=sorted(MODELS))
    p.add_argument("--composite", default="epsilon_gamma_box")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--memory", action="store_true", help="also where the peak memory is (profile_memory=True; "
                   "includes the gradient with in-place ReLUs switched off, as inside a context)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's); 1 gives op times that "
                   "other processes on a small machine disturb least")
    args = p.parse_args(argv)
    lrpcli.keep_freed_memory()  # the process as the lrpcli command and make bench run it
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    model = build_model(args.model, device)
    x = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    target = torch.arange(args.batch) * 37 % 1000

    def gradient() -> None:
        xi = x.detach().requires_grad_(True)
        with record_function("phase:forward"):
            out = model(xi)
        with record_function("phase:backward"):
            torch.autograd.grad(out, xi, lrpcli.initial_relevance(out, target, "output"))

    timed(gradient, device)
    t_grad = timed(gradient, device)[0]
    prof_g = _profile(gradient)  # outside the context: the model carries no hooks
    if args.memory:
        memory_report("gradient", gradient)
        inplace = [mod for mod in model.modules() if getattr(mod, "inplace", False) is True]
        for mod in inplace:
            mod.inplace = False
        memory_report("gradient, in-place ReLUs off", gradient)
        for mod in inplace:
            mod.inplace = True
    comp = lrpcli.composites.get(args.composite)
    with comp.context(model, canonizers=MODELS[args.model]) as m, labelled_rules():

        def explain() -> None:
            xi = x.detach().requires_grad_(True)
            with record_function("phase:forward"):
                out = m(xi)
            with record_function("phase:backward"):
                torch.autograd.grad(out, xi, lrpcli.initial_relevance(out, target, comp.seed))

        timed(explain, device)
        t_comp = timed(explain, device)[0]
        prof_c = _profile(explain)
        if args.memory:
            memory_report(args.composite, explain)

    print(f"{args.model} batch {args.batch}, {args.composite}; unprofiled: gradient {t_grad:.3f} s, "
          f"composite {t_comp:.3f} s ({t_comp / t_grad:.2f}x); torch threads {torch.get_num_threads()}")
    for label, prof in (("gradient", prof_g), (args.composite, prof_c)):
        events = prof.events()
        phases = {e.name: e.cpu_time_total for e in events if e.name.startswith("phase:")}
        total = sum(phases.values())
        print(f"\n== {label}: profiled {total / 1e6:.3f} s = " +
              ", ".join(f"{k[6:]} {v / 1e6:.3f} s" for k, v in phases.items()))
        rules = collections.defaultdict(lambda: [0.0, 0])
        for e in events:
            if e.name.startswith("rule:"):
                rules[e.name][0] += e.cpu_time_total
                rules[e.name][1] += 1
        for name, (us, n) in sorted(rules.items(), key=lambda kv: -kv[1][0]):
            print(f"  {name:<44} {us / 1e3:10.1f} ms {us / total:6.1%}  x{n}")
        fwd = [e for e in events if _ancestor(e, "phase:forward")]
        op_table(fwd, f"{label}: forward ops", total, args.top)
        if rules:
            for name in sorted(rules, key=lambda k: -rules[k][0]):
                inside = [e for e in events if (a := _ancestor(e, "rule:")) is not None and a.name == name]
                op_table(inside, f"{label}: ops inside {name}", total, args.top)
            outside = [e for e in events if _ancestor(e, "phase:backward") and not _ancestor(e, "rule:")]
            op_table(outside, f"{label}: backward ops outside the rules", total, args.top)
        else:
            bwd = [e for e in events if _ancestor(e, "phase:backward")]
            op_table(bwd, f"{label}: backward ops", total, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
