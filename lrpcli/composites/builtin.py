"""The named composites. Each builder takes only the parameters it uses, so none is silently ignored."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from ..rules import (
    AlphaBeta,
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
from . import layers as L
from .base import Composite, FirstLayer, LayerMap, Mixture, NameMap

MAXPOOL_MODES = ("wta", "average")


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


def _params(epsilon: float, stabilizer: Stabilizer | float | dict | None, zero_params: Sequence[str]) -> dict:
    return {"stabilizer": Stabilizer.coerce(stabilizer), "zero_params": tuple(zero_params or ())}


def epsilon_gamma_box(*, epsilon: float = 1e-6, gamma: float = 0.25, low: Any = -3.0, high: Any = 3.0,
                      stabilizer: Any = None, zero_params: Sequence[str] = (), maxpool: str = "wta",
                      overrides: Any = None, **options: Any) -> Mixture:
    """ZBox on the first weighted layer, Gamma on convolutions, Epsilon on dense layers."""
    p = _params(epsilon, stabilizer, zero_params)
    return _relevance([(L.CONV, Gamma(gamma, **p)), (L.LINEAR, Epsilon(epsilon, **p))], first=ZBox(low, high, **p),
                      stabilizer=p["stabilizer"], maxpool=maxpool, overrides=overrides, **options)


def _epsilon_with(conv_rule: Callable[[dict], Rule], flat: bool) -> Callable[..., Mixture]:
    def build(*, epsilon: float = 1e-6, stabilizer: Any = None, zero_params: Sequence[str] = (),
              maxpool: str = "wta", overrides: Any = None, **options: Any) -> Mixture:
        p = _params(epsilon, stabilizer, zero_params)
        return _relevance([(L.CONV, conv_rule(p)), (L.LINEAR, Epsilon(epsilon, **p))],
                          first=Flat(**p) if flat else None, stabilizer=p["stabilizer"], maxpool=maxpool,
                          overrides=overrides, **options)

    return build


def excitation_backprop(*, stabilizer: Any = None, zero_params: Sequence[str] = (), maxpool: str = "wta",
                        overrides: Any = None, **options: Any) -> Mixture:
    """ZPlus on every weighted layer (excitation backprop / c-MWP), Norm on pools."""
    p = _params(0.0, stabilizer, zero_params)
    return _relevance([(L.WEIGHTED, ZPlus(**p))], stabilizer=p["stabilizer"], maxpool=maxpool,
                      overrides=overrides, **options)


def _gradient_space(relu_rule: Callable[..., Rule], **rule_params: Any) -> Callable[..., Mixture]:
    def build(*, overrides: Any = None, **options: Any) -> Mixture:
        params = {k: options.pop(k) for k in list(options) if k in rule_params}
        parts = _overrides(overrides) + [LayerMap([(L.RELUS, relu_rule(**params)), (nn.Module, Gradient())])]
        options.setdefault("seed", "onehot")
        return Mixture(parts, **options)

    return build


def _transformer(constant_attention: bool) -> Callable[..., Mixture]:
    """AttnLRP (Achtibat et al., ICML 2024) or CP-LRP (Ali et al., ICML 2022): Epsilon on Linear and Conv, the
    LayerNorm rule, the softmax rule or constant attention weights, the uniform product rule, Pass on
    activations; ZBox on the first weighted layer (the patch embedding or the conv stem)."""

    def build(*, epsilon: float = 1e-6, low: Any = -3.0, high: Any = 3.0, stabilizer: Any = None,
              zero_params: Sequence[str] = (), maxpool: str = "wta", overrides: Any = None,
              **options: Any) -> Mixture:
        p = _params(epsilon, stabilizer, zero_params)
        stab = p["stabilizer"]
        attention: Rule = ConstantOperand(stabilizer=stab) if constant_attention else Product(stab)
        main = [(L.WEIGHTED, Epsilon(epsilon, **p)), (L.NORMS, LayerNormRule(**p)),
                (L.ATTENTION_PRODUCTS, attention), (L.PRODUCTS, Product(stab)), (L.SOFTMAXES, SoftmaxRule(stab))]
        return _relevance(main, first=ZBox(low, high, **p), stabilizer=stab, maxpool=maxpool,
                          overrides=overrides, **options)

    return build


BUILDERS: dict[str, Callable[..., Mixture]] = {
    "epsilon_gamma_box": epsilon_gamma_box,
    "epsilon_plus": _epsilon_with(lambda p: ZPlus(**p), flat=False),
    "epsilon_plus_flat": _epsilon_with(lambda p: ZPlus(**p), flat=True),
    "epsilon_alpha2_beta1": _epsilon_with(lambda p: AlphaBeta(2.0, 1.0, **p), flat=False),
    "epsilon_alpha2_beta1_flat": _epsilon_with(lambda p: AlphaBeta(2.0, 1.0, **p), flat=True),
    "excitation_backprop": excitation_backprop,
    "guided_backprop": _gradient_space(GuidedBackprop),
    "deconvnet": _gradient_space(DeconvNet),
    "beta_smooth": _gradient_space(BetaSmooth, beta=10.0),
    "attn_lrp": _transformer(constant_attention=False),
    "cp_lrp": _transformer(constant_attention=True),
}

COMMON = ("canonizers", "strict", "overrides")
PARAMETERS: dict[str, tuple[str, ...]] = {
    "epsilon_gamma_box": ("epsilon", "gamma", "low", "high", "stabilizer", "zero_params", "maxpool"),
    "epsilon_plus": ("epsilon", "stabilizer", "zero_params", "maxpool"),
    "epsilon_plus_flat": ("epsilon", "stabilizer", "zero_params", "maxpool"),
    "epsilon_alpha2_beta1": ("epsilon", "stabilizer", "zero_params", "maxpool"),
    "epsilon_alpha2_beta1_flat": ("epsilon", "stabilizer", "zero_params", "maxpool"),
    "excitation_backprop": ("stabilizer", "zero_params", "maxpool"),
    "guided_backprop": (),
    "deconvnet": (),
    "beta_smooth": ("beta",),
    "attn_lrp": ("epsilon", "low", "high", "stabilizer", "zero_params", "maxpool"),
    "cp_lrp": ("epsilon", "low", "high", "stabilizer", "zero_params", "maxpool"),
}
DESCRIPTIONS = {
    "epsilon_gamma_box": "ZBox on the first layer, Gamma on convolutions, Epsilon on dense layers",
    "epsilon_plus": "ZPlus on convolutions, Epsilon on dense layers",
    "epsilon_plus_flat": "Flat on the first layer, ZPlus on convolutions, Epsilon on dense layers",
    "epsilon_alpha2_beta1": "AlphaBeta(2, 1) on convolutions, Epsilon on dense layers",
    "epsilon_alpha2_beta1_flat": "Flat on the first layer, AlphaBeta(2, 1) on convolutions, Epsilon on dense",
    "excitation_backprop": "ZPlus on all weighted layers",
    "guided_backprop": "guided backprop (gradient space: ReLU gradients clipped at zero)",
    "deconvnet": "deconvnet (gradient space: ReLU applied to the backward signal)",
    "beta_smooth": "gradient with ReLUs replaced by softplus(beta) in the backward",
    "attn_lrp": "AttnLRP for transformers: ZBox first, Epsilon, LayerNorm and softmax rules, uniform products",
    "cp_lrp": "CP-LRP for transformers: as attn_lrp, but attention weights are constants (no softmax relevance)",
}
