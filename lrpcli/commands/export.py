"""The ``lrpcli export`` command: a config's attribution saved as a program (and optionally as ONNX)."""

from __future__ import annotations

import os
from pathlib import Path

import click

from lrpcli.errors import ConfigError, LrpcliError


def check_output(path: Path, option: str) -> None:
    """Refuse, before the capture, an output that cannot be written: a folder, or a missing or read-only
    parent folder."""
    if path.is_dir():
        raise LrpcliError(f"{option}: {path} is a folder; give a file name, e.g. {path / 'attributor.pt2'}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise LrpcliError(f"{option}: folder {parent} does not exist; create it or give another path")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise LrpcliError(f"{option}: cannot write {path} (permission denied); give a writable path")


def _device(text: str):
    """--device as a torch.device: cpu, cuda or cuda:N (one that exists here)."""
    import re

    from lrpcli.explainer.runtime import resolve_device

    if not re.fullmatch(r"cpu|cuda(:\d+)?", text.strip().lower()):
        raise LrpcliError(f"--device: expected cpu, cuda or cuda:N, got {text!r}")
    try:
        return resolve_device(text)
    except ConfigError as err:
        raise LrpcliError(str(err).replace("run.device", "--device")) from None


@click.command("export")
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="The program file to write (torch.export, load with torch.export.load).")
@click.option("--onnx", "onnx_path", type=click.Path(path_type=Path), default=None,
              help="Also write the program as ONNX (needs the onnx and onnxscript packages).")
@click.option("--example-size", nargs=2, type=click.IntRange(min=1), default=None, metavar="H W",
              help="Image height and width the program takes (default: input.crop, else input.resize).")
@click.option("--dynamic-batch/--static-batch", default=True, show_default=True,
              help="Any batch size, or only the example's (--batch-size).")
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True,
              help="The example's batch size: the one a --static-batch program takes.")
@click.option("--target", type=click.Choice(["class", "relevance"]), default="class", show_default=True,
              help="The program's second input: a class per sample, or the initial relevance (output-shaped).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N: where the program runs.")
def export(config: Path, output: Path, onnx_path: Path | None, example_size: tuple[int, int] | None,
           dynamic_batch: bool, batch_size: int, target: str, device: str) -> None:
    """Save CONFIG's LRP attribution as a program: (image batch, target) -> (logits, relevance).

    The model, its weights, the canonizers and the composite are baked in; the file runs with torch alone
    (torch.export.load(path).module()), without lrpcli.
    """
    from lrpcli.explainer.build import load_config  # lazy: keeps lrpcli --help fast

    check_output(output, "--output")
    if onnx_path is not None:
        check_output(onnx_path, "--onnx")
    cfg = load_config(config)
    if cfg.attribution.method != "lrp":
        raise ConfigError(f"{cfg.source}: attribution.method: export captures lrp, not {cfg.attribution.method}; "
                          "set attribution.method: lrp")
    import torch

    from lrpcli.explainer import models
    from lrpcli.explainer.explainer import composite_from_config
    from lrpcli.explainer.export_program import export as export_program
    from lrpcli.spec.config import channels as config_channels

    if example_size is None:
        try:
            channels, height, width = models.input_shape(cfg)
        except ConfigError as err:
            raise ConfigError(f"{err}, or give --example-size H W") from None
    else:
        channels, (height, width) = config_channels(cfg.input.get("mode", "RGB")), example_size
    where = _device(device)
    model = models.load_model(cfg).to(where)
    generator = torch.Generator().manual_seed(0)
    example = torch.randn((batch_size, channels, height, width), generator=generator).to(where)
    program = export_program(model, composite_from_config(cfg), example=example, dynamic_batch=dynamic_batch,
                             target=target)
    try:
        torch.export.save(program, output)
    except OSError as err:
        raise LrpcliError(f"--output: cannot write {output}: {err.strerror or err}") from None
    click.echo(f"wrote {output}: (x [{'N' if dynamic_batch else batch_size}, {channels}, {height}, {width}], "
               f"{'class per sample' if target == 'class' else 'initial relevance'}) -> (logits, relevance)")
    if onnx_path is not None:
        from lrpcli.explainer.export_onnx import save_onnx

        save_onnx(program, onnx_path)
        click.echo(f"wrote {onnx_path}")
