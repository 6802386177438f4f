"""Run the configured model, canonizers and composite on a few inputs and keep everything ``debug`` reports.

One ``Session`` with a detail ``Recorder`` per run: the per-layer sums are the same numbers ``explain`` stores
in ``conservation/`` (the Recorder is the one code path for both), and the rule assignment and canonizer notes
come from the session itself. The result is a plain ``Report`` of numpy arrays, so ``stats`` can treat it
exactly like the conservation group of a stored run.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lrpcli.commands.debug.report import DETAIL_FIELDS, LayerAssignment, Report
from lrpcli.engine.hooks import UnhandledModuleWarning
from lrpcli.engine.recorder import Recorder
from lrpcli.engine.rules.base import ParamRule
from lrpcli.engine.rules.passthrough import Pass
from lrpcli.errors import ConfigError, DataError, LrpcliError, RunError
from lrpcli.explainer.data import collate, open_image_folder
from lrpcli.explainer.explainer import Explainer, TargetError, composite_from_config
from lrpcli.explainer.models import input_shape, load_model
from lrpcli.explainer.runtime import resolve_device


def collect(config: Any, data: str | Path | None = None, *, samples: int = 4, device: str | None = None,
            model: torch.nn.Module | None = None, label: str = "") -> Report:
    """Run ``config`` on ``samples`` inputs (the first images of ``data``, or seeded noise) and report.

    ``model``: an already loaded model of this config (the --zero-bias rerun reuses it); ``label`` is appended to
    the inputs line. Errors a user can cause are LrpcliError lines.
    """
    dev = resolve_device(device or config.run.device)
    x, labels, names, inputs_line = _inputs(config, data, samples)
    model = (model if model is not None else load(config)).to(dev)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    x = x.to(dev, dtype)
    comp = composite_from_config(config)
    report = _run(config, model, comp, x, labels.to(dev))
    report.inputs = inputs_line + label
    report.samples = names
    report.device = str(dev)
    return report


# ------------------------------------------------------------------------------------------------- inputs
def _inputs(config: Any, data: str | Path | None, samples: int) -> tuple[Any, Any, list[str], str]:
    """(inputs N x C x H x W, labels, names, description): the first images of DATA or seeded noise."""
    if data is None:
        shape = input_shape(config)
        generator = torch.Generator().manual_seed(int(config.run.seed))
        x = torch.randn((samples, *shape), generator=generator)
        names = [f"random[{i}]" for i in range(samples)]
        line = (f"{samples} random input{'s' if samples != 1 else ''} {tuple(shape)} "
                f"(standard normal in the normalised space, seed {config.run.seed})")
        return x, torch.full((samples,), -1, dtype=torch.long), names, line
    data = Path(data)
    dataset = open_image_folder(data, config.input)
    good, skipped = [], []
    for i in range(len(dataset)):
        sample = dataset[i]
        (skipped if sample.error else good).append(sample)
        if len(good) == samples:
            break
    if not good:
        raise DataError(f"no image under {data} could be read ({len(skipped)} skipped, e.g. "
                        f"{skipped[0].filename}: {skipped[0].error})")
    batch = collate(good).batch
    line = f"{len(good)} image{'s' if len(good) != 1 else ''} from {data}"
    if skipped:
        line += f" ({len(skipped)} unreadable skipped: {', '.join(s.filename for s in skipped[:3])})"
    return batch.inputs, batch.labels, list(batch.filenames), line


def load(config: Any) -> torch.nn.Module:
    """The config's model (eval mode, CPU)."""
    return load_model(config)


# ------------------------------------------------------------------------------------------------- the run
def _target(config: Any) -> Any:
    target = config.attribution.target
    return target if target in ("label", "prediction") else int(target)


def _check_output(output: torch.Tensor) -> None:
    if output.dim() < 2:
        raise RunError(f"the model output has shape {tuple(output.shape)}; debug needs a class dimension (dim 1) "
                       "to pick the target")


def _run(config: Any, model: Any, comp: Any, x: Any, labels: Any) -> Report:
    """All chunks of ``x`` through one session; per-chunk Recorder tables joined along the samples."""
    recorder = Recorder(detail=True)
    notes: list[str] = []
    chunks: list[dict[str, Any]] = []
    size = max(1, int(config.run.batch_size))
    # inputs without labels (seeded noise): target label explains the prediction, and the report says so
    explainer = Explainer(model, comp, target=_target(config), missing_label="prediction", recorder=recorder,
                          strict=False)
    try:
        with explainer, warnings.catch_warnings():
            warnings.simplefilter("ignore", UnhandledModuleWarning)
            for start in range(0, x.shape[0], size):
                try:
                    result = explainer(x[start:start + size], labels[start:start + size], check=_check_output)
                except TargetError as err:
                    raise ConfigError(f"{config.source}: attribution.target: {err}") from None
                if result.note and result.note not in notes:
                    notes.append(result.note)
                chunks.append(_chunk(recorder, result.initial, result.relevance))
            session = explainer.session
            bias = {a.name: session.params_of(a.module)[1] is not None
                    for a in session.coverage() if isinstance(a.rule, ParamRule)}
            coverage = session.coverage()
            canonizer_notes = list(session.notes)
    except LrpcliError:
        raise
    except Exception as err:  # the user's model, a rule that does not fit its module (rule.check)
        text = " ".join(str(err).split())[:300]
        raise RunError(f"{config.source}: running the model with composite {config.composite.name!r} on inputs of "
                       f"shape {tuple(x.shape)} failed: {type(err).__name__}: {text} (--debug shows the traceback)"
                       ) from err
    layers = list(chunks[0]["layers"])
    for chunk in chunks[1:]:
        layers += [k for k in chunk["layers"] if k not in layers]
    joined = {name: np.concatenate([_align(c, name, layers) for c in chunks]) for name in
              ("relevance_in", "relevance_out", *DETAIL_FIELDS)}
    first = {}
    for chunk in reversed(chunks):
        first.update(chunk["meta"])
    base = [k.split("#", 1)[0] for k in layers]
    return Report(
        source=str(config.source), mode="model", composite=str(config.composite.name),
        canonizers=list(config.canonizers), inputs="", samples=[], layers=layers,
        types=[first[k][0] for k in layers], rules=[first[k][1] for k in layers],
        has_bias=[bias.get(b) for b in base],
        relevance_in=joined["relevance_in"], relevance_out=joined["relevance_out"],
        output_relevance=np.concatenate([c["output_relevance"] for c in chunks]),
        input_relevance=np.concatenate([c["input_relevance"] for c in chunks]),
        details={name: joined[name] for name in DETAIL_FIELDS}, dtypes=[first[k][2] for k in layers],
        assignments=[_assignment(a) for a in coverage], notes=canonizer_notes + notes,
        gradient_space=explainer.initial != "output",
    )


def _chunk(recorder: Recorder, seed: Any, relevance: Any) -> dict[str, Any]:
    """One forward/backward's numbers as numpy, before the recorder forgets them at the next forward."""
    layers, rules, r_in, r_out = recorder.table()
    n = seed.shape[0]
    shape = (n, len(layers))
    arrays = {"relevance_in": _np(r_in, shape), "relevance_out": _np(r_out, shape)}
    arrays.update(_detail_arrays(recorder, layers, n))
    meta = {k: (recorder.types[k], rule, str(recorder.details.get(k, {}).get("dtype", "")))
            for k, rule in zip(layers, rules)}
    return {"layers": layers, "arrays": arrays, "meta": meta, "n": n,
            "output_relevance": _np(seed.detach().reshape(n, -1).sum(1, dtype=torch.float64), (n,)),
            "input_relevance": _np(relevance.detach().reshape(n, -1).sum(1, dtype=torch.float64), (n,))}


def _align(chunk: dict[str, Any], name: str, layers: list[str]) -> np.ndarray:
    arr = chunk["arrays"][name]
    if chunk["layers"] == layers:
        return arr
    out = np.full((chunk["n"], len(layers)), np.nan)
    for j, key in enumerate(chunk["layers"]):
        out[:, layers.index(key)] = arr[:, j]
    return out


def _assignment(a: Any) -> LayerAssignment:
    if a.rule is None:
        status = "none" if a.calls > 0 else "idle"
    elif isinstance(a.rule, Pass):
        status = "pass"
    else:
        status = "rule"
    return LayerAssignment(a.name, a.type_name, None if a.rule is None else repr(a.rule), status, a.calls)


def _np(t: Any, shape: tuple[int, ...]) -> np.ndarray:
    if t is None or t.numel() == 0:
        return np.full(shape, np.nan)
    return t.detach().to("cpu").numpy().astype(np.float64).reshape(shape)


def _detail_arrays(recorder: Recorder, layers: list[str], n: int) -> dict[str, np.ndarray]:
    """DETAIL_FIELDS -> N x L float arrays (NaN where a layer got no relevance): each layer's rows folded to
    the samples by the Recorder (a window-attention layer's B x windows rows summed, maxed or minned per sample,
    as its conservation sums are)."""
    out = {name: np.full((n, len(layers)), np.nan) for name in DETAIL_FIELDS}
    for j, key in enumerate(layers):
        values = recorder.sample_details(key, n)
        for name in DETAIL_FIELDS:
            if name in values:
                out[name][:, j] = values[name].numpy()
    for name in ("max", "min"):  # the Recorder's +-float64 max stands for "no finite value"
        out[name][np.abs(out[name]) >= np.finfo(np.float64).max] = np.nan
    return out
