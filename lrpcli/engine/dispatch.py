"""What a session knows of each leaf module: its rule and how often it ran (``Assignment``), the rule's answers
the forward hook needs at every call, worked out once (``Dispatch``), and the calls of the probe forward
(``Probe``) that canonizers read for data flow."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from lrpcli.engine.layercall import says_signs
from lrpcli.engine.layerops import is_linear_layer
from lrpcli.engine.rules.base import Rule
from lrpcli.engine.rules.batchnorm import BatchNormRule
from lrpcli.engine.rules.passthrough import Pass


@dataclass
class Assignment:
    """What a leaf module got: its rule (None = nothing, the plain gradient flows) and how often it ran."""

    name: str
    module: nn.Module
    rule: Rule | None
    calls: int = 0
    order: int = -1
    #: what the forward hook needs to know of the rule on this module, worked out once (``Dispatch``)
    dispatch: Dispatch | None = None

    @property
    def type_name(self) -> str:
        return type(self.module).__name__


class Dispatch:
    """The rule's answers for one module, asked once when the rule is assigned instead of at every call: the
    forward hook of a small network runs hundreds of times per batch. Rules are stateless, so the answers hold
    for the session."""

    __slots__ = ("reads", "native", "keeps_zeros", "keeps_nothing", "is_relu", "producer", "recompute", "passes",
                 "bn_rule", "light")

    def __init__(self, rule: Rule, module: nn.Module) -> None:
        self.reads = rule.reads_of(module)
        self.native = rule.is_native_gradient
        self.keeps_zeros = rule.keeps_zeros(module)
        self.keeps_nothing = not self.reads and not rule.needs_graph
        self.is_relu = type(module) is nn.ReLU
        #: a linear layer whose rule may keep relu(z) for z (``LayerCall.rectify``)
        self.producer = is_linear_layer(module) and rule.tolerates_rectified_output()
        #: the rule's side of ``relu_recompute.recomputable_relu`` (reads only the input); the tensors' side is
        #: checked at each call
        self.recompute = not rule.needs_graph and "inputs" in self.reads and "output" not in self.reads
        #: the rule hands the relevance on unchanged: on a module that returns its very input (a merged
        #: BatchNorm, Dropout or Identity in eval mode) that is what the missing autograd node does too
        self.passes = type(rule) is Pass
        #: the BatchNorm rule, which is Pass on a BatchNorm that ``merge_batchnorm`` folded (checked at each call:
        #: the merge is decided by the probe)
        self.bn_rule = type(rule) is BatchNormRule
        #: Pass on a module whose calls need no record (``PassFunction``): not a ReLU (a layer below may keep its
        #: output) nor a module that ``known_nonnegative`` looks through
        self.light = self.passes and not self.is_relu and not says_signs(module)


@dataclass
class ProbeCall:
    """One leaf call seen by the probe forward: which tensors went in and came out (by identity)."""

    name: str
    module: nn.Module
    inputs: tuple[int, ...]
    output: int | None


@dataclass
class Probe:
    """The leaf calls of one real forward, in the order they ran (for canonizers that need data flow)."""

    calls: list[ProbeCall] = field(default_factory=list)
