"""``lrpcli merge SHARDS... -o OUT``: join the shard files of a distributed run by hand
(``lrpcli.runner.distributed``)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("merge")
@click.argument("shards", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The merged file (default: the shards' name without .rankNNNNN, e.g. out.h5).")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--keep-shards", is_flag=True, help="Keep the shard files after a verified merge.")
@click.option("--virtual", is_flag=True,
              help="Write OUTPUT as HDF5 virtual datasets over the shards (no copy; the shards are kept).")
@click.option("-q", "--quiet", is_flag=True, help="No summary line.")
def merge(shards: tuple[Path, ...], output: Path | None, overwrite: bool, keep_shards: bool, virtual: bool,
          quiet: bool) -> None:
    """Join the shards of a distributed `lrpcli explain` (out.rank00000.h5 ...) into one result file.

    The rows are written in data set order; every sample of the run must be present exactly once (shards of
    the same run and config, none missing, none twice, each one complete), else nothing is written. The
    shards are removed after the merged file was written and checked, unless --keep-shards or --virtual.
    """
    from lrpcli.runner.distributed import default_output  # lazy: keeps lrpcli --help fast
    from lrpcli.runner.distributed import merge as run  # lazy: keeps lrpcli --help fast

    summary = run(shards, output if output is not None else default_output(shards), overwrite=overwrite,
                  keep_shards=keep_shards, virtual=virtual)
    if not quiet:
        click.echo(summary.line())
