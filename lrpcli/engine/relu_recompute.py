"""ReLU outputs that leave the graph: saved-tensor hooks store relu(z) as a reference to z and rebuild it on use.

A rule that reads only a ReLU's input (BetaSmooth) keeps z; the layer after the ReLU would save y = relu(z) as well
(convolutions save their input), two activations where the plain gradient keeps one. During a forward of the whole
model the session therefore installs these hooks: whatever autograd saves of such a y is stored as a token holding
z, and relu(z) is recomputed, bit for bit, when a backward node unpacks it. The session (``hooks.Session``) decides
which ReLUs qualify (``recomputable_relu``) and when the hooks are pushed and popped.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch
from torch import nn

from lrpcli.engine.rules.base import Rule


def modified_error(tensor: torch.Tensor, version: int) -> RuntimeError:
    """Autograd's own error for a saved tensor changed in place: autograd skips that check for hooked tensors."""
    return RuntimeError(
        "one of the variables needed for gradient computation has been modified by an inplace operation: "
        f"[{tensor.type()} {list(tensor.shape)}] is at version {tensor._version}; expected version {version} "
        "instead (lrpcli checks saved tensors itself while it recomputes ReLU outputs)")


#: how many tensors hold a storage (private; without it the buffers of ``Scratch`` are never reused). Kept
#: though private: torch has no public way to tell that a buffer handed to a backward node is free again, and
#: timing beta_smooth with and without the reuse, alternated in one process on torchvision models, showed the
#: fresh relu(z) per unpack slower (page faults on each new activation-sized tensor)
_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)


class Scratch:
    """Reusable buffers for the relu(z) that backward nodes unpack, shared by the tokens of one forward (CPU).

    A recomputed relu(z) lives only while one node runs (a convolution's backward, a pool's), and layers repeat
    their shapes (a VGG within a block; a ResNet alternates two shapes within a stage). Fresh CPU memory of an
    activation's size costs page faults that take longer than the relu itself; reuse removes most of that. A
    buffer is reused only when nothing but this cache holds its storage; the last ``SLOTS`` shapes are kept, as
    long as the forward's graph lives.
    """

    SLOTS = 3
    __slots__ = ("buffers", "lock")

    def __init__(self) -> None:
        self.buffers: dict[tuple, torch.Tensor] = {}  # by shape, strides and dtype; least recently used first
        self.lock = threading.Lock()

    def relu(self, z: torch.Tensor) -> torch.Tensor:
        if z.device.type != "cpu" or z.layout != torch.strided or _storage_use_count is None:
            return torch.relu(z)  # the CUDA caching allocator is cheap already, and streams make reuse unsafe
        key = (z.shape, z.stride(), z.dtype)
        with self.lock:  # two backward passes through one retained graph may run in two threads
            buffer = self.buffers.pop(key, None)
            if buffer is not None and _storage_use_count(buffer.untyped_storage()._cdata) == 2:  # buffer + call
                torch.clamp_min(z, 0, out=buffer)  # exactly torch.relu(z), which is clamp_min(z, 0)
            else:
                buffer = torch.relu(z)
                if buffer.stride() != z.stride():
                    return buffer
                # another spatial size: the backward has left a stage of the model, whose shapes do not return
                for other in [k for k in self.buffers if k[0][2:] != z.shape[2:]]:
                    del self.buffers[other]
            self.buffers[key] = buffer
            while len(self.buffers) > self.SLOTS:
                del self.buffers[next(iter(self.buffers))]
            return buffer.detach()  # holds the storage before the lock is released


class Recompute:
    """A saved ReLU output stored as the ReLU's input z, which the rule keeps anyway: relu(z) is rebuilt, bit for
    bit, only when a backward node unpacks it."""

    __slots__ = ("z", "version", "scratch", "producer")

    def __init__(self, z: torch.Tensor, scratch: Scratch, producer: Any = None) -> None:
        self.z = z.detach()  # no graph: the token must not keep nodes alive, and relu records none
        self.version = z._version
        self.scratch = scratch
        #: weak reference to the call that keeps z whole below this ReLU (``hooks.Session._whole_output_producer``)
        self.producer = None if producer is None else weakref.ref(producer)

    def unpack(self) -> torch.Tensor:
        if self.z._version != self.version:
            raise modified_error(self.z, self.version)
        return self.scratch.relu(self.z)


class Kept:
    """Any other saved tensor, kept as autograd keeps it. Detached: holding an operation's own output with its
    graph would make a reference cycle. Autograd skips its version check for hooked tensors; it is done here."""

    __slots__ = ("tensor", "version")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor.detach()
        self.version = tensor._version

    def unpack(self) -> torch.Tensor:
        if self.tensor._version != self.version:
            raise modified_error(self.tensor, self.version)
        return self.tensor


def _unpack(packed: Recompute | Kept) -> torch.Tensor:
    return packed.unpack()


def _hooks_in_effect() -> tuple | None:
    """The innermost saved-tensor hooks in effect (pack, unpack), or None.

    Private: torch offers no public way to ask. It is needed because pushing our hooks over a caller's
    (checkpointing, offloading) would silently shadow them: the caller's pack would no longer see the tensors
    saved inside the model (tests/test_relu_recompute.py, test_hooks_of_the_caller_are_respected). Where it is
    missing the session keeps ReLU outputs as the plain graph does.
    """
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return (True,) if top is None else top(True)


def _token_of(aliases: dict[int, tuple[weakref.ref, int, Recompute]], tensor: torch.Tensor) -> Recompute | None:
    """The token registered for ``tensor`` if it is the very alias, unmodified since the ReLU made it (a weakref:
    ids of dead tensors are reused)."""
    entry = aliases.get(id(tensor))
    if entry is not None and entry[0]() is tensor and tensor._version == entry[1]:
        return entry[2]
    return None


class SavedTensors:
    """Saved-tensor hooks for one forward of the whole model (see the module docstring).

    When a ReLU's rule reads only its input z, the session gives the next layer ``result``, an alias of
    y = relu(z), and keeps z. Whatever autograd saves of that alias (a convolution's input, a pool's input) is
    stored as a ``Recompute`` token; nothing then holds y's storage after the forward, and the model keeps one
    activation per layer, as the plain gradient does.

    The hooks are pushed at the first such ReLU of a forward, only when no other saved-tensor hooks are in effect
    (they would be shadowed: e.g. checkpointing or offloading) and hooks are enabled (torch.func disables them),
    and popped when the forward ends, also when it raises (a root hook with always_call=True) and, failing
    that, when the context exits. Until then every tensor saved passes through ``pack``: one dict look-up. Code
    that refuses saved-tensor hooks (torch.func.grad/vjp/jacrev called inside the model's forward, after such a
    ReLU) raises there; use another composite for such models.
    """

    def __init__(self) -> None:
        #: id(alias) -> (weak alias, its version when registered, token)
        self.aliases: dict[int, tuple[weakref.ref, int, Recompute]] = {}
        self.installed = False
        self.scratch: Scratch | None = None  # the forward's, while it runs; then only its tokens hold it
        aliases = self.aliases

        def pack(tensor: torch.Tensor) -> Recompute | Kept:
            return _token_of(aliases, tensor) or Kept(tensor)

        self.pack = pack
        #: pushed at the first recomputable ReLU of a forward and popped at its end, which no ``with`` block spans
        self.hooks = torch.autograd.graph.saved_tensors_hooks(pack, _unpack)

    def install(self) -> bool:
        """Push the hooks (once per forward); False where they cannot be used."""
        if self.installed:
            return True
        if _hooks_in_effect():
            return False
        try:
            self.hooks.__enter__()
        except RuntimeError:  # saved-tensor hooks are disabled here (torch.func)
            return False
        self.installed = True
        self.scratch = Scratch()  # one per forward: it lives as long as that forward's graph
        return True

    def add(self, alias: torch.Tensor, z: torch.Tensor, producer: Any = None) -> None:
        """``alias`` is relu(z): saving it stores z instead. ``producer``: the call that keeps z whole."""
        assert self.scratch is not None, "add() outside install() ... remove()"
        self.aliases[id(alias)] = (weakref.ref(alias), alias._version, Recompute(z, self.scratch, producer))

    def producer_of(self, tensor: torch.Tensor) -> weakref.ref | None:
        """A weak reference to the call that keeps z whole, where ``tensor`` is a registered relu(z) of one."""
        token = _token_of(self.aliases, tensor) if self.aliases else None
        return None if token is None else token.producer

    def holds_any(self, tensors: tuple[torch.Tensor, ...]) -> bool:
        """Some of ``tensors`` is a registered alias (saving it stores a reference to z)."""
        aliases = self.aliases
        return bool(aliases) and any(_token_of(aliases, t) is not None for t in tensors)

    def follow(self, source: torch.Tensor, alias: torch.Tensor) -> None:
        """``alias`` has the contents of ``source`` (a tap): if source is recomputable, so is alias."""
        token = _token_of(self.aliases, source)
        if token is not None:
            self.aliases[id(alias)] = (weakref.ref(alias), alias._version, token)

    def remove(self) -> None:
        """Pop the hooks if this forward pushed them (only if they are on top: never someone else's)."""
        self.aliases.clear()
        self.scratch = None  # its buffers must not outlive the graph, e.g. between the batches of one context
        if self.installed:
            self.installed = False
            top = _hooks_in_effect()
            if top is not None and top[0] is self.pack:
                self.hooks.__exit__(None, None, None)


def recomputable_relu(rule: Rule, module: nn.Module, inputs: tuple[torch.Tensor, ...],
                      output: torch.Tensor) -> bool:
    """True if ``output`` is torch.relu of the single input z (its autograd node says so) and the rule reads only
    z: then output can leave the graph and be recomputed from z wherever autograd saved it."""
    if len(inputs) != 1 or rule.needs_graph:
        return False
    reads = rule.reads_of(module)
    if "output" in reads or "inputs" not in reads:
        return False
    return relu_output_of(inputs[0], output)


def relu_output_of(z: torch.Tensor, output: torch.Tensor) -> bool:
    """``output`` is torch.relu of z, unmodified (its autograd node says so)."""
    node = output.grad_fn
    return (node is not None and type(node).__name__ == "ReluBackward0" and output is not z
            and output._version == 0 and z.grad_fn is not None
            and node.next_functions[0] == (z.grad_fn, z.output_nr))
