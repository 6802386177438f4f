"""``lrpcli explain CONFIG DATA``: the click command; the work is in ``runner.explain``."""

from __future__ import annotations

from pathlib import Path

import click


class _Workers(click.ParamType):
    """``--num-workers``: auto or an integer >= 0 (run.num_workers)."""

    name = "auto|N"

    def convert(self, value, param, ctx):
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        text = str(value).strip().lower()
        if text == "auto":
            return "auto"
        if text.isdigit():
            return int(text)
        self.fail(f"expected auto or an integer >= 0, got {value!r}", param, ctx)


@click.command("explain")
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("data", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="HDF5 file to write (default: output.path of the config).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Images per batch (run.batch_size).")
@click.option("--device", default=None, help="auto, cpu, cuda or cuda:N (run.device).")
@click.option("--max-samples", type=click.IntRange(min=1), default=None, help="Explain only the first N images.")
@click.option("--num-workers", type=_Workers(), default=None,
              help="Data loading processes, or auto (run.num_workers; 0 decodes in a thread).")
@click.option("--resume/--overwrite", "mode", default=None,
              help="Continue an interrupted run in the same file, or replace an existing file.")
@click.option("--no-merge", is_flag=True,
              help="Under torchrun: keep the per-rank shards and write OUTPUT as a virtual dataset over them.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary line.")
def explain(config: Path, data: Path, output: Path | None, batch_size: int | None, device: str | None,
            max_samples: int | None, num_workers: int | str | None, mode: bool | None, no_merge: bool,
            quiet: bool) -> None:
    """Attributions for every image of DATA (class folders or a flat folder), written to one HDF5 file.

    Started by torchrun (RANK/WORLD_SIZE set), every process explains its own block of DATA into
    OUTPUT's shard (out.rank00003.h5) and rank 0 merges the shards into OUTPUT at the end.
    """
    from .build import load_config
    from .distributed import from_env

    overrides = {"output.path": str(output) if output else None, "run.batch_size": batch_size,
                 "run.device": device, "run.max_samples": max_samples, "run.num_workers": num_workers}
    cfg = load_config(config, overrides)
    progress = None if not quiet else False
    shard = from_env(cfg.output.path)
    if shard is not None:
        from .distributed import explain as run_distributed

        result = run_distributed(cfg, data, shard, resume=mode is True, overwrite=mode is False,
                                 merge_shards=not no_merge, progress=progress)
        if not quiet:
            for line in result.lines():
                click.echo(line)
        return
    from .runner import explain as run

    summary = run(cfg, data, resume=mode is True, overwrite=mode is False, progress=progress)
    if not quiet:
        click.echo(summary.line())
