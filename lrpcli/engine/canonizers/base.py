"""Canonizers: temporary, exactly reverted rewrites that put a model into a form the rules handle.

A canonizer is applied when a session is entered (``apply`` may return another model object to call) and
reverted on exit. Canonizers that need the model's real data flow set ``needs_probe``; the session then runs
one forward on the first sample of the first batch and hands them the ``Probe`` before the real forward.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from lrpcli.engine.hooks import Probe, Session


class Canonizer:
    """Base class; one instance serves one session (the context makes fresh ones from names)."""

    name = "canonizer"
    needs_probe = False

    def apply(self, model: nn.Module, session: Session) -> nn.Module:
        return model

    def on_probe(self, probe: Probe, session: Session) -> None:
        """Called once with the first forward's data flow, before the first real forward."""

    def revert(self) -> None:
        """Undo everything ``apply`` and ``on_probe`` did."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Composed(Canonizer):
    """Several canonizers under one name (``resnet`` = merge_batchnorm + residual blocks)."""

    def __init__(self, name: str, parts: list[Canonizer]) -> None:
        self.name = name
        self.parts = parts

    @property
    def needs_probe(self) -> bool:  # type: ignore[override]
        return any(p.needs_probe for p in self.parts)

    def apply(self, model: nn.Module, session: Session) -> nn.Module:
        for part in self.parts:
            model = part.apply(model, session)
        return model

    def on_probe(self, probe: Probe, session: Session) -> None:
        for part in self.parts:
            if part.needs_probe:
                part.on_probe(probe, session)

    def revert(self) -> None:
        for part in reversed(self.parts):
            part.revert()

    def __repr__(self) -> str:
        return f"{self.name}({', '.join(repr(p) for p in self.parts)})"
