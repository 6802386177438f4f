"""Composites by name (``get``, ``names``) and the building blocks to make new ones."""

from __future__ import annotations

from typing import Any

from .base import Composite, FirstLayer, Glob, LayerMap, Mixture, NameMap
from .builtin import BUILDERS, COMMON, DESCRIPTIONS, PARAMETERS, basics


def names() -> list[str]:
    """The registered composite names."""
    return sorted(BUILDERS)


def parameters(name: str) -> tuple[str, ...]:
    """The keyword parameters composite ``name`` uses (besides canonizers, strict and overrides)."""
    return PARAMETERS[_check(name)]


def describe(name: str) -> str:
    return DESCRIPTIONS[_check(name)]


def _check(name: str) -> str:
    if name not in BUILDERS:
        import difflib

        close = difflib.get_close_matches(str(name).lower(), names(), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown composite {name!r}{hint} (valid composites: {', '.join(names())})")
    return name


def get(name: str, **params: Any) -> Composite:
    """Build a registered composite. Parameters it does not use raise ValueError (None means default)."""
    _check(name)
    given = {k: v for k, v in params.items() if v is not None}
    allowed = PARAMETERS[name] + COMMON
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ValueError(
            f"composite {name!r} does not use {', '.join(unknown)}; its parameters: {', '.join(allowed)}"
        )
    composite = BUILDERS[name](**given)
    composite.name = name
    return composite


def register(name: str, builder: Any, parameters: tuple[str, ...] = (), description: str = "") -> None:
    """Add a composite builder (a callable taking the named parameters plus canonizers/strict/overrides)."""
    BUILDERS[name] = builder
    PARAMETERS[name] = tuple(parameters)
    DESCRIPTIONS[name] = description or name


__all__ = ["Composite", "Glob", "LayerMap", "NameMap", "FirstLayer", "Mixture", "basics", "get", "names", "parameters",
           "describe", "register"]
