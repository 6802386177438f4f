"""The ``lrpcli`` command line: a click group whose commands live in their own modules."""

from __future__ import annotations

import sys

import click

from . import __version__
from .errors import LrpcliError


class _Group(click.Group):
    """Turns LrpcliError into one line on stderr and its exit code; ``--debug`` keeps the traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except LrpcliError as err:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"lrpcli: error: {err}", err=True)
            sys.exit(err.exit_code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lrpcli")
@click.option("--debug", is_flag=True, help="Show Python tracebacks for errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Layer-wise Relevance Propagation for whole data sets."""
    from .allocator import keep_freed_memory

    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    keep_freed_memory()  # a batch tool keeps its memory between batches (see lrpcli/allocator.py)


def _register() -> None:
    """Attach the commands that exist; each lives in its own module."""
    import importlib

    for module, name in (("lrpcli.explain", "explain"), ("lrpcli.render.command", "render"),
                         ("lrpcli.debug.command", "debug"), ("lrpcli.merge", "merge")):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name and module.startswith(err.name):
                continue
            raise
        main.add_command(getattr(mod, name))


_register()

if __name__ == "__main__":  # pragma: no cover
    main()
