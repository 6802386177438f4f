"""Diagnosis rules: pure functions of a ``Summary`` (and its per-sample arrays), each line naming a layer.

Every rule returns ``Diagnosis`` records with the usual remedy, so users see what to change in the config
instead of a number to interpret. Thresholds are module constants; the README documents them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from lrpcli.commands.debug.report import rule_class
from lrpcli.commands.debug.stats import BiasRow, LayerStats, Summary, ratios

#: |sum| grows more than this factor across one layer (or input total over output): explosion.
EXPLOSION = 10.0
#: |sum| shrinks below this fraction across one layer (or input total below it): vanishing.
VANISHING = 0.1
#: a parameter layer absorbing (or adding) more than this share of its relevance: bias.
BIAS_SHARE = 0.1
#: a single relevance value this many times the layer's |sum|: positive and negative parts cancel.
CANCELLATION = 20.0
#: layers carrying less than this fraction of the output relevance are too small to judge.
SCALE = 1e-3
#: at most this many lines per kind; the rest are counted in one line.
MAX_LINES = 5
#: rules whose denominators take the stabilizer (composite.stabilizer) rather than an own epsilon.
_SIGN_RULES = ("Gamma", "ZPlus", "AlphaBeta")


@dataclass
class Diagnosis:
    """One finding: its kind, the layer it names (None for run-wide ones), what is wrong, what to change."""

    kind: str
    layer: str | None
    message: str
    remedy: str

    def line(self) -> str:
        where = f"{self.layer}: " if self.layer else ""
        remedy = f" Try: {self.remedy}." if self.remedy else ""
        return f"[{self.kind}] {where}{self.message}.{remedy}"

    def to_dict(self) -> dict[str, str | None]:
        return {"kind": self.kind, "layer": self.layer, "message": self.message, "remedy": self.remedy}


def diagnose(summary: Summary, bias_rows: list[BiasRow] | None = None) -> list[Diagnosis]:
    """All diagnosis lines for one run, most serious kinds first."""
    out: list[Diagnosis] = []
    rules: list[Callable[[Summary], list[Diagnosis]]] = [nonfinite, unhandled, batchnorm]
    if not summary.report.gradient_space:
        rules += [explosion, sign_flip, vanishing, cancellation]
    rules += [negative_inputs, low_precision]
    for rule in rules:
        out += _limit(rule(summary))
    if not summary.report.gradient_space:
        out += _limit(bias(summary, bias_rows))
    return out


def _limit(found: list[Diagnosis]) -> list[Diagnosis]:
    if len(found) <= MAX_LINES:
        return found
    rest = found[MAX_LINES:]
    names = ", ".join(d.layer or "?" for d in rest[:6]) + (", ..." if len(rest) > 6 else "")
    return found[:MAX_LINES] + [Diagnosis(rest[0].kind, None, f"and {len(rest)} more layers ({names})", "")]


# ------------------------------------------------------------------------------------------------ helpers
def _scale(summary: Summary) -> np.ndarray:
    """Per sample: the size below which a layer's sum is too small to judge (SCALE x |output relevance|)."""
    out = np.abs(summary.report.output_relevance)
    return np.where(np.isfinite(out), out, 0.0) * SCALE


def _samples(mask: np.ndarray, summary: Summary) -> str:
    k = int(mask.sum())
    return f"{k} of {summary.n} samples" if summary.n > 1 else "the sample"


def _num(x: float) -> str:
    return f"{x:.4g}"


def _flow(out: float, inp: float, sample: int) -> str:
    return f"sample {sample}: {_num(out)} at its output -> {_num(inp)} at its input"


def _this(s: LayerStats) -> str:
    """'this Gamma layer', 'this Sum layer', 'this layer'."""
    kind = rule_class(s.rule) or s.type
    return f"this {kind} layer" if kind else "this layer"


def _override(layer: str, rule: str) -> str:
    return f"composite.rules: [{{match: '{layer}', rule: {rule}}}]"


def stabilize(s: LayerStats | None) -> str:
    """The usual remedy for unstable denominators, for the rule this layer has."""
    rms = "scale-aware stabilizing (composite.stabilizer: {epsilon: 0.1, mode: rms})"
    if s is None:
        return f"{rms}, a larger composite.epsilon, or another composite"
    kind = rule_class(s.rule)
    if kind == "Epsilon":
        return (f"a larger epsilon here ({_override(s.layer, '{name: epsilon, epsilon: 0.25}')}, or composite.epsilon),"
                " or mode: rms in composite.stabilizer")
    if kind in _SIGN_RULES:
        return f"{rms}, a larger gamma, or Epsilon here ({_override(s.layer, '{name: epsilon, epsilon: 0.25}')})"
    if kind == "Norm":
        return f"{rms}: a sum's denominator is the sum of its inputs, which can cancel"
    return f"{rms}, or another rule here ({_override(s.layer, 'epsilon')})"


def _largest(summary: Summary, sample: int, grow: bool) -> LayerStats | None:
    """The layer with the largest growth (or shrink) of |sum| in one sample."""
    r = np.abs(summary.ratio[sample])
    r = np.where(np.isnan(r), 1.0, r)
    if r.size == 0:
        return None
    j = int(np.argmax(r) if grow else np.argmin(r))
    if (grow and r[j] <= 1.0) or (not grow and r[j] >= 1.0):
        return None
    return summary.layers[j]


def _pick(hit: np.ndarray, rank: np.ndarray | None = None) -> int:
    """The sample a line quotes: the hit with the largest ``rank``, else the first hit."""
    return int(np.argmax(hit if rank is None else np.where(hit, rank, -1.0)))


def _each_layer(summary: Summary, kind: str, hit: np.ndarray, say: Callable[[LayerStats, int, str], tuple[str, str]],
                rank: np.ndarray | None = None) -> list[Diagnosis]:
    """One line per layer where ``hit`` (N x L) holds in any sample: the one scan the per-layer rules share.

    ``say(layer, sample, "k of N samples")`` gives (message, remedy) for the sample ``_pick`` chose.
    """
    found = []
    for s in summary.layers:
        column = hit[:, s.index]
        if column.any():
            i = _pick(column, None if rank is None else rank[:, s.index])
            found.append(Diagnosis(kind, s.layer, *say(s, i, _samples(column, summary))))
    return found


def _culprit(s: LayerStats | None, what: str) -> tuple[str | None, str]:
    """A run-wide line's layer (None without one) and its '; WHAT LAYER' clause."""
    name = s.layer if s else None
    return name, f"; {what} {name}" if name else ""


# ------------------------------------------------------------------------------------------------ rules
def nonfinite(summary: Summary) -> list[Diagnosis]:
    """NaN/Inf: the layers where they first appear (their incoming relevance was finite)."""
    rep = summary.report
    found = []
    bad_out = ~np.isfinite(rep.output_relevance)
    if bad_out.any():
        found.append(Diagnosis("nan/inf", None, f"the output relevance is NaN or Inf in {_samples(bad_out, summary)}",
                               "check the model output itself (it is NaN/Inf before any rule runs)"))
    nan, inf, out_bad = (rep.details.get(k) for k in ("nan", "inf", "nonfinite_out"))
    if nan is None or inf is None or out_bad is None:  # a stored run: only the sums tell
        bad_sum = ~np.isfinite(rep.relevance_in) & np.isfinite(rep.relevance_out)
        return found + _each_layer(summary, "nan/inf", bad_sum, lambda s, i, where: (
            f"the relevance sum turns NaN/Inf at {_this(s)} in {where}", stabilize(s)))

    def appear(s: LayerStats, i: int, where: str) -> tuple[str, str]:
        j = s.index
        return (f"{int(np.nansum(nan[:, j]))} NaN and {int(np.nansum(inf[:, j]))} Inf values appear at {_this(s)} "
                f"in {where} (the relevance arriving was finite)", stabilize(s))

    made = (np.nan_to_num(nan) + np.nan_to_num(inf) > 0) & (np.nan_to_num(out_bad) == 0)
    origins = _each_layer(summary, "nan/inf", made, appear)
    found += origins
    arriving = [s for s in summary.layers if np.nan_to_num(out_bad[:, s.index]).any()]
    if arriving and not origins and not bad_out.any():  # made above a recorded layer: a module without a rule
        s = arriving[-1]
        found.append(Diagnosis(
            "nan/inf", s.layer, f"NaN/Inf arrive at the output of {_this(s)}: they come from above it, from a "
            "module without a rule (see the unhandled modules) or a function in forward()",
            "a rule for that module, or make the operation a module that gets one"))
    return found


def unhandled(summary: Summary) -> list[Diagnosis]:
    """Computing modules that got no rule: the plain gradient flows through them."""
    return [Diagnosis("no rule", a.name, f"{a.type} computes something but got no rule; the plain gradient flows "
                      "through it and conservation is not guaranteed",
                      f"a rule for it (composite.rules: [{{type: {a.type}, rule: pass}}] for element-wise "
                      "activations, norm for pools and sums, gradient for reshuffles, epsilon for linear maps)")
            for a in summary.report.unhandled]


def batchnorm(summary: Summary) -> list[Diagnosis]:
    """BatchNorms that ran unmerged: Pass ignores their scale and shift."""
    rep = summary.report
    merged = {n.split(":", 1)[0] for n in rep.notes if ": merged into " in n}
    found = []
    for a in rep.assignments or []:
        if "BatchNorm" in a.type and a.calls > 0 and a.name not in merged and a.status == "pass":
            found.append(Diagnosis("batchnorm", a.name, f"{a.type} was not merged into the layer before it; it gets "
                                   "Pass, so the rules ignore its scale and shift",
                                   "canonizers: [merge_batchnorm] (or vgg/resnet); the notes above say why a "
                                   "BatchNorm could not be merged"))
    return found


def explosion(summary: Summary) -> list[Diagnosis]:
    """|sum| grows more than EXPLOSION x across one layer; the input total over EXPLOSION x the output."""
    rep = summary.report
    r_in = np.abs(rep.relevance_in)
    grew = (r_in > EXPLOSION * np.abs(rep.relevance_out)) & (r_in > _scale(summary)[:, None])

    def say(s: LayerStats, i: int, where: str) -> tuple[str, str]:
        j = s.index
        return (f"|relevance| grows {_num(abs(summary.ratio[i, j]))}x across {_this(s)} in {where} "
                f"(worst {_flow(rep.relevance_out[i, j], rep.relevance_in[i, j], i)})", stabilize(s))

    found = _each_layer(summary, "explosion", grew, say, rank=np.abs(summary.ratio))
    total = np.abs(summary.total_ratio)
    grew_total = total > EXPLOSION
    if grew_total.any():
        i = _pick(grew_total, total)
        culprit = _largest(summary, i, grow=True)
        name, where = _culprit(culprit, "the largest growth is at")
        found.append(Diagnosis(
            "explosion", name, f"the relevance at the input totals {_num(summary.total_ratio[i])}x the output "
            f"relevance in {_samples(grew_total, summary)} (sample {i}: {_num(rep.output_relevance[i])} -> "
            f"{_num(rep.input_relevance[i])}){where}", stabilize(culprit)))
    return found


def sign_flip(summary: Summary) -> list[Diagnosis]:
    """The relevance total changes sign across a layer (or between output and input)."""
    rep, scale = summary.report, _scale(summary)
    r_in, r_out = rep.relevance_in, rep.relevance_out
    flip = (np.sign(r_in) * np.sign(r_out) < 0) & (np.abs(r_in) > scale[:, None]) & (np.abs(r_out) > scale[:, None])
    found = _each_layer(summary, "sign flip", flip, lambda s, i, where: (
        f"the relevance total changes sign across {_this(s)} in {where} "
        f"({_flow(r_out[i, s.index], r_in[i, s.index], i)}); biases usually cause it",
        f"zero_params: [bias], or {stabilize(s)}" if s.param else stabilize(s)))
    tot_in, tot_out = rep.input_relevance, rep.output_relevance
    flip_total = (np.sign(tot_in) * np.sign(tot_out) < 0) & (np.abs(tot_in) > scale)
    if flip_total.any():
        i = _pick(flip_total)
        name, where = _culprit(next((s for s in reversed(summary.layers) if summary.ratio[i, s.index] < 0), None),
                               "the first flip in the backward pass is at")
        found.append(Diagnosis("sign flip", name, f"the relevance at the input totals the opposite sign of the output "
                               f"relevance in {_samples(flip_total, summary)}{where}",
                               "zero_params: [bias], or explain a positive logit (attribution.target)"))
    return found


def vanishing(summary: Summary) -> list[Diagnosis]:
    """|sum| shrinks below VANISHING x across one layer, or the input total does."""
    rep = summary.report
    r_out = np.abs(rep.relevance_out)
    lost = (np.abs(rep.relevance_in) < VANISHING * r_out) & (r_out > _scale(summary)[:, None])

    def say(s: LayerStats, i: int, where: str) -> tuple[str, str]:
        j = s.index
        remedy = ("zero_params: [bias] (the bias takes it), or a smaller epsilon" if s.param else
                  "a rule that passes relevance on (pass, norm), or a smaller stabilizer epsilon")
        return (f"only {_num(abs(summary.ratio[i, j]))}x of the relevance passes {_this(s)} in {where} "
                f"({_flow(rep.relevance_out[i, j], rep.relevance_in[i, j], i)})", remedy)

    found = _each_layer(summary, "vanishing", lost, say, rank=r_out)
    lost_total = np.abs(summary.total_ratio) < VANISHING
    if lost_total.any():
        i = _pick(lost_total)
        name, where = _culprit(_largest(summary, i, grow=False), "the most is lost at")
        found.append(Diagnosis("vanishing", name, f"the relevance at the input totals only "
                               f"{_num(summary.total_ratio[i])}x the output relevance in "
                               f"{_samples(lost_total, summary)}{where}",
                               "zero_params: [bias], a smaller epsilon, or another composite"))
    return found


def cancellation(summary: Summary) -> list[Diagnosis]:
    """Single relevance values far larger than the layer's sum: large positive and negative parts cancel."""
    rep, scale = summary.report, _scale(summary)[:, None]
    high, low = rep.details.get("max"), rep.details.get("min")
    if high is None or low is None:
        return []
    peak = np.maximum(np.abs(np.nan_to_num(high)), np.abs(np.nan_to_num(low)))
    size = np.maximum(np.abs(rep.relevance_out), scale)
    big = (peak > CANCELLATION * size) & (peak > scale)
    return _each_layer(summary, "cancellation", big, lambda s, i, where: (
        f"single relevance values at the input of {_this(s)} reach {_num(peak[i, s.index])} while its output "
        f"carries {_num(rep.relevance_out[i, s.index])} in total (sample {i}): large positive and negative parts "
        "cancel, as when the inputs of a residual sum nearly cancel", stabilize(s)), rank=ratios(peak, size))


def bias(summary: Summary, rows: list[BiasRow] | None = None) -> list[Diagnosis]:
    """Parameter layers whose bias (and stabilizer) absorb or add more than BIAS_SHARE of their relevance.

    Layers already reported as explosion, sign flip or vanishing are left out: those lines say more.
    """
    rep, scale = summary.report, _scale(summary)
    compared = {r.layer: r for r in rows or []}
    covered = {d.layer for rule in (explosion, sign_flip, vanishing) for d in rule(summary)}
    found = []
    for s in summary.layers:
        j = s.index
        if not s.param or s.has_bias is False or s.layer in covered:
            continue
        r_out, r_in = rep.relevance_out[:, j], rep.relevance_in[:, j]
        ok = np.abs(r_out) > scale
        if not ok.any():
            continue
        share = float(np.mean(ratios(r_out[ok] - r_in[ok], np.abs(r_out[ok]))))
        if not abs(share) > BIAS_SHARE:
            continue
        verb = "absorbed" if share > 0 else "added"
        text = (f"{abs(share):.0%} of the relevance arriving at {_this(s)} is {verb} by its bias and the stabilizer "
                "(mean over samples)")
        row = compared.get(s.layer)
        if row is not None:
            text += (f"; without biases {abs(row.share_zero_bias):.0%} is "
                     f"{'absorbed' if row.share_zero_bias >= 0 else 'added'}")
        remedy = "zero_params: [bias] (lrpcli debug --zero-bias compares)"
        if rule_class(s.rule) == "Epsilon":
            remedy += ", or a smaller epsilon"
        found.append(Diagnosis("bias", s.layer, text, remedy))
    return found


def negative_inputs(summary: Summary) -> list[Diagnosis]:
    """Gamma or ZPlus on a layer whose input has negative values (both assume a preceding ReLU)."""
    neg = summary.report.details.get("input_negative")
    if neg is None:
        return []
    kinds = [rule_class(s.rule) for s in summary.layers]
    seen = (np.nan_to_num(neg) > 0) & np.array([k in ("Gamma", "ZPlus") for k in kinds], dtype=bool)
    return _each_layer(summary, "negative inputs", seen, lambda s, i, where: (
        f"{kinds[s.index]} sees negative inputs in {where}; it is meant for non-negative inputs (after a ReLU) and "
        "treats negative evidence differently",
        f"zbox for an input layer ({_override(s.layer, 'zbox')}), else epsilon or alpha_beta here"))


def low_precision(summary: Summary) -> list[Diagnosis]:
    """float16/bfloat16 relevance: denominators and small sums lose precision."""
    rep = summary.report
    low = [name for name, dtype in zip(rep.layers, rep.dtypes) if dtype in ("float16", "bfloat16")]
    if not low:
        return []
    kinds = sorted({d for d in rep.dtypes if d in ("float16", "bfloat16")})
    more = f" and {len(low) - 1} more layers" if len(low) > 1 else ""
    return [Diagnosis("precision", low[0], f"relevance is computed in {'/'.join(kinds)} here{more}; epsilon 1e-6 "
                      "is below its resolution and sums lose digits", "run the model in float32 for explanations "
                      "(model.float()), or raise the stabilizer epsilon")]
