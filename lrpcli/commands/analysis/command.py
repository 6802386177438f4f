"""``lrpcli analyze`` and ``lrpcli virelay``: the click commands, kept thin.

Heavy imports (scikit-learn, scipy, h5py) happen inside the commands so ``lrpcli --help`` stays instant.
"""

from __future__ import annotations

import click

from lrpcli.errors import DataError

_CTX = {"help_option_names": ["-h", "--help"]}


def parse_clusters(text: str) -> tuple[int, ...]:
    """``2-10`` or ``2,4,8`` (or a mix) to sorted unique k >= 2; DataError naming --clusters otherwise."""
    ks: set[int] = set()
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = (int(p) for p in part.split("-", 1))
                ks.update(range(lo, hi + 1))
            elif part:
                ks.add(int(part))
    except ValueError:
        ks = set()
    if not ks or min(ks) < 2 or max(ks) > 99:
        raise DataError(f"--clusters {text!r}: expected k values from 2 to 99 as a range or list, e.g. 2-10 or 2,4,8")
    return tuple(sorted(ks))


@click.command("analyze", context_settings=_CTX)
@click.argument("file", metavar="OUT.h5")
@click.option("-o", "--output", "out", required=True, metavar="ANALYSIS.h5", help="Analysis file to write.")
@click.option("--by", type=click.Choice(["label", "target"]), default="label", show_default=True,
              help="Group samples by their data set class (label) or by the output explained (target).")
@click.option("--class", "wanted", multiple=True, metavar="NAME|NUMBER",
              help="Analyse only this class (repeatable) [default: every class with samples].")
@click.option("--size", type=click.IntRange(2, 256), default=32, show_default=True,
              help="Maps are average-pooled to SIZE x SIZE before comparing.")
@click.option("--absolute", is_flag=True, help="Compare |relevance| (where, regardless of sign).")
@click.option("--neighbors", type=click.IntRange(1, 1000), default=10, show_default=True,
              help="Neighbours per sample in the kNN affinity graph.")
@click.option("--eigenvalues", type=click.IntRange(2, 256), default=32, show_default=True,
              help="Eigenvalues (and dimensions) of the spectral embedding.")
@click.option("--clusters", default="2-10", show_default=True, metavar="KS",
              help="k values for k-means, as a range or list: 2-10, 2,4,8.")
@click.option("--tsne/--no-tsne", default=True, show_default=True,
              help="Also compute a 2-d t-SNE layout for display.")
@click.option("--tsne-fit", type=click.IntRange(4, None), default=2000, show_default=True, metavar="N",
              help="t-SNE fits at most N samples of a class; the others are placed by their nearest neighbours.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of k-means, t-SNE and the eigensolver.")
@click.option("--threads", type=click.IntRange(1, 256), default=1, show_default=True,
              help="Threads of the numerical libraries; more only pays on an idle multi-core machine.")
@click.option("--overwrite", is_flag=True, help="Replace an existing ANALYSIS.h5.")
@click.option("-q", "--quiet", is_flag=True, help="No per-class progress lines.")
def analyze(file: str, out: str, by: str, wanted: tuple[str, ...], size: int, absolute: bool, neighbors: int,
            eigenvalues: int, clusters: str, tsne: bool, tsne_fit: int, seed: int, threads: int, overwrite: bool,
            quiet: bool) -> None:
    """Spectral relevance analysis (SpRAy) of the relevance maps in OUT.h5, per class, in ViRelAy's layout."""
    from lrpcli.commands.analysis.analyze import analyze_file  # lazy: keeps lrpcli --help fast
    from lrpcli.commands.analysis.spray import Params  # lazy: keeps lrpcli --help fast

    params = Params(size=size, absolute=absolute, neighbors=neighbors, eigenvalues=eigenvalues,
                    clusters=parse_clusters(clusters), tsne=tsne, tsne_fit=tsne_fit, seed=seed, threads=threads)
    log = None if quiet else (lambda line: click.echo(line, err=True))
    cats = analyze_file(file, out, params, by=by, wanted=wanted, overwrite=overwrite, log=log)
    if not quiet:
        click.echo(f"analyze: wrote {out} ({len(cats)} categories, {sum(len(c.index) for c in cats)} samples)")


@click.command("virelay", context_settings=_CTX)
@click.argument("files", metavar="OUT.h5...", nargs=-1, required=True)
@click.option("--analysis", "analyses", multiple=True, metavar="ANALYSIS.h5",
              help="An analysis of one of the OUT.h5 files, written by 'lrpcli analyze' (repeatable).")
@click.option("-d", "--dir", "out_dir", required=True, metavar="DIR", help="Project folder to write.")
@click.option("--name", default=None, help="Project name shown in ViRelAy [default: the OUT.h5 file name].")
@click.option("--overwrite", is_flag=True, help="Replace the files lrpcli writes in an existing DIR.")
@click.option("-q", "--quiet", is_flag=True, help="No summary.")
def virelay(files: tuple[str, ...], analyses: tuple[str, ...], out_dir: str, name: str | None, overwrite: bool,
            quiet: bool) -> None:
    """A ViRelAy project folder for OUT.h5: several OUT.h5 of the same data become one project each."""
    from lrpcli.commands.analysis.project import make_project  # lazy: keeps lrpcli --help fast

    written = make_project(list(files), list(analyses), out_dir, name=name, overwrite=overwrite)
    if not quiet:
        click.echo(f"virelay: wrote {len(written)} project file(s) to {out_dir}")
        click.echo("open with: python -m virelay " + " ".join(str(p) for p in written))
