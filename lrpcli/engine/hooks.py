"""The hook machinery: one autograd node per module call that swaps the gradient for the rule's relevance.

How it works. Inside a ``Session`` every leaf module has a forward hook. When a module that got a rule
runs, the hook wraps its output ``z`` in ``RuleFunction``, an identity in the forward whose backward calls
the rule with the relevance arriving at ``z`` and returns the relevance for each of the module's inputs
directly. The module's own backward is never run (the rule's result replaces it) and the layer is never
re-run: the forward already computed ``z``, and rules reuse it.

Per-call state (inputs, output, rule) lives in a ``LayerCall`` (``lrpcli.engine.layercall``) owned by the
autograd node, so a module called twice in one forward gets two independent records, and everything is freed
with the graph; the session's zero notes, parameter cache and per-module facts live in ``zeronotes``,
``paramcache`` and ``dispatch``. The session can be made inactive (``inactive()``): nodes then pass the plain
gradient to ``z``, which is what a second backward through a relevance (create_graph=True) must see.

ReLU outputs that are recomputed. A rule that reads only a ReLU's input keeps z; during a forward of the whole
model the session stores what autograd saves of y = relu(z) as a reference to z and recomputes relu(z) when a
backward needs it (``relu_recompute``), so the model keeps one activation per layer, as the plain gradient does.
The same holds for a ReLU after a layer whose rms stabilizer needs that layer's whole output (Gamma, AlphaBeta):
the layer keeps z (``Session._whole_output_producer``); other layers followed by a ReLU keep relu(z) instead of z
(``LayerCall.rectify``). Where the layer above such a recomputed ReLU is proportional to its input, its relevance
is noted as zero wherever z <= 0 (``ZeroNotes.mark_rectified``, ``LayerCall.positive_relevance``).

Calls that need no record. A module returning its very input under Pass (or a merged BatchNorm) gets no
node; Pass on an activation or a gate gets ``PassFunction``, a node without a LayerCall; a rule that is the
module's own gradient leaves the module unhooked. Small networks run hundreds of such calls per batch.

The plain path. Under ``rules.plain()`` every hooked layer keeps its own output and its relevance comes from
``rules.formula`` on the whole batch: no rectified outputs, recomputed ReLUs, zero notes, unhooked gradients or
batch slices.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from lrpcli.engine import relu_recompute
from lrpcli.engine.dispatch import Assignment, Dispatch, Probe, ProbeCall
from lrpcli.engine.functional_modules import MERGED_BATCHNORMS
from lrpcli.engine.layercall import LayerCall, PassFunction, RuleFunction, Tap, known_nonnegative
from lrpcli.engine.layerops import tracing
from lrpcli.engine.paramcache import ParamCache, tensors_stamp
from lrpcli.engine.rules import formula
from lrpcli.engine.rules.base import Rule
from lrpcli.engine.zeronotes import ZeroNotes, same_elements

# re-exported: callers and tests name them here. CHUNK_BYTES is not: patching hooks.CHUNK_BYTES would change
# nothing, so it fails instead
__all__ = ["Assignment", "LayerCall", "ParamCache", "Probe", "ProbeCall", "Session",
           "UnhandledModuleError", "UnhandledModuleWarning", "ZeroNotes", "known_nonnegative", "rules_off",
           "same_elements", "sessions_of"]


class Composite(Protocol):
    """What a session asks of its composite (``composites.base.Composite``): the rule of each module."""

    def rule_for(self, name: str, module: nn.Module, state: Any) -> Rule | None: ...


class Canonizer(Protocol):
    """What a session asks of a canonizer (``canonizers.base.Canonizer``): apply, revert, and the probe."""

    needs_probe: bool

    def apply(self, model: nn.Module, session: Session) -> nn.Module: ...

    def revert(self) -> None: ...

    def on_probe(self, probe: Probe, session: Session) -> None: ...


class Recorder(Protocol):
    """What a session tells a recorder (``recorder.Recorder``): each call's forward and backward, and the
    relevance at the outputs of the modules it asked for."""

    patterns: Sequence[str]

    def wants_map(self, name: str) -> bool: ...

    def start(self) -> None: ...

    def on_forward(self, call: LayerCall) -> None: ...

    def on_backward(self, call: LayerCall, relevance: torch.Tensor, result: Sequence[torch.Tensor | None]) -> None: ...

    def on_map(self, key: str, relevance: torch.Tensor) -> None: ...


_SESSIONS: weakref.WeakKeyDictionary[nn.Module, list[Session]] = weakref.WeakKeyDictionary()


class Session:
    """A context in which a model's leaf modules carry LRP rules; everything is undone on exit.

    Use ``with composite.context(model) as m:`` — ``m`` is the model to call (a canonizer may wrap it).
    On exit, also on exceptions, all hooks are removed, canonizers reverted and ``inplace`` flags restored.
    """

    def __init__(self, composite: Composite, model: nn.Module, *, canonizers: Sequence[Canonizer] = (),
                 strict: bool = False, recorder: Recorder | None = None) -> None:
        self.composite = composite
        self.original = model
        self.model = model
        self.canonizers = list(canonizers)
        self.strict = strict
        self.recorder = recorder
        self.active = True
        self.assignments: dict[nn.Module, Assignment] = {}
        self.param_overrides: dict[nn.Module, Callable[[], tuple[torch.Tensor, torch.Tensor | None]]] = {}
        #: for a module in ``param_overrides``: the further modules whose parameters and buffers its substituted
        #: parameters are computed from (a merged BatchNorm); without an entry its values are never cached
        self.param_sources: dict[nn.Module, tuple[nn.Module, ...]] = {}
        self.param_cache = ParamCache()
        self.notes: list[str] = []  # what canonizers did, for reports
        self._handles: list[Any] = []
        self._inplace: list[nn.Module] = []
        self._names: dict[nn.Module, str] = {}
        self._call_counts: dict[nn.Module, int] = {}
        self._tap_counts: dict[str, int] = {}
        self._state: dict[Any, Any] = {}
        self._producers: dict[int, tuple[weakref.ref, weakref.ref]] = {}  # hooked outputs that may be rectified
        self._rectifying: dict[int, weakref.ref] = {}  # ReLU outputs that a producer keeps as its output
        self._in_root = False  # inside a forward of the whole model (the producers are cleared at its end)
        self._saved = relu_recompute.SavedTensors()
        self.zero_notes = ZeroNotes()
        self._order = 0
        self._probed = False
        self._probing = False
        self._warned = False
        self._unhandled_ran = False  # a module without a rule ran (``_root_hook`` then names them)
        self._entered = False

    # -- context -------------------------------------------------------------------------------------------
    def __enter__(self) -> nn.Module:
        if self._entered:
            raise RuntimeError("lrpcli: a session can be entered once; make a new context")
        self._entered = True
        try:
            for module in self.original.modules():
                if getattr(module, "inplace", False) is True:
                    module.inplace = False
                    self._inplace.append(module)
            model = self.original
            for canonizer in self.canonizers:
                model = canonizer.apply(model, self)
            self.model = model
            self._register(model)
        except BaseException:
            self._undo()
            raise
        _SESSIONS.setdefault(self.original, []).append(self)
        if self.model is not self.original:
            _SESSIONS.setdefault(self.model, []).append(self)
        return self.model

    def __exit__(self, *exc: object) -> None:
        self.active = False  # graphs that outlive the context differentiate plainly (second-order use)
        for key in {self.original, self.model}:
            sessions = _SESSIONS.get(key, [])
            if self in sessions:
                sessions.remove(self)
        self._undo()

    def _undo(self) -> None:
        self._saved.remove()
        self.zero_notes.clear()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for canonizer in reversed(self.canonizers):
            canonizer.revert()
        self.param_overrides.clear()
        self.param_sources.clear()
        self.param_cache.clear()
        for module in self._inplace:
            module.inplace = True
        self._inplace.clear()

    @contextlib.contextmanager
    def inactive(self) -> Iterator[None]:
        """Rules off: backward passes inside this block see the plain gradient (second-order use)."""
        previous, self.active = self.active, False
        try:
            yield
        finally:
            self.active = previous

    # -- registration --------------------------------------------------------------------------------------
    def _register(self, model: nn.Module) -> None:
        self._names = {}
        for name, module in model.named_modules():
            if next(module.children(), None) is None:
                self._names[module] = name or type(module).__name__
                self.assignments[module] = Assignment(name or type(module).__name__, module, None)
                self._handles.append(module.register_forward_hook(self._forward_hook))
        if self.recorder is not None and self.recorder.patterns:
            for name, module in model.named_modules():
                if name and self.recorder.wants_map(name):
                    self._handles.append(module.register_forward_hook(self._tap_hook(name)))
        self._handles.append(model.register_forward_pre_hook(self._root_pre_hook))
        self._handles.append(model.register_forward_hook(self._root_hook))
        self._handles.append(model.register_forward_hook(self._root_end, always_call=True))

    def _root_pre_hook(self, module: nn.Module, args: tuple) -> None:
        if self._probing:
            return
        if not self._probed:
            self._probed = True
            if any(c.needs_probe for c in self.canonizers):
                self._run_probe(args)
        self._call_counts = {}
        self._tap_counts: dict[str, int] = {}
        self._producers.clear()
        self._rectifying.clear()
        self.zero_notes.clear()
        self._saved.remove()  # left over only if the last forward was interrupted (KeyboardInterrupt)
        self._in_root = True
        if self.recorder is not None:
            self.recorder.start()

    def _root_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._probing or self._warned:
            return
        if not self._unhandled_ran:
            return
        missing = [a for a in self.assignments.values() if a.rule is None and a.calls > 0]
        if missing:
            self._warned = True
            names = ", ".join(f"{a.name!r} ({a.type_name})" for a in missing[:8])
            more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
            warnings.warn(
                f"lrpcli: no rule for modules that compute something: {names}{more}; the plain gradient flows "
                "through them. Add a rule override or use a composite that covers them.",
                UnhandledModuleWarning, stacklevel=2)

    def _root_end(self, module: nn.Module, args: tuple, output: Any) -> None:
        """The end of a forward of the whole model, also when it raised: no saved-tensor hook outlives it."""
        if self._probing:
            return
        self._saved.remove()
        self._producers.clear()
        self._rectifying.clear()
        self._in_root = False

    def _run_probe(self, args: tuple) -> None:
        """One forward on the first sample, recording which leaf produced the tensor each leaf consumed."""
        probe = Probe()
        keep: list[Any] = []  # hold every tensor seen so that ids stay unique during the probe

        def record(module: nn.Module, inputs: tuple, output: Any) -> None:
            keep.append((inputs, output))
            ids = tuple(id(t) for t in inputs if isinstance(t, torch.Tensor))
            out = id(output) if isinstance(output, torch.Tensor) else None
            probe.calls.append(ProbeCall(self._names.get(module, type(module).__name__), module, ids, out))

        handles = [m.register_forward_hook(record) for m in self._names]
        small = tuple(a[:1] if isinstance(a, torch.Tensor) and a.dim() > 0 else a for a in args)
        self._probing = True
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()  # the probe must not update BatchNorm statistics or draw dropout masks
        try:
            with torch.no_grad():
                keep.append(self.model(*small))
        finally:
            self._probing = False
            for module, training in modes:
                module.training = training
            for handle in handles:
                handle.remove()
        for canonizer in self.canonizers:
            if canonizer.needs_probe:
                canonizer.on_probe(probe, self)

    # -- rules ---------------------------------------------------------------------------------------------
    def rule_for(self, module: nn.Module) -> Rule | None:
        assignment = self.assignments[module]
        if assignment.order < 0:
            assignment.order = self._order
            self._order += 1
            rule = self.composite.rule_for(assignment.name, module, self._state)
            if rule is not None:
                rule.check(module, assignment.name)
            elif self.strict:
                raise UnhandledModuleError(
                    f"lrpcli: no rule for module {assignment.name!r} ({assignment.type_name}) and strict=True")
            assignment.rule = rule
            assignment.dispatch = None if rule is None else Dispatch(rule, module)
        return assignment.rule

    def params_of(self, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        override = self.param_overrides.get(module)
        if override is not None:
            return override()
        return module.weight, module.bias

    def param_stamp(self, call: LayerCall) -> tuple | None:
        """What ``ParamCache`` entries of this call are valid for: each parameter and buffer the call's parameters
        come from (identity, storage and version) and the input's shape, dtype and device; None where unknown
        (a substitution without named sources)."""
        module = call.module
        sources: tuple[nn.Module, ...] = (module,)
        if module in self.param_overrides:
            extra = self.param_sources.get(module)
            if extra is None:
                return None
            sources += extra
        x = call.inputs[0] if call.inputs else call.output
        return tensors_stamp(sources, x.shape[1:], x.dtype, x.device)

    def _tap_hook(self, name: str) -> Callable[..., Any]:
        """A forward hook that taps the relevance at this module's output (any module, also containers)."""

        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            if self._probing or not isinstance(output, torch.Tensor) or not output.requires_grad:
                return None
            count = self._tap_counts.get(name, 0)
            self._tap_counts[name] = count + 1
            key = name if count == 0 else f"{name}#{count + 1}"
            tapped = Tap.apply(self.recorder, key, output)
            self._saved.follow(output, tapped)
            return tapped

        return hook

    def _forward_hook(self, module: nn.Module, args: tuple, output: Any) -> Any:
        if self._probing:
            return None
        assignment = self.assignments[module]
        rule = assignment.rule if assignment.order >= 0 else self.rule_for(module)
        count = self._call_counts.get(module, 0)
        self._call_counts[module] = count + 1
        assignment.calls += 1
        if rule is None:
            self._unhandled_ran = True
            return None
        if not isinstance(output, torch.Tensor) or not torch.is_grad_enabled() or not output.requires_grad:
            return None
        inputs = tuple(a for a in args if isinstance(a, torch.Tensor))
        dispatch: Dispatch = assignment.dispatch
        plain = formula.enabled()
        if (dispatch.passes or (dispatch.bn_rule and module in MERGED_BATCHNORMS)) and self.recorder is None \
                and not plain and len(inputs) == 1 and output is inputs[0]:
            # an identity under Pass: no node, the relevance arrives below as the very tensor (its ZeroNotes
            # hold), and a producer above stays registered under the same tensor
            return None
        if dispatch.native and self.recorder is None and not plain and not (
                dispatch.keeps_zeros and inputs and self._rectifies(inputs[0])):
            # the module's own gradient flows unhooked: same result, nothing kept alive. A max pool over a ReLU
            # output that the layer below keeps stays hooked: it hands on the note that saves that layer a check
            # (``ZeroNotes``), and keeps nothing that is not kept anyway
            return None
        traced = tracing()  # a capture keeps every layer's own output, like the plain path
        if dispatch.light and self.recorder is None and not plain and not traced and inputs:
            return PassFunction.apply(self, assignment.name, module, rule, output, *inputs)
        key = assignment.name if count == 0 else f"{assignment.name}#{count + 1}"
        call = LayerCall(self, module, assignment.name, key, rule, inputs, output, dispatch.reads)
        if self.recorder is not None:
            self.recorder.on_forward(call)
        # a ReLU output that can be recomputed stays out of the graph: once the forward has moved on, nothing
        # refers to it or to its autograd node, and its storage is freed
        recompute = (dispatch.recompute and self._in_root and not plain and not traced
                     and relu_recompute.recomputable_relu(rule, module, inputs, output) and self._saved.install())
        # a ReLU (Pass) over the output of a layer whose rms stabilizer needs that output whole: the layer keeps
        # z, and relu(z) is recomputed from it like the output above
        below = (self._whole_output_producer(inputs[0], output) if dispatch.is_relu and dispatch.keeps_nothing
                 and not recompute and self._in_root and not plain and not traced else None)
        recompute = recompute or below is not None
        call.relu_recomputed = recompute
        # inputs that are recomputed ReLU outputs go into the node's context, which stores them as references
        call.saves_inputs = recompute or (not rule.needs_graph and self._saved.holds_any(inputs))
        if call.saves_inputs and not recompute:
            call.input_relu_of = self._saved.producer_of(inputs[0])
        result = RuleFunction.apply(call, output.detach() if recompute else output, *inputs)
        call.release()
        if recompute:
            self._saved.add(result, inputs[0], below)
        if call.saves_inputs:
            call.inputs = tuple(torch.empty_like(t, device="meta") for t in inputs)  # they live in ctx (above)
        if below is not None:  # the layer below keeps z itself: nothing to rectify
            return result
        if plain or traced:  # every layer keeps its own output (no relu(z) in its place)
            return result
        keeps_nothing = dispatch.keeps_nothing
        if keeps_nothing and inputs and dispatch.is_relu:
            if self._rectify_producer(inputs[0], output):
                self._rectifying[id(result)] = weakref.ref(result)
        elif keeps_nothing and inputs and output is inputs[0]:  # an identity (a merged BatchNorm): look through
            entry = self._producers.pop(id(output), None)
            if entry is not None and entry[0]() is output:
                self._producers[id(result)] = (weakref.ref(result), entry[1])
        elif self._in_root and dispatch.producer:
            # weak both ways: an entry never keeps a graph alive (e.g. a submodule called outside the root)
            self._producers[id(result)] = (weakref.ref(result), weakref.ref(call))
        return result

    def _whole_output_producer(self, z: torch.Tensor, output: torch.Tensor) -> LayerCall | None:
        """The producer of ``z`` (a ReLU's input) if its rule takes an rms of whole denominators and the ReLU's
        output can leave the graph (then the producer keeps z instead of relu(z) and the rms of its denominators,
        and its backward forms those from z); None otherwise (``_rectify_producer`` then applies)."""
        entry = self._producers.get(id(z))
        call = entry[1]() if entry is not None and entry[0]() is z else None
        if (call is None or not call.rule.rms_at_forward() or not call.rule.denominators_take_a_forward
                or call.output._version != call.versions[-1]
                or not relu_recompute.relu_output_of(z, output) or not self._saved.install()):
            return None
        del self._producers[id(z)]
        return call

    def _rectify_producer(self, z: torch.Tensor, rectified: torch.Tensor) -> bool:
        """A ReLU whose rule keeps nothing consumed a hooked layer's output: that layer keeps relu(z) instead.
        True if it does."""
        entry = self._producers.pop(id(z), None)
        call = entry[1]() if entry is not None and entry[0]() is z else None
        if call is not None:
            call.rectify(rectified)
        return call is not None

    def _rectifies(self, tensor: torch.Tensor) -> bool:
        """``tensor`` is the output of a ReLU that a layer below keeps as its own (``_rectify_producer``)."""
        entry = self._rectifying.get(id(tensor))
        return entry is not None and entry() is tensor

    # -- reports -------------------------------------------------------------------------------------------
    def coverage(self) -> list[Assignment]:
        """Every leaf module in forward order (modules that never ran last), with the rule it got."""
        ran = sorted((a for a in self.assignments.values() if a.order >= 0), key=lambda a: a.order)
        idle = [a for a in self.assignments.values() if a.order < 0]
        return ran + idle

    def unhandled(self) -> list[Assignment]:
        """Leaf modules that ran and got no rule (their plain gradient flowed)."""
        return [a for a in self.coverage() if a.rule is None and a.calls > 0]


class UnhandledModuleWarning(UserWarning):
    """A module that computes something got no rule."""


class UnhandledModuleError(ValueError):
    """strict=True and a module that computes something got no rule."""


def sessions_of(model: nn.Module) -> list[Session]:
    """The sessions currently entered on a model (or on the model a canonizer returned)."""
    return list(_SESSIONS.get(model, []))


@contextlib.contextmanager
def rules_off(model: nn.Module) -> Iterator[None]:
    """Switch the rules of every active session on ``model`` off: backward passes see plain gradients."""
    with contextlib.ExitStack() as stack:
        for session in sessions_of(model):
            stack.enter_context(session.inactive())
        yield
