"""The builders of the named composites declared in ``lrpcli.catalogue``.

Each builder is bound to its declaration with ``@builds(name)`` and takes exactly the declared parameters as
keywords (checked when this module is imported), so a parameter cannot be declared and silently ignored.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from lrpcli.catalogue import AUTO_STABILIZER, COMPOSITES, MAXPOOL_MODES
from lrpcli.engine.composites import layers as L
from lrpcli.engine.composites.base import Composite, FirstLayer, LayerMap, Mixture, NameMap, _CheckedSession
from lrpcli.engine.hooks import Session
from lrpcli.engine.recorder import Recorder
from lrpcli.engine.rules import (
    AlphaBeta,
    BatchNormRule,
    BetaSmooth,
    ConstantOperand,
    DeconvNet,
    Epsilon,
    Flat,
    Gamma,
    Gradient,
    GuidedBackprop,
    LayerNormRule,
    MaxPoolAverage,
    Norm,
    Pass,
    Product,
    Rule,
    SoftmaxRule,
    Stabilizer,
    ZBox,
    ZPlus,
)

#: Keywords every builder takes besides its declared parameters.
COMMON = ("canonizers", "strict", "overrides")
BUILDERS: dict[str, Callable[..., Composite]] = {}


def builds(name: str) -> Callable[[Callable[..., Composite]], Callable[..., Composite]]:
    """Register a builder for the declared composite ``name``; its keyword-only parameters (besides
    ``overrides``) must be the declaration's parameters."""

    def bind(builder: Callable[..., Composite]) -> Callable[..., Composite]:
        declared = set(COMPOSITES[name].params)
        taken = {p.name for p in inspect.signature(builder).parameters.values()
                 if p.kind is p.KEYWORD_ONLY and p.name != "overrides"}
        if taken != declared:
            raise TypeError(f"composite {name!r}: builder takes {sorted(taken)}, declared {sorted(declared)}")
        BUILDERS[name] = builder
        return builder

    return bind


def basics(stabilizer: Stabilizer, maxpool: str = "wta") -> LayerMap:
    """Rules every relevance composite shares for layers without weights."""
    if maxpool not in MAXPOOL_MODES:
        raise ValueError(f"maxpool: expected one of {', '.join(MAXPOOL_MODES)}, got {maxpool!r}")
    pool_rule: Rule = Gradient() if maxpool == "wta" else MaxPoolAverage(stabilizer)
    return LayerMap([
        (L.ACTIVATIONS + L.BATCHNORMS + L.IDENTITIES + L.GATES, Pass()),
        (L.AVGPOOLS + L.UPSAMPLES + L.SUMS + L.REDUCTIONS, Norm(stabilizer)),
        (L.MAXPOOLS, pool_rule),
        (L.PADDINGS, Gradient()),
    ])


def _overrides(overrides: Sequence[tuple[Any, Rule]] | None) -> list[Composite]:
    return [NameMap(list(overrides))] if overrides else []


def _relevance(main: Sequence[tuple[Any, Rule]], *, stabilizer: Stabilizer, maxpool: str,
               overrides: Sequence[tuple[Any, Rule]] | None, first: Rule | None = None,
               **options: Any) -> Mixture:
    parts = _overrides(overrides)
    if first is not None:
        parts.append(FirstLayer(L.WEIGHTED, first))
    parts += [LayerMap(list(main)), basics(stabilizer, maxpool)]
    return Mixture(parts, **options)


def _common(stabilizer: Stabilizer | float | dict | None, zero_params: Sequence[str]) -> dict:
    """The keywords every parameter rule of a composite shares."""
    return {"stabilizer": Stabilizer.coerce(stabilizer), "zero_params": tuple(zero_params or ())}


@builds("epsilon_gamma_box")
def epsilon_gamma_box(*, epsilon: float, gamma: float, low: Any, high: Any, stabilizer: Any,
                      zero_params: Sequence[str], maxpool: str, overrides: Any = None, **options: Any) -> Mixture:
    p = _common(stabilizer, zero_params)
    return _relevance([(L.CONV, Gamma(gamma, **p)), (L.LINEAR, Epsilon(epsilon, **p))], first=ZBox(low, high, **p),
                      stabilizer=p["stabilizer"], maxpool=maxpool, overrides=overrides, **options)


def _epsilon_with(conv_rule: Callable[[dict], Rule], flat: bool) -> Callable[..., Mixture]:
    def build(*, epsilon: float, stabilizer: Any, zero_params: Sequence[str], maxpool: str, overrides: Any = None,
              **options: Any) -> Mixture:
        p = _common(stabilizer, zero_params)
        return _relevance([(L.CONV, conv_rule(p)), (L.LINEAR, Epsilon(epsilon, **p))],
                          first=Flat(**p) if flat else None, stabilizer=p["stabilizer"], maxpool=maxpool,
                          overrides=overrides, **options)

    return build


builds("epsilon_plus")(_epsilon_with(lambda p: ZPlus(**p), flat=False))
builds("epsilon_plus_flat")(_epsilon_with(lambda p: ZPlus(**p), flat=True))
builds("epsilon_alpha2_beta1")(_epsilon_with(lambda p: AlphaBeta(2.0, 1.0, **p), flat=False))
builds("epsilon_alpha2_beta1_flat")(_epsilon_with(lambda p: AlphaBeta(2.0, 1.0, **p), flat=True))


@builds("excitation_backprop")
def excitation_backprop(*, stabilizer: Any, zero_params: Sequence[str], maxpool: str, overrides: Any = None,
                        **options: Any) -> Mixture:
    p = _common(stabilizer, zero_params)
    return _relevance([(L.WEIGHTED, ZPlus(**p))], stabilizer=p["stabilizer"], maxpool=maxpool,
                      overrides=overrides, **options)


def _gradient_space(relu_rule: Callable[..., Rule]) -> Callable[..., Mixture]:
    def build(*, overrides: Any = None, **options: Any) -> Mixture:
        parts = _overrides(overrides) + [LayerMap([(L.RELUS, relu_rule()), (nn.Module, Gradient())])]
        options.setdefault("seed", "onehot")
        return Mixture(parts, **options)

    return build


builds("guided_backprop")(_gradient_space(GuidedBackprop))
builds("deconvnet")(_gradient_space(DeconvNet))


@builds("beta_smooth")
def beta_smooth(*, beta: float, overrides: Any = None, **options: Any) -> Mixture:
    parts = _overrides(overrides) + [LayerMap([(L.RELUS, BetaSmooth(beta=beta)), (nn.Module, Gradient())])]
    options.setdefault("seed", "onehot")
    return Mixture(parts, **options)


def _transformer(constant_attention: bool) -> Callable[..., Mixture]:
    """AttnLRP (Achtibat et al., ICML 2024) or CP-LRP (Ali et al., ICML 2022): Epsilon on Linear and Conv, the
    LayerNorm rule, the softmax rule or constant attention weights, the uniform product rule, Pass on
    activations; ZBox on the first weighted layer (the patch embedding or the conv stem)."""

    def build(*, epsilon: float, low: Any, high: Any, stabilizer: Any, zero_params: Sequence[str], maxpool: str,
              overrides: Any = None, **options: Any) -> Mixture:
        p = _common(stabilizer, zero_params)
        stab = p["stabilizer"]
        attention: Rule = ConstantOperand(stabilizer=stab) if constant_attention else Product(stab)
        main = [(L.WEIGHTED, Epsilon(epsilon, **p)), (L.NORMS, LayerNormRule(**p)),
                (L.ATTENTION_PRODUCTS, attention), (L.PRODUCTS, Product(stab)), (L.SOFTMAXES, SoftmaxRule(stab))]
        return _relevance(main, first=ZBox(low, high, **p), stabilizer=stab, maxpool=maxpool,
                          overrides=overrides, **options)

    return build


builds("attn_lrp")(_transformer(constant_attention=False))
builds("cp_lrp")(_transformer(constant_attention=True))


#: where an auto session keeps its choice (the session's rule state: one composite serves several models)
_CHOICE = "auto:chosen"


class _AutoSession(_CheckedSession):
    """A session that lets ``auto`` choose once the canonizers have run: attention written functionally (LeViT)
    is only visible as modules after the ``functional`` canonizer traced the model. Rules are given at the first
    forward, after this."""

    def __enter__(self) -> nn.Module:
        model = super().__enter__()
        composite: AutoComposite = self.composite  # type: ignore[assignment]
        self._state[_CHOICE] = composite.choose(model, self.notes)
        return model


class AutoComposite(Composite):
    """``auto``: the model decides. Once the canonizers have run, a model with attention (an attention module,
    or the softmax, attention products and activation products the canonizers route through lrpcli's modules)
    or a LayerNorm, RMSNorm or GroupNorm gets the ``attn_lrp`` rules, any other the ``epsilon_gamma_box`` rules,
    both with the same parameters; the session's notes say which. The choice is kept per session, so one
    composite object serves several models."""

    name = "auto"

    def __init__(self, transformer: Composite, cnn: Composite, stabilizer: Stabilizer, **options: Any) -> None:
        super().__init__(**options)
        self.transformer, self.cnn, self.stabilizer = transformer, cnn, stabilizer

    @staticmethod
    def needs(model: nn.Module) -> str | None:
        """Why the model needs the attn_lrp rules (it holds a layer epsilon_gamma_box has no rule for), or None.
        ConvNeXt has LayerNorm only; LeViT's attention is functional, seen after the canonizers as Softmax,
        MatMul and AttentionProduct modules."""
        from lrpcli.engine.canonizers.attention import (
            _window_attention,  # lazy: canonizers import this package at module level
        )

        attention = L.NORMS + L.SOFTMAXES + L.ATTENTION_PRODUCTS + (nn.MultiheadAttention,) + _window_attention()
        modules = list(model.modules())
        if any(isinstance(m, attention) for m in modules):
            return "attention or LayerNorm found"
        if any(isinstance(m, L.PRODUCTS) for m in modules):
            return "products of two activations found"
        return None

    @classmethod
    def wants_transformer(cls, model: nn.Module) -> bool:
        """Whether ``needs`` finds a reason for the attn_lrp rules in ``model`` as it is now."""
        return cls.needs(model) is not None

    def choose(self, model: nn.Module, notes: list[str]) -> Composite:
        """The rules for ``model`` (as canonized), with a note saying which and why."""
        why = self.needs(model)
        notes.append(f"auto: composite {'epsilon_gamma_box' if why is None else 'attn_lrp'} rules "
                     f"({why or 'no attention or LayerNorm'}), "
                     f"stabilizer {self.stabilizer.mode} {self.stabilizer.epsilon:g}")
        return self.cnn if why is None else self.transformer

    def context(self, model: nn.Module, *, canonizers: Sequence[Any] | None = None, strict: bool | None = None,
                recorder: Recorder | None = None) -> Session:
        from lrpcli.engine.canonizers import make_all  # lazy: canonizers import this package at their module level

        specs = self.canonizers if canonizers is None else list(canonizers)
        return _AutoSession(self, model, canonizers=make_all(specs),
                            strict=self.strict if strict is None else strict, recorder=recorder)

    def patterns(self) -> list[str]:
        return self.cnn.patterns()

    def rule_for(self, name: str, module: nn.Module, state: dict) -> Rule | None:
        chosen = state.get(_CHOICE)
        if chosen is None:
            raise RuntimeError("lrpcli: composite 'auto' chooses its rules from the model; apply it with "
                               "composite.context(model)")
        return chosen.rule_for(name, module, state)


@builds("auto")
def auto(*, epsilon: float, gamma: float, low: Any, high: Any, stabilizer: Any = None, zero_params: Sequence[str],
         maxpool: str, overrides: Any = None, **options: Any) -> AutoComposite:
    if stabilizer is None or isinstance(stabilizer, dict | int | float):  # the mode defaults to rms here
        given = {"epsilon": stabilizer} if isinstance(stabilizer, int | float) else (stabilizer or {})
        stabilizer = {**AUTO_STABILIZER, **given}
    stab = Stabilizer.coerce(stabilizer)
    # BatchNorms merge_batchnorm could not fold (DenseNet's, after a concatenation) keep their scale and shift;
    # after the user's overrides, which win
    batchnorm = (L.BATCHNORMS, BatchNormRule(stab, tuple(zero_params or ())))
    shared = {"epsilon": epsilon, "low": low, "high": high, "stabilizer": stab, "zero_params": zero_params,
              "maxpool": maxpool, "overrides": list(overrides or []) + [batchnorm]}
    return AutoComposite(BUILDERS["attn_lrp"](**shared), BUILDERS["epsilon_gamma_box"](gamma=gamma, **shared),
                         stab, **options)
