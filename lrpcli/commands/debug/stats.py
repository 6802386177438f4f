"""Mean and worst reductions over samples of the per-layer conservation numbers.

``summarize`` takes a ``Report``, whether a model run made it (``collect``) or it was read from a result file's
``conservation/`` group (``from_results``), so the stored table and the live table are the same computation.
No torch: a stored run is printed without the model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lrpcli.catalogue import COMPOSITES
from lrpcli.commands.debug.report import PARAM_RULES, Report, rule_class
from lrpcli.errors import DataError
from lrpcli.store import ATTRIBUTION_DATASET, FILENAME_DATASET, open_results

#: The conservation columns, in table order: (key in json/csv, table header).
COLUMNS: tuple[tuple[str, str], ...] = (
    ("layer", "layer"),
    ("type", "type"),
    ("rule", "rule"),
    ("out_mean", "out"),
    ("in_mean", "in"),
    ("ratio_mean", "in/out"),
    ("ratio_worst", "worst in/out"),
    ("negative_mean", "neg"),
    ("negative_worst", "worst neg"),
    ("max", "max"),
    ("min", "min"),
    ("nan", "nan"),
    ("inf", "inf"),
)
NUMERIC = tuple(key for key, _ in COLUMNS[3:])


@dataclass
class LayerStats:
    """One conservation row: per-sample numbers reduced to their mean and their worst sample."""

    index: int
    layer: str
    type: str
    rule: str
    out_mean: float
    in_mean: float
    ratio_mean: float
    ratio_worst: float
    worst_sample: int | None
    negative_mean: float | None
    negative_worst: float | None
    max: float | None
    min: float | None
    nan: int | None
    inf: int | None
    param: bool  # a layer with weights (its out - in went to biases and stabilizers)
    has_bias: bool | None

    def value(self, key: str) -> object:
        return getattr(self, key)


@dataclass
class Summary:
    """The whole table plus the per-sample arrays the diagnoses read."""

    report: Report
    layers: list[LayerStats]
    ratio: np.ndarray  # N x L, in/out per sample (NaN where both are 0)
    total_ratio: np.ndarray  # N, input relevance / output relevance
    output_mean: float
    input_mean: float
    total_ratio_mean: float
    total_ratio_worst: float
    total_worst_sample: int | None

    @property
    def n(self) -> int:
        return int(self.report.relevance_in.shape[0])


def ratios(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, with 0/0 = NaN (nothing in, nothing out) and x/0 = +-inf."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.asarray(numerator, dtype=np.float64) / np.asarray(denominator, dtype=np.float64)


def badness(ratio: np.ndarray) -> np.ndarray:
    """How far from conservation a ratio is: non-finite and sign flips first, then |log|ratio||; NaN -> -1."""
    r = np.asarray(ratio, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        score = np.abs(np.log(np.abs(r)))
    score = np.where(r < 0, score + 1e6, score)
    score = np.where(np.isinf(r), np.inf, score)
    return np.where(np.isnan(r), -1.0, score)


def mean(values: np.ndarray) -> float:
    """Mean over the samples that have a value (NaN when none does)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return float("nan")
    if np.isinf(v).any():
        return float(np.sum(v[np.isinf(v)]))  # +inf, -inf or nan if both
    return float(v.mean())


def worst(ratio: np.ndarray) -> tuple[float, int | None]:
    """The ratio farthest from 1 over the samples, and its sample index."""
    score = badness(ratio)
    if score.size == 0 or np.all(score < 0):
        return float("nan"), None
    i = int(np.argmax(score))
    return float(ratio[i]), i


def summarize(report: Report) -> Summary:
    """Mean and worst per layer, and the output/input header; the same for model runs and stored runs."""
    r_in, r_out = report.relevance_in, report.relevance_out
    ratio = ratios(r_in, r_out)
    details = report.details
    rows = []
    for j, name in enumerate(report.layers):
        rule = report.rules[j]
        ratio_worst, sample = worst(ratio[:, j])
        neg = details.get("negative_share")
        rows.append(LayerStats(
            index=j, layer=name, type=report.types[j] if report.types else "", rule=rule,
            out_mean=mean(r_out[:, j]), in_mean=mean(r_in[:, j]), ratio_mean=mean(ratio[:, j]),
            ratio_worst=ratio_worst, worst_sample=sample,
            negative_mean=None if neg is None else mean(neg[:, j]),
            negative_worst=None if neg is None else _nan_reduce(np.nanmax, neg[:, j]),
            max=None if "max" not in details else _nan_reduce(np.nanmax, details["max"][:, j]),
            min=None if "min" not in details else _nan_reduce(np.nanmin, details["min"][:, j]),
            nan=None if "nan" not in details else int(np.nansum(details["nan"][:, j])),
            inf=None if "inf" not in details else int(np.nansum(details["inf"][:, j])),
            param=rule_class(rule) in PARAM_RULES,
            has_bias=report.has_bias[j] if report.has_bias else None,
        ))
    total = ratios(report.input_relevance, report.output_relevance)
    total_worst, total_sample = worst(total)
    return Summary(report=report, layers=rows, ratio=ratio, total_ratio=total,
                   output_mean=mean(report.output_relevance), input_mean=mean(report.input_relevance),
                   total_ratio_mean=mean(total), total_ratio_worst=total_worst, total_worst_sample=total_sample)


def _nan_reduce(reduce: Callable[[np.ndarray], object], v: np.ndarray) -> float | None:
    """np.nanmax/np.nanmin without their all-NaN warning: None when no sample has a value."""
    v = np.asarray(v, dtype=np.float64)
    return None if np.all(np.isnan(v)) else float(reduce(v))


@dataclass
class BiasRow:
    """What one parameter layer absorbs (out - in, mean over samples), with and without its bias."""

    layer: str
    rule: str
    absorbed: float
    share: float  # absorbed / mean |out|
    absorbed_zero_bias: float
    share_zero_bias: float


def compare_bias(with_bias: Summary, zero_bias: Summary) -> list[BiasRow]:
    """Per parameter layer: relevance absorbed (relevance_out - relevance_in) in both runs."""
    other = {s.layer: (j, s) for j, s in enumerate(zero_bias.layers)}
    rows = []
    for j, s in enumerate(with_bias.layers):
        if not s.param or s.layer not in other:
            continue
        k, _ = other[s.layer]
        a = _absorbed(with_bias.report, j)
        b = _absorbed(zero_bias.report, k)
        rows.append(BiasRow(s.layer, s.rule, a[0], a[1], b[0], b[1]))
    return rows


def _absorbed(report: Report, j: int) -> tuple[float, float]:
    out, inp = report.relevance_out[:, j], report.relevance_in[:, j]
    absorbed = mean(out - inp)
    scale = mean(np.abs(out))
    return absorbed, float(ratios(absorbed, scale)) if scale else float("nan")


# ------------------------------------------------------------------------------------------ stored runs
def from_results(path: str | Path, samples: int | None = None) -> Report:
    """A Report from a result file's conservation group (first ``samples`` rows; all when None).

    The input relevance is the stored attribution summed per sample, read in blocks.
    """
    with open_results(path) as results:
        cons = results.conservation
        n = len(results) if samples is None else min(samples, len(results))
        if n == 0:
            raise DataError(f"{path}: holds no finished rows yet (rows_written is 0)")
        layers = list(cons["layer"])
        r_in = np.asarray(cons["relevance_in"][:n], dtype=np.float64).reshape(n, len(layers))
        r_out = np.asarray(cons["relevance_out"][:n], dtype=np.float64).reshape(n, len(layers))
        output = np.asarray(cons["output_relevance"][:n], dtype=np.float64)
        total = np.zeros(n)
        for start in range(0, n, 64):
            block = results.read(ATTRIBUTION_DATASET, slice(start, min(n, start + 64)))
            total[start:start + block.shape[0]] = block.reshape(block.shape[0], -1).sum(1, dtype=np.float64)
        names = list(results.read(FILENAME_DATASET, slice(0, n)))
        config = results.config or {}
    composite = config.get("composite") or {}
    attribution = config.get("attribution") or {}
    method = attribution.get("method", "lrp")
    notes = [] if method == "lrp" else [f"this run used attribution.method {method}: no per-layer conservation"]
    return Report(
        source=str(path), mode="stored", composite=str(composite.get("name", "?")),
        canonizers=list(config.get("canonizers") or []),
        inputs=f"{n} stored sample{'s' if n != 1 else ''} of {path}", samples=[str(s) for s in names],
        layers=layers, types=["" for _ in layers], rules=list(cons["rule"]), has_bias=[None for _ in layers],
        relevance_in=r_in, relevance_out=r_out, output_relevance=output, input_relevance=total, notes=notes,
        gradient_space=composite.get("name") in GRADIENT_SPACE,
    )


#: Built-in composites that propagate gradients (seed one-hot), where conservation is not expected.
GRADIENT_SPACE = tuple(name for name, decl in COMPOSITES.items() if decl.gradient_space)


def matches(layer: str, patterns: Sequence[str]) -> bool:
    """Whether any glob matches the row name or its module name ('layer1.0#2' is also 'layer1.0')."""
    from fnmatch import fnmatchcase

    return any(fnmatchcase(layer.split("#", 1)[0], p) or fnmatchcase(layer, p) for p in patterns)


def select(rows: Sequence[LayerStats], patterns: Sequence[str]) -> list[LayerStats]:
    """Rows whose layer name matches any glob (all rows without patterns)."""
    if not patterns:
        return list(rows)
    return [r for r in rows if matches(r.layer, patterns)]
