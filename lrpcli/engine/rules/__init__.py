"""LRP rules, one module each; ``make(name, **params)`` builds one by its config name."""

from __future__ import annotations

from typing import Any

from lrpcli.engine.rules.activations import BetaSmooth, DeconvNet, GuidedBackprop
from lrpcli.engine.rules.alphabeta import AlphaBeta
from lrpcli.engine.rules.base import ParamRule, Rule
from lrpcli.engine.rules.batchnorm import BatchNormRule
from lrpcli.engine.rules.epsilon import Epsilon
from lrpcli.engine.rules.flat import Flat, WSquare
from lrpcli.engine.rules.formula import plain
from lrpcli.engine.rules.gamma import Gamma
from lrpcli.engine.rules.layernorm import LayerNormRule
from lrpcli.engine.rules.maxpool import MaxPoolAverage
from lrpcli.engine.rules.norm import Norm
from lrpcli.engine.rules.passthrough import Gradient, Pass
from lrpcli.engine.rules.product import ConstantOperand, Product
from lrpcli.engine.rules.softmax import SoftmaxRule
from lrpcli.engine.rules.stabilizer import Stabilizer
from lrpcli.engine.rules.zbox import ZBox
from lrpcli.engine.rules.zplus import ZPlus

RULES: dict[str, type[Rule]] = {
    cls.name: cls
    for cls in (Epsilon, ZPlus, AlphaBeta, Gamma, ZBox, Flat, WSquare, Norm, Pass, Gradient, GuidedBackprop,
                DeconvNet, BetaSmooth, MaxPoolAverage, LayerNormRule, SoftmaxRule, Product, ConstantOperand,
                BatchNormRule)
}
ALIASES = {"alphabeta": "alpha_beta", "z_plus": "zplus", "w_square": "wsquare", "z_box": "zbox",
           "wta": "gradient", "guidedbackprop": "guided_backprop", "betasmooth": "beta_smooth",
           "layer_norm": "layernorm", "batch_norm": "batchnorm"}


def names() -> list[str]:
    """The rule names accepted by ``make`` and in configs."""
    return sorted(RULES)


def make(name: str, **params: Any) -> Rule:
    """Build a rule by name; unknown names raise ValueError listing the valid ones, bad params TypeError/ValueError."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in RULES:
        raise ValueError(f"unknown rule {name!r}; valid rules: {', '.join(names())}")
    try:
        return RULES[key](**params)
    except TypeError as err:
        import inspect

        allowed = [p for p in inspect.signature(RULES[key].__init__).parameters if p != "self"]
        raise TypeError(f"rule {key!r}: {err}; its parameters: {', '.join(allowed) or 'none'}") from None


__all__ = ["Rule", "ParamRule", "Stabilizer", "Epsilon", "ZPlus", "AlphaBeta", "Gamma", "ZBox", "Flat", "WSquare",
           "Norm", "Pass", "BatchNormRule", "Gradient",
           "GuidedBackprop", "DeconvNet", "BetaSmooth", "MaxPoolAverage", "make",
           "names", "plain"]
