"""``lrpcli explain CONFIG DATA``: the click command; the work is in ``runner.run`` (one process) or
``distributed.run_rank`` (one rank under torchrun)."""

from __future__ import annotations

from pathlib import Path

import click

from lrpcli.catalogue import MAX_BATCH_SIZE
from lrpcli.errors import LrpcliError


class _Threads(click.ParamType):
    """``--threads``: auto or an integer >= 1 (run.threads)."""

    name = "auto|N"

    def convert(self, value, param, ctx):
        text = str(value).strip().lower()
        if text == "auto":
            return "auto"
        if text.isdigit() and 1 <= int(text) <= 1024:
            return int(text)
        self.fail(f"expected auto or an integer from 1 to 1024, got {value!r}", param, ctx)


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
@click.option("--batch-size", type=click.IntRange(min=1, max=MAX_BATCH_SIZE), default=None,
              help="Images per batch (run.batch_size).")
@click.option("--device", default=None, help="auto, cpu, cuda or cuda:N (run.device).")
@click.option("--max-samples", type=click.IntRange(min=1), default=None, help="Explain only the first N images.")
@click.option("--num-workers", type=_Workers(), default=None,
              help="Data loading processes, or auto (run.num_workers; 0 decodes in a thread).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in the same file.")
@click.option("--overwrite", is_flag=True, help="Replace an existing file.")
@click.option("--threads", type=_Threads(), default=None,
              help="torch threads for the attribution, or auto (run.threads; on a busy machine fewer are faster).")
@click.option("--no-merge", is_flag=True,
              help="Under torchrun: keep the per-rank shards and write OUTPUT as a virtual dataset over them.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary line.")
def explain(config: Path, data: Path, output: Path | None, batch_size: int | None, device: str | None,
            max_samples: int | None, num_workers: int | str | None, resume: bool, overwrite: bool,
            threads: int | str | None, no_merge: bool, quiet: bool) -> None:
    """Attributions for every image of DATA (class folders or a flat folder), written to one HDF5 file.

    Started by torchrun (RANK/WORLD_SIZE set), every process explains its own block of DATA into
    OUTPUT's shard (out.rank00003.h5) and rank 0 merges the shards into OUTPUT at the end.
    """
    from lrpcli.explainer.build import load_config  # lazy: keeps lrpcli --help fast
    from lrpcli.runner.distributed import from_env  # lazy: keeps lrpcli --help fast

    if resume and overwrite:
        raise LrpcliError("--resume and --overwrite exclude each other: --resume continues the file, "
                          "--overwrite replaces it; give one of them")
    overrides = {"output.path": str(output) if output else None, "run.batch_size": batch_size,
                 "run.device": device, "run.max_samples": max_samples, "run.num_workers": num_workers,
                 "run.threads": threads}
    cfg = load_config(config, overrides)
    progress = None if not quiet else False
    shard = from_env(cfg.output.path)
    if shard is not None:
        from lrpcli.runner.distributed import run_rank  # lazy: keeps lrpcli --help fast

        result = run_rank(cfg, data, shard, resume=resume, overwrite=overwrite,
                          merge_shards=not no_merge, progress=progress)
        if not quiet:
            for line in result.lines():
                click.echo(line)
        return
    from lrpcli.runner.local import run  # lazy: keeps lrpcli --help fast

    summary = run(cfg, data, resume=resume, overwrite=overwrite, progress=progress)
    if not quiet:
        click.echo(summary.line())
