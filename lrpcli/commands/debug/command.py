"""``lrpcli debug CONFIG [DATA]`` (or ``lrpcli debug OUT.h5``): the click command; the work is in the modules."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from lrpcli.errors import ConfigWarning, LrpcliError

if TYPE_CHECKING:  # pragma: no cover
    from lrpcli.commands.debug.report import Report

# lrpcli.commands.debug.format.RENDERERS (not imported: --help stays fast)
FORMATS = ("table", "json", "csv", "markdown")

HDF5_SUFFIXES = (".h5", ".hdf5", ".he5")
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def is_result_file(path: Path) -> bool:
    """A stored run (by suffix, or by the HDF5 signature for other names)."""
    if path.suffix.lower() in HDF5_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            return f.read(8) == _HDF5_SIGNATURE
    except OSError:
        return False


def _patterns(values: tuple[str, ...]) -> list[str]:
    return [p.strip() for v in values for p in v.split(",") if p.strip()]


@click.command("debug")
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("data", required=False, type=click.Path(path_type=Path))
@click.option("-n", "--samples", type=click.IntRange(min=1), default=None,
              help="Inputs to run (default 4); for a stored run, its first N rows (default all).")
@click.option("--layers", "layers", multiple=True, metavar="GLOB",
              help="Only table rows whose module name matches (repeat or comma-separate globs).")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True,
              help="Output format.")
@click.option("--zero-bias", is_flag=True,
              help="Also run with composite.zero_params: [bias] and show what biases absorb per layer.")
@click.option("--strict", is_flag=True,
              help="Exit status 1 when a computing module got no rule (also when composite.strict is true).")
@click.option("--device", default=None, help="auto, cpu, cuda or cuda:N (run.device).")
def debug(config: Path, data: Path | None, samples: int | None, layers: tuple[str, ...], fmt: str,
          zero_bias: bool, strict: bool, device: str | None) -> None:
    """Rule assignment, per-layer conservation and diagnoses: CONFIG on N images of DATA (or on random inputs of
    the configured shape without DATA), or the conservation table of a stored run (debug OUT.h5)."""
    from lrpcli.commands.debug.diagnose import diagnose  # lazy: keeps lrpcli --help fast
    from lrpcli.commands.debug.format import View, render  # lazy: keeps lrpcli --help fast
    from lrpcli.commands.debug.stats import compare_bias, matches, summarize  # lazy: keeps lrpcli --help fast

    patterns = _patterns(layers)
    if is_result_file(config):
        report, zero, config_strict = _stored(config, data, samples, zero_bias)
    else:
        report, zero, config_strict = _live(config, data, samples, zero_bias, device)
    summary = summarize(report)
    bias_summary = summarize(zero) if zero is not None else None
    bias_rows = compare_bias(summary, bias_summary) if bias_summary is not None else None
    known = [s.layer for s in summary.layers] + [a.name for a in report.assignments or []]
    if patterns and not any(matches(name, patterns) for name in known):
        raise LrpcliError(f"--layers: no layer matches {', '.join(patterns)}; layers are e.g. "
                          f"{', '.join(known[:5])}")
    view = View(summary, diagnose(summary, bias_rows), patterns, bias_rows, bias_summary)
    click.echo(render(view, fmt))
    missing = report.unhandled
    if (strict or config_strict) and missing:
        names = ", ".join(f"{a.name} ({a.type})" for a in missing)
        why = "--strict" if strict else "composite.strict"
        click.echo(f"lrpcli: {len(missing)} computing module{'s' if len(missing) != 1 else ''} got no rule "
                   f"({why}): {names}", err=True)
        click.get_current_context().exit(1)


def _stored(path: Path, data: Path | None, samples: int | None, zero_bias: bool) -> tuple[Report, None, bool]:
    """A result file's conservation group: no model, no DATA, no rerun."""
    from lrpcli.commands.debug.stats import from_results  # lazy: keeps lrpcli --help fast

    if data is not None:
        raise LrpcliError(f"{path} is a stored run: it takes no DATA (got {data})")
    if zero_bias:
        raise LrpcliError(f"--zero-bias needs the model: give the config instead of the stored run {path}")
    return from_results(path, samples), None, False


def _live(path: Path, data: Path | None, samples: int | None, zero_bias: bool,
          device: str | None) -> tuple[Report, Report | None, bool]:
    """The configured model on N inputs, and the same inputs with zero_params: [bias] for --zero-bias."""
    import warnings

    from lrpcli.commands.debug.collect import collect, load  # lazy: keeps lrpcli --help fast
    from lrpcli.explainer.build import load_config  # lazy: keeps lrpcli --help fast

    overrides = {"run.device": device}
    with warnings.catch_warnings():  # explain's "keys the method does not use": debug uses the composite keys
        warnings.simplefilter("ignore", ConfigWarning)
        cfg = load_config(path, overrides)
    method = cfg.attribution.method
    if method != "lrp":
        click.echo(f"lrpcli: note: {path}: attribution.method is {method}; debug shows the config's LRP composite "
                   f"({cfg.composite.name}), not the {method} attribution that explain computes", err=True)
    model = load(cfg)
    n = samples or 4
    report = collect(cfg, data, samples=n, model=model)
    zero = None
    if zero_bias:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConfigWarning)
            cfg0 = load_config(path, {**overrides, "composite.zero_params": ["bias"]})
        zero = collect(cfg0, data, samples=n, model=model, label=" (composite.zero_params: [bias])")
    return report, zero, bool(cfg.composite.strict)
