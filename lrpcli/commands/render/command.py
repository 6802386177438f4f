"""``lrpcli render``: the click command, kept thin; the work is in ``lrpcli.commands.render.pipeline``.

Heavy imports (numpy, h5py, Pillow) happen inside the command so ``lrpcli --help`` stays instant.
"""

from __future__ import annotations

from pathlib import Path

import click

from lrpcli.errors import DataError

_SWATCH_FORMATS = {".png": "png", ".webp": "webp", ".jpg": "jpg", ".jpeg": "jpg"}


def _list_cmaps(cmap: str | None, swatch_file: str | None) -> None:
    """Print the named palettes (and a custom --cmap spec); optionally write a swatch strip image."""
    from lrpcli.commands.render import images, palettes  # lazy: keeps lrpcli --help fast

    luts = {}
    width = max(len(n) for n in palettes.PALETTES)
    for name, named in palettes.PALETTES.items():
        kind = "signed" if named.signed else "unsigned"
        click.echo(f"{name:<{width}}  {kind:<8}  {named.spec:<32}  {named.description}")
        luts[name] = palettes.palette(name)
    if cmap is not None and cmap.strip().lower() not in palettes.PALETTES:
        try:
            luts["custom"] = palettes.palette(cmap)
        except DataError as err:
            raise DataError(f"--cmap: {err}") from None
        click.echo(f"{'custom':<{width}}  {'signed' if palettes.is_signed(cmap) else 'unsigned':<8}  {cmap}")
    click.echo(
        "custom palettes: --cmap 'STOP,STOP,...', STOP = [POS:]COLOUR, COLOUR = rgb or rrggbb hex, "
        f"POS = hex 00-ff (80 = centre), e.g. '{palettes.EXAMPLE_SPEC}'"
    )
    if swatch_file:
        fmt = _SWATCH_FORMATS.get(Path(swatch_file).suffix.lower())
        if fmt is None:
            raise DataError(f"--swatches {swatch_file}: use a .png, .webp or .jpg file name")
        try:
            images.save(images.swatches(luts), swatch_file, fmt)
        except OSError as err:
            raise DataError(f"--swatches {swatch_file}: cannot write ({err.strerror or err})") from None
        click.echo(f"wrote {swatch_file}")


@click.command("render", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("file", metavar="OUT.h5", required=False)
@click.option("-d", "--dir", "out_dir", metavar="DIR",
              help="Output folder [default: OUT_heatmaps next to OUT.h5].")
@click.option("--cmap", default=None, metavar="NAME|SPEC",
              help="Palette name (see --list-cmaps) or colour-stop spec like '0ff,00f,80:000,f00,ff0,fff' "
                   "[default: coldnhot].")
@click.option("--norm", type=click.Choice(["symmetric", "absolute", "unaligned"]), default="symmetric",
              show_default=True, help="Per-sample normalisation: symmetric puts 0 at the palette centre.")
@click.option("--level", type=float, default=1.0, show_default=True,
              help="Values are divided by (max|R| / LEVEL) before clipping: > 1 saturates, < 1 dims.")
@click.option("--clip", type=float, default=None, metavar="P",
              help="Use the P-th percentile of |R| instead of the max (e.g. 99.5) for heavy-tailed maps.")
@click.option("--overlay", type=float, default=None, metavar="ALPHA",
              help="Blend the heatmap over the stored input image: ALPHA * heat + (1 - ALPHA) * image.")
@click.option("--overlay-alpha", type=click.Choice(["constant", "relevance"]), default="constant",
              show_default=True,
              help="relevance: each pixel's ALPHA is scaled by its |R| (0 at zero relevance, which shows the "
                   "image; full ALPHA at max|R| / LEVEL); alone it implies --overlay 1.")
@click.option("--grid", is_flag=True, help="Write one montage DIR/grid.FORMAT of the selection, labelled.")
@click.option("--columns", type=int, default=None, help="Tiles per grid row [default: ceil(sqrt(n))].")
@click.option("--grid-label", default=None, metavar="TEMPLATE",
              help="Text under each grid tile; {label_name} and {target_name} are class names where the "
                   "file has them [default: '#{index} y={label_name} t={target_name}'].")
@click.option("--select", "selection", default=None, metavar="SPEC",
              help="Rows to render: 0:16, 3,7,9, label=3, target=3, index=3, file=GLOB or *.jpg "
                   "[default: all].")
@click.option("--format", "fmt", type=click.Choice(["png", "webp", "jpg"]), default="png", show_default=True,
              help="Image format: png is lossless (palette PNG without --overlay).")
@click.option("--name", default=None, metavar="TEMPLATE",
              help="File name per sample from {row} {index} {label} {target} {label_name} {target_name} "
                   "{file} {stem} {layer} [default: '{index:05d}_{label}_{target}', with --layer "
                   "'{index:05d}_{label}_{target}_{layer}'].")
@click.option("--layer", default=None, metavar="NAME",
              help="Render layers/NAME (a hidden layer's relevance) instead of attribution, resized to the "
                   "input size.")
@click.option("--resample", type=click.Choice(["nearest", "bilinear"]), default="nearest", show_default=True,
              help="How --layer maps are resized.")
@click.option("--list-cmaps", is_flag=True, help="List the palettes and exit.")
@click.option("--swatches", metavar="FILE", default=None,
              help="With --list-cmaps: write a swatch strip image.")
@click.option("-j", "--jobs", type=int, default=0, show_default=True,
              help="Worker processes, >= 0; 0: one per CPU (max 8) when there are 128 files or more.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")
def render(
    file: str | None, out_dir: str | None, cmap: str | None, norm: str, level: float, clip: float | None,
    overlay: float | None, overlay_alpha: str, grid: bool, columns: int | None, grid_label: str | None,
    selection: str | None, fmt: str, name: str | None, layer: str | None, resample: str, list_cmaps: bool,
    swatches: str | None, jobs: int, quiet: bool,
) -> None:
    """Heatmap images from the relevances stored in OUT.h5 (written by 'lrpcli explain')."""
    if list_cmaps or swatches:
        _list_cmaps(cmap, swatches)
        return
    if file is None:
        raise click.UsageError("Missing argument 'OUT.h5' (or use --list-cmaps).")

    from lrpcli.commands.render.pipeline import (  # lazy: keeps lrpcli --help fast
        DEFAULT_GRID_LABEL,
        RenderOptions,
        render_file,
    )

    opts = RenderOptions(
        cmap="coldnhot" if cmap is None else cmap, norm=norm, level=level, clip=clip, overlay=overlay,
        overlay_alpha=overlay_alpha, grid=grid, columns=columns, select=selection, fmt=fmt, name=name,
        grid_label=DEFAULT_GRID_LABEL if grid_label is None else grid_label, layer=layer, resample=resample,
        jobs=jobs, progress=False if quiet else None,
    )
    target = Path(out_dir) if out_dir else Path(file).with_name(Path(file).stem + "_heatmaps")
    result = render_file(file, target, opts)
    if not quiet:
        if grid:
            click.echo(f"render: wrote {result.files[0]} ({result.samples} tiles)")
        else:
            click.echo(f"render: wrote {len(result.files)} {fmt} files to {result.out_dir}")
