"""Per-layer relevance statistics, collected in the same backward pass that computes the attribution.

The ``Recorder`` is the one code path for the conservation numbers: ``explain`` stores its sums in
``conservation/``, ``debug`` prints them (with ``detail=True`` also sign shares, extremes and non-finite
counts), and ``attribute(layers=...)`` takes its per-layer maps.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lrpcli.engine.hooks import LayerCall, same_elements
from lrpcli.engine.rules import AlphaBeta, Epsilon, Flat, Gamma, Norm, ZBox, ZPlus

#: ``sample_details``' per-sample statistics (``dtype``, a string, is in ``details`` beside them)
DETAIL_KEYS = ("negative_share", "max", "min", "nan", "inf", "nonfinite_out", "nonfinite", "input_negative")


class Recorder:
    """Collects, per layer call (``name`` or ``name#2`` for a second call) and per sample, the relevance summed
    at the layer's output (``relevance_out``) and over its inputs (``relevance_in``).

    ``layers``: glob patterns of module names (any module, containers too) whose output relevance maps are kept
    in ``maps``.
    ``detail``: also per-sample negative share, max, min and NaN/Inf counts of the input relevance, and
    whether the layer saw negative inputs (for diagnoses): ``sample_details``.

    Dimension 0 of a layer's tensors holds its rows: the samples, or batch x windows where a block runs over
    windows (Swin's window attention: ``B * windows`` rows, batch-major, so row r is sample r // windows). Per-row
    numbers are kept and folded to the samples when the batch is known (``table``, ``sample_details``). An
    operand shared by all samples (a position bias or mask broadcast over the batch, a parameter) has no rows of
    its own: relevance handed to a constant is absorbed (not counted in ``relevance_in``, as a layer's bias),
    a parameter's share (a position embedding) counts an equal part per row, and neither enters the details.
    """

    def __init__(self, layers: Sequence[str] = (), keep_graph: bool = False, detail: bool = False) -> None:
        self.patterns = list(layers)
        self.keep_graph = keep_graph
        self.detail = detail
        #: while True, the root mean square of each layer's output is kept in ``scales`` (first forward wins):
        #: what tells an absolute stabilizer's loss from a bias's (``vanishing_layer``); one pass per layer,
        #: so the runner measures one batch
        self.measure_scales = False
        self.scales: dict[str, float] = {}
        self.start()

    def start(self) -> None:
        """Forget the last forward (called at the start of every forward of the model)."""
        self.order: list[str] = []
        self.rules: dict[str, str] = {}
        self.types: dict[str, str] = {}
        self.relevance_out: dict[str, torch.Tensor] = {}
        self.relevance_in: dict[str, torch.Tensor] = {}
        self.maps: dict[str, torch.Tensor] = {}
        self.map_order: list[str] = []
        self.details: dict[str, dict[str, Any]] = {}
        #: per call with several inputs: which inputs are shared by all samples (``shared_operands``)
        self._shared: dict[str, tuple[str, ...]] = {}
        # (tensor, its version, its per-sample sum) for the relevance the last backward call handed down: in a
        # chain of layers that tensor is the relevance arriving at the next layer's output, summed only once
        self._handed_down: list[tuple[torch.Tensor, int, torch.Tensor]] = []

    def wants_map(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.patterns)

    def on_forward(self, call: LayerCall) -> None:
        self.order.append(call.key)
        self.rules[call.key] = repr(call.rule)
        self.types[call.key] = type(call.module).__name__
        if self.measure_scales and call.key not in self.scales and isinstance(call.output, torch.Tensor):
            out = call.output.detach()
            if out.numel() and out.is_floating_point():
                self.scales[call.key] = float(torch.linalg.vector_norm(out)) / out.numel() ** 0.5
        if len(call.inputs) > 1:
            self._shared[call.key] = shared_operands(call.inputs, call.output)
        if self.detail:
            with torch.no_grad():
                x = call.inputs[0] if call.inputs else call.output
                negative = (x.detach() < 0).reshape(_rows(x), -1).any(1)
            self.details[call.key] = {"input_negative": negative, "dtype": str(x.dtype).replace("torch.", "")}

    def on_backward(self, call: LayerCall, relevance: torch.Tensor,
                    result: tuple[torch.Tensor | None, ...]) -> None:
        with torch.no_grad():
            out_sum = self.relevance_out[call.key] = self._sum(relevance)
            kinds = self._shared.get(call.key, ())
            parts = [r for i, r in enumerate(result) if r is not None and (kinds[i] if i < len(kinds) else "") == ""]
            shared = [r for i, r in enumerate(result) if r is not None and i < len(kinds) and kinds[i] == "shared"]
            # a pass-through (Pass on a ReLU, a reshape) hands down the same elements: its input sum is its output sum
            handed = [(r, r._version, out_sum if same_elements(r, relevance) else per_sample_sum(r)) for r in parts]
            self._handed_down = handed
            total = None
            for _, _, s in handed:
                total = s if total is None else add_rows(total, s)
            for r in shared:  # summed over the batch by the rule: an equal part per row of the layer
                spread = per_sample_sum(r).sum().expand(_rows(relevance)) / _rows(relevance)
                total = spread if total is None else add_rows(total, spread)
            if total is not None:
                self.relevance_in[call.key] = total
            if self.detail:
                entry = self.details.setdefault(call.key, {})
                entry["parts"] = [_row_stats(r.detach()) for r in parts]
                entry["nonfinite_out"] = (~torch.isfinite(relevance.detach().reshape(_rows(relevance), -1))).sum(1)

    def _sum(self, relevance: torch.Tensor) -> torch.Tensor:
        """``per_sample_sum(relevance)``, taken from the last backward call when it handed down this tensor."""
        handed, self._handed_down = self._handed_down, []
        for tensor, version, total in handed:
            if tensor is relevance and tensor._version == version:
                return total
        return per_sample_sum(relevance)

    def on_map(self, key: str, relevance: torch.Tensor) -> None:
        """The relevance at the output of a module matching ``layers`` (same shape as its output)."""
        self.maps[key] = relevance if self.keep_graph else relevance.detach()
        self.map_order.append(key)

    def ordered_maps(self) -> dict[str, torch.Tensor]:
        """The maps in forward order (the backward delivers them in reverse)."""
        return {key: self.maps[key] for key in reversed(self.map_order)}

    def batch(self) -> int:
        """The number of samples: the leading size at the model's last layer (layers inside may run over
        batch x windows, Swin); 0 before any backward."""
        last = next((self.relevance_out[k] for k in reversed(self.order) if k in self.relevance_out), None)
        ref = last if last is not None else next(iter(self.relevance_out.values()), None)
        return ref.shape[0] if ref is not None else 0

    def sample_details(self, key: str, n: int) -> dict[str, torch.Tensor]:
        """``DETAIL_KEYS`` -> per-sample float64 values (length ``n``) of one layer call's input relevance, its
        rows folded to the samples: sums and counts summed, maxima maxed, minima minned, the negative share
        recomputed from the folded sums; NaN where the rows cannot be told apart by sample. Empty without
        ``detail`` or when no relevance arrived."""
        entry = self.details.get(key, {})
        parts = entry.get("parts")
        if parts is None:
            return {}
        nan = torch.full((n,), float("nan"), dtype=torch.float64)
        folded = dict.fromkeys(_ROW_REDUCTIONS, nan)
        for k, stats in enumerate(parts):  # the inputs of one call (both terms of a Sum), each with its own rows
            for name, reduce in _ROW_REDUCTIONS.items():
                value = fold_batch(stats[name].to("cpu", torch.float64), n, reduce)
                folded[name] = value if k == 0 else _COMBINE[reduce](folded[name], value)
        negative, absolute = folded["negative"], folded["absolute"]
        share = torch.where(absolute > 0, negative / absolute.clamp(min=1e-300), torch.zeros_like(absolute))
        out_bad = fold_batch(entry["nonfinite_out"].to("cpu", torch.float64), n)
        seen = entry.get("input_negative")
        seen = nan if seen is None else fold_batch(seen.to("cpu", torch.float64), n, "amax")
        return {"negative_share": torch.where(absolute.isnan(), absolute, share), "max": folded["max"],
                "min": folded["min"], "nan": folded["nan"], "inf": folded["inf"], "nonfinite_out": out_bad,
                "nonfinite": folded["nan"] + folded["inf"] + out_bad,
                "input_negative": torch.where(seen.isnan(), seen, (seen > 0).to(torch.float64))}

    def table(self) -> tuple[list[str], list[str], torch.Tensor, torch.Tensor]:
        """(layers, rules, relevance_in N×L, relevance_out N×L) in forward order; NaN where nothing arrived."""
        self._handed_down = []
        layers = list(self.order)
        n = self.batch()
        ref = next(iter(self.relevance_out.values()), None)
        device = ref.device if ref is not None else "cpu"
        r_in = torch.full((n, len(layers)), float("nan"), dtype=torch.float64, device=device)
        r_out = torch.full_like(r_in, float("nan"))
        for j, key in enumerate(layers):
            if key in self.relevance_in:
                r_in[:, j] = fold_batch(self.relevance_in[key], n)
            if key in self.relevance_out:
                r_out[:, j] = fold_batch(self.relevance_out[key], n)
        return layers, [self.rules[k] for k in layers], r_in, r_out


#: how ``_row_stats``' per-row values fold to a sample, and how two inputs' folded values combine
_ROW_REDUCTIONS = {"negative": "sum", "absolute": "sum", "nan": "sum", "inf": "sum", "max": "amax", "min": "amin"}
_COMBINE = {"sum": torch.add, "amax": torch.maximum, "amin": torch.minimum}


def fold_batch(values: torch.Tensor, n: int, reduce: str = "sum") -> torch.Tensor:
    """Per-sample values of a layer whose dimension 0 is not the batch: batch x windows (Swin's window attention
    runs on ``B * windows`` rows, batch-major: row r is sample r // windows) folds to the batch with ``reduce``
    (``sum``, ``amax``, ``amin``); a size that is no multiple of it gives NaN (the rows cannot be told apart by
    sample). A NaN row makes its sample NaN."""
    m = values.shape[0]
    if m == n:
        return values
    if n and m % n == 0:
        rows = values.reshape(n, m // n)
        return rows.sum(1) if reduce == "sum" else getattr(rows, reduce)(1)
    return torch.full((n,), float("nan"), dtype=values.dtype if values.is_floating_point() else torch.float64,
                      device=values.device)


def add_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row sums of two inputs of one layer, where one may run over batch x windows and the other over the
    batch: the longer folds to the shorter (NaN where it cannot)."""
    if a.shape[0] < b.shape[0]:
        a, b = b, a
    return fold_batch(a, b.shape[0]) + b


def shared_operands(inputs: Sequence[torch.Tensor], output: torch.Tensor) -> tuple[str, ...]:
    """Per input of a call with several: '' for an activation with rows of its own, 'constant' for one that
    needs no gradient (a detached position bias, a mask: relevance handed to it stays there), 'shared' for a
    parameter or an operand broadcast over the output's leading dimension (fewer dimensions, or size 1 where the
    output has more): the rule sums its relevance over the batch, so it has no per-sample rows."""
    kinds = []
    for t in inputs:
        if not t.requires_grad:
            kinds.append("constant")
        elif isinstance(t, torch.nn.Parameter) or t.dim() < output.dim() or (
                t.dim() > 0 and t.shape[0] == 1 < output.shape[0]):
            kinds.append("shared")
        else:
            kinds.append("")
    return tuple(kinds)


def _rows(t: torch.Tensor) -> int:
    return t.shape[0] if t.dim() else 1


def per_sample_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over everything but the batch dimension in the tensor's own dtype (pairwise summation), returned as
    float64; converting float32 maps to float64 first would cost a pass and a copy of each map for a gain far below
    what the maps' own float32 rounding allows."""
    t = t.detach()
    if t.dim() == 0:
        return t.reshape(1).to(torch.float64)
    return t.reshape(t.shape[0], -1).sum(dim=1).to(torch.float64)


def _row_stats(t: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per row of one input's relevance: the sums of its negative part and of its magnitude, the largest and
    smallest finite value (-+float64 max where a row has none) and its NaN and Inf counts; folded to the samples
    by ``Recorder.sample_details``."""
    flat = t.reshape(_rows(t), -1).to(torch.float64)
    finite = torch.isfinite(flat)
    clean = torch.where(finite, flat, torch.zeros_like(flat))
    big = torch.finfo(torch.float64).max
    bad = (~finite).sum(1)
    nan = torch.isnan(flat).sum(1) if bool(bad.any()) else torch.zeros_like(bad)  # all finite: no second pass
    # a row without a finite value (or without elements) gets -+float64 max: "none" for sample_details' readers
    high = torch.where(finite, flat, torch.full_like(flat, -big))
    low = torch.where(finite, flat, torch.full_like(flat, big))
    none = torch.full((flat.shape[0],), big, dtype=torch.float64, device=flat.device)
    return {
        "negative": (-clean.clamp(max=0)).sum(1), "absolute": clean.abs().sum(1),
        "max": high.amax(1) if flat.shape[1] else -none, "min": low.amin(1) if flat.shape[1] else none,
        "nan": nan, "inf": bad - nan,
    }


#: A layer whose input relevance is below this share of its output relevance (summed over the batch) lost it.
VANISHING_KEPT = 0.5
#: Layers whose output relevance is below this share of the model's output relevance are not judged.
VANISHING_FLOOR = 1e-3


#: A layer is below its stabilizer when its output's root mean square is under this multiple of epsilon.
VANISHING_SCALE = 10.0


def vanishing_layer(layers: Sequence[str], rules: Mapping[str, object], relevance_in: torch.Tensor,
                    relevance_out: torch.Tensor, output_relevance: float, scales: Mapping[str, float]
                    ) -> tuple[str, object, float] | None:
    """(layer, rule, share lost) for the first layer in backward order whose absolute stabilizer swallowed most
    of its relevance, or None.

    A rule that divides by a stabilized denominator (``sign`` or ``clip`` mode: an absolute epsilon) keeps the
    sign of the relevance but shrinks it to ``z / (z + eps)``; where activations are far below epsilon almost
    nothing passes. So: a weighted-layer or pooling rule with such a stabilizer, carrying a non-negligible share
    of the output relevance, hands on less than half of it with the same sign, and its output (``scales``: root
    mean square per layer) is within ``VANISHING_SCALE`` x epsilon; a bias absorbs relevance the same way, but at
    ordinary activation sizes. ``rules`` maps a module name to its rule (call keys ``name#2`` share it).
    """
    family = (AlphaBeta, Epsilon, Flat, Gamma, Norm, ZBox, ZPlus)
    sums_in, sums_out = relevance_in.nansum(0), relevance_out.nansum(0)
    for j in range(len(layers) - 1, -1, -1):
        rule = rules.get(layers[j].split("#")[0])
        stabilizer = getattr(rule, "stabilizer", None)
        if not isinstance(rule, family) or stabilizer is None or stabilizer.mode == "rms":
            continue
        r_in, r_out = float(sums_in[j]), float(sums_out[j])
        if abs(r_out) <= VANISHING_FLOOR * abs(output_relevance) or r_out == 0:
            continue
        if scales.get(layers[j], float("inf")) >= VANISHING_SCALE * stabilizer.epsilon:
            continue
        if r_in * r_out >= 0 and abs(r_in) < VANISHING_KEPT * abs(r_out):
            return layers[j], rule, 1.0 - r_in / r_out
    return None
