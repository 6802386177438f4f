"""Composites: which rule each module gets. Building blocks and the context that applies them.

A composite answers ``rule_for(name, module, state)`` with a Rule or None (no rule: the plain gradient flows
and the module is reported). The blocks compose: ``LayerMap`` by type, ``NameMap`` by module-name glob,
``FirstLayer`` for the first matching layer in forward order, ``Mixture`` tries its parts in order.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any

from torch import nn

from lrpcli.engine.hooks import Session
from lrpcli.engine.recorder import Recorder
from lrpcli.engine.rules.base import Rule
from lrpcli.errors import UnmatchedPatternError

Types = type | tuple[type, ...]


class Glob(str):
    """A module-name glob that remembers where the user wrote it (``c.yaml: composite.rules[2].match``), so an
    override that matches nothing is reported at that key."""

    where: str = ""

    def __new__(cls, pattern: str, where: str = "") -> Glob:
        glob = super().__new__(cls, pattern)
        glob.where = where
        return glob


class _CheckedSession(Session):
    """A session that, once the model (after canonizers) is hooked, refuses override globs that match no module
    that rules are given to (a module without children): such an override would silently do nothing."""

    def __enter__(self) -> nn.Module:
        model = super().__enter__()
        try:
            names = [a.name for a in self.assignments.values()]
            for pattern in self.composite.patterns():
                if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
                    raise UnmatchedPatternError(_unmatched(pattern, names))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return model


def _unmatched(pattern: str, names: list[str]) -> str:
    where = getattr(pattern, "where", "") or "rule override"
    stem = pattern.split("*")[0].split("?")[0].split("[")[0]
    close = [n for n in names if stem and n.startswith(stem[:3])][:5] or names[:5]
    return (f"{where}: {str(pattern)!r} matches no module of the model that gets a rule (modules without "
            f"children), e.g. {', '.join(close)}")


class Composite:
    """Base: subclasses implement ``rule_for``. ``seed`` is 'output' (relevance: start from the logit) or
    'onehot' (gradient-space composites: start from a one-hot, as gradients do)."""

    seed: str = "output"
    name: str = "custom"

    def __init__(self, canonizers: Sequence[Any] = (), strict: bool = False, seed: str | None = None,
                 name: str | None = None) -> None:
        self.canonizers = list(canonizers)
        self.strict = strict
        if seed is not None:
            self.seed = seed
        if name is not None:
            self.name = name

    def rule_for(self, name: str, module: nn.Module, state: dict) -> Rule | None:
        raise NotImplementedError

    def context(self, model: nn.Module, *, canonizers: Sequence[Any] | None = None, strict: bool | None = None,
                recorder: Recorder | None = None) -> Session:
        """``with composite.context(model) as m:`` — rules active on ``m`` inside, everything undone on exit."""
        from lrpcli.engine.canonizers import make_all  # lazy: canonizers import this package at their module level

        specs = self.canonizers if canonizers is None else list(canonizers)
        return _CheckedSession(self, model, canonizers=make_all(specs),
                               strict=self.strict if strict is None else strict, recorder=recorder)

    def patterns(self) -> list[str]:
        """The module-name globs this composite assigns rules by (each must match a module it is applied to)."""
        return []

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class LayerMap(Composite):
    """Rules by module type: ``LayerMap([(nn.Linear, Epsilon()), ((nn.Conv2d, nn.Conv1d), Gamma())])``."""

    def __init__(self, pairs: Sequence[tuple[Types, Rule]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pairs = [(types if isinstance(types, tuple) else (types,), rule) for types, rule in pairs]

    def rule_for(self, name: str, module: nn.Module, state: dict) -> Rule | None:
        for types, rule in self.pairs:
            if isinstance(module, types):
                return rule
        return None


class NameMap(Composite):
    """Rules by module name glob (``features.0``, ``layer4.*``) or, for a type key, by type."""

    def __init__(self, pairs: Sequence[tuple[str | Types, Rule]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pairs = list(pairs)
        for i, pair in enumerate(self.pairs):
            if not isinstance(pair, tuple | list) or len(pair) != 2 or not isinstance(pair[1], Rule):
                raise TypeError(f"NameMap: pairs[{i}]: expected (glob or module class, Rule), got {pair!r} "
                                "(lrpcli.attribute's overrides= also takes rule names and config mappings)")

    def patterns(self) -> list[str]:
        return [key for key, _ in self.pairs if isinstance(key, str)]

    def rule_for(self, name: str, module: nn.Module, state: dict) -> Rule | None:
        for key, rule in self.pairs:
            if isinstance(key, str):
                if fnmatch.fnmatchcase(name, key):
                    return rule
            elif isinstance(module, key):
                return rule
        return None


class FirstLayer(Composite):
    """The special rule for the first module of the given types in forward order (not definition order)."""

    def __init__(self, types: Types, rule: Rule, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.types = types if isinstance(types, tuple) else (types,)
        self.rule = rule

    def rule_for(self, name: str, module: nn.Module, state: dict) -> Rule | None:
        if not isinstance(module, self.types):
            return None
        key = ("first", id(self))
        if key in state:
            return None
        state[key] = name
        return self.rule


class Mixture(Composite):
    """Tries its parts in order; the first rule found wins."""

    def __init__(self, parts: Sequence[Composite], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.parts = list(parts)

    def patterns(self) -> list[str]:
        return [pattern for part in self.parts for pattern in part.patterns()]

    def rule_for(self, name: str, module: nn.Module, state: dict) -> Rule | None:
        for part in self.parts:
            rule = part.rule_for(name, module, state)
            if rule is not None:
                return rule
        return None
