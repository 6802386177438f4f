"""The ``lrpcli evaluate`` command: options, checks of bad input, progress, table and outputs."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from lrpcli.commands.evaluate.settings import FAMILIES, MASK_FAMILIES, OPT_IN, REPLACEMENTS, SCORES, Settings
from lrpcli.errors import DataError, LrpcliError

ROW_TO_FAMILY = {row: fam for fam, rows in FAMILIES.items() for row in rows}


def parse_metrics(text: str | None, masks: bool) -> list[str]:
    """``--metrics`` (comma-separated family or table-row names, or ``all``) as family names, in table order.

    Default: every family but the opt-in ones (model_randomisation), the localisation ones only with
    ``--masks``. A name that does not exist, or a
    localisation metric without masks, is an LrpcliError with the allowed names.
    """
    if text is None or text.strip() == "all":
        return [f for f in FAMILIES if (masks or f not in MASK_FAMILIES) and f not in OPT_IN]
    from lrpcli.spec.config import did_you_mean  # lazy: keeps lrpcli --help fast

    known = list(FAMILIES) + [r for r in ROW_TO_FAMILY if r not in FAMILIES]
    chosen = set()
    for word in (w.strip() for w in text.split(",")):
        if not word:
            continue
        fam = word if word in FAMILIES else ROW_TO_FAMILY.get(word)
        if fam is None:
            raise LrpcliError(f"--metrics: unknown metric {word!r}{did_you_mean(word, known)} "
                              f"(known: all, {', '.join(FAMILIES)})")
        if fam in MASK_FAMILIES and not masks:
            raise LrpcliError(f"--metrics: {word} needs --masks DIR (object masks in DATA's layout)")
        chosen.add(fam)
    if not chosen:
        raise LrpcliError("--metrics: no metric given; use all or a comma-separated list")
    return [f for f in FAMILIES if f in chosen]


@click.command("evaluate")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--metrics", default=None, metavar="LIST",
              help="Comma-separated metrics (default: all but model_randomisation; localisation needs --masks).")
@click.option("--masks", type=click.Path(path_type=Path), default=None, metavar="DIR",
              help="Object masks in DATA's layout (same relative file names).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the results as .json (per sample too) or .csv.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Draw the MoRF/LeRF curves of all files into this PNG.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The run's config file; relative model paths are looked up next to it.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Perturbed images per forward (default: fit a memory budget).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--max-samples", type=click.IntRange(min=1), default=None, help="Evaluate only the first N rows.")
@click.option("--patch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Side of the square regions perturbed.")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Perturbation steps (default: every patch, at most 100).")
@click.option("--replacement", type=click.Choice(REPLACEMENTS), default="mean", show_default=True,
              help="What a perturbed region becomes.")
@click.option("--score", type=click.Choice(SCORES), default="logit", show_default=True,
              help="What the curves measure for the target class.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the random baseline, uniform noise and random subsets.")
@click.option("--blur-sigma", type=click.FloatRange(min=0.1), default=4.0, show_default=True,
              help="Standard deviation (pixels) of --replacement blur.")
@click.option("--fc-runs", type=click.IntRange(min=2), default=50, show_default=True,
              help="Random subsets per sample for faithfulness_correlation.")
@click.option("--fc-subset", type=click.FloatRange(min=0.0, max=1.0, min_open=True), default=0.1, show_default=True,
              help="Share of the patches in each random subset.")
@click.option("--mpr-checkpoints", type=click.IntRange(min=1), default=5, show_default=True,
              help="Points of the model_randomisation cascade where the attribution is re-run.")
@click.option("--no-baseline", is_flag=True, help="Leave out the random-attribution column.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def evaluate(files: tuple[Path, ...], metrics: str | None, masks: Path | None, output: Path | None,
             plot: Path | None, config_file: Path | None, batch_size: int | None, device: str,
             max_samples: int | None, patch_size: int, steps: int | None, replacement: str, score: str, seed: int,
             blur_sigma: float, fc_runs: int, fc_subset: float, mpr_checkpoints: int, no_baseline: bool,
             quiet: bool) -> None:
    """Measure the attributions of FILES (from 'lrpcli explain') and print one table, metric x file."""
    from lrpcli.commands.evaluate.report import summarise, table_text, write_report  # lazy: keeps lrpcli --help fast
    from lrpcli.commands.evaluate.run import evaluate_file, settings_dict  # lazy: keeps lrpcli --help fast
    from lrpcli.commands.evaluate.source import load_model_of, open_source  # lazy: keeps lrpcli --help fast
    from lrpcli.explainer.runtime import resolve_device  # lazy: keeps lrpcli --help fast

    families = parse_metrics(metrics, masks is not None)
    if masks is not None and not masks.is_dir():
        raise DataError(f"--masks {masks}: not a folder (expected masks in DATA's layout)")
    if output is not None and output.suffix.lower() not in (".json", ".csv"):
        raise LrpcliError(f"-o {output}: expected a .json or .csv file name")
    if plot is not None and "region_perturbation" not in families:
        raise LrpcliError("--plot draws the region_perturbation curves; add region_perturbation to --metrics")
    settings = Settings(patch_size=patch_size, steps=steps, replacement=replacement, score=score, seed=seed,
                        blur_sigma=blur_sigma, fc_runs=fc_runs, fc_subset=fc_subset, mpr_checkpoints=mpr_checkpoints)
    seen: dict[Path, Path] = {}
    for f in files:
        if f.resolve() in seen:
            raise LrpcliError(f"{f} is given twice (as {seen[f.resolve()]}); give each file once")
        seen[f.resolve()] = f
    dev = resolve_device(device)
    sources = [open_source(f, max_samples, config_file) for f in files]
    if len(sources) > 1:  # refuse mismatched files before any long computation
        from lrpcli.commands.evaluate.report import common_rows  # lazy: keeps lrpcli --help fast
        from lrpcli.commands.evaluate.run import FileResult  # lazy: keeps lrpcli --help fast

        common_rows([FileResult(s, {}, {}) for s in sources])
    models: dict[str, object] = {}
    results = []
    show = sys.stderr.isatty() and not quiet
    for i, src in enumerate(sources):
        want = ("attribution", "random") if i == 0 and not no_baseline else ("attribution",)

        def model_of(src=src):
            """Files of one model share it; a file whose values are all stored never loads it."""
            if src.model_key not in models:
                models[src.model_key] = load_model_of(src, dev)
            return models[src.model_key]

        with _Progress(src, show) as advance:
            try:
                results.append(evaluate_file(src, families, settings, masks=str(masks.resolve()) if masks else None,
                                             device=dev, batch_size=batch_size, sources=want, model=model_of,
                                             progress=advance))
            except KeyboardInterrupt:
                raise LrpcliError(f"interrupted; the samples evaluated so far are kept in {src.path} (evaluation/): "
                                  "run the same command again to continue") from None
    summary = summarise(results, families, not no_baseline)
    click.echo(table_text(summary))
    if output is not None:
        write_report(output, results, summary, settings_dict(settings), not no_baseline)
    if plot is not None:
        from lrpcli.commands.evaluate.plot import draw_curves  # lazy: keeps lrpcli --help fast

        draw_curves(plot, results, summary, score=score, baseline=not no_baseline)


class _Progress:
    """A tqdm bar over one file's samples (its rate is samples/s); a no-op without a terminal."""

    def __init__(self, src, show: bool) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=src.n, unit="sample", desc=src.path.name, disable=not show, leave=False,
                        dynamic_ncols=True)

    def __enter__(self):
        return self.bar.update

    def __exit__(self, *exc: object) -> None:
        self.bar.close()
