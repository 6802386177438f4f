"""The attribution step: one object that turns a batch into an ``Attribution``.

Everything that attributes goes through ``Explainer``: ``lrpcli.attribute``, the attributors, the ``explain``
runner (one context for the whole run, so canonizers are applied and hooks registered once) and ``debug``.
It sits above the engine (rules, hooks, composites, canonizers, recorder) and below the runner; the engine never
imports it. Targets are resolved in one place, ``resolve_target``, so every caller means the same by "label",
"prediction", a class index or a tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from lrpcli.engine.composites import Composite, get
from lrpcli.engine.recorder import Recorder
from lrpcli.errors import ConfigError, LrpcliError
from lrpcli.explainer import methods
from lrpcli.explainer.build import composite_kwargs, resolve_baseline
from lrpcli.explainer.build import resolve_overrides as _config_overrides

Target = (int | str | Sequence[int] | torch.Tensor | Callable[[torch.Tensor], torch.Tensor] | None)

#: The methods an Explainer runs; "gradient" is LRP where a composite is given (the rules modify the gradient).
METHODS = ("gradient", "input_x_gradient", "smoothgrad", "integrated_gradients", "occlusion")

#: Each method's options and their defaults (the keyword arguments ``Explainer`` takes for it).
METHOD_OPTIONS: dict[str, dict[str, Any]] = {
    "gradient": {},
    "input_x_gradient": {},
    "smoothgrad": {"noise_level": 0.1, "n_iter": 20, "seed": 0, "memory_budget": methods.DEFAULT_BUDGET},
    "integrated_gradients": {"baseline": None, "n_iter": 20, "memory_budget": methods.DEFAULT_BUDGET},
    "occlusion": {"window": 8, "stride": None, "fill": 0.0, "memory_budget": methods.DEFAULT_BUDGET},
}

NO_LABELS_NOTE = "attribution.target is label, but these inputs have no labels: explaining the prediction"


class TargetError(ValueError):
    """A target that does not fit the output (also a ValueError, or a TypeError for a wrong form), so callers
    can tell it from a failure of the model itself."""


class _TargetTypeError(TargetError, TypeError):
    pass


# ------------------------------------------------------------------------------------------------- targets
def predicted(output: torch.Tensor) -> torch.Tensor:
    """The predicted class per sample: argmax over dim 1 of the output summed over any further dims."""
    return output.detach().reshape(output.shape[0], output.shape[1], -1).sum(-1).argmax(1)


def resolve_target(output: torch.Tensor, target: Target, labels: torch.Tensor | None = None, *,
                   missing_label: Literal["error", "prediction"] = "error") -> tuple[torch.Tensor, str | None]:
    """``(target, note)``: class indices (a 1-d long tensor on the output's device), or a floating tensor
    shaped like the output that is the initial relevance as is; ``note`` says where a policy stepped in.

    ``target``: "label" (``labels``), "prediction" or None (``predicted``), an int (that class for every
    sample), a sequence or 1-d tensor of class indices, a tensor shaped like the output, or a callable of the
    output returning such a tensor. ``missing_label`` is what "label" does where the inputs have no labels
    (``labels`` None or negative, as for seeded noise): "error" raises, "prediction" explains the prediction
    and says so in the note.
    """
    if callable(target) and not isinstance(target, torch.Tensor):
        given = target(output)
        if not isinstance(given, torch.Tensor) or given.shape != output.shape:
            got = tuple(given.shape) if isinstance(given, torch.Tensor) else type(given).__name__
            raise TargetError(f"target callable must return a tensor shaped like the output {tuple(output.shape)}, "
                              f"got {got}")
        return given.to(output.dtype), None
    if isinstance(target, torch.Tensor) and target.shape == output.shape and target.dim() > 1:
        return target.to(device=output.device, dtype=output.dtype), None
    if output.dim() < 2:
        raise TargetError(f"class targets need an output with a class dimension (dim 1); output is "
                          f"{tuple(output.shape)}: pass a tensor shaped like the output instead")
    n, k = output.shape[0], output.shape[1]
    note = None
    if isinstance(target, str) and target == "label":
        if labels is None or bool((torch.as_tensor(labels) < 0).any()):
            if missing_label != "prediction":
                raise TargetError("target: label needs the inputs' class labels, and these inputs have none; "
                                  "give labels, or explain the prediction")
            target, note = None, NO_LABELS_NOTE
        else:
            target = labels
    if target is None or (isinstance(target, str) and target == "prediction"):
        index = predicted(output)
    elif isinstance(target, bool):
        raise _TargetTypeError("target: expected a class index, a tensor or a callable, got a bool")
    elif isinstance(target, int):
        index = torch.full((n,), target, dtype=torch.long, device=output.device)
    else:
        index = torch.as_tensor(target, device=output.device) if not isinstance(target, str) else None
        if index is None or index.dim() != 1 or index.shape[0] != n or index.is_floating_point():
            got = repr(target) if index is None else f"shape {tuple(index.shape)}"
            raise TargetError(f"target: expected an int, {n} class indices, or a tensor shaped like the output "
                              f"{tuple(output.shape)}; got {got}")
        index = index.long()
    if bool(((index < 0) | (index >= k)).any()):
        raise TargetError(f"target: class index out of range for {k} outputs: {index.tolist()}")
    return index, note


def _initial(output: torch.Tensor, target: torch.Tensor, initial: str) -> torch.Tensor:
    """The initial relevance from a resolved target: a floating tensor as is, else the output masked to the
    class (``initial='output'``) or a one-hot (``'onehot'``)."""
    if target.is_floating_point():
        return target
    n = output.shape[0]
    shape = (n, output.shape[1]) + (1,) * (output.dim() - 2)
    mask = torch.zeros(shape, dtype=output.dtype, device=output.device)
    mask.scatter_(1, target.view((n, 1) + (1,) * (output.dim() - 2)), 1.0)
    mask = mask.expand_as(output)
    return mask * output if initial == "output" else mask.clone()


def initial_relevance(output: torch.Tensor, target: Target, initial: str = "output") -> torch.Tensor:
    """The relevance put in at the output for ``target`` (any form ``resolve_target`` takes, but "label").

    A class target gives the output masked to that class (``initial='output'``, the logit itself) or a one-hot
    (``initial='onehot'``, for gradients); a tensor shaped like the output, or a callable's, is used as is.
    """
    return _initial(output, resolve_target(output, target)[0], initial)


# ------------------------------------------------------------------------------------------------- composites
def resolve_overrides(overrides: Any, values: dict[str, Any] | None = None) -> list[tuple[Any, Any]]:
    """``overrides=`` as (matcher, Rule) pairs; a wrong name or value is a ValueError (a ConfigError in config
    terms), a wrong form a TypeError."""
    try:
        return _config_overrides(overrides, values)
    except ConfigError as err:
        raise ValueError(str(err)) from None


def resolve_composite(composite: str | Composite | None, **params: Any) -> Composite | None:
    """A composite object from a name (with its parameters) or as given.

    ``overrides`` are checked and built here (the forms README's Python API lists), so a wrong item fails now
    with a message naming it, not later inside the model.
    """
    given = {k: v for k, v in params.items() if v is not None}
    if "overrides" in given:
        given["overrides"] = resolve_overrides(given["overrides"], given)
    if composite is None or isinstance(composite, Composite):
        if given:
            raise ValueError(f"{', '.join(sorted(given))}: only apply with a composite name; build the composite "
                             "object with them instead")
        return composite
    if not isinstance(composite, str):
        raise TypeError(f"composite: expected a name or a Composite, got {type(composite).__name__}")
    return get(composite, **given)


def composite_from_config(config: Any) -> Composite:
    """The config's composite (its canonizers, overrides and strictness included)."""
    try:
        return get(config.composite.name, **composite_kwargs(config))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{config.source}: composite: {err}") from None


def method_options(config: Any) -> dict[str, Any]:
    """The config's options for its (non-LRP) method, as ``Explainer`` keywords."""
    att = config.attribution
    if att.method == "smoothgrad":
        return {"noise_level": att.noise_level, "n_iter": att.n_iter, "seed": config.run.seed}
    if att.method == "integrated_gradients":
        return {"n_iter": att.n_iter, "baseline": resolve_baseline(config)}
    if att.method == "occlusion":
        return {"window": list(att.window), "stride": list(att.stride), "fill": att.fill}
    return {}


# ------------------------------------------------------------------------------------------------- the step
@dataclass
class Attribution:
    """One batch's attribution.

    ``output``: the model output (the prediction); ``target``: the resolved target (class indices, or the
    initial relevance given as a tensor); ``relevance``: shaped like the input; ``initial``: the relevance put in
    at the output (single-backward methods); ``layers``: the recorder's per-layer maps; ``note``: where the
    target policy stepped in (e.g. no labels: the prediction).
    """

    output: torch.Tensor
    target: torch.Tensor
    relevance: torch.Tensor
    initial: torch.Tensor | None = None
    layers: dict[str, torch.Tensor] = field(default_factory=dict)
    note: str | None = None


class Explainer:
    """Model, composite (None: the plain gradient), canonizers, recorder, target policy and method, with one
    call per batch: ``explainer(x, labels) -> Attribution``.

    Used as a context manager, the composite's context (hooks, canonizers) stays entered across calls; a call
    outside one enters and leaves it for that call. ``method`` is one of ``METHODS`` with the options of
    ``METHOD_OPTIONS``; with a composite, "gradient" is LRP and the other methods use the relevance where they
    use a gradient (occlusion needs no backward and ignores the composite). ``target`` and ``missing_label`` are
    ``resolve_target``'s. ``recorder`` (single-backward methods with a composite) collects per-layer sums and
    maps; ``create_graph`` keeps the relevance differentiable.
    """

    def __init__(self, model: nn.Module, composite: Composite | None = None, canonizers: Sequence[Any] | None = None,
                 *, method: str = "gradient", target: Target = None,
                 missing_label: Literal["error", "prediction"] = "error", recorder: Recorder | None = None,
                 strict: bool | None = None, create_graph: bool = False, **options: Any) -> None:
        if method not in METHODS:
            raise ValueError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")
        unknown = sorted(set(options) - set(METHOD_OPTIONS[method]))
        if unknown:
            raise TypeError(f"{method}: unexpected option {', '.join(unknown)}; its options: "
                            f"{', '.join(METHOD_OPTIONS[method]) or 'none'}")
        if recorder is not None and (composite is None or method not in ("gradient", "input_x_gradient")):
            raise ValueError("a recorder needs a composite and a single-backward method (gradient, input_x_gradient)")
        self.options = {**METHOD_OPTIONS[method], **options}
        if method == "smoothgrad":
            methods.check_smoothgrad(self.options["noise_level"], self.options["n_iter"])
        elif method == "integrated_gradients":
            methods.check_integrated_gradients(self.options["n_iter"])
        self.original, self.composite, self.canonizers = model, composite, canonizers
        self.method, self.target, self.missing_label = method, target, missing_label
        self.recorder, self.strict, self.create_graph = recorder, strict, create_graph
        self.initial = "onehot" if composite is None else composite.seed
        self.session: Any = None  # the composite's context while entered
        self.model: nn.Module | None = None  # the model to call while entered (hooked, canonized)

    @classmethod
    def from_config(cls, config: Any, model: nn.Module, *, recorder: Recorder | None = None,
                    missing_label: Literal["error", "prediction"] = "error") -> Explainer:
        """The config's attribution: its method (LRP with its composite) and target."""
        att = config.attribution
        target = att.target if att.target in ("label", "prediction") else int(att.target)
        if att.method == "lrp":
            return cls(model, composite_from_config(config), method="gradient", target=target,
                       missing_label=missing_label, recorder=recorder)
        return cls(model, method=att.method, target=target, missing_label=missing_label, **method_options(config))

    def __enter__(self) -> Explainer:
        if self.model is not None:
            raise RuntimeError("lrpcli: an Explainer is entered once at a time")
        if self.composite is not None and self.method != "occlusion":
            session = self.composite.context(self.original, canonizers=self.canonizers, strict=self.strict,
                                             recorder=self.recorder)
            self.model = session.__enter__()
            self.session = session
        else:
            self.model = self.original
        return self

    def __exit__(self, *exc: object) -> None:
        session, self.session, self.model = self.session, None, None
        if session is not None:
            session.__exit__(*exc)

    def __call__(self, x: torch.Tensor, labels: torch.Tensor | None = None, *,
                 check: Callable[[torch.Tensor], None] | None = None,
                 forward_error: Callable[[Exception], Exception] | None = None) -> Attribution:
        """The attribution of batch ``x`` (``labels``: its class labels, for target "label").

        ``check`` is called with the output of the first forward, before the target is resolved;
        ``forward_error`` turns a failure of that forward (other than an LrpcliError) into the exception to
        raise, chained to it.
        """
        if self.model is None:
            with self:
                return self(x, labels, check=check, forward_error=forward_error)
        if self.method in ("gradient", "input_x_gradient"):
            return self._single(x, labels, check, forward_error)
        return self._repeated(x, labels, check, forward_error)

    def _forward(self, model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                 check: Callable[[torch.Tensor], None] | None,
                 forward_error: Callable[[Exception], Exception] | None) -> torch.Tensor:
        try:
            output = model(x)
        except LrpcliError:
            raise
        except Exception as err:
            if forward_error is None:
                raise
            raise forward_error(err) from err
        if check is not None:
            check(output)
        return output

    def _single(self, x: torch.Tensor, labels: torch.Tensor | None, check: Any, forward_error: Any) -> Attribution:
        """One forward and one backward: the (modified) gradient, or x times it."""
        xi = x if x.requires_grad else x.detach().requires_grad_(True)
        with torch.enable_grad():
            output = self._forward(self.model, xi, check, forward_error)
            target, note = resolve_target(output, self.target, labels, missing_label=self.missing_label)
            initial = _initial(output, target, self.initial)
            (grad,) = torch.autograd.grad(output, xi, initial, create_graph=self.create_graph)
        relevance = x.detach() * grad if self.method == "input_x_gradient" else grad
        maps = self.recorder.ordered_maps() if self.recorder is not None else {}
        return Attribution(output if self.create_graph else output.detach(), target, relevance, initial, maps, note)

    def _clean_output(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.original(x)

    def _signal(self, x: torch.Tensor, target: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward and backward of a batch of copies, for the methods that sum over many."""
        xi = x.detach().requires_grad_(True)
        with torch.enable_grad():
            out = self.model(xi)
            (grad,) = torch.autograd.grad(out, xi, initial_relevance(out, target, self.initial))
        return out.detach(), grad

    def _repeated(self, x: torch.Tensor, labels: torch.Tensor | None, check: Any, forward_error: Any) -> Attribution:
        """smoothgrad, integrated gradients and occlusion: the output and target from the clean input, which
        then stays fixed over noise, steps and windows (a callable target is applied to each forward)."""
        o = self.options
        window = stride = None
        if self.method == "occlusion":  # a bad window fails before any work
            window, stride = methods.occlusion_windows(x, o["window"], o["stride"])
        output = self._forward(self._clean_output, x, check, forward_error)
        target, note = resolve_target(output, self.target, labels, missing_label=self.missing_label)
        each = self.target if callable(self.target) and not isinstance(self.target, torch.Tensor) else target
        if self.method == "smoothgrad":
            scale, noise = methods.smoothgrad_noise(x, o["noise_level"], o["n_iter"], o["seed"])
            relevance = methods.smoothgrad(self._signal, x, each, scale, noise, o["memory_budget"])
        elif self.method == "integrated_gradients":
            relevance = methods.integrated_gradients(self._signal, x, each, o["baseline"], o["n_iter"],
                                                     o["memory_budget"])
        else:
            onehot = _initial(output, target, "onehot")
            relevance = methods.occlusion(self.original, x, output, onehot, window, stride, o["fill"],
                                          o["memory_budget"])
        return Attribution(output, target, relevance, None, {}, note)

