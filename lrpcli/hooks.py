"""The hook machinery: one autograd node per module call that swaps the gradient for the rule's relevance.

How it works. Inside a ``Session`` every leaf module has a forward hook. When a module that got a rule
runs, the hook wraps its output ``z`` in ``_RuleFunction``, an identity in the forward whose backward calls
the rule with the relevance arriving at ``z`` and returns the relevance for each of the module's inputs
directly. The module's own backward is never run (the rule's result replaces it) and the layer is never
re-run: the forward already computed ``z``, and rules reuse it.

Per-call state (inputs, output, rule) lives in a ``LayerCall`` owned by the autograd node, so a module called
twice in one forward gets two independent records, and everything is freed with the graph. The session can be
made inactive (``inactive()``): nodes then pass the plain gradient to ``z``, which is what a second backward
through a relevance (create_graph=True) must see.

ReLU outputs that are recomputed. A rule that reads only a ReLU's input keeps z; during a forward of the whole
model the session stores what autograd saves of y = relu(z) as a reference to z and recomputes relu(z) when a
backward needs it (``relu_recompute``), so the model keeps one activation per layer, as the plain gradient does.

The plain path. Under ``rules.plain()`` every hooked layer keeps its own output and its relevance comes from
``rules.formula`` on the whole batch: no rectified outputs, recomputed ReLUs, zero notes, unhooked gradients or
batch slices.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from . import relu_recompute
from .layerops import bias_shape, empty_like_layout, forward, is_linear_layer, tracing
from .rules import formula
from .rules.base import Rule, fits


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


#: largest relevance tensor (bytes) a rule processes in one piece; larger ones are split over the batch
CHUNK_BYTES = 16 * 2**20


class LayerCall:
    """One call of a hooked module: what its rule needs in the backward."""

    __slots__ = ("session", "module", "name", "key", "rule", "inputs", "output", "versions", "rectified",
                 "output_rectified", "relu_recomputed", "input_nonnegative", "into", "_memo", "__weakref__")

    def __init__(self, session: Session, module: nn.Module, name: str, key: str, rule: Rule,
                 inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        self.session = session
        self.module = module
        self.name = name
        self.key = key
        self.rule = rule
        self.inputs = inputs
        self.output = output
        self.versions = tuple(t._version for t in inputs) + (output._version,)
        self.rectified = False
        #: in the backward: the output is relu(z) and the relevance is 0 wherever it is 0 (see restore_output)
        self.output_rectified = False
        #: the call is a ReLU whose output is not in the graph (``relu_recompute``): the plain gradient is computed
        #: from the input here instead of by the ReLU's own autograd node
        self.relu_recomputed = False
        self._memo: dict[str, Any] = {}
        #: where a rule may write the relevance of the first input (``times_input(..., into=call.into)``): this
        #: slice's rows of the whole batch's result, when the backward runs over slices of the batch; else None
        self.into: torch.Tensor | None = None
        #: the first input is a hooked ReLU's output (through pooling or reshaping), unmodified: x >= 0 is known
        #: without reading x (sign-split rules skip their min/max pass)
        self.input_nonnegative = bool(inputs) and known_nonnegative(inputs[0])

    @property
    def x(self) -> torch.Tensor:
        return self.inputs[0]

    def params(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight and bias in effect for this call (merged ones while a canonizer is active); computed once
        per backward of the call, also when the rule runs over several batch slices."""
        return self.memo("params", lambda: self.session.params_of(self.module))

    def memo(self, key: str, build: Callable[[], Any]) -> Any:
        """A value computed once per backward of this call and shared by its batch slices (W+, stacked weights,
        a ZBox's bound terms): work that depends on the parameters, not on the samples."""
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    def output_without_bias(self, bias: torch.Tensor | None) -> torch.Tensor:
        """z - b: the layer output without its bias term (the one from ``params()``), from the stored output."""
        if bias is None:
            return self.output
        return self.output - bias.view(bias_shape(self.module, self.output))

    def native_vjp(self, v: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """The module's own vector-Jacobian product at v, for each input (None where an input has no path)."""
        wanted = [t for t in self.inputs if t.requires_grad]
        if not wanted:
            return tuple(None for _ in self.inputs)
        grads = iter(torch.autograd.grad(self.output, wanted, v, retain_graph=True,
                                          create_graph=torch.is_grad_enabled(), allow_unused=True))
        return tuple(next(grads) if t.requires_grad else None for t in self.inputs)

    def release(self) -> None:
        """Keep only the tensors the rule reads; the others become shape-only (meta) stand-ins.

        A LayerCall lives as long as the graph: holding every layer's output would keep activations alive that
        a plain backward frees (a ReLU's Pass needs none, ZPlus no output), doubling peak memory.
        """
        if self.rule.needs_graph:
            return
        reads = self.rule.reads_of(self.module)
        if "output" not in reads:
            self.output = torch.empty_like(self.output, device="meta")
        if "inputs" not in reads:
            self.inputs = tuple(torch.empty_like(t, device="meta") for t in self.inputs)

    def rectify(self, rectified: torch.Tensor) -> None:
        """Keep relu(z) instead of z: the ReLU's output, which the next layer keeps anyway (one activation
        less per layer). Only for rules that ``tolerates_rectified_output()``; ``restore_output`` makes it exact."""
        self.output = rectified.detach()  # detached: no reference cycle through the graph
        self.versions = self.versions[:-1] + (self.output._version,)
        self.rectified = True

    def restore_output(self, relevance: torch.Tensor) -> None:
        """Give the rule an output that yields exactly its relevance, after ``rectify``.

        Where relu(z) > 0 it equals z. Where it is 0 (z <= 0) the rule's ratio R_j / s(den_j) is 0 whatever
        den_j is, as long as R_j = 0 — which holds whenever the layers above are proportional to their input
        (every LRP rule but Flat, WSquare and ZBox, and no gradient rule). When the relevance is the very tensor
        such a rule made from this output (``ZeroNotes``), that is known without looking; else one pass over
        both tensors checks it. Where it fails, z is recomputed from the stored input, one forward of this
        layer; also under create_graph=True, where z must carry its graph.
        """
        if not self.rectified:
            return
        self.rectified = False
        zero_where_rectified = not torch.is_grad_enabled() and (
            self.session.zero_notes.known(relevance, self.output)
            or not bool(torch.logical_and(relevance != 0, self.output == 0).any()))
        if zero_where_rectified:
            self.output_rectified = True  # rules may use it: only outputs > 0 carry relevance
        else:
            weight, bias = self.params()
            self.output = forward(self.module, self.x, weight, bias, self.output)
            self.versions = self.versions[:-1] + (self.output._version,)

    def relevance(self, relevance: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """The rule's relevance for each input; over slices of the batch where the layer is large.

        A rule's temporaries are several tensors of the output's size (products, denominators, a pair buffer, the
        transposed operation's result); at the first layers of an image model they set the peak memory. Rules
        are per-sample, so slicing the batch changes no number, and bounds those temporaries to CHUNK_BYTES.
        """
        if tracing():  # a capture serves any batch size: no slices that depend on it
            return self.rule.relevance(self, relevance)
        n = relevance.shape[0] if relevance.dim() else 0
        parts = min(n, -(-relevance.numel() * relevance.element_size() // CHUNK_BYTES))
        if parts <= 1 or self.rule.needs_graph or not self.rule.makes_temporaries or torch.is_grad_enabled() \
                or not self._batched(n) or not self.rule.splits_over_batch(self):
            return self.rule.relevance(self, relevance)
        # the first input's result is allocated up front, so that rules write each slice's rows straight into
        # it (``into``) instead of into a temporary that is then copied
        # (on the relevance's device: x is a shape-only stand-in where the rule does not read it)
        first = empty_like_layout(self.x, self.x.shape, dtype=torch.result_type(self.x, relevance),
                                  device=relevance.device)
        results: list[torch.Tensor | None] = []
        for rows in torch.arange(n).tensor_split(parts):
            start, stop = int(rows[0]), int(rows[-1]) + 1
            sliced = self._rows(start, stop)
            sliced.into = first[start:stop]
            part = self.rule.relevance(sliced, relevance[start:stop])
            if not results:
                results = [None if r is None else (first if k == 0 and fits(sliced.into, r)
                                                   else r.new_empty((n,) + r.shape[1:]))
                           for k, r in enumerate(part)]
            for out, r in zip(results, part):
                if out is not None and r is not None and r.data_ptr() != out[start:stop].data_ptr():
                    out[start:stop] = r
        return tuple(results)

    def _batched(self, n: int) -> bool:
        return all(t.dim() > 0 and t.shape[0] == n for t in self.inputs + (self.output,))

    def _rows(self, start: int, stop: int) -> LayerCall:
        """This call restricted to samples start:stop (the same module, rule and parameters)."""
        part = object.__new__(LayerCall)
        for slot in LayerCall.__slots__:
            if slot != "__weakref__":
                setattr(part, slot, getattr(self, slot))
        part.inputs = tuple(t[start:stop] for t in self.inputs)
        part.output = self.output[start:stop]
        return part

    def check_unmodified(self) -> None:
        """Refuse to compute with tensors that an in-place operation changed after the module ran."""
        now = tuple(t._version for t in self.inputs) + (self.output._version,)
        reads = self.rule.reads_of(self.module)
        changed = [a != b for a, b in zip(now, self.versions)]
        if ("inputs" in reads and any(changed[:-1])) or ("output" in reads and changed[-1]):
            raise RuntimeError(
                f"lrpcli: the input or output of module {self.name!r} ({type(self.module).__name__}) was modified "
                "in place after the module ran; relevance would be wrong. Avoid in-place operations on hooked "
                "tensors (e.g. `out += identity`: use the 'residual' canonizer, or `out = out + identity`)."
            )


#: modules whose output is >= 0 whatever their input, and modules whose output keeps the signs of their input
_NONNEGATIVE_OUTPUT = (nn.ReLU, nn.ReLU6)
_SIGN_KEEPING = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
                 nn.AdaptiveMaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
                 nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.Flatten, nn.Identity)


def known_nonnegative(x: torch.Tensor, depth: int = 4) -> bool:
    """True when x is, unmodified, what a hooked ReLU returned (possibly through pooling or reshaping layers).

    Read from the autograd graph: a hooked module's result has its ``_RuleFunction`` node as grad_fn, which
    carries the LayerCall; an in-place change since then gives x another grad_fn or another version.
    """
    call = getattr(x.grad_fn, "call", None)
    if not isinstance(call, LayerCall) or call.versions[-1] != x._version:
        return False
    if isinstance(call.module, _NONNEGATIVE_OUTPUT):
        return True
    return (depth > 0 and isinstance(call.module, _SIGN_KEEPING) and bool(call.inputs)
            and known_nonnegative(call.inputs[0], depth - 1))


class _RuleFunction(torch.autograd.Function):
    """Identity in the forward; the rule's relevance in the backward (plain gradient when inactive)."""

    @staticmethod
    def forward(ctx: Any, call: LayerCall, z: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        ctx.call = call
        if call.relu_recomputed:
            # autograd frees saved tensors once the node ran (unless the graph is retained); a LayerCall lives
            # as long as the graph. The plain gradient frees each activation as the backward passes it: so must
            # this one, the only copy of the layer's activation
            ctx.save_for_backward(*inputs)
        # an alias, not a view: in-place ops downstream stay legal, and check_unmodified catches those that
        # change a tensor the rule reads (detach shares the version counter)
        return z.detach()

    @staticmethod
    def backward(ctx: Any, relevance: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        call: LayerCall = ctx.call
        if not call.relu_recomputed:
            return _RuleFunction._backward(call, relevance)
        stand_ins, call.inputs = call.inputs, ctx.saved_tensors
        try:
            return _RuleFunction._backward(call, relevance)
        finally:
            call.inputs = stand_ins

    @staticmethod
    def _backward(call: LayerCall, relevance: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        n = len(call.inputs)
        if not call.session.active:
            if call.relu_recomputed:  # what the ReLU's own node (ReluBackward0) computes, bit for bit
                call.check_unmodified()
                return None, None, torch.ops.aten.threshold_backward(relevance, torch.relu(call.x), 0)
            return (None, relevance) + (None,) * n
        call.check_unmodified()
        if formula.enabled():
            return (None, None) + tuple(_RuleFunction._plain(call, relevance))
        call.restore_output(relevance)
        result = call.relevance(relevance)
        call._memo.clear()
        if not torch.is_grad_enabled() and not tracing():  # a capture keeps no notes (they read memory)
            notes = call.session.zero_notes
            if call.rule.proportional_to_inputs or (call.rule.keeps_zeros(call.module)
                                                    and notes.known(relevance, call.output)):
                notes.mark(call.inputs, result)
            else:
                notes.hand_on(relevance, result)
        if call.session.recorder is not None:
            call.session.recorder.on_backward(call, relevance, result)
        return (None, None) + tuple(result)

    @staticmethod
    def _plain(call: LayerCall, relevance: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """The rule's formula (``rules.formula``) on the whole batch and the layer's true output."""
        if call.rectified:  # kept as relu(z) by a forward that ran the fast path: z again, from the input
            call.rectified = False
            weight, bias = call.params()
            call.output = formula.layer(call.module, call.x, weight, bias, call.output)
        result = formula.relevance(call.rule, call, relevance)
        call._memo.clear()
        if call.session.recorder is not None:
            call.session.recorder.on_backward(call, relevance, result)
        return result


class ZeroNotes:
    """Which relevance tensors are known to be zero wherever a given tensor is, kept by the session.

    A rule with ``proportional_to_inputs`` makes relevance that is zero wherever its input is; when that input is
    a ReLU's output, the layer below the ReLU (which keeps relu(z) as its output, ``LayerCall.rectify``) is then
    spared the pass over its output and relevance that ``restore_output`` would otherwise make. A note is keyed
    by the relevance tensor's id and holds it weakly (ids of dead tensors are reused), with the versions of both
    tensors: it holds only while neither changed. Notes are made and read within one backward; the session drops
    them at the start of each forward.
    """

    __slots__ = ("notes",)

    def __init__(self) -> None:
        #: id(relevance) -> (weak relevance, its version, weak input, the input's version)
        self.notes: dict[int, tuple[weakref.ref, int, weakref.ref, int]] = {}

    def mark(self, inputs: Sequence[torch.Tensor], result: Sequence[torch.Tensor | None]) -> None:
        """Each input's relevance in ``result`` is zero wherever that input is."""
        for x, r in zip(inputs, result):
            if r is not None and r.shape == x.shape and not x.is_meta:
                self.notes[id(r)] = (weakref.ref(r), r._version, weakref.ref(x), x._version)

    def _note(self, relevance: torch.Tensor) -> tuple[weakref.ref, int, weakref.ref, int] | None:
        note = self.notes.get(id(relevance))
        return note if note is not None and note[0]() is relevance else None

    def hand_on(self, relevance: torch.Tensor, result: Sequence[torch.Tensor | None]) -> None:
        """A result holding the very elements of the relevance (a Pass that reshapes it: Flatten) keeps its
        note."""
        note = self._note(relevance)
        if note is not None:
            for r in result:
                if r is not None and r is not relevance and same_elements(r, relevance):
                    self.notes[id(r)] = (weakref.ref(r),) + note[1:]

    def known(self, relevance: torch.Tensor, output: torch.Tensor) -> bool:
        """True if ``relevance`` is known to be zero wherever ``output`` is: a note says so for a tensor holding
        the same elements as ``output``, and neither changed since."""
        note = self._note(relevance)
        if note is None:
            return False
        _, version, ref, x_version = note
        x = ref()
        return (x is not None and relevance._version == version and x._version == x_version
                and relevance.numel() == output.numel() and same_elements(x, output))

    def clear(self) -> None:
        self.notes.clear()


def same_elements(a: torch.Tensor, b: torch.Tensor) -> bool:
    """a and b hold the same elements in the same order (one is b itself, or both are the same memory with the
    same layout, or contiguous reshapes of one another)."""
    if a is b:
        return True
    if (a.dim() == 0 or b.dim() == 0 or a.data_ptr() != b.data_ptr() or a.dtype != b.dtype
            or a.device != b.device or a.numel() != b.numel() or a.shape[0] != b.shape[0]):
        return False
    return (a.shape == b.shape and a.stride() == b.stride()) or (a.is_contiguous() and b.is_contiguous())


class _Tap(torch.autograd.Function):
    """Identity both ways; the backward hands the relevance arriving at a module's output to the recorder."""

    @staticmethod
    def forward(ctx: Any, recorder: Recorder, key: str, z: torch.Tensor) -> torch.Tensor:
        ctx.recorder, ctx.key = recorder, key
        return z.detach()

    @staticmethod
    def backward(ctx: Any, relevance: torch.Tensor) -> tuple[None, None, torch.Tensor]:
        ctx.recorder.on_map(ctx.key, relevance)
        return None, None, relevance


@dataclass
class Assignment:
    """What a leaf module got: its rule (None = nothing, the plain gradient flows) and how often it ran."""

    name: str
    module: nn.Module
    rule: Rule | None
    calls: int = 0
    order: int = -1

    @property
    def type_name(self) -> str:
        return type(self.module).__name__


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
        return assignment.rule

    def params_of(self, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        override = self.param_overrides.get(module)
        if override is not None:
            return override()
        return module.weight, module.bias

    def _tap_hook(self, name: str) -> Callable[..., Any]:
        """A forward hook that taps the relevance at this module's output (any module, also containers)."""

        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            if self._probing or not isinstance(output, torch.Tensor) or not output.requires_grad:
                return None
            count = self._tap_counts.get(name, 0)
            self._tap_counts[name] = count + 1
            key = name if count == 0 else f"{name}#{count + 1}"
            tapped = _Tap.apply(self.recorder, key, output)
            self._saved.follow(output, tapped)
            return tapped

        return hook

    def _forward_hook(self, module: nn.Module, args: tuple, output: Any) -> Any:
        if self._probing:
            return None
        rule = self.rule_for(module)
        assignment = self.assignments[module]
        count = self._call_counts.get(module, 0)
        self._call_counts[module] = count + 1
        assignment.calls += 1
        if rule is None or not isinstance(output, torch.Tensor) or not torch.is_grad_enabled():
            return None
        inputs = tuple(a for a in args if isinstance(a, torch.Tensor))
        if not output.requires_grad:
            return None
        plain = formula.enabled()
        if rule.is_native_gradient and self.recorder is None and not plain and not (
                rule.keeps_zeros(module) and inputs and self._rectifies(inputs[0])):
            # the module's own gradient flows unhooked: same result, nothing kept alive. A max pool over a ReLU
            # output that the layer below keeps stays hooked: it hands on the note that saves that layer a check
            # (``ZeroNotes``), and keeps nothing that is not kept anyway
            return None
        key = assignment.name if count == 0 else f"{assignment.name}#{count + 1}"
        call = LayerCall(self, module, assignment.name, key, rule, inputs, output)
        if self.recorder is not None:
            self.recorder.on_forward(call)
        # a ReLU output that can be recomputed stays out of the graph: once the forward has moved on, nothing
        # refers to it or to its autograd node, and its storage is freed
        traced = tracing()  # a capture keeps every layer's own output, like the plain path
        recompute = (self._in_root and not plain and not traced
                     and relu_recompute.recomputable_relu(rule, module, inputs, output) and self._saved.install())
        call.relu_recomputed = recompute
        result = _RuleFunction.apply(call, output.detach() if recompute else output, *inputs)
        call.release()
        if recompute:
            self._saved.add(result, inputs[0])
            call.inputs = tuple(torch.empty_like(t, device="meta") for t in inputs)  # z lives in ctx (above)
        if plain or traced:  # every layer keeps its own output (no relu(z) in its place)
            return result
        keeps_nothing = not rule.reads_of(module) and not rule.needs_graph
        if keeps_nothing and inputs and type(module) is nn.ReLU:
            if self._rectify_producer(inputs[0], output):
                self._rectifying[id(result)] = weakref.ref(result)
        elif keeps_nothing and inputs and output is inputs[0]:  # an identity (a merged BatchNorm): look through
            entry = self._producers.pop(id(output), None)
            if entry is not None and entry[0]() is output:
                self._producers[id(result)] = (weakref.ref(result), entry[1])
        elif self._in_root and is_linear_layer(module) and rule.tolerates_rectified_output():
            # weak both ways: an entry never keeps a graph alive (e.g. a submodule called outside the root)
            self._producers[id(result)] = (weakref.ref(result), weakref.ref(call))
        return result

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
