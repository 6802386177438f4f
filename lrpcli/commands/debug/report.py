"""The plain data a debug run produces; no torch here, so stored runs are read and printed without it."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: Rules with weights (their out - in is what biases and stabilizers absorb); matched on the rule's class name.
PARAM_RULES = ("Epsilon", "Gamma", "ZPlus", "AlphaBeta", "ZBox", "Flat", "WSquare")
#: Per-sample detail arrays a model run has (a stored run has none of them).
DETAIL_FIELDS = ("negative_share", "max", "min", "nan", "inf", "nonfinite_out", "input_negative")


@dataclass
class LayerAssignment:
    """One leaf module in forward order: what it got. ``status``: rule, pass, none (unhandled) or idle."""

    name: str
    type: str
    rule: str | None
    status: str
    calls: int


@dataclass
class Report:
    """What one debug run saw; stored runs fill the same fields (assignments None, details empty)."""

    source: str
    mode: str  # "model" or "stored"
    composite: str
    canonizers: list[str]
    inputs: str  # one line: where the inputs came from
    samples: list[str]  # a name per sample (file name, or random[i])
    layers: list[str]  # conservation rows, forward order (name or name#2 for a second call)
    types: list[str]
    rules: list[str]
    has_bias: list[bool | None]  # None: unknown (stored runs)
    relevance_in: np.ndarray  # N x L float64
    relevance_out: np.ndarray  # N x L float64
    output_relevance: np.ndarray  # N
    input_relevance: np.ndarray  # N: the relevance at the model input (the attribution's sum)
    details: dict[str, np.ndarray] = field(default_factory=dict)  # DETAIL_FIELDS -> N x L
    dtypes: list[str] = field(default_factory=list)
    assignments: list[LayerAssignment] | None = None
    notes: list[str] = field(default_factory=list)
    gradient_space: bool = False
    device: str = "cpu"

    @property
    def unhandled(self) -> list[LayerAssignment]:
        """Modules that computed something and got no rule (their plain gradient flowed)."""
        return [a for a in self.assignments or [] if a.status == "none"]


def rule_class(rule: str | None) -> str:
    """'Gamma(gamma=0.25)' -> 'Gamma'."""
    return "" if not rule else rule.split("(", 1)[0]
