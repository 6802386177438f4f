"""``attention``: each ``nn.MultiheadAttention`` runs as explicit steps for the duration of the session.

The fused attention kernel is one opaque function: its products and its softmax get no rule, and relevance
through it is the plain gradient. ``ExplicitMultiheadAttention`` computes the same output from the same
(shared) parameters with q/k/v Linear layers, a score MatMul, a Softmax and an AttentionProduct, each of which
gets a rule (AttnLRP or CP-LRP). The original modules are put back on exit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from lrpcli.engine.canonizers.base import Canonizer, Composed
from lrpcli.engine.canonizers.batchnorm import MergeBatchNorm
from lrpcli.engine.canonizers.functional import FunctionalOperations
from lrpcli.engine.composites.layers import BATCHNORMS
from lrpcli.engine.functional_modules import ExplicitMultiheadAttention, ExplicitWindowAttention

if TYPE_CHECKING:  # pragma: no cover
    from lrpcli.engine.hooks import Session


def _window_attention() -> tuple[type, ...]:
    try:
        from torchvision.models.swin_transformer import ShiftedWindowAttention
    except Exception:  # pragma: no cover - torchvision missing
        return ()
    return (ShiftedWindowAttention,)  # V2 is a subclass


def _unsupported(mha: nn.Module) -> str | None:
    if not isinstance(mha, nn.MultiheadAttention):
        return None
    if mha.bias_k is not None or mha.bias_v is not None:
        return "add_bias_kv"
    if mha.add_zero_attn:
        return "add_zero_attn"
    return None


class MultiheadAttentionSteps(Canonizer):
    """Replace nn.MultiheadAttention and torchvision's ShiftedWindowAttention children by explicit steps
    (weights shared), restored on exit."""

    name = "attention"

    def __init__(self) -> None:
        self._swapped: list[tuple[nn.Module, str, nn.Module]] = []

    def apply(self, model: nn.Module, session: Session) -> nn.Module:
        counts: dict[str, int] = {}
        windowed = _window_attention()
        for parent_name, parent in list(model.named_modules()):
            for name, child in list(parent._modules.items()):
                if not isinstance(child, (nn.MultiheadAttention,) + windowed):
                    continue
                where = f"{parent_name}.{name}" if parent_name else name
                why = _unsupported(child)
                if why is not None:
                    session.notes.append(f"attention: {where} not decomposed ({why} is not supported); its "
                                         "attention runs on the plain gradient")
                    continue
                explicit = ExplicitWindowAttention(child) if isinstance(child, windowed) \
                    else ExplicitMultiheadAttention(child)
                parent._modules[name] = explicit
                self._swapped.append((parent, name, child))
                counts[type(child).__name__] = counts.get(type(child).__name__, 0) + 1
        if counts:
            which = ", ".join(f"{n} x{k}" for n, k in counts.items())
            session.notes.append(f"attention: {which} run as explicit q/k/v projections, score product, softmax "
                                 "and weights-times-values product")
        return model

    def revert(self) -> None:
        for parent, name, original in reversed(self._swapped):
            parent._modules[name] = original
        self._swapped.clear()


class Auto(Canonizer):
    """``auto``: what the model needs, chosen by looking at it: ``merge_batchnorm`` where it has BatchNorms,
    ``attention`` where it has attention modules, then ``functional`` (every functional operation as a module).
    A note names the choice."""

    name = "auto"

    def __init__(self) -> None:
        self.chosen = Composed("auto", [])

    @property
    def needs_probe(self) -> bool:  # type: ignore[override]
        return self.chosen.needs_probe

    def apply(self, model: nn.Module, session: Session) -> nn.Module:
        modules = list(model.modules())
        parts: list[Canonizer] = []
        if any(isinstance(m, BATCHNORMS) for m in modules):
            parts.append(MergeBatchNorm())
        if any(isinstance(m, (nn.MultiheadAttention,) + _window_attention()) for m in modules):
            parts.append(MultiheadAttentionSteps())
        parts.append(FunctionalOperations())
        self.chosen.parts = parts
        session.notes.append(f"auto: canonizers {', '.join(p.name for p in parts)}")
        return self.chosen.apply(model, session)

    def on_probe(self, probe, session: Session) -> None:
        self.chosen.on_probe(probe, session)

    def revert(self) -> None:
        self.chosen.revert()
