"""The ``lrpcli`` command line: a click group whose commands live in their own modules."""

from __future__ import annotations

import functools
import io
import sys
import warnings

import click

from lrpcli import __version__
from lrpcli.errors import LrpcliError
from lrpcli.explainer import allocator


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one line, ``lrpcli: warning: ...``, instead of Python's source location and code line.

    Warnings from other libraries keep their category name (``UserWarning: ...``) so they can be told apart.
    """
    text = " ".join(str(message).split())
    if text.startswith("lrpcli: "):
        text = text[len("lrpcli: "):]
    elif not category.__module__.startswith("lrpcli"):
        text = f"{category.__name__}: {text}"
    from tqdm import tqdm

    try:  # above a progress bar when one is showing, which tqdm.write clears and redraws
        tqdm.write(f"lrpcli: warning: {text}", file=file if file is not None else sys.stderr)
    except (OSError, AttributeError):  # no usable stderr: like Python's own, drop the warning
        pass


def _show_click_error(err: click.ClickException, file=None) -> None:
    """click's own report of a usage error (Usage and Try lines kept), its last line ``lrpcli: error: ...``
    like every other error, so scripts and users find one form."""
    buffer = io.StringIO()
    type(err).show(err, buffer)
    lines = buffer.getvalue().rstrip("\n").split("\n")
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("Error: "):
            lines[i] = "lrpcli: error: " + lines[i][len("Error: "):]
            break
    click.echo("\n".join(lines), file=file if file is not None else sys.stderr)


def _reformat(err: click.ClickException) -> click.ClickException:
    err.show = functools.partial(_show_click_error, err)  # type: ignore[method-assign]
    return err


class _Group(click.Group):
    """Turns LrpcliError into one line on stderr and its exit code, and warnings into one line each;
    ``--debug`` keeps the traceback and Python's warning format. click's usage errors keep their exit code 2
    and Usage/Try lines, the error line in lrpcli's form."""

    def make_context(self, *args, **kwargs) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)
        except click.ClickException as err:
            _reformat(err)
            raise

    def invoke(self, ctx: click.Context):
        shown = warnings.showwarning
        try:
            return super().invoke(ctx)
        except click.ClickException as err:
            _reformat(err)
            raise
        except LrpcliError as err:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"lrpcli: error: {err}", err=True)
            sys.exit(err.exit_code)
        finally:
            warnings.showwarning = shown  # in-process callers (tests, notebooks) get theirs back


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lrpcli")
@click.option("--debug", is_flag=True, help="Show Python tracebacks for errors, and warnings with their source.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Layer-wise Relevance Propagation for whole data sets."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    if not debug:
        warnings.showwarning = _show_warning
    allocator.keep_freed_memory()  # a batch tool keeps its memory between batches (see lrpcli/explainer/allocator.py)


def _register() -> None:
    """Attach the commands that exist; each lives in its own module."""
    import importlib

    for module, name in (("lrpcli.commands.explain", "explain"), ("lrpcli.commands.render.command", "render"),
                         ("lrpcli.commands.debug.command", "debug"), ("lrpcli.commands.merge", "merge"),
                         ("lrpcli.commands.evaluate.command", "evaluate"),
                         ("lrpcli.commands.analysis.command", "analyze"),
                         ("lrpcli.commands.analysis.command", "virelay"), ("lrpcli.commands.export", "export")):
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
