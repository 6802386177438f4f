"""From a validated config to engine objects: composite keywords, override rules, bounds, baseline.

The config schema (``lrpcli.spec.schema``) knows names only; this module imports the engine and hands the schema the
checks that need it (``ENGINE_CHECKS``: a torchvision model name, a module class, a rule's own parameter checks).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NoReturn

import torch

from lrpcli.catalogue import PARAMS
from lrpcli.engine import canonizers, modules, rules
from lrpcli.engine.composites import Glob
from lrpcli.errors import ConfigError
from lrpcli.explainer.models import check_model_name
from lrpcli.spec.config import Config, check_rule_spec, check_rules, read_config
from lrpcli.spec.schema import EngineChecks, bounds_value
from lrpcli.spec.values import Bad, did_you_mean, show

__all__ = ["load_config", "ENGINE_CHECKS", "composite_kwargs", "make_override_rules", "resolve_overrides",
           "resolve_bounds", "resolve_baseline", "resolve_module_type"]


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Config:
    """Read and validate a config file (``lrpcli.spec.config.read_config``) with the checks that need the engine."""
    return read_config(path, overrides, ENGINE_CHECKS)


def _refuse(message: str) -> NoReturn:
    raise Bad(message)


def _fail(source: str, path: str, message: str) -> NoReturn:
    raise ConfigError(f"{source}: {path}: {message}")


def resolve_bounds(config: Mapping) -> tuple[Any, Any]:
    """``(low, high)`` of the composite in normalised input space: a float, or a float32 tensor of shape (C,).

    ``auto`` is the normalised value of pixel 0.0 (low) and pixel 1.0 (high) per channel, (0 - mean) / std
    and (1 - mean) / std, so ZBox bounds follow the preprocessing without the user computing them.
    """
    inp, comp = config["input"], config["composite"]
    out = []
    for which in ("low", "high"):
        spec = "auto" if comp[which] is None else comp[which]
        out.append(_as_bound(bounds_value(spec, which, list(inp["mean"]), list(inp["std"]))))
    return out[0], out[1]


def _as_bound(value: Any) -> Any:
    return torch.tensor(list(value), dtype=torch.float32) if isinstance(value, list | tuple) else float(value)


def resolve_baseline(config: Mapping) -> Any:
    """The integrated-gradients baseline in normalised input space: a float or a (C, 1, 1) tensor.

    ``zeros`` is 0 after normalisation, ``black``/``white`` the normalised pixel 0.0/1.0 per channel (shaped
    to broadcast against an (N, C, H, W) batch), a number is used as is.
    """
    inp, baseline = config["input"], config["attribution"]["baseline"]
    if baseline == "zeros":
        return 0.0
    if baseline in ("black", "white"):
        value = bounds_value("auto", "low" if baseline == "black" else "high", list(inp["mean"]), list(inp["std"]))
        return torch.tensor(value, dtype=torch.float32).view(-1, 1, 1)
    return float(baseline)


def _is_module(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, torch.nn.Module)


def resolve_module_type(name: str, fail: Callable[[str], NoReturn] | None = None) -> type:
    """A module class by name: ``torch.nn.<name>``, an lrpcli layer (e.g. ``Sum``) or ``pkg.mod.Class``."""

    def _fail(msg: str) -> NoReturn:
        if fail is not None:
            fail(msg)
        raise ConfigError(msg)

    if "." in name:
        module_name, _, attr = name.rpartition(".")
        try:  # a user's module class, named in the config
            obj = getattr(importlib.import_module(module_name), attr, None)
        except ImportError as err:
            _fail(f"cannot import {module_name!r} for module type {name!r}: {err}")
        if not _is_module(obj):
            _fail(f"{name!r} is not a torch.nn.Module class")
        return obj
    for namespace in (torch.nn, modules, canonizers):
        obj = getattr(namespace, name, None)
        if _is_module(obj):
            return obj
    candidates = [n for n in dir(torch.nn) if _is_module(getattr(torch.nn, n, None))] + ["Sum"]
    _fail(
        f"unknown module type {name!r}{did_you_mean(name, candidates)} "
        "(a torch.nn class name such as Linear or Conv2d, an lrpcli layer such as Sum, or pkg.module.Class)"
    )


def make_override_rules(config: Mapping) -> list[tuple[Any, Any]]:
    """The composite's rule overrides as ``(matcher, rule)``: a glob string (``match``) or a class (``type``).

    Rules are built fresh on every call, so contexts never share rule state.
    """
    comp, inp = config["composite"], config["input"]
    source = getattr(config, "source", "config")
    out = []
    for i, item in enumerate(comp["rules"]):
        path = f"composite.rules[{i}]"
        if "match" in item:
            matcher = Glob(item["match"], f"{source}: {path}.match")
        else:
            matcher = resolve_module_type(item["type"], lambda msg, p=f"{path}.type": _fail(source, p, msg))
        out.append((matcher, _build_rule(item["rule"], comp, inp)))
    return out


def resolve_overrides(items: Any, values: Mapping[str, Any] | None = None,
                      source: str = "lrpcli.attribute") -> list[tuple[Any, Any]]:
    """The Python API's ``overrides=`` as ``(matcher, rule)`` pairs, refusing anything else.

    Each item is a pair ``(glob or nn.Module class or tuple of classes, rule)`` whose rule is a Rule, a rule
    name or ``{name: ..., param: value}``, or a config-style mapping ``{match: glob, rule: ...}`` /
    ``{type: Class or name, rule: ...}``. Names and mappings are checked and built by the same code as
    ``composite.rules``; parameters a rule does not set come from ``values`` (the composite's epsilon, gamma,
    low, high, stabilizer, zero_params where given) or the config defaults. Bad items raise TypeError
    (wrong form) or ConfigError (a wrong name or value) naming ``overrides[i]``.
    """
    if isinstance(items, str | bytes | Mapping) or not isinstance(items, list | tuple):
        raise TypeError(f"{source}: overrides: expected a list of (glob or module class, rule) pairs or "
                        f"{{match: glob, rule: ...}} mappings, got {type(items).__name__}")
    comp, inp = _api_composite(values or {})
    out = []
    for i, item in enumerate(items):
        path = f"overrides[{i}]"
        if isinstance(item, Mapping):
            item = dict(item)
            given_type = item.get("type")
            if _is_module(given_type):
                item["type"] = "Module"  # validated below as a stand-in; the class itself is used
            (entry,) = check_rules(source, [item], comp, inp, ENGINE_CHECKS, prefix="overrides", offset=i)
            if "match" in entry:
                matcher = Glob(entry["match"], f"{source}: {path}.match")
            else:
                matcher = given_type if _is_module(given_type) else resolve_module_type(
                    entry["type"], lambda msg, p=f"{path}.type": _fail(source, p, msg))
            out.append((matcher, _build_rule(entry["rule"], comp, inp)))
            continue
        if not isinstance(item, list | tuple) or len(item) != 2:
            raise TypeError(f"{source}: {path}: expected a (glob or module class, rule) pair or a mapping "
                            f"{{match: glob, rule: ...}}, got {show(item) if isinstance(item, str) else repr(item)}")
        matcher, rule = item
        if not _is_matcher(matcher):
            raise TypeError(f"{source}: {path}: expected a module-name glob, an nn.Module class or a tuple of "
                            f"them first, got {matcher!r}")
        if isinstance(matcher, str):
            matcher = Glob(matcher, f"{source}: {path}[0]")
        if isinstance(rule, rules.Rule):
            out.append((matcher, rule))
        elif isinstance(rule, str | Mapping):
            spec = check_rule_spec(source, f"{path}[1]", rule, comp, inp, ENGINE_CHECKS)
            out.append((matcher, _build_rule(spec, comp, inp)))
        else:
            raise TypeError(f"{source}: {path}: expected a Rule (e.g. lrpcli.rules.Epsilon(0.25)), a rule name or "
                            f"{{'name': ..., param: value}} second, got {rule!r}")
    return out


def _is_matcher(value: Any) -> bool:
    if isinstance(value, str):
        return bool(value.strip())
    if isinstance(value, tuple):
        return bool(value) and all(_is_module(v) for v in value)
    return _is_module(value)


def _api_composite(values: Mapping[str, Any]) -> tuple[dict, dict]:
    """Composite-level values for API override rules and the input they assume: those given, else the
    defaults of ``lrpcli.attribute`` (ZBox bounds -3 and 3; a per-channel tensor bound sets the channels)."""
    comp: dict[str, Any] = {k: PARAMS[k].builder_default() for k in ("epsilon", "gamma", "zero_params",
                                                                      "stabilizer", "low", "high")}
    channels = 3
    for key in ("epsilon", "gamma", "low", "high"):
        value = values.get(key)
        if hasattr(value, "tolist"):  # a tensor: a number or one per channel
            value = value.tolist()
        if isinstance(value, list | tuple) and key in ("low", "high"):
            channels = len(value)
            comp[key] = [float(v) for v in value]
        elif isinstance(value, int | float) and not isinstance(value, bool):
            comp[key] = float(value)
    for key in ("low", "high"):
        if not isinstance(comp[key], list):
            comp[key] = float(comp[key])
    if values.get("zero_params") is not None:
        comp["zero_params"] = list(values["zero_params"])
    stabilizer = values.get("stabilizer")
    if stabilizer is not None and hasattr(stabilizer, "epsilon") and hasattr(stabilizer, "mode"):
        comp["stabilizer"] = {"epsilon": stabilizer.epsilon, "mode": stabilizer.mode}
    elif isinstance(stabilizer, int | float) and not isinstance(stabilizer, bool):
        comp["stabilizer"] = {"epsilon": float(stabilizer), "mode": "sign"}
    return comp, {"mean": [0.0] * channels, "std": [1.0] * channels}


def _build_rule(spec: Any, comp: Mapping, inp: Mapping) -> Any:
    """A validated rule spec (a name or ``{name: ..., **params}``) as a fresh Rule."""
    if isinstance(spec, str):
        return rules.make(spec, **_rule_kwargs(spec, {}, comp, inp))
    params = {k: v for k, v in spec.items() if k != "name"}
    return rules.make(spec["name"], **_rule_kwargs(spec["name"], params, comp, inp))


def _accepted_params(name: str) -> set[str]:
    """The keyword parameters rule ``name`` accepts (from its class signature)."""
    return {p for p in inspect.signature(rules.RULES[name].__init__).parameters if p != "self"}


def _rule_kwargs(name: str, params: Mapping, comp: Mapping, inp: Mapping) -> dict:
    """Keyword arguments for ``rules.make``: the rule's own params, composite-level values as defaults.

    Composite-level epsilon/gamma/low/high/stabilizer/zero_params reach an override rule for the parameters
    it accepts and did not set itself, so ``{type: Linear, rule: epsilon}`` uses composite.epsilon and
    ``{match: features.0, rule: zbox}`` gets the input's ``auto`` bounds.
    """
    accepted = _accepted_params(name)
    kwargs: dict[str, Any] = {}
    for key in ("epsilon", "gamma", "low", "high", "stabilizer", "zero_params"):
        if key in accepted and key not in params:
            value = comp.get(key)
            if value is None and key in ("low", "high"):
                value = "auto"
            if value is not None:
                kwargs[key] = value
    kwargs.update(params)
    for key in ("low", "high"):
        if key in kwargs:
            kwargs[key] = _as_bound(bounds_value(kwargs[key], key, list(inp["mean"]), list(inp["std"])))
    if isinstance(kwargs.get("stabilizer"), Mapping):
        kwargs["stabilizer"] = rules.Stabilizer(kwargs["stabilizer"]["epsilon"], kwargs["stabilizer"]["mode"])
    if "zero_params" in kwargs:
        kwargs["zero_params"] = list(kwargs["zero_params"])
    return kwargs


def composite_kwargs(config: Mapping) -> dict[str, Any]:
    """Keyword arguments for ``lrpcli.engine.composites.get(config.composite.name, **kwargs)``.

    Only the parameters the composite uses (its others are null in the resolved config), as declared in
    ``lrpcli.catalogue.PARAMS``: low/high as floats or (C,) float32 tensors, stabilizer as an
    ``lrpcli.engine.rules.Stabilizer``; always canonizers (names), overrides (``make_override_rules``) and strict.
    """
    comp = config["composite"]
    kwargs = {k: comp[k] for k in PARAMS if comp[k] is not None}
    if "low" in kwargs and "high" in kwargs:
        kwargs["low"], kwargs["high"] = resolve_bounds(config)
    if "stabilizer" in kwargs:
        kwargs["stabilizer"] = rules.Stabilizer(kwargs["stabilizer"]["epsilon"], kwargs["stabilizer"]["mode"])
    if "zero_params" in kwargs:
        kwargs["zero_params"] = list(kwargs["zero_params"])
    kwargs["canonizers"] = list(config["canonizers"])
    kwargs["overrides"] = make_override_rules(config) if comp["rules"] else []
    kwargs["strict"] = bool(comp["strict"])
    return kwargs


#: The checks the config schema leaves to the engine: the rule check builds the rule once.
ENGINE_CHECKS = EngineChecks(
    model_name=lambda name: check_model_name(name, _refuse),
    module_type=lambda name: resolve_module_type(name, _refuse),
    rule=lambda name, params, comp, inp: rules.make(name, **_rule_kwargs(name, params, comp, inp)),
)
