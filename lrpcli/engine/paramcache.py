"""Parameter-derived tensors a session keeps from one backward to the next (``ParamCache``), and the stamps
that tell when a module's parameters changed (``tensors_stamp``, ``same_stamp``; the merged BatchNorm cache of
``canonizers.batchnorm`` compares them alike)."""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import nn


class LayerCall(Protocol):
    """What the cache reads of a call (``layercall.LayerCall``): its module and rule, the session's stamp of
    its parameters, and the call's memo, which holds the module's entries once looked up."""

    module: nn.Module
    rule: Any
    session: Any
    _memo: dict[str, Any]


class ParamCache:
    """Values that depend only on a module's parameters (W+, stacked weights, merged BatchNorm weights), kept by
    the session from one backward to the next.

    Small networks run many cheap layers: rebuilding each layer's weight-derived tensors in every backward
    costs as much as the rule's arithmetic on the activations. A module's entries are reused while every
    parameter and buffer they were built from is the same tensor at the same version (an optimizer step,
    ``reset_parameters`` or ``load_state_dict`` change them), and the input has the same shape, dtype and device
    (ZBox's bound terms follow the input's size); else they are all dropped. Modules whose parameters a canonizer
    substitutes are cached only where it names the modules they come from (``Session.param_sources``). Entries
    are capped at ``ENTRY_BYTES`` each and ``BUDGET_BYTES`` in all, which bounds what the cache adds to a run's
    memory (about 0.1x of a resnet50's gradient at batch 8): the large weights of VGG- and ResNet-style models
    stay uncached, their rebuild being small beside their arithmetic. Only first-order backward passes use it.
    """

    ENTRY_BYTES = 2**20
    BUDGET_BYTES = 64 * 2**20
    __slots__ = ("stamps", "entries", "used")

    def __init__(self) -> None:
        #: (module, rule id) -> the stamp its entries were built under (``Session.param_stamp``)
        self.stamps: dict[tuple[nn.Module, int], tuple] = {}
        #: (module, rule id) -> {key: (value, bytes)}
        self.entries: dict[tuple[nn.Module, int], dict[str, tuple[Any, int]]] = {}
        self.used = 0

    def get(self, call: LayerCall, key: str, build: Callable[[], Any]) -> Any:
        entries = call._memo.get(_ENTRIES, _ENTRIES)
        if entries is _ENTRIES:  # once per backward of the call
            entries = call._memo[_ENTRIES] = self._entries_of(call)
        if entries is None:
            return build()
        entry = entries.get(key)
        if entry is not None:
            return entry[0]
        value = build()
        size = _owned_bytes(value)
        if size <= self.ENTRY_BYTES and self.used + size <= self.BUDGET_BYTES:
            entries[key] = (value, size)
            self.used += size
        return value

    def _entries_of(self, call: LayerCall) -> dict[str, tuple[Any, int]] | None:
        """The call's module's entries, emptied first if its parameters changed; None: not cacheable."""
        stamp = call.session.param_stamp(call)
        if stamp is None:
            return None
        slot = (call.module, id(call.rule))
        old = self.stamps.get(slot)
        if old is None or not same_stamp(old, stamp):
            self.stamps[slot] = stamp
            self.used -= sum(size for _, size in self.entries.pop(slot, {}).values())
            self.entries[slot] = {}
        return self.entries[slot]

    def clear(self) -> None:
        self.stamps.clear()
        self.entries.clear()
        self.used = 0


#: the key under which a call's memo keeps its ParamCache entries
_ENTRIES = "\0entries"


def same_stamp(a: tuple, b: tuple) -> bool:
    """Equal stamps (``tensors_stamp`` plus further values): the same tensors, compared by identity (a stamp holds
    them, so no id is reused), and equal values. One tuple comparison for the values: a stamp is checked at
    every backward of every cached layer."""
    return a[1:] == b[1:] and len(a[0]) == len(b[0]) and all(map(operator.is_, a[0], b[0]))



def tensors_stamp(modules: Sequence[nn.Module], *extra: Any) -> tuple:
    """(each parameter and buffer of ``modules``, their storages and versions, *extra). Equal stamps
    (``same_stamp``) mean nothing was replaced, moved (``.to``) or changed in place (an optimizer step,
    ``load_state_dict``, ``reset_parameters``); a write through ``.data`` bypasses the version and is not seen."""
    tensors = [t for source in modules for group in (source._parameters, source._buffers)
               for t in group.values() if t is not None]
    return (tuple(tensors), tuple([t.data_ptr() for t in tensors]), tuple([t._version for t in tensors])) + extra


def _owned_bytes(value: Any) -> int:
    """Bytes of the tensors in ``value`` that are not parameters (a parameter is held by the model anyway)."""
    if isinstance(value, (tuple, list)):
        return sum(_owned_bytes(v) for v in value)
    if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
        return value.numel() * value.element_size()
    return 0
