"""The Rule interface and the per-call record a rule works on.

A rule maps the relevance arriving at a module's output to the relevance at each of its inputs. It sees one
``LayerCall``: the module, the tensors it was called with, the output it produced (already computed by the
forward — rules never re-run the original layer) and the effective parameters (canonizers may substitute
merged weights). Rules are stateless and may be shared by many modules.

Besides ``relevance``, a rule tells the hooks what it allows them to skip; none of these changes a number
(``rules.formula`` runs without them, tests/test_plain_path.py compares), and each stays for its reason:
- ``reads`` / ``reads_of``: memory; a call keeps only what its rule reads, else every layer's input and output
  live until the backward reaches it.
- ``needs_graph``: not a shortcut; Norm and Gradient run the module's own backward, which needs its graph.
- ``is_native_gradient``: memory and time; the module runs unhooked, with no record and no extra node.
- ``makes_temporaries``: time; slicing a rule that hands relevance on unchanged (Pass) over the batch only copies.
- ``proportional_to_inputs`` and ``keeps_zeros``: time; they let the layer below a ReLU skip the check of
  ``LayerCall.restore_output`` (``zeronotes.ZeroNotes``).
- ``splits_over_batch``: not a shortcut; it keeps batch slicing away from a rule with per-sample parameters.
- ``tolerates_rectified_output`` (``ParamRule.ratio_of_output``): memory; a layer followed by a ReLU keeps
  relu(z), which the next layer keeps anyway, instead of z. In rms mode it keeps the per-sample rms of each
  denominator too, taken while z is whole (``rms_at_forward``, ``rectified_rms``), unless that takes a forward
  (``denominators_take_a_forward``): such a layer keeps z, and the ReLU's output is recomputed from it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Protocol

import torch

from lrpcli.engine.layerops import is_linear_layer
from lrpcli.engine.rules.stabilizer import Stabilizer

ZERO_PARAMS = ("bias",)


class LayerCall(Protocol):
    """What a rule reads of one call of its module. ``layercall.LayerCall`` implements it; the protocol lives here so
    that the rules do not import the hooks that call them."""

    module: torch.nn.Module
    name: str
    key: str
    rule: Rule
    inputs: tuple[torch.Tensor, ...]
    output: torch.Tensor
    into: torch.Tensor | None
    input_nonnegative: bool
    output_rectified: bool
    #: the relevance is known to be 0 wherever the layer's output z is <= 0 (a ReLU above)
    positive_relevance: bool
    #: the rms of each of the rule's denominators per sample, taken in the forward (``ParamRule.rectified_rms``)
    rms: tuple[torch.Tensor, ...] | None

    @property
    def x(self) -> torch.Tensor: ...

    @property
    def params(self) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def memo(self, key: str, build: Callable[[], Any]) -> Any: ...

    def output_without_bias(self, bias: torch.Tensor | None) -> torch.Tensor: ...

    def native_vjp(self, v: torch.Tensor) -> tuple[torch.Tensor | None, ...]: ...


class Rule:
    """Base class: subclasses set ``name`` and implement ``relevance``."""

    name: ClassVar[str] = "rule"
    #: attribute names shown in repr, in order
    shown: ClassVar[tuple[str, ...]] = ()
    #: which stored tensors the rule reads in the backward ("inputs", "output"): these must not change in place
    reads: ClassVar[tuple[str, ...]] = ("inputs", "output")
    #: the rule runs the module's own backward (needs the real output and inputs, whatever it reads)
    needs_graph: ClassVar[bool] = False
    #: the rule is the module's own gradient: with nothing to record, the module can run unhooked
    is_native_gradient: ClassVar[bool] = False
    #: the rule makes temporaries of the output's size (worth bounding by slicing the batch, see
    #: ``LayerCall.relevance``); a rule that hands the relevance on unchanged makes none, and slicing would
    #: only copy it
    makes_temporaries: ClassVar[bool] = True
    #: each input's relevance is that input times a factor (R_i = x_i c_i), so it is zero wherever the input is
    #: (the layer below may then keep relu(z) for z without a check, see ``LayerCall.restore_output``)
    proportional_to_inputs: ClassVar[bool] = False

    def keeps_zeros(self, module: torch.nn.Module) -> bool:
        """True if relevance that is zero wherever the module's output is zero gives relevance that is zero
        wherever its input is (winner-takes-all pooling: an input of 0 that wins its window made the output 0)."""
        return False

    def check(self, module: torch.nn.Module, name: str) -> None:
        """Raise ValueError if this rule cannot handle ``module`` (called once, when the rule is assigned)."""

    def splits_over_batch(self, call: LayerCall) -> bool:
        """True if the relevance of samples a:b depends only on the call's samples a:b (all rules are per
        sample unless a parameter carries its own batch dimension)."""
        return True

    def reads_of(self, module: torch.nn.Module) -> tuple[str, ...]:
        """``reads`` for this module (a rule may need less on some module types)."""
        return self.reads

    def tolerates_rectified_output(self) -> bool:
        """True if the output enters only through ratios R_j / s(den_j) with s(den_j) != 0: then relu(z) may
        stand in for z wherever R_j = 0 (see ``LayerCall.rectify``)."""
        return False

    def rms_at_forward(self) -> bool:
        """True if the rule's stabilizer scales by the rms of whole denominators, which relu(z) no longer gives:
        a call that keeps relu(z) keeps those rms too, taken before (``rectified_rms``)."""
        return False

    def rectified_rms(self, call: LayerCall) -> tuple[torch.Tensor, ...]:
        """The per-sample rms of each denominator of the call, from its whole output (``rms_at_forward``)."""
        raise NotImplementedError

    def relevance(self, call: LayerCall, relevance: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """Relevance at each input of the call, given the relevance at its output."""
        raise NotImplementedError

    def _repr_parts(self) -> list[str]:
        return [f"{key}={_short(getattr(self, key))}" for key in self.shown]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(self._repr_parts())})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and repr(self) == repr(other)

    def __hash__(self) -> int:
        return hash(repr(self))


def _short(value: object) -> str:
    if isinstance(value, torch.Tensor):
        if value.numel() == 1:
            return f"{value.item():g}"
        more = ", ..." if value.numel() > 4 else ""
        return "[" + ", ".join(f"{v:g}" for v in value.flatten().tolist()[:4]) + more + "]"
    if isinstance(value, tuple):
        return "[" + ", ".join(repr(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:g}"
    return repr(value)


def times_input(x: torch.Tensor, fresh: torch.Tensor, into: torch.Tensor | None = None) -> torch.Tensor:
    """x * fresh, into ``fresh`` (a temporary the caller owns) when no graph is being recorded, or into ``into``
    (``LayerCall.into``: the call's slice of the whole batch's result) where it fits."""
    if torch.is_grad_enabled():
        return x * fresh
    if fits(into, fresh):
        return torch.mul(fresh, x, out=into)
    return fresh.mul_(x)


def fits(into: torch.Tensor | None, result: torch.Tensor) -> bool:
    """``into`` (``LayerCall.into``) exists and can hold ``result`` as it is (same shape and dtype)."""
    return into is not None and into.shape == result.shape and into.dtype == result.dtype


def scaled(fresh: torch.Tensor, factor: float) -> torch.Tensor:
    """fresh * factor, in place on the temporary ``fresh`` when no graph is being recorded."""
    if torch.is_grad_enabled():
        return fresh * factor
    return fresh.mul_(factor)


def check_number(rule: str, key: str, value: object, minimum: float | None = 0.0, strict: bool = False) -> float:
    """Validate a numeric rule parameter with a message naming the rule and key."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{rule}: {key} must be a number, got {value!r}")
    value = float(value)
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise ValueError(f"{rule}: {key} must be {'>' if strict else '>='} {minimum:g}, got {value:g}")
    return value


def checked_zero_params(rule: str, zero_params: Sequence[str] | str) -> tuple[str, ...]:
    """``zero_params`` as a tuple of known parameter names; an unknown one is a ValueError naming the rule."""
    if isinstance(zero_params, str):
        zero_params = (zero_params,)
    for param in zero_params:
        if param not in ZERO_PARAMS:
            raise ValueError(f"{rule}: zero_params: unknown parameter {param!r}; allowed: {', '.join(ZERO_PARAMS)}")
    return tuple(zero_params)


def total(*terms: torch.Tensor | None) -> torch.Tensor:
    """The sum of the terms that are not None (at least one must be a tensor)."""
    present = [t for t in terms if t is not None]
    result = present[0]
    for t in present[1:]:
        result = result + t
    return result


class StabilizedRule(Rule):
    """A rule without parameters of its own but a stabilizer for its denominator (Norm, softmax)."""

    def __init__(self, stabilizer: Stabilizer | float | None = None) -> None:
        self.stabilizer = Stabilizer.coerce(stabilizer)

    def _repr_parts(self) -> list[str]:
        if self.stabilizer == Stabilizer():
            return []
        return [f"stabilizer={self.stabilizer.epsilon:g}/{self.stabilizer.mode}"]


class ParamRule(Rule):
    """A rule for layers with weights (Linear, Conv, ConvTranspose): stabilizer and zero_params."""

    def __init__(self, stabilizer: Stabilizer | float | None = None, zero_params: Sequence[str] = ()) -> None:
        self.stabilizer = Stabilizer.coerce(stabilizer)
        self.zero_params = checked_zero_params(type(self).__name__, zero_params)

    #: the output enters only through R_j / s(den_j) (Epsilon, Gamma, AlphaBeta, ZBox)
    ratio_of_output: ClassVar[bool] = False
    #: forming the denominators from the output takes one more forward of the layer (sums of its positive
    #: contributions: Gamma, AlphaBeta). In rms mode such a layer followed by a ReLU keeps z whole, the ReLU's
    #: output being recomputed from it, rather than relu(z) and the rms taken in the forward at that cost
    #: (``hooks.Session._whole_output_producer``)
    denominators_take_a_forward: ClassVar[bool] = False

    def tolerates_rectified_output(self) -> bool:
        # epsilon 0 could make 0 / s(0) a NaN where the true denominator is not 0. Where relu(z) = 0 the relevance
        # is 0 (``LayerCall.restore_output``), so the ratio is 0 whatever den the rule forms from relu(z) there:
        # |s(den)| >= eps (sign, clip) or eps * rms > 0 (rms; an all-zero sample has rms 1). Where relu(z) > 0 it
        # forms the true den, and rms mode takes its scale from the whole den, kept in the forward
        return self.ratio_of_output and self.stabilizer.epsilon > 0

    def rms_at_forward(self) -> bool:
        return self.ratio_of_output and self.stabilizer.mode == "rms"

    def denominators(self, call: LayerCall) -> tuple[torch.Tensor, ...]:
        """The rule's denominators before stabilizing, formed from the call's whole output, in the order of
        ``rms_of``'s index (rules with ``ratio_of_output`` implement it)."""
        raise NotImplementedError

    def rectified_rms(self, call: LayerCall) -> tuple[torch.Tensor, ...]:
        return tuple(Stabilizer.rms(den) for den in self.denominators(call))

    def rms_of(self, call: LayerCall, index: int = 0) -> torch.Tensor | None:
        """The rms of the ``index``-th denominator kept in the forward (``LayerCall.rectify``) for the stabilizer
        (``Stabilizer.divide(..., rms=)``); None where none was kept, or with a graph being recorded (the rms is
        then a function of the denominator, formed from the whole output ``restore_output`` recomputes)."""
        kept = getattr(call, "rms", None)
        return None if kept is None or torch.is_grad_enabled() else kept[index]

    @property
    def zero_bias(self) -> bool:
        return "bias" in self.zero_params

    def check(self, module: torch.nn.Module, name: str) -> None:
        if not is_linear_layer(module):
            raise ValueError(
                f"{type(self).__name__} applies to Linear, Conv and ConvTranspose layers; "
                f"module {name!r} is {type(module).__name__}"
            )

    def _repr_parts(self) -> list[str]:
        parts = super()._repr_parts()
        if self.stabilizer != Stabilizer():
            parts.append(f"stabilizer={self.stabilizer.epsilon:g}/{self.stabilizer.mode}")
        if self.zero_params:
            parts.append(f"zero_params={list(self.zero_params)}")
        return parts
