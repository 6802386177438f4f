"""The torchvision zoo sweep: every model of ``torchvision.models.list_models(module=torchvision.models)`` through
``composite: auto`` and ``canonizers: auto``, one row per model.

    .venv/bin/python share/bench/bench_zoo.py [--models resnet18,vit_*] [--max-params 350] [--repeats 3]
                                              [--no-time] [--no-conservation]
                                              [--time-size 224] [--time-batch 8] [--threads 1]
    .venv/bin/python share/bench/bench_zoo.py --timm [--models resnet50,swin_*]   # timm's models (timm installed)

A ``timm:NAME`` model is given as a user gives one, ``model.entrypoint: timm:create_model`` with
``kwargs: {model_name: NAME, pretrained: false}``; ``--timm`` sweeps ``TIMM_MODELS``.

Each model is built with random weights (``weights: None``, the seed ``lrpcli explain`` uses) at the smallest
input size it accepts among ``SIZES`` (ViTs and MaxViT need their own image size), then:

- coverage: float32, batch 2, through the code ``lrpcli explain`` runs for a shipped auto config
  (``Explainer.from_config``): the modules left without a rule and the functional operations the canonizers left
  on the plain gradient (``coverage_left``), and whether the relevance is finite;
- time: the explainer against the plain input gradient in this process, at ``--time-batch`` (default 2) and
  ``--time-size`` (default: the coverage size; a model that does not run at that size is timed at the accepted
  size nearest to it, ViTs at 224, and the row says which size it got): ``--repeats`` interleaved pairs
  (gradient, attribution, in alternating order) after a warm-up, and the median of the per-pair ratios, which
  drift on a shared machine moves far less than a ratio of medians. At the smallest sizes the fixed cost per
  module call dominates; ``--time-size 224`` gives the ratio at the size the models are used at;
- conservation: float64, batch 1, biases zeroed in the model and the rules, epsilon and the rms stabilizer at
  ``EPSILON``, and the attention weights held constant (CP-LRP's ``constant_operand`` on every AttentionProduct, so
  no softmax rule runs): every rule on the path is then conservative, and (relevance at the input + relevance
  that reaches the model's own embedding parameters) / output relevance should be 1 within ``TOLERANCE``.

Models above ``--max-params`` million parameters are skipped with the reason printed (the float64 copy of a
600M-parameter model needs 5 GB). Imported by tests/test_zoo_sweep.py, which runs the same checks.
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from benchlib import log, median
from torch import nn

import lrpcli
from lrpcli.explainer.build import ENGINE_CHECKS, load_config
from lrpcli.explainer.explainer import Explainer
from lrpcli.explainer.models import load_model
from lrpcli.spec.config import validate

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "configs" / "efficientnet_b0_auto.yaml"  # a shipped auto config; the model name is replaced
SIZES = (32, 64, 96, 128, 160, 224, 299)
TOLERANCE = 1e-6
#: the stabilizer's share is epsilon times the sample's rms over an output entry: small everywhere but where an
#: entry is far below the sample's rms and carries the relevance (timm's deit3: the class token, N(0, 1e-6) at
#: init, no position embedding, LayerScale 1e-6, through 24 residual sums: 1.1e-5 at 1e-12, 1.1e-8 at 1e-15)
EPSILON = 1e-15
EXACT = {  # config overrides that make the auto rules exactly conservative (see the module docstring)
    "composite.zero_params": ["bias"],
    "composite.epsilon": EPSILON,
    "composite.stabilizer": {"epsilon": EPSILON, "mode": "rms"},
    "composite.rules": [{"type": "lrpcli.engine.functional_modules.AttentionProduct",
                         "rule": {"name": "constant_operand"}}],
}
#: timm models swept by ``--timm`` (random weights; the sweep picks the smallest input each accepts)
TIMM_MODELS = ("resnet50", "regnety_016", "efficientnet_b0", "mobilenetv3_large_100", "convnext_tiny",
               "vit_small_patch16_224", "deit_small_patch16_224", "swin_tiny_patch4_window7_224",
               "resnet18", "densenet121", "ghostnet_100", "repvgg_a0", "mixer_s16_224", "levit_128s",
               "deit3_small_patch16_224", "poolformer_s12", "edgenext_xx_small")
TIMM = "timm:"
#: listed models known to fail, with why (the slow test skips them; the sweep still shows their row)
TIMM_EXEMPT: dict[str, str] = {}  # none at present
#: issue 23's time target for the auto composite: attribution at most this many times a plain gradient
TIME_TARGET = 2.0
#: what a note says when the canonizers left something without a rule
UNSEEN = ("left on the plain gradient", "cannot trace", "not decomposed")


@dataclass
class ZooRow:
    """One model's sweep result."""

    model: str
    params_m: float
    size: int = 0
    left: list[str] = field(default_factory=list)
    finite: bool | None = None
    ratio: float | None = None  # attribution time / plain gradient time
    time_size: int = 0  # the input the timing ran at: time_batch x 3 x time_size x time_size
    time_batch: int = 0
    conservation: float | None = None  # (input + embeddings) / output relevance, float64
    embedding_share: float | None = None
    skipped: str = ""
    error: str = ""

    @property
    def status(self) -> str:
        if self.skipped:
            return "skipped"
        if self.error:
            return "error"
        bad = []
        if self.left:
            bad.append("coverage")
        if self.finite is False:
            bad.append("non-finite")
        if self.conservation is not None and not abs(self.conservation - 1) <= TOLERANCE:
            bad.append("conservation")
        return "ok" if not bad else "FAIL " + "+".join(bad)

    def cells(self) -> tuple[str, ...]:
        shown = self.left[:3] + ([f"... {len(self.left) - 3} more"] if len(self.left) > 4 else self.left[3:4])
        left = "-" if not self.left else f"{len(self.left)}: {'; '.join(shown)}"
        cons = "-" if self.conservation is None else f"{self.conservation - 1:+.1e}"
        if self.embedding_share:
            cons += f" (emb {self.embedding_share:.2f})"
        ratio = "-" if self.ratio is None else f"{self.ratio:.2f}x @{self.time_batch}x{self.time_size}"
        why = self.skipped or self.error
        return (self.model, f"{self.params_m:.0f}M", str(self.size or "-"), left,
                "-" if self.finite is None else ("yes" if self.finite else "NO"), cons, ratio,
                self.status + (f" ({why})" if why else ""))


HEADER = ("model", "params", "size", "coverage left", "finite", "conservation - 1", "time vs gradient @batch x size",
          "status")


def config_for(name: str, exact: bool = False):
    """The shipped auto config with this model (random weights); ``exact``: the conservative variant. A
    ``timm:NAME`` model comes through ``model.entrypoint`` as a user would give it."""
    overrides = dict(EXACT) if exact else {}
    if not name.startswith(TIMM):
        return load_config(TEMPLATE, {"model.name": name, "model.weights": None, **overrides})
    import yaml

    raw = yaml.safe_load(TEMPLATE.read_text())
    raw["model"] = {"entrypoint": "timm:create_model",
                    "kwargs": {"model_name": name[len(TIMM):], "pretrained": False}}
    return validate(raw, source=f"{TEMPLATE} ({name})", base_dir=TEMPLATE.parent, overrides=overrides,
                    checks=ENGINE_CHECKS)


def build(name: str) -> nn.Module:
    """As ``lrpcli explain`` builds it (``load_model``: eval mode, seeded), random weights. torchvision
    initialises some weights to zero (ViT's classification head): those are drawn at random, so that the output,
    and the relevance, are not zero."""
    model = load_model(config_for(name) if name.startswith(TIMM) else {"model": {"name": name, "weights": None}})
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if isinstance(module, nn.Linear) and not weight.any():
                weight.copy_(torch.randn(weight.shape, generator=gen) * weight.shape[1] ** -0.5)
    return model


def accepts(model: nn.Module, size: int) -> bool:
    """Whether the model runs on a square input of this size."""
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size, dtype=next(model.parameters()).dtype))
        return True
    except Exception:  # too small, or not the one size a ViT takes: a shape error somewhere inside the model
        return False


def smallest_size(model: nn.Module, sizes: tuple[int, ...] = SIZES) -> int:
    """The smallest square input among ``sizes`` the model runs on."""
    for size in sizes:
        if accepts(model, size):
            return size
    raise ValueError(f"runs on none of the sizes {sizes}")


def timing_size(model: nn.Module, wanted: int, sizes: tuple[int, ...] = SIZES) -> int:
    """``wanted`` if the model runs on it, else the size among ``sizes`` nearest to it that the model runs on
    (the larger of two equally near): inception_v3 at 32 gets its smallest accepted size, a ViT gets 224."""
    if accepts(model, wanted):
        return wanted
    for size in sorted(sizes, key=lambda s: (abs(s - wanted), -s)):
        if size != wanted and accepts(model, size):
            return size
    raise ValueError(f"runs on neither {wanted} nor any of the sizes {sizes}")


def coverage_left(session) -> list[str]:
    """What the auto config left on the plain gradient: modules without a rule, and the canonizers' notes about
    operations they could not route or models they could not trace."""
    left = [f"{a.name} ({a.type_name})" for a in session.unhandled()]
    for note in session.notes:
        if any(u in note for u in UNSEEN):
            left.append(note)
        elif "computes outside its modules:" in note and not note.endswith(": nothing"):
            left.append(note)
    return left


def hooked_session(explainer: Explainer):
    return lrpcli.hooks.sessions_of(explainer.model)[0]


def embedding_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Parameters a model keeps on its containers (class token, position embedding, layer scale, position-bias
    tables): the ones that can take relevance as a term of a sum (the weights of a leaf layer never do)."""
    found = []
    for prefix, module in model.named_modules():
        if next(module.children(), None) is None:
            continue
        for name, p in module.named_parameters(recurse=False):
            found.append((f"{prefix}.{name}" if prefix else name, p))
    return found


def zero_biases(model: nn.Module) -> None:
    """Biases out of the forward (BatchNorm shifts and means too), with non-trivial BatchNorm scales: relevance
    can then only be conserved, never absorbed by a bias."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.zero_()
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen) * 1.5 + 0.5)
                if module.weight is not None:
                    module.weight.copy_(torch.rand(module.weight.shape, generator=gen) + 0.5)
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()


def conservation(name: str, size: int) -> tuple[float, float, bool, list[str]]:
    """(input + embeddings) / output relevance in float64 with the exactly conservative variant of the auto
    rules; the embeddings' share of it; whether all is finite; what the coverage left."""
    model = build(name).double()
    zero_biases(model)
    x = torch.randn(1, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    params = embedding_parameters(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Explainer.from_config(config_for(name, exact=True), model) as explainer:
            xi = x.clone().requires_grad_(True)
            out = explainer.model(xi)
            seed = lrpcli.initial_relevance(out, out.argmax(1), "output")
            grads = torch.autograd.grad(out, [xi] + [p for _, p in params], seed, allow_unused=True)
            left = coverage_left(hooked_session(explainer))
    total = seed.sum().item()
    at_input = grads[0].sum().item()
    embedded = sum(g.sum().item() for g in grads[1:] if g is not None)
    finite = all(torch.isfinite(g).all().item() for g in grads if g is not None)
    return (at_input + embedded) / total, embedded / total, finite, left


def paired_ratio(gradient: Callable[[], object], attribution: Callable[[], object], repeats: int) -> float:
    """The median over ``repeats`` pairs of attribution time / gradient time, the pairs' order alternating
    (gradient first, then attribution first), after one warm-up call of each."""
    gradient()
    attribution()
    ratios = []
    for k in range(repeats):
        first, second = (gradient, attribution) if k % 2 == 0 else (attribution, gradient)
        t0 = time.perf_counter()
        first()
        t1 = time.perf_counter()
        second()
        t2 = time.perf_counter()
        grad, lrp = (t1 - t0, t2 - t1) if k % 2 == 0 else (t2 - t1, t1 - t0)
        ratios.append(lrp / grad)
    return median(ratios)


def coverage_and_time(name: str, size: int, repeats: int, batch: int = 2, time_size: int | None = None,
                      time_batch: int = 2) -> tuple[list[str], bool, float | None]:
    """Coverage and finiteness of the auto config in float32 at ``batch`` x ``size``, and (repeats > 0) its
    time against the gradient at ``time_batch`` x ``time_size`` (default ``size``), in the same explainer."""
    model = build(name)
    twin = copy.deepcopy(model)  # the explainer's copy: the plain gradient runs on a model without hooks
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    t = time_size or size
    xt = torch.randn(time_batch, 3, t, t, generator=torch.Generator().manual_seed(1))

    def gradient() -> torch.Tensor:
        xi = xt.clone().requires_grad_(True)
        out = model(xi)
        return torch.autograd.grad(out, xi, lrpcli.initial_relevance(out, out.argmax(1), "output"))[0]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Explainer.from_config(config_for(name), twin) as explainer:
            relevance = explainer(x).relevance  # also a warm-up (the canonizers' probe runs on the first call)
            left = coverage_left(hooked_session(explainer))
            finite = bool(torch.isfinite(relevance).all())
            del relevance
            if repeats <= 0:
                return left, finite, None
            ratio = paired_ratio(gradient, lambda: explainer(xt), repeats)
    return left, finite, ratio


def parameters_m(name: str) -> float:
    """Millions of parameters, counted on the meta device where the builder allows (no memory, no random init:
    vit_h_14 takes a minute); RegNet's builders compute their widths with tensors and are built for real."""
    if name.startswith(TIMM):
        return sum(p.numel() for p in build(name).parameters()) / 1e6
    import torchvision

    try:
        with torch.device("meta"):
            model = torchvision.models.get_model(name)
    except NotImplementedError:  # "Cannot copy out of meta tensor"
        model = torchvision.models.get_model(name)
    return sum(p.numel() for p in model.parameters()) / 1e6


def sweep_one(name: str, max_params_m: float, repeats: int, conserve: bool, time_size: int | None = None,
              time_batch: int = 2) -> ZooRow:
    """One model's row; ``time_size`` (default: the coverage size) and ``time_batch``: the timing's input."""
    row = ZooRow(name, parameters_m(name))
    if row.params_m > max_params_m:
        row.skipped = f"{row.params_m:.0f}M parameters > --max-params {max_params_m:g}M"
        return row
    try:
        model = build(name)
        row.size = smallest_size(model)
        if repeats > 0:
            row.time_size = row.size if time_size is None else timing_size(model, time_size)
            row.time_batch = time_batch
        del model
        row.left, row.finite, row.ratio = coverage_and_time(name, row.size, repeats, time_size=row.time_size or None,
                                                            time_batch=time_batch)
        if conserve:
            row.conservation, row.embedding_share, finite, _ = conservation(name, row.size)
            row.finite = row.finite and finite
    except Exception as err:  # one model's failure is a row, not the end of the sweep
        row.error = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200] if str(err).strip() else ''}"
    return row


def select(patterns: str | None, timm: bool = False) -> list[str]:
    """The models matching ``patterns`` (names or globs) among torchvision's and, as ``timm:NAME``, the
    ``TIMM_MODELS``; ``timm``: among the latter only, ``timm:`` implied. A ``timm:NAME`` without a glob names
    any timm model. No patterns: every torchvision model (``timm``: every listed timm model)."""
    import torchvision

    listed = [TIMM + n for n in TIMM_MODELS]
    vision = torchvision.models.list_models(module=torchvision.models)
    if patterns and timm:
        patterns = ",".join(p if p.strip().startswith(TIMM) else TIMM + p.strip() for p in patterns.split(","))
    if not patterns:
        return listed if timm else vision
    wanted = [p.strip() for p in patterns.split(",") if p.strip()]
    names = listed if timm else vision + listed
    names += [p for p in wanted if p.startswith(TIMM) and not any(c in p for c in "*?[") and p not in names]
    chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in wanted)]
    unknown = [p for p in wanted if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unknown:
        raise SystemExit(f"bench_zoo: no torchvision model matches {', '.join(unknown)}")
    return chosen


def markdown(rows: list[ZooRow]) -> str:
    table = [HEADER] + [r.cells() for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(HEADER))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(HEADER), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in table[1:]])


def summary(rows: list[ZooRow]) -> str:
    ran = [r for r in rows if not r.skipped]
    ok = [r for r in ran if r.status == "ok"]
    skipped = [r.model for r in rows if r.skipped]
    checked = (f"conservation within {TOLERANCE:g}" if any(r.conservation is not None for r in ran)
               else "conservation not run")
    text = f"{len(ok)} of {len(ran)} models ok (coverage empty, finite, {checked})"
    if skipped:
        text += f"; skipped for size: {', '.join(skipped)}"
    bad = [f"{r.model}: {r.status}" + (f" (exempt: {TIMM_EXEMPT[r.model[len(TIMM):]]})"
                                        if r.model.startswith(TIMM) and r.model[len(TIMM):] in TIMM_EXEMPT else "")
           for r in ran if r.status != "ok"]
    return text + ("; " + "; ".join(bad) if bad else "") + time_summary(ran)


def time_summary(rows: list[ZooRow]) -> str:
    """The range of the time ratios, and the models above ``TIME_TARGET`` (empty when nothing was timed)."""
    timed = sorted((r for r in rows if r.ratio is not None), key=lambda r: r.ratio)
    if not timed:
        return ""
    above = [f"{r.model} {r.ratio:.2f}x" for r in reversed(timed) if r.ratio > TIME_TARGET]
    return (f"; time vs gradient {timed[0].ratio:.2f}x ({timed[0].model}) to {timed[-1].ratio:.2f}x "
            f"({timed[-1].model}), above {TIME_TARGET:g}x: {', '.join(above) or 'none'}")


def run(names: list[str], max_params_m: float, repeats: int, conserve: bool, time_size: int | None = None,
        time_batch: int = 2) -> list[ZooRow]:
    rows = []
    for name in names:
        t0 = time.perf_counter()
        row = sweep_one(name, max_params_m, repeats, conserve, time_size, time_batch)
        rows.append(row)
        log(f"zoo {name}: {row.status} in {time.perf_counter() - t0:.0f} s | " + " | ".join(row.cells()[2:]))
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", help="comma-separated names or globs (default: the whole list); timm:NAME or "
                   "timm:* for timm's models")
    p.add_argument("--max-params", type=float, default=350.0,
                   help="skip models above this many million parameters (default 350: vit_h_14, regnet_y_128gf)")
    p.add_argument("--repeats", type=int, default=3, help="timed pairs per model (default 3)")
    p.add_argument("--time-size", type=positive, metavar="N",
                   help="image size of the timing (default: the model's smallest accepted size, the one coverage "
                   "runs at); a model that does not run at N is timed at the accepted size nearest to it")
    p.add_argument("--time-batch", type=positive, default=2, metavar="N", help="batch of the timing (default 2)")
    p.add_argument("--no-time", action="store_true", help="skip the timing")
    p.add_argument("--no-conservation", action="store_true", help="skip the float64 conservation check")
    p.add_argument("--timm", action="store_true",
                   help="sweep timm's models (TIMM_MODELS; --models picks among them) instead of torchvision's")
    p.add_argument("--threads", type=positive, help="torch intra-op threads")
    return p.parse_args(argv)


def positive(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = 0 if args.no_time else args.repeats
    rows = run(select(args.models, args.timm), args.max_params, repeats, not args.no_conservation, args.time_size,
               args.time_batch)
    print(markdown(rows) + "\n\n" + summary(rows))
    return 0 if all(r.status in ("ok", "skipped") for r in rows) else 1


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
