"""What an untraceable module computes outside its hooked leaf modules: the torch functions no rule sees.

The ``functional`` canonizer routes what torch.fx can trace; for a module it cannot trace it installs a
``Watch``, which counts, during the first forward with gradients, the functions called on tensors that require
grad outside the module's leaves (``known``: the operations the canonizer routes, which are not reported), and
notes them in the session, so the coverage report names them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

import torch
from torch import fx, nn
from torch.overrides import TorchFunctionMode

if TYPE_CHECKING:
    from lrpcli.engine.hooks import Session


class Unseen(TorchFunctionMode):
    """Counts the torch functions called on tensors that require grad while an untraceable module runs, outside
    its hooked leaf modules (those have rules): the operations no rule sees."""

    def __init__(self, known: Collection[Any]) -> None:
        super().__init__()
        self.known = known
        self.paused = 0
        self.seen: Counter[str] = Counter()

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if not self.paused:
            name = getattr(func, "__name__", "")
            name = name[2:-2].lstrip("ir") if name.startswith("__") and name != "__get__" else name
            if name and name != "__get__" and func not in self.known and name not in self.known \
                    and any(isinstance(a, torch.Tensor) and a.requires_grad
                            for a in list(args) + list(kwargs.values())):
                self.seen[name] += 1
        return func(*args, **kwargs)


class Watch:
    """Runs ``Unseen`` during the first forward with gradients of one untraceable module; then notes what it saw."""

    def __init__(self, module: nn.Module, label: str, session: Session, known: Collection[Any]) -> None:
        self.label, self.session = label, session
        self.mode = Unseen(known)
        self.active = False
        self.handles = [module.register_forward_pre_hook(self._start),
                        module.register_forward_hook(self._stop, always_call=True)]

    def _start(self, module: nn.Module, args: tuple) -> None:
        if not torch.is_grad_enabled() or self.active:
            return
        # registered now, after the session's hooks, so that what those do in a leaf's forward hook is paused
        # too; traced children are paused as a whole (fx saw their operations)
        for inner in module.modules():
            if inner is not module and (isinstance(inner, fx.GraphModule) or next(inner.children(), None) is None):
                self.handles += [inner.register_forward_pre_hook(self._pause),
                                 inner.register_forward_hook(self._resume, always_call=True)]
        self.active = True
        self.mode.__enter__()

    def _stop(self, module: nn.Module, args: tuple, output: Any) -> None:
        if not self.active:
            return
        self.mode.__exit__(None, None, None)
        self.active = False
        seen = counts(self.mode.seen)
        self.session.notes.append(f"functional: {self.label} (not traced) computes outside its modules: "
                                  f"{seen or 'nothing'}")
        self.remove()

    def _pause(self, module: nn.Module, args: tuple) -> None:
        self.mode.paused += 1

    def _resume(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.mode.paused -= 1

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def counts(counter: Counter) -> str:
    return ", ".join(f"{name} x{n}" for name, n in counter.most_common())
