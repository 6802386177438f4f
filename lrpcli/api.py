"""The one-call API: ``lrpcli.attribute`` (relevance for a batch) and the target -> initial relevance logic."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .composites import Composite, get
from .recorder import Recorder

Target = int | Sequence[int] | torch.Tensor | Callable[[torch.Tensor], torch.Tensor] | None


def initial_relevance(output: torch.Tensor, target: Target, seed: str = "output") -> torch.Tensor:
    """The relevance put in at the output.

    An int or a 1-d tensor of class indices selects a class (along dim 1) per sample: the result is the output
    masked to that class (``seed='output'``, the logit itself) or a one-hot (``seed='onehot'``, for gradients).
    None selects the predicted class. A tensor shaped like the output is used as is; a callable gets the output
    and returns such a tensor.
    """
    if callable(target) and not isinstance(target, torch.Tensor):
        seed_tensor = target(output)
        if not isinstance(seed_tensor, torch.Tensor) or seed_tensor.shape != output.shape:
            got = tuple(seed_tensor.shape) if isinstance(seed_tensor, torch.Tensor) else type(seed_tensor).__name__
            raise ValueError(f"target callable must return a tensor shaped like the output {tuple(output.shape)}, "
                             f"got {got}")
        return seed_tensor.to(output.dtype)
    if isinstance(target, torch.Tensor) and target.shape == output.shape and target.dim() > 1:
        return target.to(device=output.device, dtype=output.dtype)
    if output.dim() < 2:
        raise ValueError(f"class targets need an output with a class dimension (dim 1); output is "
                         f"{tuple(output.shape)}: pass a tensor shaped like the output instead")
    n, k = output.shape[0], output.shape[1]
    if target is None:
        index = output.detach().reshape(n, k, -1).sum(-1).argmax(1)
    elif isinstance(target, bool):
        raise TypeError("target: expected a class index, a tensor or a callable, got a bool")
    elif isinstance(target, int):
        index = torch.full((n,), target, dtype=torch.long, device=output.device)
    else:
        index = torch.as_tensor(target, device=output.device)
        if index.dim() != 1 or index.shape[0] != n or index.is_floating_point():
            raise ValueError(f"target: expected an int, {n} class indices, or a tensor shaped like the output "
                             f"{tuple(output.shape)}; got shape {tuple(index.shape)}")
        index = index.long()
    if bool(((index < 0) | (index >= k)).any()):
        raise ValueError(f"target: class index out of range for {k} outputs: {index.tolist()}")
    shape = (n, k) + (1,) * (output.dim() - 2)
    mask = torch.zeros(shape, dtype=output.dtype, device=output.device)
    mask.scatter_(1, index.view((n, 1) + (1,) * (output.dim() - 2)), 1.0)
    mask = mask.expand_as(output)
    return mask * output if seed == "output" else mask.clone()


def resolve_composite(composite: str | Composite | None, **params: Any) -> Composite | None:
    """A composite object from a name (with its parameters) or as given.

    ``overrides`` are checked and built here (``lrpcli.build.resolve_overrides``: the forms README's Python
    API lists), so a wrong item fails now with a message naming it, not later inside the model.
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


def resolve_overrides(overrides: Any, values: dict[str, Any] | None = None) -> list[tuple[Any, Any]]:
    """``overrides=`` as (matcher, Rule) pairs; a wrong name or value is a ValueError (a ConfigError in config
    terms), a wrong form a TypeError."""
    from .build import resolve_overrides as resolve
    from .errors import ConfigError

    try:
        return resolve(overrides, values)
    except ConfigError as err:
        raise ValueError(str(err)) from None


def attribute(model: nn.Module, x: torch.Tensor, target: Target = None,
              composite: str | Composite | None = "epsilon_gamma_box", canonizers: Sequence[Any] | None = None, *,
              epsilon: float | None = None, gamma: float | None = None, low: Any = None, high: Any = None,
              stabilizer: Any = None, zero_params: Sequence[str] | None = None, maxpool: str | None = None,
              overrides: Sequence[tuple[Any, Any]] | None = None, strict: bool | None = None,
              return_output: bool = False, create_graph: bool = False,
              layers: Sequence[str] | None = None, **params: Any) -> Any:
    """Relevance of ``x`` for ``target`` under an LRP composite; see README 'Python API'.

    Returns the relevance (shaped like x); with ``return_output`` also the model output first; with ``layers``
    (module-name globs) additionally a dict of the relevance at each matching module's output, last.
    Further keyword ``params`` go to the composite (e.g. ``beta`` of beta_smooth).
    ``composite=None`` gives the plain gradient. ``create_graph=True`` returns a relevance that can be
    differentiated with respect to x and the parameters (the rules are off for that second backward).
    """
    comp = resolve_composite(composite, epsilon=epsilon, gamma=gamma, low=low, high=high, stabilizer=stabilizer,
                             zero_params=zero_params, maxpool=maxpool, overrides=overrides, **params)
    x_in = x if x.requires_grad else x.detach().requires_grad_(True)
    maps: dict[str, torch.Tensor] = {}
    if comp is None:
        if canonizers or layers:
            raise ValueError("canonizers and layers need a composite")
        with torch.enable_grad():
            output = model(x_in)
            seed = initial_relevance(output, target, "onehot")
            (relevance,) = torch.autograd.grad(output, x_in, seed, create_graph=create_graph)
    else:
        recorder = None
        if layers:
            recorder = Recorder(layers, keep_graph=create_graph)
        with comp.context(model, canonizers=canonizers, strict=strict, recorder=recorder) as m:
            if layers:
                _check_patterns(m, layers)
            with torch.enable_grad():
                output = m(x_in)
                seed = initial_relevance(output, target, comp.seed)
                (relevance,) = torch.autograd.grad(output, x_in, seed, create_graph=create_graph)
            if recorder is not None:
                maps = recorder.ordered_maps()
    result: tuple = (relevance,)
    if return_output:
        result = (output if create_graph else output.detach(),) + result
    if layers:
        result = result + (maps,)
    return result[0] if len(result) == 1 else result


def _check_patterns(model: nn.Module, patterns: Sequence[str]) -> None:
    import fnmatch

    names = [n for n, _ in model.named_modules() if n]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            close = [n for n in names if pattern.split("*")[0] and n.startswith(pattern.split("*")[0][:3])][:5]
            raise ValueError(f"layers: no module matches {pattern!r}; modules are e.g. "
                             f"{', '.join(close or names[:5])}")
