"""The debug report as an aligned text table, markdown, csv or json.

Every number is printed through ``cell``; json and csv carry the unrounded values of exactly the rows and
columns of the table, so a script reading them sees what a person reads on screen.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from lrpcli.commands.debug.diagnose import Diagnosis
from lrpcli.commands.debug.report import rule_class
from lrpcli.commands.debug.stats import COLUMNS, NUMERIC, BiasRow, LayerStats, Summary, select


@dataclass
class View:
    """What to print: the summary, the rows the --layers globs keep, the diagnoses, the bias comparison."""

    summary: Summary
    diagnoses: list[Diagnosis]
    patterns: Sequence[str] = ()
    bias_rows: list[BiasRow] | None = None
    bias_summary: Summary | None = None
    rows: list[LayerStats] = field(init=False)
    columns: list[tuple[str, str]] = field(init=False)

    def __post_init__(self) -> None:
        self.rows = select(self.summary.layers, self.patterns)
        # a stored run has no types and no detail numbers: leave those columns out rather than print dashes
        self.columns = [(key, head) for key, head in COLUMNS if key in ("layer", "rule") or
                        any(s.value(key) not in (None, "") for s in self.summary.layers)]


# ------------------------------------------------------------------------------------------------ cells
def cell(key: str, value: object) -> str:
    """How the table prints ``value`` of column ``key`` (the one place numbers are rounded)."""
    text = _cell(key, value)
    return text[1:] if re.fullmatch(r"-0(\.0*)?%?", text) else text  # no "-0.0%" for tiny negatives


def _cell(key: str, value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if key in ("nan", "inf", "index", "calls"):
        return str(int(value))
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if key.startswith("negative") or key.startswith("share"):
        return f"{100 * float(value):.1f}%"
    if key in ("out_mean", "in_mean", "output", "input", "absorbed", "absorbed_zero_bias"):
        return f"{float(value):.6g}"
    if isinstance(value, (int, float)):
        return f"{float(value):.4g}"
    return str(value)


def _plain(value: object) -> object:
    """JSON-safe: NaN -> null, +-inf -> "inf"/"-inf" (strict JSON has neither)."""
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
    return value


def row_values(s: LayerStats, columns: Sequence[tuple[str, str]] = COLUMNS) -> dict[str, object]:
    """One conservation row as in json/csv: the table's columns (full rule) and the worst sample's index."""
    values = {key: s.value(key) for key, _ in columns}
    values["worst_sample"] = s.worst_sample
    return values


def header_values(summary: Summary) -> dict[str, object]:
    return {"output": summary.output_mean, "input": summary.input_mean, "ratio_mean": summary.total_ratio_mean,
            "ratio_worst": summary.total_ratio_worst, "worst_sample": summary.total_worst_sample}


def _header_line(summary: Summary) -> str:
    h = header_values(summary)
    sample = "" if h["worst_sample"] is None else f" (sample {h['worst_sample']})"
    return (f"output relevance {cell('output', h['output'])} -> input relevance {cell('input', h['input'])} "
            f"(means); input/output {cell('ratio_mean', h['ratio_mean'])} mean, "
            f"{cell('ratio_worst', h['ratio_worst'])} worst{sample}")


def _aligned(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool], indent: str = "  ") -> str:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        parts = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)]
        return (indent + "  ".join(parts)).rstrip()

    return "\n".join([line(headers)] + [line(r) for r in rows])


def _markdown(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]) -> str:
    def esc(text: str) -> str:
        return text.replace("|", "\\|")

    out = ["| " + " | ".join(esc(h) for h in headers) + " |",
           "|" + "|".join("---:" if r else "---" for r in right) + "|"]
    out += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------- sections
def _assignment_rows(view: View) -> tuple[list[str], list[list[str]], list[bool]]:
    rep = view.summary.report
    if rep.assignments is None:  # a stored run: the rules it recorded
        kept = {s.layer for s in view.rows}
        rows = [[str(j), name, rule] for j, (name, rule) in enumerate(zip(rep.layers, rep.rules)) if name in kept]
        return ["#", "layer", "rule"], rows, [True, False, False]
    from fnmatch import fnmatchcase

    rows = []
    for j, a in enumerate(rep.assignments):
        if view.patterns and not any(fnmatchcase(a.name, p) for p in view.patterns):
            continue
        rule = {"pass": "pass", "none": "NO RULE (plain gradient)", "idle": "- (did not run)"}.get(a.status, a.rule)
        rows.append([str(j), a.name, a.type, rule or "-"])
    return ["#", "layer", "type", "rule"], rows, [True, False, False, False]


def _conservation_rows(view: View) -> tuple[list[str], list[list[str]], list[bool]]:
    headers = [h for _, h in view.columns]
    shown = {"layer": lambda s: s.layer, "type": lambda s: s.type or "-", "rule": lambda s: rule_class(s.rule) or "-"}
    rows = [[shown[k](s) if k in shown else cell(k, s.value(k)) for k, _ in view.columns] for s in view.rows]
    return headers, rows, [k in NUMERIC for k, _ in view.columns]


BIAS_COLUMNS = (("layer", "layer"), ("rule", "rule"), ("absorbed", "absorbed"), ("share", "share"),
                ("absorbed_zero_bias", "absorbed (zero bias)"), ("share_zero_bias", "share (zero bias)"))


def _bias_rows(view: View) -> tuple[list[str], list[list[str]], list[bool]]:
    kept = {s.layer for s in view.rows}
    rows = [[r.layer, rule_class(r.rule)] + [cell(k, getattr(r, k)) for k, _ in BIAS_COLUMNS[2:]]
            for r in view.bias_rows or [] if r.layer in kept]
    return [h for _, h in BIAS_COLUMNS], rows, [False, False, True, True, True, True]


def _bias_header(view: View) -> str:
    other = view.bias_summary
    assert other is not None
    return (f"input relevance {cell('input', view.summary.input_mean)} with biases, "
            f"{cell('input', other.input_mean)} without (output relevance {cell('output', view.summary.output_mean)}"
            f" and {cell('output', other.output_mean)}); absorbed = relevance_out - relevance_in, mean over samples")


def _intro(view: View) -> list[str]:
    rep = view.summary.report
    canon = ", ".join(rep.canonizers) or "none"
    lines = [f"lrpcli debug: {rep.source}", f"inputs: {rep.inputs}" + (f" on {rep.device}" if rep.mode == "model"
                                                                       else ""),
             f"composite: {rep.composite}; canonizers: {canon}"]
    if rep.gradient_space:
        lines.append("this composite propagates gradients (one-hot seed): conservation is not expected and its "
                     "checks are skipped")
    return lines


def _unhandled_line(view: View) -> str | None:
    rep = view.summary.report
    if rep.assignments is None:
        return None
    missing = rep.unhandled
    if not missing:
        return "Unhandled modules: none (every module that ran got a rule or pass)"
    names = ", ".join(f"{a.name} ({a.type})" for a in missing)
    return f"Unhandled modules ({len(missing)}, the plain gradient flows through them): {names}"


def _canonizer_lines(view: View) -> list[str]:
    rep = view.summary.report
    notes = [n for n in rep.notes]
    if rep.mode == "model" and not rep.canonizers:
        notes.insert(0, "no canonizers configured")
    return notes


COLUMN_HELP = (
    "  out, in: relevance summed at the layer's output and at its input (mean over samples); in/out: their ratio,",
    "  mean and worst (the sample farthest from 1); at the layer's input: neg = share of negative relevance (mean,",
    "  worst), max and min single values, nan and inf counts",
)


def render_table(view: View) -> str:
    """The human view: aligned columns, one section per question."""
    out = _intro(view)
    heads, rows, right = _assignment_rows(view)
    rep = view.summary.report
    count = len(rep.assignments) if rep.assignments is not None else len(rep.layers)
    what = "leaf modules, forward order" if rep.assignments is not None else "layers stored with the run"
    out += ["", f"Rule assignment ({count} {what})", _aligned(heads, rows, right)]
    unhandled = _unhandled_line(view)
    if unhandled:
        out.append(unhandled)
    notes = _canonizer_lines(view)
    if notes:
        out += ["Canonizers and notes:"] + [f"  {n}" for n in notes]
    n = view.summary.n
    out += ["", f"Conservation over {n} sample{'s' if n != 1 else ''} (forward order)", *COLUMN_HELP,
            _header_line(view.summary)]
    heads, rows, right = _conservation_rows(view)
    out.append(_aligned(heads, rows, right))
    if view.bias_summary is not None:
        heads, rows, right = _bias_rows(view)
        out += ["", "Bias comparison (the same inputs with composite.zero_params: [bias])", _bias_header(view),
                _aligned(heads, rows, right)]
    out += ["", "Diagnosis"]
    out += [f"  {d.line()}" for d in view.diagnoses] or ["  no problems found"]
    return "\n".join(out)


def render_markdown(view: View) -> str:
    """The same sections as ``render_table`` as markdown (for issues and notebooks)."""
    out = ["# lrpcli debug", "", *[f"- {line}" for line in _intro(view)]]
    heads, rows, right = _assignment_rows(view)
    out += ["", "## Rule assignment", "", _markdown(heads, rows, right)]
    unhandled = _unhandled_line(view)
    if unhandled:
        out += ["", unhandled]
    notes = _canonizer_lines(view)
    if notes:
        out += ["", "Canonizers and notes:", ""] + [f"- {n}" for n in notes]
    heads, rows, right = _conservation_rows(view)
    out += ["", "## Conservation", "", " ".join(line.strip() for line in COLUMN_HELP), "", _header_line(view.summary),
            "", _markdown(heads, rows, right)]
    if view.bias_summary is not None:
        heads, rows, right = _bias_rows(view)
        out += ["", "## Bias comparison", "", _bias_header(view), "", _markdown(heads, rows, right)]
    out += ["", "## Diagnosis", ""]
    out += [f"- {d.line()}" for d in view.diagnoses] or ["- no problems found"]
    return "\n".join(out)


def render_csv(view: View) -> str:
    """The conservation table only, one row per layer, unrounded (worst_sample added)."""
    buf = io.StringIO()
    keys = [k for k, _ in view.columns] + ["worst_sample"]
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(keys)
    for s in view.rows:
        values = row_values(s, view.columns)
        writer.writerow(["" if values[k] is None else (repr(values[k]) if isinstance(values[k], float) else values[k])
                         for k in keys])
    return buf.getvalue().rstrip("\n")


def to_dict(view: View) -> dict[str, object]:
    """Everything the table shows, unrounded, as plain JSON types."""
    rep = view.summary.report
    data: dict[str, object] = {
        "source": rep.source, "mode": rep.mode, "inputs": rep.inputs, "samples": rep.samples,
        "composite": rep.composite, "canonizers": rep.canonizers, "gradient_space": rep.gradient_space,
        "assignments": None if rep.assignments is None else [
            {"index": j, "name": a.name, "type": a.type, "rule": a.rule, "status": a.status, "calls": a.calls}
            for j, a in enumerate(rep.assignments)],
        "unhandled": [a.name for a in rep.unhandled], "notes": list(rep.notes),
        "header": {k: _plain(v) for k, v in header_values(view.summary).items()},
        "columns": [k for k, _ in view.columns] + ["worst_sample"],
        "layers": [{k: _plain(v) for k, v in row_values(s, view.columns).items()} for s in view.rows],
        "diagnoses": [d.to_dict() for d in view.diagnoses],
    }
    if view.bias_summary is not None:
        kept = {s.layer for s in view.rows}
        data["zero_bias"] = {
            "input": _plain(view.bias_summary.input_mean), "output": _plain(view.bias_summary.output_mean),
            "layers": [{k: _plain(getattr(r, k)) for k, _ in BIAS_COLUMNS} for r in view.bias_rows or []
                       if r.layer in kept]}
    return data


def render_json(view: View) -> str:
    return json.dumps(to_dict(view), indent=2, allow_nan=False)


RENDERERS = {"table": render_table, "markdown": render_markdown, "csv": render_csv, "json": render_json}


def render(view: View, fmt: str) -> str:
    """The report in one of the RENDERERS' formats (``command.FORMATS`` lists them for click)."""
    return RENDERERS[fmt](view)
