"""Per-layer relevance statistics, collected in the same backward pass that computes the attribution.

The ``Recorder`` is the one code path for the conservation numbers: ``explain`` stores its sums in
``conservation/``, ``debug`` prints them (with ``detail=True`` also sign shares, extremes and non-finite
counts), and ``attribute(layers=...)`` takes its per-layer maps.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence

import torch

from lrpcli.engine.hooks import LayerCall, same_elements
from lrpcli.engine.rules import AlphaBeta, Epsilon, Flat, Gamma, Norm, ZBox, ZPlus

DETAIL_KEYS = ("negative_share", "max", "min", "nonfinite", "input_negative", "dtype")


class Recorder:
    """Collects, per layer call (``name`` or ``name#2`` for a second call) and per sample, the relevance summed
    at the layer's output (``relevance_out``) and over its inputs (``relevance_in``).

    ``layers``: glob patterns of module names (any module, containers too) whose output relevance maps are kept
    in ``maps``.
    ``detail``: also per-sample negative share, max, min and non-finite count of the input relevance, and
    whether the layer saw negative inputs (for diagnoses).
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
        self.details: dict[str, dict[str, torch.Tensor | str]] = {}
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
        if self.detail:
            with torch.no_grad():
                x = call.inputs[0] if call.inputs else call.output
                negative = (x.detach() < 0).reshape(x.shape[0], -1).any(1) if x.dim() else (x < 0).reshape(1)
            self.details[call.key] = {"input_negative": negative, "dtype": str(x.dtype).replace("torch.", "")}

    def on_backward(self, call: LayerCall, relevance: torch.Tensor,
                    result: tuple[torch.Tensor | None, ...]) -> None:
        with torch.no_grad():
            out_sum = self.relevance_out[call.key] = self._sum(relevance)
            parts = [r for r in result if r is not None]
            # a pass-through (Pass on a ReLU, a reshape) hands down the same elements: its input sum is its output sum
            handed = [(r, r._version, out_sum if same_elements(r, relevance) else per_sample_sum(r)) for r in parts]
            self._handed_down = handed
            if handed:
                total = handed[0][2]
                for _, _, s in handed[1:]:
                    total = total + s
                self.relevance_in[call.key] = total
                if self.detail:
                    self.details.setdefault(call.key, {}).update(_detail([r.detach() for r in parts], relevance))

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

    def table(self) -> tuple[list[str], list[str], torch.Tensor, torch.Tensor]:
        """(layers, rules, relevance_in N×L, relevance_out N×L) in forward order; NaN where nothing arrived."""
        self._handed_down = []
        layers = list(self.order)
        # the batch: the leading size at the model's last layer (layers inside run over batch x windows, Swin)
        last = next((self.relevance_out[k] for k in reversed(layers) if k in self.relevance_out), None)
        ref = last if last is not None else next(iter(self.relevance_out.values()), None)
        n = ref.shape[0] if ref is not None else 0
        device = ref.device if ref is not None else "cpu"
        r_in = torch.full((n, len(layers)), float("nan"), dtype=torch.float64, device=device)
        r_out = torch.full_like(r_in, float("nan"))
        for j, key in enumerate(layers):
            if key in self.relevance_in:
                r_in[:, j] = fold_batch(self.relevance_in[key], n)
            if key in self.relevance_out:
                r_out[:, j] = fold_batch(self.relevance_out[key], n)
        return layers, [self.rules[k] for k in layers], r_in, r_out


def fold_batch(sums: torch.Tensor, n: int) -> torch.Tensor:
    """Per-sample sums of a layer whose dimension 0 is not the batch: batch x windows (Swin's window attention
    runs on ``B * windows`` rows, batch-major) folds to the batch; a size that is no multiple of it gives NaN
    (the layer's sums cannot be told apart by sample)."""
    m = sums.shape[0]
    if m == n:
        return sums
    if n and m % n == 0:
        return sums.reshape(n, m // n).sum(1)
    return torch.full((n,), float("nan"), dtype=sums.dtype, device=sums.device)


def per_sample_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over everything but the batch dimension in the tensor's own dtype (pairwise summation), returned as
    float64; converting float32 maps to float64 first would cost a pass and a copy of each map for a gain far below
    what the maps' own float32 rounding allows."""
    t = t.detach()
    if t.dim() == 0:
        return t.reshape(1).to(torch.float64)
    return t.reshape(t.shape[0], -1).sum(dim=1).to(torch.float64)


def _detail(parts: list[torch.Tensor], relevance_out: torch.Tensor) -> dict[str, torch.Tensor]:
    n = parts[0].shape[0] if parts[0].dim() else 1
    flat = torch.cat([p.reshape(n, -1).to(torch.float64) for p in parts], dim=1)
    finite = torch.isfinite(flat)
    clean = torch.where(finite, flat, torch.zeros_like(flat))
    absolute = clean.abs().sum(1)
    negative = (-clean.clamp(max=0)).sum(1)
    big = torch.finfo(torch.float64).max
    out_bad = (~torch.isfinite(relevance_out.detach().reshape(n, -1))).sum(1)
    return {
        "negative_share": torch.where(absolute > 0, negative / absolute.clamp(min=1e-300), torch.zeros_like(absolute)),
        "max": torch.where(finite, flat, torch.full_like(flat, -big)).max(1).values,
        "min": torch.where(finite, flat, torch.full_like(flat, big)).min(1).values,
        "nonfinite": (~finite).sum(1) + out_bad,
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
