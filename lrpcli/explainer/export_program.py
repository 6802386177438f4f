"""``lrpcli.export``: one attribution captured as a program of plain tensor operations, to save and serve.

The rules are autograd functions, so a forward and the LRP backward through them can be recorded as one graph
below autograd (``make_fx``): every rule's backward becomes ordinary operations. The capture runs on fake tensors
whose batch size is a symbol, with the model's parameters and buffers as inputs (so no real tensor is baked into
the graph and no operation is specialised to the example's batch); the engine meanwhile takes its general path
wherever it would read a tensor's values or memory (``layerops.traced``). The graph is then wrapped with the
weights as buffers and exported with ``torch.export``: the saved program needs torch only, not lrpcli.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch
from torch import nn

from lrpcli.engine.composites import Composite
from lrpcli.engine.layerops import traced
from lrpcli.errors import LrpcliError
from lrpcli.explainer.explainer import Explainer, _initial, resolve_composite

#: what the program takes besides the image batch: a class index per sample, or the initial relevance
TargetForm = Literal["class", "relevance"]

#: what a failed capture says about an error raised while tracing (by the error's type name)
_DATA_DEPENDENT = ("GuardOnDataDependentSymNode", "DataDependentOutputException", "DynamicOutputShapeException",
                   "UserError")


class ExportError(LrpcliError, ValueError):
    """The model or its attribution cannot be captured as a program (one line naming the module and why)."""


class Attributor(nn.Module):
    """The captured attribution with the model's parameters and buffers as its own buffers.

    ``forward(x, target) -> (logits, relevance)``; exported as it is, it is what the saved program runs.
    """

    def __init__(self, graph: nn.Module, state: dict[str, torch.Tensor], classes: int | None = None) -> None:
        super().__init__()
        self.program = graph  # not ``graph``: the exported module is a GraphModule, whose ``graph`` is its own
        self.classes = classes
        self.names = list(state)
        for i, tensor in enumerate(state.values()):
            self.register_buffer(f"w{i}", tensor.detach().clone())

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        state = {name: getattr(self, f"w{i}") for i, name in enumerate(self.names)}
        if self.classes is not None:  # checked before the no_grad region: a failure inside it would leave the
            # caller's process with gradients off (the program's grad-mode switches are operations of its own)
            torch._assert_async(((target >= 0) & (target < self.classes)).all(),
                                f"lrpcli: target class out of range: the model has {self.classes} outputs")
        with torch.no_grad():  # the graph holds the backward already (and out= operations, which refuse autograd)
            return self.program(state, x, target)


def export(model: nn.Module, composite: str | Composite | None = "epsilon_gamma_box",
           canonizers: Sequence[Any] | None = None, *, example: torch.Tensor, dynamic_batch: bool = True,
           target: TargetForm = "class", strict: bool | None = None,
           **params: Any) -> torch.export.ExportedProgram:
    """The attribution of ``model`` under ``composite`` as an exported program (see README 'Deploying').

    Its module takes a normalised image batch shaped like ``example`` and the target class of each sample
    (int64, one per sample; ``target='relevance'``: the initial relevance, shaped like the model's output) and
    returns ``(logits, relevance)``. The model is captured in eval mode on the example's device and dtype;
    with ``dynamic_batch`` any batch size runs, else only the example's. Further keyword ``params`` go to the
    composite, as in ``lrpcli.attribute``. A model whose forward cannot be captured (it branches on a tensor's
    values) raises ``ExportError`` naming the module.
    """
    graph, state, (x, second) = capture(model, composite, canonizers, example=example,
                                        dynamic_batch=dynamic_batch, target=target, strict=strict, **params)
    classes = None
    if target == "class":
        with torch.no_grad():
            classes = int(model(x[:1]).shape[1])
    attributor = Attributor(graph, state, classes)
    shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1)
        shapes = ({0: batch}, {0: batch})
    try:
        program = torch.export.export(attributor, (x, second), dynamic_shapes=shapes)
    except Exception as err:  # the capture ran: what fails here is a shape the graph fixed
        raise ExportError(f"cannot export the captured attribution: {_first_line(err)}") from err
    _carry_layers(graph, program)
    return program


def _carry_layers(graph: nn.Module, program: torch.export.ExportedProgram) -> None:
    """Each exported node's layer (``custom`` metadata ``lrpcli_layer``), from the captured node it was traced
    from: export records the line of the captured graph's code that made it, which names that node."""
    layers = {node.name: node.meta.get("lrpcli_layer") for node in graph.graph.nodes}
    for node in all_nodes(program):
        lines = re.findall(r"^\s+(\w+) = torch\.ops\.", node.meta.get("stack_trace") or "", flags=re.M)
        layer = layers.get(lines[-1]) if lines else None
        if layer is not None:
            node.meta.setdefault("custom", {})["lrpcli_layer"] = layer


def all_nodes(program: torch.export.ExportedProgram) -> Iterator[torch.fx.Node]:
    """Every node of the program, also those of its submodules (the no_grad region is one)."""
    for module in program.graph_module.modules():
        if isinstance(module, torch.fx.GraphModule):
            yield from module.graph.nodes


def capture(model: nn.Module, composite: str | Composite | None = "epsilon_gamma_box",
            canonizers: Sequence[Any] | None = None, *, example: torch.Tensor, dynamic_batch: bool = True,
            target: TargetForm = "class", strict: bool | None = None,
            **params: Any) -> tuple[nn.Module, dict[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``(graph, state, inputs)``: the attribution as a graph module ``graph(state, x, target) -> (logits,
    relevance)`` of aten operations, the parameters and buffers it takes as ``state`` (names as in the hooked
    model) and the example inputs it was traced with."""
    if target not in ("class", "relevance"):
        raise ValueError(f"target: expected 'class' or 'relevance', got {target!r}")
    if not isinstance(example, torch.Tensor) or example.dim() < 1 or example.shape[0] < 1:
        raise ValueError("example: expected a tensor with a batch dimension, e.g. one normalised image batch")
    comp = resolve_composite(composite, **params)
    if comp is None and canonizers:
        raise ValueError("canonizers need a composite")
    explainer = Explainer(model, comp, canonizers, strict=strict)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with explainer:
            hooked = explainer.model
            x, second = _inputs(model, example, target, dynamic_batch)
            explainer(x)  # eager once: the canonizers' probe runs, and a failing rule fails as it does eagerly
            state = {k: v.detach() for k, v in _state(hooked).items()}
            run = _program(hooked, explainer.initial, target)
            return _trace(run, hooked, state, x, second, dynamic_batch), state, (x, second)
    finally:
        for module, training in modes:
            module.training = training


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(model.named_buffers(remove_duplicate=False))
    return named


def _inputs(model: nn.Module, example: torch.Tensor, target: TargetForm,
            dynamic_batch: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The example batch (two samples at least for a dynamic batch: a size-1 dimension would be fixed at 1)
    and a matching second input: class 0 per sample, or the output (an initial relevance of its shape)."""
    x = example.detach()
    if dynamic_batch and x.shape[0] == 1:
        x = x.expand((2,) + tuple(x.shape[1:])).clone()
    if target == "class":
        return x, torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    with torch.no_grad():
        out = model(x)
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"the model returns {type(out).__name__}: export needs a single output tensor")
    return x, out.detach().clone()


def _program(model: nn.Module, initial: str, target: TargetForm) -> Callable[..., Any]:
    """What is captured: the forward, the initial relevance and the backward of one batch."""

    def run(x: torch.Tensor, second: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xi = x.detach().requires_grad_(True)
        with torch.enable_grad():
            output = model(xi)
            if not isinstance(output, torch.Tensor):
                raise ValueError(f"the model returns {type(output).__name__}: export needs a single output tensor")
            if target == "class":
                k = output.shape[1]
                torch._assert_async(((second >= 0) & (second < k)).all(),
                                    f"lrpcli: target class out of range: the model has {k} outputs")
                seed = _initial(output, second, initial)
            else:
                seed = second
            _Layers.backward_starts()
            (relevance,) = torch.autograd.grad(output, xi, seed)
        return output.detach(), relevance

    return run


def _trace(run: Callable[..., Any], model: nn.Module, state: dict[str, torch.Tensor], x: torch.Tensor,
           second: torch.Tensor, dynamic_batch: bool) -> nn.Module:
    """``run`` recorded with ``make_fx`` on fake tensors: the batch dimension symbolic (dynamic_batch), the rest
    fixed; the state swapped into the model for the forward and the backward alike."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext
    from torch.nn.utils.stateless import _reparametrize_module

    mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)

    def fake(t: torch.Tensor, batch: bool) -> torch.Tensor:
        sizes = [DimDynamic.DYNAMIC if batch and i == 0 else DimDynamic.STATIC for i in range(t.dim())]
        return mode.from_tensor(t, symbolic_context=StatelessSymbolicContext(dynamic_sizes=sizes))

    def program(weights: dict[str, torch.Tensor], xb: torch.Tensor, sb: torch.Tensor) -> Any:
        with _reparametrize_module(model, weights, tie_weights=True):
            return run(xb, sb)

    fakes = {k: fake(v, False) for k, v in state.items()}
    fx, fs = fake(x, dynamic_batch), fake(second, dynamic_batch)
    with _Layers(model) as layers:
        try:
            with traced(), mode:
                graph = make_fx(program, tracing_mode="real", _allow_non_fake_inputs=True)(fakes, fx, fs)
        except LrpcliError:
            raise
        except Exception as err:
            raise ExportError(_capture_failure(layers.stack, err)) from err
    names = layers.label(graph.graph)
    for node in graph.graph.nodes:
        node.meta["lrpcli_layer"] = names[node.name]
    return graph


class _Layers:
    """Which module each recorded operation belongs to, and where a failed capture stopped.

    ``stack``: the modules whose forward is running (innermost last), left as it was where one raised. Every
    module's forward start and end, and the start of each leaf's backward (a pre-hook on its output's node), is
    a mark: the last node in the graph being recorded then, and the layer the nodes after it belong to.
    """

    #: the capture in progress (``backward_starts`` marks its graph)
    active: _Layers | None = None

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.last_leaf = "output"
        self.stack: list[str] = []
        self.marks: dict[str | None, str] = {}
        self.handles: list[Any] = []

    def mark(self, label: str) -> None:
        from torch.fx.experimental.proxy_tensor import get_proxy_mode

        proxy = get_proxy_mode()
        if proxy is not None:
            last = next(reversed(proxy.tracer.graph.nodes), None)
            self.marks[None if last is None else last.name] = label

    @classmethod
    def backward_starts(cls) -> None:
        """The backward begins at the leaf that made the output (autograd runs no pre-hook on the root node)."""
        if cls.active is not None:
            cls.active.mark(cls.active.last_leaf)

    def __enter__(self) -> _Layers:
        _Layers.active = self
        for name, module in self.model.named_modules():
            leaf = next(module.children(), None) is None
            label = name or type(module).__name__
            self.handles.append(module.register_forward_pre_hook(functools.partial(self._push, label)))
            self.handles.append(module.register_forward_hook(functools.partial(self._pop, label, leaf)))
        return self

    def __exit__(self, *exc: object) -> None:
        _Layers.active = None
        for handle in self.handles:
            handle.remove()

    def _push(self, label: str, _module: nn.Module, _args: Any) -> None:
        self.stack.append(label)
        self.mark(label)

    def _pop(self, label: str, leaf: bool, _module: nn.Module, args: Any, output: Any) -> None:
        if self.stack:
            self.stack.pop()
        self.mark(self.stack[-1] if self.stack else "output")
        if leaf and isinstance(output, torch.Tensor) and output.grad_fn is not None \
                and not any(output is a for a in args):  # an identity (a merged BatchNorm) is its input's layer
            self.last_leaf = label
            output.grad_fn.register_prehook(lambda _grads: self.mark(label))

    def label(self, graph: torch.fx.Graph) -> dict[str, str]:
        """Node name -> layer, for every node of the recorded graph."""
        current, found = self.marks.get(None, "input"), {}
        for node in graph.nodes:
            found[node.name] = current
            current = self.marks.get(node.name, current)
        return found


def _capture_failure(where: list[str], err: BaseException) -> str:
    """One line: where the capture stopped and why."""
    names = [type(e).__name__ for e in chain(err)]
    at = f"module {where[-1]!r}" if where else "the attribution's backward pass"
    if any(n in _DATA_DEPENDENT for n in names) or "data-dependent" in str(err).lower():
        why = ("its forward branches on a tensor's values (Python if/int()/.item() on a tensor, or an output "
               "whose shape depends on the values); a program must run the same operations for every input")
    else:
        why = _first_line(err)
    return f"cannot capture the model for export at {at}: {why}"


def chain(err: BaseException) -> Iterator[BaseException]:
    """``err`` and the exceptions it was raised from or during, each once."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _first_line(err: BaseException) -> str:
    text = str(err).strip().split("\n")[0] or type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."
