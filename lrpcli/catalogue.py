"""What the engine offers, by name, without importing it: composites and their parameters, rule, canonizer and
compression names.

The config schema validates against these tables so it needs no torch; the engine registries
(``lrpcli.engine.rules``, ``lrpcli.engine.canonizers``, ``lrpcli.engine.composites``, ``lrpcli.store``) build from
or are checked against them (an import-time check for composites, tests for the rest), so a name added to one side
cannot be missed on the other.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Param", "CompositeDecl", "PARAMS", "COMPOSITES", "declare", "RULE_NAMES", "RULE_ALIASES",
           "CANONIZER_NAMES", "COMPRESSIONS", "STABILIZER_MODES", "MAXPOOL_MODES", "ZERO_PARAMS"]

STABILIZER_MODES = ("sign", "clip", "rms")
MAXPOOL_MODES = ("wta", "average")
#: Parameters a rule may treat as zero (``zero_params``).
ZERO_PARAMS = ("bias",)


@dataclass(frozen=True)
class Param:
    """One composite parameter, declared once: the config default (``default``), the values it takes (``kind``:
    the check ``lrpcli.spec.schema.PARAM_CHECKS`` applies; ``allowed``: as the README writes them), what it does, and
    the default of a composite built in Python without a config (``engine_default``; ``auto`` bounds need the
    input's mean/std)."""

    name: str
    default: Any
    kind: str
    allowed: str
    description: str
    engine_default: Any = None

    def config_default(self) -> Any:
        """A fresh copy of the config default (lists and mappings are never shared)."""
        return copy.deepcopy(self.default)

    def builder_default(self) -> Any:
        return copy.deepcopy(self.default if self.engine_default is None else self.engine_default)


_PARAMS = (
    Param("epsilon", 1.0e-6, "positive", "number > 0", "epsilon of the Epsilon rule"),
    Param("gamma", 0.25, "non_negative", "number ≥ 0", "gamma of the Gamma rule"),
    Param("low", "auto", "bounds", "`auto`, a number, or a list with one number per channel",
          "ZBox lower bound; `auto` = the normalised value of pixel 0.0 per channel, `(0 - mean) / std`",
          engine_default=-3.0),
    Param("high", "auto", "bounds", "as `low`, above it", "ZBox upper bound; `auto` = `(1 - mean) / std`",
          engine_default=3.0),
    Param("zero_params", [], "zero_params", "`[bias]`",
          "leave biases out of the rules (a zero-bias comparison for conservation)"),
    Param("stabilizer", {"epsilon": 1.0e-6, "mode": "sign"}, "stabilizer",
          "`{epsilon: number > 0, mode: sign|clip|rms}`", "denominator stabilizer"),
    Param("maxpool", "wta", "maxpool", "`wta`, `average`",
          "MaxPool relevance: winner takes all, or spread like average pooling (in proportion to the window's inputs)"),
    Param("beta", 10.0, "positive", "number > 0", "softplus beta of `beta_smooth`"),
)
#: The composite parameters by name, in config order.
PARAMS: dict[str, Param] = {p.name: p for p in _PARAMS}


@dataclass(frozen=True)
class CompositeDecl:
    """A named composite: what it does, the parameters (names in ``PARAMS``, or free names for a composite
    registered from Python) its builder takes besides canonizers, strict and overrides, and whether it propagates
    gradients (a one-hot seed: conservation is not expected, so ``lrpcli debug`` skips its checks). ``defaults``:
    parameter defaults of this composite that differ from ``PARAMS`` (a mapping default is merged under what a
    config gives, so ``stabilizer: {epsilon: 1e-8}`` keeps the composite's mode)."""

    name: str
    description: str
    params: tuple[str, ...] = field(default=())
    gradient_space: bool = False
    defaults: dict[str, Any] = field(default_factory=dict)


#: Every registered composite by name; ``declare`` adds one, ``lrpcli.composites.register`` too.
COMPOSITES: dict[str, CompositeDecl] = {}


def declare(name: str, description: str, params: tuple[str, ...] = (), gradient_space: bool = False,
            defaults: dict[str, Any] | None = None) -> CompositeDecl:
    """Declare composite ``name``; its builder (``lrpcli.engine.composites``) must take exactly ``params``."""
    decl = CompositeDecl(name, description, tuple(params), gradient_space, dict(defaults or {}))
    COMPOSITES[name] = decl
    return decl


_EPSILON_RULES = ("epsilon", "stabilizer", "zero_params", "maxpool")
declare("epsilon_gamma_box", "ZBox(low, high) on the first weighted layer (in forward order), Gamma on convolutions, "
        "Epsilon on dense layers", ("epsilon", "gamma", "low", "high", "stabilizer", "zero_params", "maxpool"))
declare("epsilon_plus", "ZPlus on convolutions, Epsilon on dense layers", _EPSILON_RULES)
declare("epsilon_plus_flat", "Flat on the first layer, ZPlus on convolutions, Epsilon on dense layers",
        _EPSILON_RULES)
declare("epsilon_alpha2_beta1", "AlphaBeta(2, 1) on convolutions, Epsilon on dense layers", _EPSILON_RULES)
declare("epsilon_alpha2_beta1_flat", "Flat on the first layer, AlphaBeta(2, 1) on convolutions, Epsilon on dense "
        "layers", _EPSILON_RULES)
declare("excitation_backprop", "ZPlus on all weighted layers", ("stabilizer", "zero_params", "maxpool"))
declare("guided_backprop", "gradient space: ReLU gradients clipped at zero, every other layer its plain gradient",
        gradient_space=True)
declare("deconvnet", "gradient space: ReLU applied to the backward signal, every other layer its plain gradient",
        gradient_space=True)
declare("beta_smooth", "gradient space: ReLUs replaced by softplus(beta) in the backward, every other layer its "
        "plain gradient", ("beta",), gradient_space=True)
_TRANSFORMER = ("epsilon", "low", "high", "stabilizer", "zero_params", "maxpool")
declare("attn_lrp", "AttnLRP (Achtibat et al., ICML 2024), for transformers and ConvNeXt: ZBox(low, high) on the "
        "first weighted layer (the patch embedding or conv stem), Epsilon on Linear and convolutions, the LayerNorm "
        "rule on LayerNorm, LayerNorm2d, RMSNorm and GroupNorm, the softmax rule on Softmax, the uniform product "
        "rule on products of two activations", _TRANSFORMER)
declare("cp_lrp", "CP-LRP (Ali et al., ICML 2022): as attn_lrp, but the attention weights are constants (all "
        "relevance to the values, none into the softmax, queries or keys)", _TRANSFORMER)
#: What ``auto`` uses when no stabilizer is given: scale-relative, so small activations keep their relevance.
AUTO_STABILIZER = {"epsilon": 1.0e-6, "mode": "rms"}
declare("auto", "looks at the model: the attn_lrp rules where it has attention or a LayerNorm, RMSNorm or "
        "GroupNorm (transformers, ConvNeXt), else the epsilon_gamma_box rules; the stabilizer defaults to "
        "`{epsilon: 1e-6, mode: rms}` (scale-relative); a note says what it chose",
        ("epsilon", "gamma", "low", "high", "stabilizer", "zero_params", "maxpool"),
        defaults={"stabilizer": AUTO_STABILIZER})

#: Rule names of ``lrpcli.rules.make`` (``lrpcli.rules.RULES`` is checked against it by a test) and their aliases.
RULE_NAMES = ("alpha_beta", "batchnorm", "beta_smooth", "constant_operand", "deconvnet", "epsilon", "flat", "gamma",
              "gradient", "guided_backprop", "layernorm", "maxpool_average", "norm", "pass", "product", "softmax",
              "wsquare", "zbox", "zplus")
RULE_ALIASES = {"alphabeta": "alpha_beta", "z_plus": "zplus", "w_square": "wsquare", "z_box": "zbox",
                "wta": "gradient", "guidedbackprop": "guided_backprop", "betasmooth": "beta_smooth",
                "layer_norm": "layernorm", "batch_norm": "batchnorm"}
#: Canonizer names of ``lrpcli.canonizers.make`` (checked against it by a test).
CANONIZER_NAMES = ("attention", "auto", "densenet", "efficientnet", "functional", "merge_batchnorm", "mobilenet",
                   "residual", "resnet", "se_gates", "transformer", "vgg")
#: ``output.compression`` values (``lrpcli.store.COMPRESSIONS`` is checked against it by a test).
COMPRESSIONS = ("auto", "lzf", "none")
#: The largest ``run.batch_size`` / ``--batch-size`` (a DataLoader takes at most sys.maxsize per batch).
MAX_BATCH_SIZE = 2**31 - 1
