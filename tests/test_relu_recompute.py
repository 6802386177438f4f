"""ReLU outputs recomputed from the kept input (rules that read only a ReLU's input, e.g. BetaSmooth).

The session stores what autograd saves of relu(z) as a reference to z and rebuilds relu(z) when a backward node
needs it; z itself is freed as the backward passes it. These tests check that the numbers are those of an
independent computation and of the session without the mechanism, that the ReLU outputs are really freed, and
that no saved-tensor hook outlives a forward, an exception or the context.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

import lrpcli
import lrpcli.engine.hooks as hooks
import lrpcli.engine.layercall as layercall
import lrpcli.engine.relu_recompute as relu_recompute
from lrpcli.engine.composites import LayerMap

try:
    from tests.test_engine import _traced_bytes
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from test_engine import _traced_bytes

pytestmark = pytest.mark.usefixtures("float64")


def vgg_like(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(32, 10), nn.ReLU(), nn.Dropout(), nn.Linear(10, 4)).eval()


class Block(nn.Module):
    """A residual block whose input (a ReLU output) feeds both a convolution and the addition."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.relu1 = nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()
        self.conv2, self.add, self.relu2 = nn.Conv2d(4, 4, 3, padding=1), lrpcli.Sum(), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu2(self.add(self.conv2(self.relu1(self.conv1(x))), x))


def residual(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), Block(), Block(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 3)).eval()


MODELS = {"vgg_like": (vgg_like, (2, 3, 8, 8)), "residual": (residual, (3, 2, 6, 6))}


@pytest.fixture
def recompute_off(monkeypatch):
    """The session as it was before the mechanism: every ReLU output stays in the graph."""
    monkeypatch.setattr(relu_recompute, "recomputable_relu", lambda *args: False)


@pytest.fixture
def count_recomputed(monkeypatch) -> list[int]:
    """Counts the ReLU outputs rebuilt from z in backward passes (a test must exercise the mechanism)."""
    counts = [0]
    original = relu_recompute.Recompute.unpack

    def spy(self: relu_recompute.Recompute) -> torch.Tensor:
        counts[0] += 1
        return original(self)

    monkeypatch.setattr(relu_recompute.Recompute, "unpack", spy)
    return counts


def top_hooks() -> object:
    return torch._C._autograd._top_saved_tensors_default_hooks(True)


class _ReluSoftplusGradient(torch.autograd.Function):
    """relu(z) forward, softplus_beta's derivative sigmoid(beta z) backward: beta_smooth written by hand."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, beta: float) -> torch.Tensor:
        ctx.save_for_backward(z)
        ctx.beta = beta
        return z.clamp(min=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (z,) = ctx.saved_tensors
        return torch.sigmoid(ctx.beta * z) * grad, None


class _SmoothReLU(nn.Module):
    def __init__(self, beta: float) -> None:
        super().__init__()
        self.beta = beta

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return _ReluSoftplusGradient.apply(z, self.beta)


def by_hand(model: nn.Module, x: torch.Tensor, target: torch.Tensor, beta: float) -> torch.Tensor:
    """The beta-smooth gradient without lrpcli: every nn.ReLU of a copy replaced by _SmoothReLU."""
    smooth = copy.deepcopy(model)
    for module in list(smooth.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.ReLU):
                setattr(module, name, _SmoothReLU(beta))
    xg = x.clone().requires_grad_(True)
    out = smooth(xg)
    (grad,) = torch.autograd.grad(out.gather(1, target[:, None]).sum(), xg)
    return grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("beta", [10.0, 2.5])
@pytest.mark.parametrize("name", list(MODELS))
def test_beta_smooth_equals_computation_by_hand(name, beta, dtype, count_recomputed):
    build, shape = MODELS[name]
    model = build().to(dtype)
    x = torch.randn(*shape, dtype=dtype)
    target = torch.arange(shape[0]) % 3
    got = lrpcli.attribute(model, x, target, composite="beta_smooth", beta=beta)
    assert count_recomputed[0] > 0  # the ReLU outputs were rebuilt, not kept
    want = by_hand(model, x, target, beta)
    assert (want != 0).any()
    tolerance = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance * want.abs().max().item())


@pytest.mark.parametrize("name", list(MODELS))
def test_same_numbers_as_without_recomputation(name, monkeypatch):
    """Bitwise: the relevance, the plain gradient under rules_off, a second-order gradient through the relevance,
    a retained graph's second backward, relevance maps of taps and a batch split into slices."""
    build, shape = MODELS[name]
    model = build()
    x = torch.randn(*shape)

    def everything() -> list[torch.Tensor]:
        results = []
        comp = lrpcli.composites.get("beta_smooth")
        xr = x.clone().requires_grad_(True)
        with comp.context(model) as m:
            out = m(xr)
            with lrpcli.rules_off(model):
                results += torch.autograd.grad(out[:, 0].sum(), xr, retain_graph=True)
            seed = lrpcli.initial_relevance(out, 1, comp.seed)
            results += torch.autograd.grad(out, xr, seed, retain_graph=True)
            results += torch.autograd.grad(out, xr, seed)
        relevance = lrpcli.attribute(model, xr, 1, composite=comp, create_graph=True)
        results += torch.autograd.grad((relevance ** 2).sum(), [xr] + list(model.parameters()), allow_unused=True)
        relevance, maps = lrpcli.attribute(model, x, 2, composite=comp, layers=["*"])
        results += [relevance] + [maps[k] for k in sorted(maps)]
        with monkeypatch.context() as mp:
            mp.setattr(layercall, "CHUNK_BYTES", 64)
            results.append(lrpcli.attribute(model, x, 0, composite=comp))
        return results

    got = everything()
    with monkeypatch.context() as mp:
        mp.setattr(relu_recompute, "recomputable_relu", lambda *args: False)
        want = everything()
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b)
    xp = x.clone().requires_grad_(True)
    (plain,) = torch.autograd.grad(model(xp)[:, 0].sum(), xp)
    assert torch.equal(got[0], plain)  # rules off: the plain gradient


def _storage_refs(model: nn.Module) -> tuple[list[StorageWeakRef], list[StorageWeakRef], list[object]]:
    """Weak references to the storage of every ReLU's input z and output y, taken by hooks that run before the
    session's (registered first)."""
    inputs: list[StorageWeakRef] = []
    outputs: list[StorageWeakRef] = []

    def spy(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        inputs.append(StorageWeakRef(args[0].untyped_storage()))
        outputs.append(StorageWeakRef(output.untyped_storage()))

    handles = [m.register_forward_hook(spy) for m in model.modules() if isinstance(m, nn.ReLU)]
    return inputs, outputs, handles


def _relu_storages_freed(model: nn.Module, x: torch.Tensor) -> tuple[list[bool], list[bool]]:
    """(ReLU outputs freed after the forward, ReLU inputs freed when the backward reaches the input)."""
    inputs, outputs, handles = _storage_refs(model)
    at_input: list[bool] = []
    comp = lrpcli.composites.get("beta_smooth")
    try:
        with comp.context(model) as m:
            xr = x.clone().requires_grad_(True)
            out = m(xr)
            after_forward = [ref.expired() for ref in outputs]
            xr.register_hook(lambda grad: at_input.extend(ref.expired() for ref in inputs))
            torch.autograd.grad(out, xr, lrpcli.initial_relevance(out, 0, comp.seed))
            del out
    finally:
        for handle in handles:
            handle.remove()
    return after_forward, at_input


@pytest.mark.parametrize("name", list(MODELS))
def test_relu_outputs_are_freed_after_the_forward(name):
    """Only z stays: nothing holds relu(z) once the forward has moved on (the next layer's saved input is a
    token), and each z is freed when the backward has passed it, as the plain gradient frees its activations."""
    build, shape = MODELS[name]
    model = build()
    after_forward, at_input = _relu_storages_freed(model, torch.randn(*shape))
    assert len(after_forward) >= 4
    if name == "residual":
        # the last ReLU's output goes through Flatten, a view the Linear saves: not an alias the session knows
        after_forward = after_forward[:-1]
    assert all(after_forward), after_forward
    assert all(at_input), at_input


@pytest.mark.parametrize("name", list(MODELS))
def test_without_recomputation_relu_outputs_stay(name, recompute_off):
    """The check above is meaningful: the session without the mechanism keeps every y and every z."""
    build, shape = MODELS[name]
    after_forward, at_input = _relu_storages_freed(build(), torch.randn(*shape))
    assert not any(after_forward)
    assert not any(at_input)


def test_only_rules_that_read_only_the_relu_input_engage(monkeypatch):
    """Guided backprop (reads the output), deconvnet and LRP composites (read nothing of a ReLU) never install
    saved-tensor hooks; beta_smooth does, once per forward."""
    installs: list[int] = []
    original = relu_recompute.SavedTensors.install

    def spy(self: relu_recompute.SavedTensors) -> bool:
        installs.append(self.installed)
        return original(self)

    monkeypatch.setattr(relu_recompute.SavedTensors, "install", spy)
    model, x = vgg_like(), torch.randn(2, 3, 8, 8)
    for name in ("guided_backprop", "deconvnet", "epsilon_gamma_box", "epsilon_plus"):
        lrpcli.attribute(model, x, 0, composite=name)
    assert installs == []
    lrpcli.attribute(model, x, 0, composite="beta_smooth")
    assert installs and installs[0] is False and top_hooks() is None


class Raising(nn.Module):
    def __init__(self, error: type[BaseException]) -> None:
        super().__init__()
        self.error = error
        self.armed = False
        self.seen: list[object] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(top_hooks())
        if self.armed:
            raise self.error("boom")
        return x


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_no_saved_tensor_hooks_left_after_an_exception_in_the_forward(error):
    """An exception after the first recomputed ReLU leaves no hook behind: popped by the root hook that is always
    called (Exception), or on exit from the context (KeyboardInterrupt skips always-called hooks)."""
    torch.manual_seed(0)
    raising = Raising(error)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), raising, nn.Conv2d(2, 2, 3), nn.ReLU(), nn.Flatten()).eval()
    x = torch.randn(2, 1, 7, 7)
    comp = lrpcli.composites.get("beta_smooth")
    want = lrpcli.attribute(model, x, 0, composite=comp)
    assert raising.seen[-1] is not None  # the hooks were in place after the first ReLU
    raising.armed = True
    if error is RuntimeError:
        with comp.context(model) as m:
            for _ in range(3):
                with pytest.raises(RuntimeError, match="boom"):
                    m(x.clone().requires_grad_(True))
                assert top_hooks() is None
            raising.armed = False
            xr = x.clone().requires_grad_(True)
            out = m(xr)  # the session still works, with the hooks of this forward only
            assert top_hooks() is None
            (got,) = torch.autograd.grad(out, xr, lrpcli.initial_relevance(out, 0, comp.seed))
        assert torch.equal(got, want)
    else:
        with pytest.raises(KeyboardInterrupt):
            with comp.context(model) as m:
                m(x.clone().requires_grad_(True))
        assert top_hooks() is None
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 0


def test_hooks_of_the_caller_are_respected():
    """Saved-tensor hooks already in effect (offloading, checkpointing) are not shadowed: the session then keeps
    the ReLU outputs as before, and the caller's hooks see every saved tensor."""
    model, x = vgg_like(), torch.randn(2, 3, 8, 8)
    want = lrpcli.attribute(model, x, 1, composite="beta_smooth")
    packed: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        packed.append(tuple(t.shape))
        return t.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        got = lrpcli.attribute(model, x, 1, composite="beta_smooth")
        assert top_hooks()[0] is pack
    assert torch.equal(got, want)
    assert (2, 6, 8, 8) in packed  # a ReLU output, saved by the next convolution through the caller's hooks


def test_inplace_changes_are_still_errors():
    """In-place changes stay errors: of z after its ReLU ran (the rule and the recomputation read it), and of any
    other tensor saved while the session's hooks are in place, which plain autograd refuses (it skips its own
    version check for hooked tensors; the session does it)."""

    class ChangesZ(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.relu, self.conv2 = nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3)

        def forward(self, x):
            z = self.conv(x)
            y = self.relu(z)
            z.mul_(2)
            return self.conv2(y).flatten(1)

    class ChangesSaved(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.relu, self.sigmoid = nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Sigmoid()

        def forward(self, x):
            s = self.sigmoid(self.relu(self.conv(x)))  # sigmoid saves its output, after the first ReLU
            s.mul_(2)
            return s.flatten(1)

    torch.manual_seed(0)
    x = torch.randn(2, 1, 6, 6)
    with pytest.raises(RuntimeError, match="in ?place"):
        ChangesSaved()(x.clone().requires_grad_(True)).sum().backward()  # plain autograd refuses it too
    for model in (ChangesZ(), ChangesSaved()):
        with pytest.raises(RuntimeError, match="in ?place"):
            lrpcli.attribute(model, x, 0, composite="beta_smooth")
        assert top_hooks() is None


def test_beta_smooth_memory_flat_over_1000_attributions():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8, 2)).eval()
    x = torch.randn(2, 1, 6, 6)
    comp = LayerMap([(nn.ReLU, lrpcli.rules.BetaSmooth(5.0)), (nn.Module, lrpcli.rules.Gradient())], seed="onehot")
    grown = _traced_bytes(lambda: lrpcli.attribute(model, x, 0, composite=comp))
    assert grown < 64 * 1024, f"new context each time: memory grew by {grown} bytes over 1000 attributions"
    with comp.context(model) as m:
        def once() -> None:
            xi = x.clone().requires_grad_(True)
            out = m(xi)
            torch.autograd.grad(out, xi, lrpcli.initial_relevance(out, 0, comp.seed))
        grown = _traced_bytes(once)
        session = hooks.sessions_of(model)[0]
        assert session._saved.aliases == {} and not session._saved.installed
        assert session._saved.scratch is None  # no relu buffer kept between attributions
    assert grown < 64 * 1024, f"one context: memory grew by {grown} bytes over 1000 attributions"
    assert top_hooks() is None


def test_scratch_buffer_is_reused_only_when_free():
    """The relu(z) that backward nodes unpack goes into one reused buffer, never into one still held elsewhere,
    and equals torch.relu bit for bit (also for -0.0 and NaN)."""
    scratch = relu_recompute.Scratch()
    z1, z2 = torch.randn(4, 5), torch.randn(4, 5)
    z1[0] = -0.0
    z1[1, :2] = float("nan")
    a = scratch.relu(z1)
    b = scratch.relu(z2)  # a still holds the first buffer: a new one
    assert a.data_ptr() != b.data_ptr()
    assert torch.equal(a.view(torch.int64), torch.relu(z1).view(torch.int64))
    assert torch.equal(b, torch.relu(z2))
    kept = b.data_ptr()
    del a, b
    c = scratch.relu(z1)  # nothing holds the buffer now: reused
    assert c.data_ptr() == kept
    assert torch.equal(c.view(torch.int64), torch.relu(z1).view(torch.int64))
    d = scratch.relu(z2.t().contiguous().t())  # other strides: a new buffer
    assert d.data_ptr() != c.data_ptr() and torch.equal(d, torch.relu(z2))
    del c, d
    wide = torch.randn(4, 10)
    scratch.relu(wide)  # a third shape; the other two stay (shapes alternate, e.g. in a bottleneck)
    assert scratch.relu(z1).data_ptr() == kept
    maps = [torch.randn(1, 2, 3, 3), torch.randn(1, 4, 3, 3), torch.randn(1, 2, 6, 6)]
    scratch.relu(maps[0])  # other trailing dims than the 2-d buffers: those go
    scratch.relu(maps[1])
    assert [key[0] for key in scratch.buffers] == [maps[0].shape, maps[1].shape]
    scratch.relu(maps[2])  # another spatial size: the backward has left those layers, their buffers go
    assert [key[0] for key in scratch.buffers] == [maps[2].shape]


def test_scratch_buffer_is_reused_in_the_backward(monkeypatch):
    """Consecutive layers of one shape share the buffer (vgg_like: the second conv's input and the pool's)."""
    reused: list[bool] = []
    original = relu_recompute.Scratch.relu

    def spy(self: relu_recompute.Scratch, z: torch.Tensor) -> torch.Tensor:
        before = set(map(id, self.buffers.values()))
        result = original(self, z)
        reused.append(set(map(id, self.buffers.values())) <= before)  # no new buffer
        return result

    monkeypatch.setattr(relu_recompute.Scratch, "relu", spy)
    lrpcli.attribute(vgg_like(), torch.randn(2, 3, 8, 8), 0, composite="beta_smooth")
    assert any(reused) and not all(reused)
