"""One call of a hooked module: what its rule reads in the backward, and what the session knows about it.

A ``LayerCall`` is made by the session's forward hook (``hooks``) for each call of a module that got a rule
and is owned by that call's autograd node, so a module called twice in one forward gets two records and all
is freed with the graph. It keeps only the tensors its rule reads (``release``), may keep relu(z) in place of
its output z and restore what the rule needs (``rectify``, ``restore_output``), runs the rule over slices of
the batch where the layer is large (``relevance``) and refuses tensors changed in place (``check_unmodified``).

Its autograd node: ``RuleFunction``, an identity in the forward whose backward runs the call's rule (``Tap``
hands a module's incoming relevance to a recorder; ``PassFunction`` stands in for a LayerCall where Pass needs
none). Besides it: ``known_nonnegative``, read from the graph. What the session keeps across calls lives
beside it: ``paramcache`` (parameter-derived tensors) and ``zeronotes`` (relevance known to be zero).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge

from lrpcli.engine.layerops import bias_shape, empty_like_layout, forward, tracing
from lrpcli.engine.paramcache import ParamCache
from lrpcli.engine.rules import formula
from lrpcli.engine.rules.base import Rule, fits
from lrpcli.engine.zeronotes import ZeroNotes


class Session(Protocol):
    """What a call asks of its session (``hooks.Session``)."""

    active: bool
    recorder: Any
    zero_notes: ZeroNotes
    param_cache: ParamCache

    def params_of(self, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def param_stamp(self, call: LayerCall) -> tuple | None: ...


#: largest relevance tensor (bytes) a rule processes in one piece; larger ones are split over the batch
CHUNK_BYTES = 16 * 2**20


class LayerCall:
    """One call of a hooked module: what its rule needs in the backward."""

    __slots__ = ("session", "module", "name", "key", "rule", "reads", "inputs", "output", "versions", "rectified",
                 "output_rectified", "relu_recomputed", "input_nonnegative", "into", "rms", "saves_inputs",
                 "positive_relevance", "input_relu_of", "_memo", "__weakref__")

    def __init__(self, session: Session, module: nn.Module, name: str, key: str, rule: Rule,
                 inputs: tuple[torch.Tensor, ...], output: torch.Tensor,
                 reads: tuple[str, ...] | None = None) -> None:
        self.session = session
        self.module = module
        self.name = name
        self.key = key
        self.rule = rule
        #: ``rule.reads_of(module)``, given by the session from its per-module dispatch
        self.reads = rule.reads_of(module) if reads is None else reads
        self.inputs = inputs
        self.output = output
        self.versions = tuple(t._version for t in inputs) + (output._version,)
        self.rectified = False
        #: in the backward: the output is relu(z) and the relevance is 0 wherever it is 0 (see restore_output)
        self.output_rectified = False
        #: in the backward: the relevance is known to be 0 wherever z <= 0 (output_rectified, or a ReLU above
        #: whose output is recomputed from the z this call keeps whole); the output itself may be z
        self.positive_relevance = False
        #: weak reference to the call below a recomputed ReLU whose output is this call's first input (the
        #: session's ``relu_recompute`` route): a proportional rule here tells it where its relevance is 0
        self.input_relu_of: Any = None
        #: rms mode: the per-sample rms of each of the rule's denominators, taken before ``rectify`` (B numbers each)
        self.rms: tuple[torch.Tensor, ...] | None = None
        #: the call is a ReLU whose output is not in the graph (``relu_recompute``): the plain gradient is computed
        #: from the input here instead of by the ReLU's own autograd node
        self.relu_recomputed = False
        #: the inputs live in the autograd node's context (recomputed ReLU outputs: stored as references to z)
        self.saves_inputs = False
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
        a ZBox's bound terms): work that depends on the parameters, not on the samples. In a first-order
        backward the session also keeps it for later calls of the module (``ParamCache``)."""
        memo = self._memo
        if key not in memo:
            cache = self.session.param_cache
            if torch.is_grad_enabled() or formula.enabled() or tracing():  # a capture bakes nothing in
                memo[key] = build()
            else:
                memo[key] = cache.get(self, key, build)
        return memo[key]

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
        if not torch.is_grad_enabled() and not tracing():  # a capture records autograd.grad's work as it is
            node = _single_node(self.output, self.inputs)
            if node is not None:  # what autograd.grad would run, without starting a graph task
                direct = node(v)
                direct = (direct,) if isinstance(direct, torch.Tensor) else tuple(direct)
                # autograd would still reduce broadcast gradients or cast them: left to it
                if all(g is None or (g.shape == t.shape and g.dtype == t.dtype and g.device == t.device)
                       for g, t in zip(direct, self.inputs)):
                    return tuple(g if t.requires_grad else None for g, t in zip(direct, self.inputs))
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
        reads = self.reads
        if "output" not in reads:
            self.output = torch.empty_like(self.output, device="meta")
        if "inputs" not in reads:
            self.inputs = tuple(torch.empty_like(t, device="meta") for t in self.inputs)

    def rectify(self, rectified: torch.Tensor) -> None:
        """Keep relu(z) instead of z: the ReLU's output, which the next layer keeps anyway (one activation
        less per layer). Only for rules that ``tolerates_rectified_output()``; ``restore_output`` makes it exact.

        An rms stabilizer scales epsilon by the rms of each whole denominator, which relu(z) does not give: those
        are taken now, while z is whole, and kept (B numbers each) in place of z. A z changed in place since the
        layer ran stays (``check_unmodified`` refuses it in the backward)."""
        if self.output._version != self.versions[-1]:
            return
        if self.rule.rms_at_forward():
            self.rms = self._forward_rms()
        self.output = rectified.detach()  # detached: no reference cycle through the graph
        self.versions = self.versions[:-1] + (self.output._version,)
        self.rectified = True

    def _forward_rms(self) -> tuple[torch.Tensor, ...]:
        """``rule.rectified_rms`` of this call, over slices of the batch where the layer is large: the
        denominators are temporaries of the output's size (Gamma's takes one forward through W+), bounded like
        the backward's (``relevance``). Parameter-derived tensors come from the session's cache, and none is
        kept on the call until its backward."""
        rule, z = self.rule, self.output
        n = z.shape[0] if z.dim() > 1 else 0
        parts = min(n, -(-z.numel() * z.element_size() // CHUNK_BYTES))
        with torch.no_grad():
            if parts <= 1 or not self._batched(n) or not rule.splits_over_batch(self):
                kept = rule.rectified_rms(self)
            else:
                pieces = []
                for rows in torch.arange(n).tensor_split(parts):
                    pieces.append(rule.rectified_rms(self._rows(int(rows[0]), int(rows[-1]) + 1)))
                kept = tuple(torch.cat(column) for column in zip(*pieces))
        self._memo.clear()
        return kept

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
            # z kept whole below a recomputed ReLU: the ReLU's relevance may be known to vanish where z <= 0
            self.positive_relevance = not torch.is_grad_enabled() and \
                self.session.zero_notes.known_rectified(relevance, self.output)
            return
        self.rectified = False
        zero_where_rectified = not torch.is_grad_enabled() and (
            self.session.zero_notes.known(relevance, self.output)
            or not bool(torch.logical_and(relevance != 0, self.output == 0).any()))
        if zero_where_rectified:
            self.output_rectified = True  # rules may use it: only outputs > 0 carry relevance
            self.positive_relevance = True
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
        if self.rms is not None:  # per sample; a scalar where the output has no batch dimension
            part.rms = tuple(r[start:stop] if r.dim() else r for r in self.rms)
        return part

    def check_unmodified(self) -> None:
        """Refuse to compute with tensors that an in-place operation changed after the module ran."""
        reads = self.reads
        if not reads:  # nothing kept, nothing to check
            return
        versions = self.versions
        # inputs from the node's context are checked as they are unpacked (``relu_recompute``)
        output_changed = "output" in reads and self.output._version != versions[-1]
        inputs_changed = "inputs" in reads and not self.saves_inputs and any(
            t._version != v for t, v in zip(self.inputs, versions))
        if output_changed or inputs_changed:
            raise RuntimeError(
                f"lrpcli: the input or output of module {self.name!r} ({type(self.module).__name__}) was modified "
                "in place after the module ran; relevance would be wrong. Avoid in-place operations on hooked "
                "tensors (e.g. `out += identity`: use the 'residual' canonizer, or `out = out + identity`)."
            )


def _single_node(output: torch.Tensor, inputs: tuple[torch.Tensor, ...]) -> Any:
    """The autograd node of ``output`` where it takes the inputs directly, one edge each, in order (a module that
    is one operation: a pool, a mean, a product); else None. Calling it is autograd.grad's work for one node,
    the same kernel on the same saved tensors, without the cost of a graph task (small networks run many)."""
    node = output.grad_fn
    if node is None:
        return None
    edges = node.next_functions
    if len(edges) != len(inputs):
        return None
    seen: set[tuple[int, int]] = set()
    for t, (target, index) in zip(inputs, edges):
        if not t.requires_grad:
            if target is not None:
                return None
            continue
        edge = get_gradient_edge(t)
        key = (id(edge.node), edge.output_nr)
        if edge.node is not target or edge.output_nr != index or key in seen:
            return None
        seen.add(key)
    return node


#: modules whose output is >= 0 whatever their input, and modules whose output keeps the signs of their input
_NONNEGATIVE_OUTPUT = (nn.ReLU, nn.ReLU6)
_SIGN_KEEPING = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
                 nn.AdaptiveMaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
                 nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.Flatten, nn.Identity)


def says_signs(module: nn.Module) -> bool:
    """``known_nonnegative`` reads the LayerCall of this module's calls (their output or input is >= 0)."""
    return isinstance(module, _NONNEGATIVE_OUTPUT + _SIGN_KEEPING)


def known_nonnegative(x: torch.Tensor, depth: int = 4) -> bool:
    """True when x is, unmodified, what a hooked ReLU returned (possibly through pooling or reshaping layers).

    Read from the autograd graph: a hooked module's result has its ``RuleFunction`` node as grad_fn, which
    carries the LayerCall; an in-place change since then gives x another grad_fn or another version.
    """
    call = getattr(x.grad_fn, "call", None)
    if not isinstance(call, LayerCall) or call.versions[-1] != x._version:
        return False
    if isinstance(call.module, _NONNEGATIVE_OUTPUT):
        return True
    return (depth > 0 and isinstance(call.module, _SIGN_KEEPING) and bool(call.inputs)
            and known_nonnegative(call.inputs[0], depth - 1))


class RuleFunction(torch.autograd.Function):
    """Identity in the forward; the rule's relevance in the backward (plain gradient when inactive)."""

    @staticmethod
    def forward(ctx: Any, call: LayerCall, z: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        ctx.call = call
        if call.saves_inputs:
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
        if not call.saves_inputs:
            return RuleFunction._backward(call, relevance)
        stand_ins, call.inputs = call.inputs, ctx.saved_tensors
        try:
            return RuleFunction._backward(call, relevance)
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
            return (None, None) + tuple(RuleFunction._plain(call, relevance))
        call.restore_output(relevance)
        result = call.relevance(relevance)
        call._memo.clear()
        if not torch.is_grad_enabled() and not tracing():  # a capture keeps no notes (they read memory)
            notes = call.session.zero_notes
            if call.rule.proportional_to_inputs or (call.rule.keeps_zeros(call.module)
                                                    and notes.known(relevance, call.output)):
                notes.mark(call.inputs, result)
                below = None if call.input_relu_of is None else call.input_relu_of()
                if below is not None and result and result[0] is not None:
                    notes.mark_rectified(result[0], below.output)
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


class PassFunction(torch.autograd.Function):
    """``RuleFunction`` for Pass on a module that computes something (an activation, a gate), without a
    ``LayerCall``: the relevance goes to the first input unchanged, the plain gradient to z when inactive.

    Pass keeps nothing and checks nothing, and such a module's output says nothing of its input's signs
    (``known_nonnegative``): of a LayerCall it reads only the first input's shape. Small networks run dozens of
    these per forward; the record and its shape-only stand-ins are most of their cost. Sessions with a recorder,
    the plain path and captures keep the LayerCall.
    """

    @staticmethod
    def forward(ctx: Any, session: Session, name: str, module: nn.Module, rule: Rule, z: torch.Tensor,
                *inputs: torch.Tensor) -> torch.Tensor:
        ctx.session, ctx.name, ctx.module, ctx.rule = session, name, module, rule
        ctx.shape, ctx.count = inputs[0].shape, len(inputs)
        return z.detach()

    @staticmethod
    def backward(ctx: Any, relevance: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        rest = (None,) * (ctx.count - 1)
        if not ctx.session.active:
            return (None, None, None, None, relevance, None) + rest
        if relevance.shape == ctx.shape:  # Pass's own answer: the tensor itself
            return (None, None, None, None, None, relevance) + rest
        # another shape: the rule reshapes or refuses, on shape-only stand-ins of the inputs
        x = torch.empty(ctx.shape, dtype=relevance.dtype, device="meta")
        result = ctx.rule.relevance(_Shapes(ctx.name, ctx.module, (x,) * ctx.count), relevance)
        if not torch.is_grad_enabled() and not tracing() and not formula.enabled():
            ctx.session.zero_notes.hand_on(relevance, result)
        return (None, None, None, None, None) + tuple(result)


class _Shapes:
    """What Pass reads of a call: its name, module and inputs (shape-only)."""

    __slots__ = ("name", "module", "inputs")

    def __init__(self, name: str, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        self.name, self.module, self.inputs = name, module, inputs

    @property
    def x(self) -> torch.Tensor:
        return self.inputs[0]


class Tap(torch.autograd.Function):
    """Identity both ways; the backward hands the relevance arriving at a module's output to the recorder."""

    @staticmethod
    def forward(ctx: Any, recorder: Any, key: str, z: torch.Tensor) -> torch.Tensor:
        ctx.recorder, ctx.key = recorder, key
        return z.detach()

    @staticmethod
    def backward(ctx: Any, relevance: torch.Tensor) -> tuple[None, None, torch.Tensor]:
        ctx.recorder.on_map(ctx.key, relevance)
        return None, None, relevance
