"""``functional``: the operations a model writes in ``forward`` become modules that get rules (torch.fx).

Hooks only see modules. A model that writes ``x * gate``, ``q @ k.transpose(-2, -1)``, ``attn.softmax(-1)``,
``x.mean((2, 3))`` or ``F.gelu(x)`` in its forward sends relevance through those operations as a plain gradient,
which neither splits it by contribution nor conserves it. This canonizer traces the model with torch.fx (a copy
that shares every module and parameter) and puts a module call in place of each such operation:

- tensor + tensor -> ``Sum`` (``EmbeddingSum`` where one side is a parameter, e.g. a position embedding);
  activation - activation -> ``Sum`` of the first and the negated second (``Scaled``);
- activation * activation -> ``Product``; -> ``Gate`` where one factor is a sigmoid; activation * parameter or
  number, activation / parameter or number -> ``Scaled`` (layer scale, 1/sqrt(d): relevance passes);
- matmul / bmm / two-operand einsum of activations -> ``MatMul``, or ``AttentionProduct`` where an operand
  comes from a softmax;
- softmax -> ``nn.Softmax``; relu, gelu, silu, sigmoid, hardswish, ... -> their ``nn`` modules;
- mean, adaptive/average pooling -> ``Reduce`` (Norm); max pooling -> ``nn.MaxPool*d`` (so that the composite's
  maxpool choice applies); ``F.layer_norm`` -> ``LayerNormFn``; ``F.normalize`` (p=2) -> ``Normalize``;
- ``F.scaled_dot_product_attention`` -> ``DotProductAttention`` (score MatMul, Softmax, AttentionProduct).

Pure routing (reshape, permute, cat, split, chunk, getitem, roll, pad, ...) needs nothing: its gradient moves
relevance with the elements. Every other operation found on a tensor is named in a note ("left on the plain
gradient"); childless modules that fx inlines are named too. Modules fx cannot trace are canonized child by
child; the classes that could not be traced are named, and during the first forward a torch-function mode
counts the operations each of them computes outside its modules, which a second note names.
"""

from __future__ import annotations

import operator
from collections import Counter
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from lrpcli.engine.canonizers.base import Canonizer
from lrpcli.engine.canonizers.optables import (
    ACTIVATIONS,
    ADD,
    DIV,
    GATE_SOURCES,
    MATMUL,
    MAXPOOL_ARGS,
    MAXPOOLS,
    MEAN,
    MUL,
    POOLS,
    ROUTING,
    SHAPE_ATTRS,
    SOFTMAX,
    SUB,
)
from lrpcli.engine.canonizers.unseen import Watch, counts
from lrpcli.engine.composites import layers as L
from lrpcli.engine.functional_modules import (
    AttentionBias,
    AttentionProduct,
    DotProductAttention,
    ExplicitMultiheadAttention,
    ExplicitWindowAttention,
    LayerNormFn,
    MatMul,
    Normalize,
    Product,
    Reduce,
    Scaled,
    mean,
)
from lrpcli.engine.modules import Gate, Sum

if TYPE_CHECKING:  # pragma: no cover
    from lrpcli.engine.hooks import Session

PREFIX = "lrpcli_fn"


class EmbeddingSum(Sum):
    """A Sum where one term is a parameter (a position embedding): the relevance it gets is the embedding's."""


def _kind(node: fx.Node) -> Any:
    return node.target if node.op in ("call_function", "call_method") else None


def _op_name(target: Any) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", repr(target))


class _Tracer(fx.Tracer):
    """Keeps as calls: lrpcli's modules, torch.nn modules and childless subclasses of them (LayerNorm2d), and
    every module type a composite knows (StochasticDepth); inlines the rest (their operations get routed)."""

    def __init__(self) -> None:
        super().__init__()
        self.inlined: Counter[str] = Counter()

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        own = (Sum, Gate, Product, MatMul, Scaled, Reduce, LayerNormFn, ExplicitMultiheadAttention,
               ExplicitWindowAttention, Normalize, DotProductAttention)
        if isinstance(m, own + L.WEIGHTED + L.ACTIVATIONS + L.BATCHNORMS + L.IDENTITIES + L.AVGPOOLS
                      + L.MAXPOOLS + L.UPSAMPLES + L.PADDINGS + (nn.LayerNorm, nn.GroupNorm, nn.Softmax)):
            return True
        if super().is_leaf_module(m, qualname):
            return True
        if next(m.children(), None) is None:
            self.inlined[type(m).__name__] += 1
        return False


class _Rewriter:
    """Rewrites one traced graph; counts what it did and what it left."""

    def __init__(self, traced: fx.GraphModule) -> None:
        self.gm = traced
        self.done: Counter[str] = Counter()
        self.left: Counter[str] = Counter()
        self.embeddings: list[str] = []  # parameters that enter as terms of the input (see ``_note_embeddings``)
        self._count = 0
        self._tensor: dict[fx.Node, bool] = {}

    # -- what a node is ------------------------------------------------------------------------------------
    def is_tensor(self, node: Any) -> bool:
        """Whether a graph value is a tensor (not a size, a shape or a Python number)."""
        if not isinstance(node, fx.Node):
            return False
        if node not in self._tensor:
            self._tensor[node] = self._is_tensor(node)
        return self._tensor[node]

    def _is_tensor(self, node: fx.Node) -> bool:
        if node.op in ("placeholder", "call_module"):
            return True
        if node.op == "get_attr":
            return isinstance(self._attr(node), torch.Tensor)
        if node.op == "output":
            return False
        if node.target in ("size", "dim", "numel") or (node.target is getattr and node.args[1] in SHAPE_ATTRS):
            return False
        if node.target is operator.getitem:
            return self.is_tensor(node.args[0])
        args = [a for a in node.args if isinstance(a, fx.Node)]
        return any(self.is_tensor(a) for a in args) if args else True

    def _attr(self, node: fx.Node) -> Any:
        obj: Any = self.gm
        for part in str(node.target).split("."):
            obj = getattr(obj, part, None)
        return obj

    def is_activation(self, node: Any) -> bool:
        """A tensor that depends on the input (not a parameter, buffer or constant)."""
        if not self.is_tensor(node):
            return False
        seen, todo = set(), [node]
        while todo:
            n = todo.pop()
            if n in seen:
                continue
            seen.add(n)
            if n.op == "placeholder":
                return True
            # not through sizes: a tensor built from x.shape alone (EdgeNeXt's position grid) is a constant
            todo += [a for a in n.all_input_nodes if self.is_tensor(a)]
        return False

    def module_of(self, node: Any) -> nn.Module | None:
        if isinstance(node, fx.Node) and node.op == "call_module":
            return self.gm.get_submodule(str(node.target))
        return None

    def from_softmax(self, node: Any) -> bool:
        """The node is a softmax output, possibly through dropout or identity modules."""
        while isinstance(node, fx.Node):
            module = self.module_of(node)
            if isinstance(module, nn.Softmax) or _kind(node) in SOFTMAX:
                return True
            if isinstance(module, L.IDENTITIES) or _kind(node) is F.dropout:
                node = node.args[0]
                continue
            return False
        return False

    # -- rewriting -----------------------------------------------------------------------------------------
    def replace(self, node: fx.Node, module: nn.Module, args: tuple, label: str) -> None:
        name = f"{PREFIX}_{label}_{self._count}"
        self._count += 1
        self.gm.add_submodule(name, module)
        with self.gm.graph.inserting_after(node):
            new = self.gm.graph.call_module(name, args)
        node.replace_all_uses_with(new)
        self.gm.graph.erase_node(node)
        self.done[label] += 1

    def run(self) -> None:
        for node in list(self.gm.graph.nodes):
            kind = _kind(node)
            if kind is None or not self.is_tensor(node):
                continue
            try:
                handled = self.rewrite(node, kind)
            except TypeError:  # hashing an unhashable target (a bound method): not one of ours
                handled = False
            if not handled and kind not in ROUTING and any(self.is_activation(a) for a in node.all_input_nodes):
                self.left[_op_name(kind)] += 1
        self._note_embeddings()
        self.gm.graph.lint()
        self.gm.recompile()

    def _parameter_source(self, node: Any) -> str | None:
        """The parameter a constant term comes from, through routing (expand, reshape, indexing): its name."""
        while isinstance(node, fx.Node):
            if node.op == "get_attr":
                return str(node.target) if isinstance(self._attr(node), nn.Parameter) else None
            if _kind(node) not in ROUTING or not node.args:
                return None
            node = node.args[0]
        return None

    def _note_embeddings(self) -> None:
        """Parameters that are terms of the signal: summed with it (a position embedding, ``EmbeddingSum``) or
        concatenated to it (a class token). Relevance reaches them as it reaches the input; the note names
        them, so that their share is not taken for a loss."""
        for node in self.gm.graph.nodes:
            module = self.module_of(node)
            if isinstance(module, EmbeddingSum):
                terms = list(node.args)
            elif _kind(node) in (torch.cat, torch.concat, torch.stack) and node.args \
                    and isinstance(node.args[0], (list, tuple)) and any(self.is_activation(a) for a in node.args[0]):
                terms = list(node.args[0])
            else:
                continue
            for term in terms:
                name = self._parameter_source(term)  # also an expand to the input's batch size (a class token)
                if name is not None and name not in self.embeddings:
                    self.embeddings.append(name)

    def rewrite(self, node: fx.Node, kind: Any) -> bool:
        args, kwargs = node.args, node.kwargs
        if kind in ADD and len(args) == 2 and not kwargs:
            return self._add(node, args)
        if kind in MUL and len(args) == 2 and not kwargs:
            return self._mul(node, args)
        if kind in SUB and len(args) == 2 and not kwargs and all(self.is_activation(a) for a in args):
            return self._sub(node, args)
        if kind in DIV and len(args) == 2 and not kwargs and self.is_activation(args[0]) \
                and not self.is_activation(args[1]):
            self.replace(node, Scaled(torch.div, 0), (args[0], args[1]), "scaled")
            return True
        if kind in MATMUL and len(args) == 2 and not kwargs and all(self.is_activation(a) for a in args):
            self._matmul(node, args, MATMUL[kind], None)
            return True
        if kind is torch.einsum and len(args) == 3 and isinstance(args[0], str) \
                and all(self.is_activation(a) for a in args[1:]):
            self._matmul(node, args[1:], torch.einsum, args[0])
            return True
        if kind in SOFTMAX and self.is_activation(args[0]):
            dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
            if isinstance(dim, int) and kwargs.get("dtype") is None and len(args) <= 2:
                self.replace(node, nn.Softmax(dim), (args[0],), "softmax")
                return True
            return False
        if kind in ACTIVATIONS and len(args) == 1 and self.is_activation(args[0]):
            module = _activation(kind, kwargs)
            if module is not None:
                self.replace(node, module, (args[0],), _op_name(kind))
                return True
            return False
        if (kind in MEAN or kind in POOLS) and self.is_activation(args[0]) and _constant(args[1:], kwargs):
            fn = mean if kind in MEAN else kind
            self.replace(node, Reduce(fn, args[1:], dict(kwargs)), (args[0],), "reduce")
            return True
        if kind in MAXPOOLS and self.is_activation(args[0]) and _constant(args[1:], kwargs):
            options = dict(zip(MAXPOOL_ARGS, args[1:]))
            options.update(kwargs)
            if options.get("return_indices"):
                return False
            self.replace(node, MAXPOOLS[kind](**options), (args[0],), "max_pool")
            return True
        if kind is F.layer_norm and self.is_activation(args[0]):
            return self._layer_norm(node, args, kwargs)
        if kind is F.normalize and self.is_activation(args[0]):
            options = dict(zip(("p", "dim", "eps"), args[1:]))
            options.update(kwargs)
            if options.get("p", 2.0) != 2.0 or options.get("out") is not None or not _constant((), options):
                return False
            self.replace(node, Normalize(options.get("dim", 1), options.get("eps", 1e-12)), (args[0],), "normalize")
            return True
        if kind is F.scaled_dot_product_attention:
            return self._attention(node, args, kwargs)
        return False

    def _attention(self, node: fx.Node, args: tuple, kwargs: dict) -> bool:
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        values = dict(zip(names, args))
        values.update(kwargs)
        # an option handed down from the model's own forward arguments (timm's ``attn_mask=None``,
        # ``is_causal=False``) is a placeholder: lrpcli calls the model with the input alone, so its default holds
        values = {k: _default(v) for k, v in values.items()}
        options = [values.get(k) for k in ("dropout_p", "is_causal", "scale", "enable_gqa")]
        if any(isinstance(o, fx.Node) for o in options) or values.get("enable_gqa"):
            return False
        mask = values.get("attn_mask")
        module = DotProductAttention(values.get("dropout_p") or 0.0, bool(values.get("is_causal")),
                                     values.get("scale"), masked=mask is not None)
        inputs = (values["query"], values["key"], values["value"]) + ((mask,) if mask is not None else ())
        self.replace(node, module, inputs, "attention")
        return True

    def feeds_softmax(self, node: fx.Node, depth: int = 4) -> bool:
        """The node's value reaches a softmax through additions and routing only (attention logits)."""
        for user in node.users:
            kind = _kind(user)
            if isinstance(self.module_of(user), nn.Softmax) or kind in SOFTMAX:
                return True
            if depth > 0 and (kind in ADD or kind in ROUTING) and self.feeds_softmax(user, depth - 1):
                return True
        return False

    def _add(self, node: fx.Node, args: tuple) -> bool:
        if not all(self.is_tensor(a) for a in args) or not any(self.is_activation(a) for a in args):
            return False
        embedding = not all(self.is_activation(a) for a in args)
        if embedding and self.feeds_softmax(node):
            # a position bias on attention logits: it absorbs its share, as a layer's bias does, and nothing flows
            # into the parameters (or the MLP) that made it
            scores, bias = (args[0], args[1]) if self.is_activation(args[0]) else (args[1], args[0])
            with self.gm.graph.inserting_before(node):
                bias = self.gm.graph.call_method("detach", (bias,))
            self.replace(node, AttentionBias(), (scores, bias), "attention_bias")
            return True
        self.replace(node, EmbeddingSum() if embedding else Sum(), tuple(args), "embedding" if embedding else "sum")
        return True

    def _sub(self, node: fx.Node, args: tuple) -> bool:
        """a - b as Sum(a, -b) (PoolFormer's ``pool(x) - x``): the sum splits by contribution, the negation
        (Scaled) passes, so a gets a R / z and b gets -b R / z, which add up to R."""
        name = f"{PREFIX}_neg_{self._count}"
        self._count += 1
        self.gm.add_submodule(name, Scaled(torch.neg, 0))
        with self.gm.graph.inserting_before(node):
            negated = self.gm.graph.call_module(name, (args[1],))
        self.replace(node, Sum(), (args[0], negated), "difference")
        return True

    def _mul(self, node: fx.Node, args: tuple) -> bool:
        active = [self.is_activation(a) for a in args]
        if all(active):
            gate = [isinstance(self.module_of(a), GATE_SOURCES) or _kind(a) in (torch.sigmoid, F.sigmoid,
                                                                                  "sigmoid", F.hardsigmoid)
                    for a in args]
            if gate[1] and not gate[0]:
                self.replace(node, Gate(), (args[0], args[1]), "gate")
            elif gate[0] and not gate[1]:
                self.replace(node, Gate(), (args[1], args[0]), "gate")
            else:
                self.replace(node, Product(), tuple(args), "product")
            return True
        if not any(active):
            return False
        position = active.index(True)
        other = args[1 - position]
        self.replace(node, Scaled(torch.mul, position), (args[position], other), "scaled")
        return True

    def _matmul(self, node: fx.Node, args: tuple, fn: Any, equation: str | None) -> None:
        weights = [self.from_softmax(a) for a in args]
        if any(weights) and not all(weights):
            module: MatMul = AttentionProduct(fn, equation, constant_index=weights.index(True))
            self.replace(node, module, tuple(args), "attention_product")
        else:
            self.replace(node, MatMul(fn, equation), tuple(args), "matmul")

    def _layer_norm(self, node: fx.Node, args: tuple, kwargs: dict) -> bool:
        values = dict(zip(("input", "normalized_shape", "weight", "bias", "eps"), args))
        values.update(kwargs)
        shape, eps = values.get("normalized_shape"), values.get("eps", 1e-5)
        if not isinstance(shape, (list, tuple)) or not all(isinstance(s, int) for s in shape) \
                or not isinstance(eps, float):
            return False
        weight, bias = values.get("weight"), values.get("bias")
        if weight is None and bias is not None:
            return False
        extra = tuple(t for t in (weight, bias) if t is not None)
        self.replace(node, LayerNormFn(shape, eps), (args[0],) + extra, "layer_norm")
        return True


def _default(value: Any) -> Any:
    """A placeholder with a default (a model forward's keyword argument) as that default; anything else as is."""
    if isinstance(value, fx.Node) and value.op == "placeholder" and value.args:
        return value.args[0]
    return value


def _constant(args: tuple, kwargs: dict) -> bool:
    return not any(isinstance(a, fx.Node) for a in list(args) + list(kwargs.values()))


def _activation(kind: Any, kwargs: dict) -> nn.Module | None:
    cls = ACTIVATIONS[kind]
    kwargs = {k: v for k, v in kwargs.items() if k != "inplace"}
    if any(isinstance(v, fx.Node) for v in kwargs.values()):
        return None
    try:
        return cls(**kwargs)
    except TypeError:
        return None


def _reason(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:160] if text else type(err).__name__


class FunctionalOperations(Canonizer):
    """Trace with torch.fx and route functional operations through modules (see the module docstring)."""

    name = "functional"

    def __init__(self) -> None:
        self._swapped: list[tuple[nn.Module, str, nn.Module]] = []
        self._watches: list[Watch] = []
        self._session: Session | None = None
        self._embeddings: list[str] = []

    def apply(self, model: nn.Module, session: Session) -> nn.Module:
        self._session = session
        done: Counter[str] = Counter()
        left: Counter[str] = Counter()
        inlined: Counter[str] = Counter()
        untraced: list[str] = []
        embeddings: list[str] = []
        self._embeddings = embeddings
        result = self._canonize(model, "", done, left, inlined, untraced)
        constants = done.pop("attention_bias", 0)
        notes = [f"functional: routed through modules: {counts(done) or 'nothing'}"]
        if constants:
            notes.append(f"functional: position biases of attention logits as AttentionBias (the bias absorbs its "
                         f"share of relevance, as a layer's bias does): x{constants}")
        if embeddings:
            notes.append("functional: parameters that are terms of the signal take relevance as the input does (the "
                         f"embeddings' share, not a loss): {', '.join(embeddings)}")
        if inlined:
            notes.append(f"functional: inlined by torch.fx (their operations are routed above): {counts(inlined)}")
        if left:
            notes.append(f"functional: left on the plain gradient: {counts(left)}")
        if untraced:
            notes.append(f"functional: torch.fx cannot trace {'; '.join(untraced)}: the functional operations "
                         "in their forward are not seen and pass the plain gradient")
        session.notes.extend(notes)
        return result

    def _canonize(self, module: nn.Module, where: str, done: Counter, left: Counter, inlined: Counter,
                  untraced: list[str]) -> nn.Module:
        tracer = _Tracer()
        try:
            graph = tracer.trace(module)
        except Exception as err:  # fx raises many kinds of errors on untraceable code
            label = f"{type(module).__name__} at {where or '<model>'}"
            untraced.append(f"{label} ({_reason(err)})")
            for name, child in list(module._modules.items()):
                if child is None or tracer.is_leaf_module(child, name):
                    continue
                new = self._canonize(child, f"{where}.{name}" if where else name, done, left, inlined, untraced)
                if new is not child:
                    module._modules[name] = new
                    self._swapped.append((module, name, child))
            if self._session is not None:
                self._watches.append(Watch(module, label, self._session, ROUTING))
            return module
        traced = fx.GraphModule(module, graph, type(module).__name__)
        rewriter = _Rewriter(traced)
        rewriter.run()
        done.update(rewriter.done)
        self._embeddings.extend(f"{where}.{name}" if where else name for name in rewriter.embeddings)
        left.update(rewriter.left)
        inlined.update(tracer.inlined)
        return traced

    def revert(self) -> None:
        for watch in self._watches:
            if watch.active:  # a forward that never finished
                watch.mode.__exit__(None, None, None)
            watch.remove()
        self._watches.clear()
        for parent, name, original in reversed(self._swapped):
            parent._modules[name] = original
        self._swapped.clear()
