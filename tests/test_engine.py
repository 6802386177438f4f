"""The hook machinery: contexts undo everything, reused modules, targets, coverage, second order, memory."""

from __future__ import annotations

import gc
import tracemalloc
import warnings

import pytest
import torch
from torch import nn

import lrpcli
from lrpcli.engine import layercall
from lrpcli.engine.composites import FirstLayer, LayerMap, Mixture, NameMap
from lrpcli.engine.rules import AlphaBeta, Epsilon, Flat, Gamma, Norm, Pass, Stabilizer, ZBox, ZPlus

pytestmark = pytest.mark.usefixtures("float64")


def small_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
                         nn.Linear(4 * 3 * 3, 5), nn.ReLU(), nn.Linear(5, 3)).eval()


def hooks_of(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def snapshot(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_context_leaves_model_bitwise_unchanged():
    model = small_net()
    x = torch.randn(3, 2, 6, 6)
    before, out_before = snapshot(model), model(x)
    params_before = [(n, p.requires_grad, p.data_ptr()) for n, p in model.named_parameters()]
    relevance = lrpcli.attribute(model, x, 1, composite="epsilon_gamma_box", canonizers=["vgg"])
    assert relevance.shape == x.shape
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [(n, p.requires_grad, p.data_ptr()) for n, p in model.named_parameters()] == params_before
    assert torch.equal(model(x), out_before)
    assert hooks_of(model) == 0
    assert all(p.grad is None for p in model.parameters())


def test_hooks_removed_after_exception_inside_context():
    model = small_net()
    composite = lrpcli.composites.get("epsilon_plus")
    with pytest.raises(RuntimeError, match="boom"):
        with composite.context(model) as m:
            m(torch.randn(1, 2, 6, 6))
            assert hooks_of(model) > 0
            raise RuntimeError("boom")
    assert hooks_of(model) == 0


def test_inplace_relu_restored_and_handled():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Linear(4, 2))
    x = torch.randn(2, 4)
    r = lrpcli.attribute(model, x, 0, composite=LayerMap([(nn.Linear, Epsilon(1e-9)), (nn.ReLU, Pass())]))
    assert model[1].inplace is True
    ref = nn.Sequential(model[0], nn.ReLU(), model[2])
    r2 = lrpcli.attribute(ref, x, 0, composite=LayerMap([(nn.Linear, Epsilon(1e-9)), (nn.ReLU, Pass())]))
    torch.testing.assert_close(r, r2, atol=1e-12, rtol=0)


class Reused(nn.Module):
    """The same Linear and the same ReLU applied twice."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.relu = nn.ReLU()
        self.b = nn.Linear(4, 3)

    def forward(self, x):
        return self.b(self.relu(self.a(self.relu(self.a(x)))))


class Unrolled(nn.Module):
    def __init__(self, reused: Reused) -> None:
        super().__init__()
        self.a1, self.a2, self.b = reused.a, reused.a, reused.b
        self.r1, self.r2 = nn.ReLU(), nn.ReLU()

    def forward(self, x):
        return self.b(self.r2(self.a2(self.r1(self.a1(x)))))


@pytest.mark.parametrize("rule", [Epsilon(0.01), ZPlus(), Gamma(0.5)])
def test_module_called_twice_gets_relevance_for_both_calls(rule):
    torch.manual_seed(1)
    model = Reused()
    x = torch.randn(3, 4).abs()
    comp = LayerMap([(nn.Linear, rule), (nn.ReLU, Pass())])
    expected = lrpcli.attribute(Unrolled(model), x, 2, composite=comp)
    torch.testing.assert_close(lrpcli.attribute(model, x, 2, composite=comp), expected, atol=1e-12, rtol=0)


def test_epsilon_to_zero_equals_gradient_times_input():
    model = small_net(3)
    x = torch.randn(2, 2, 6, 6)
    comp = LayerMap([((nn.Linear, nn.Conv2d), Epsilon(1e-12)), (nn.ReLU, Pass()), (nn.AvgPool2d, Norm(1e-12)),
                     (nn.Flatten, Pass())])
    relevance = lrpcli.attribute(model, x, 0, composite=comp)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(xg)[:, 0].sum(), xg)
    torch.testing.assert_close(relevance, grad * x, atol=1e-8, rtol=0)


def test_first_layer_is_first_in_forward_order_not_definition_order():
    class Backwards(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.late = nn.Linear(3, 2)     # defined first, runs last
            self.early = nn.Linear(4, 3)    # defined last, runs first

        def forward(self, x):
            return self.late(torch.relu(self.early(x)))

    model = Backwards()
    comp = Mixture([FirstLayer(nn.Linear, ZBox(-1.0, 1.0)), LayerMap([(nn.Linear, Epsilon())])])
    with comp.context(model) as m:
        m(torch.randn(1, 4))
        session = lrpcli.hooks.sessions_of(model)[0]
        rules = {a.name: repr(a.rule) for a in session.coverage()}
    assert rules["early"].startswith("ZBox") and rules["late"].startswith("Epsilon")


def test_target_forms_agree():
    model = small_net(4)
    x = torch.randn(2, 2, 6, 6)
    out = model(x)
    by_int = lrpcli.attribute(model, x, 1, composite="epsilon_plus")
    by_vector = lrpcli.attribute(model, x, torch.tensor([1, 1]), composite="epsilon_plus")
    mask = torch.zeros_like(out)
    mask[:, 1] = out[:, 1]
    by_tensor = lrpcli.attribute(model, x, mask, composite="epsilon_plus")
    by_callable = lrpcli.attribute(model, x, lambda o: o * torch.tensor([0.0, 1.0, 0.0]), composite="epsilon_plus")
    for other in (by_vector, by_tensor, by_callable):
        torch.testing.assert_close(other, by_int, atol=1e-12, rtol=0)
    predicted = lrpcli.attribute(model, x, None, composite="epsilon_plus")
    explicit = lrpcli.attribute(model, x, out.argmax(1), composite="epsilon_plus")
    torch.testing.assert_close(predicted, explicit)
    with pytest.raises(ValueError, match="out of range"):
        lrpcli.attribute(model, x, 7, composite="epsilon_plus")


def test_single_logit_and_segmentation_outputs():
    torch.manual_seed(0)
    binary = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 1))
    x = torch.randn(3, 5)
    relevance = lrpcli.attribute(binary, x, 0, composite="epsilon_plus", epsilon=1e-12)
    torch.testing.assert_close(relevance.sum(1), binary(x)[:, 0] - _bias_share(binary, x), atol=1e-9, rtol=0)
    seg = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 1, 1))
    img = torch.randn(2, 2, 8, 8)
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 2:5, 2:5] = 1.0
    rel = lrpcli.attribute(seg, img, mask, composite="epsilon_plus")
    assert rel.shape == img.shape and torch.isfinite(rel).all()


def _bias_share(model, x):
    """Relevance absorbed by biases under Epsilon(0) = sum over layers of bias * R/z."""
    comp = LayerMap([(nn.Linear, Epsilon(1e-12)), (nn.ReLU, Pass())])
    no_bias = nn.Sequential(*[m for m in model])
    rel = lrpcli.attribute(no_bias, x, 0, composite=comp)
    return model(x)[:, 0] - rel.sum(1)


def test_unhandled_module_warns_and_strict_raises():
    class Custom(nn.Module):
        def forward(self, x):
            return x * 2

    model = nn.Sequential(nn.Linear(3, 3), Custom(), nn.Softmax(dim=1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lrpcli.attribute(model, torch.randn(2, 3), 0, composite="epsilon_plus")
    messages = [str(w.message) for w in caught if issubclass(w.category, lrpcli.UnhandledModuleWarning)]
    assert len(messages) == 1 and "'1' (Custom)" in messages[0] and "'2' (Softmax)" in messages[0]
    with pytest.raises(ValueError, match="no rule for module '1'"):
        lrpcli.attribute(model, torch.randn(2, 3), 0, composite="epsilon_plus", strict=True)


def test_composite_registry_and_parameters():
    assert set(lrpcli.composites.names()) >= {
        "epsilon_gamma_box", "epsilon_plus", "epsilon_plus_flat", "epsilon_alpha2_beta1", "epsilon_alpha2_beta1_flat",
        "guided_backprop", "deconvnet", "excitation_backprop", "beta_smooth"}
    with pytest.raises(ValueError, match="valid composites: .*epsilon_plus"):
        lrpcli.composites.get("epsilon_plsu")
    with pytest.raises(ValueError, match="does not use gamma"):
        lrpcli.composites.get("epsilon_plus", gamma=0.5)


@pytest.mark.parametrize("composite,param,values", [
    ("epsilon_gamma_box", "epsilon", (1e-6, 10.0)),
    ("epsilon_gamma_box", "gamma", (0.0, 2.0)),
    ("epsilon_gamma_box", "low", (-3.0, -1.0)),
    ("epsilon_plus", "epsilon", (1e-6, 10.0)),
    ("epsilon_plus", "zero_params", ((), ("bias",))),
    ("epsilon_plus", "stabilizer", (1e-6, 5.0)),
    ("epsilon_alpha2_beta1", "epsilon", (1e-6, 10.0)),
])
def test_every_parameter_reaches_its_rules(composite, param, values):
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                          nn.AvgPool2d(2), nn.Flatten(), nn.Linear(4 * 3 * 3, 5), nn.ReLU(), nn.Linear(5, 3))
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.uniform_(m.bias, -0.5, 0.5)
    x = torch.randn(2, 2, 6, 6)
    a, b = (lrpcli.attribute(model, x, 0, composite=composite, **{param: v}) for v in values)
    assert not torch.allclose(a, b), f"{param} had no effect on {composite}"


def test_composite_object_with_params_is_rejected():
    comp = lrpcli.composites.get("epsilon_plus")
    with pytest.raises(ValueError, match="epsilon: only apply with a composite name"):
        lrpcli.attribute(small_net(), torch.randn(1, 2, 6, 6), 0, composite=comp, epsilon=0.1)


def test_gradient_space_composites_start_from_one_hot():
    model = small_net(6)
    x = torch.randn(2, 2, 6, 6)
    guided = lrpcli.attribute(model, x, 0, composite="guided_backprop")
    beta_large = lrpcli.attribute(model, x, 0, composite="beta_smooth", beta=1e6)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(xg)[:, 0].sum(), xg)
    torch.testing.assert_close(beta_large, grad, atol=1e-8, rtol=0)   # softplus(beta -> inf) = ReLU
    assert not torch.allclose(guided, grad)


def test_rules_off_gives_plain_gradient_inside_context():
    model = small_net(7)
    x = torch.randn(2, 2, 6, 6, requires_grad=True)
    comp = lrpcli.composites.get("epsilon_plus")
    with comp.context(model) as m:
        out = m(x)
        with lrpcli.rules_off(model):
            (plain,) = torch.autograd.grad(out[:, 0].sum(), x, retain_graph=True)
        (lrp,) = torch.autograd.grad(out, x, lrpcli.initial_relevance(out, 0))
    (expected,) = torch.autograd.grad(model(x)[:, 0].sum(), x)
    torch.testing.assert_close(plain, expected)
    assert not torch.allclose(lrp, expected)


def test_inplace_modification_of_hooked_output_is_an_error():
    class Bad(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 3)

        def forward(self, x):
            y = self.a(x)
            y += 1
            return y

    with pytest.raises(RuntimeError, match="in ?place"):
        lrpcli.attribute(Bad(), torch.randn(2, 3), 0, composite="epsilon_plus")


def _loss_of_relevance(model, x, comp):
    relevance = lrpcli.attribute(model, x, 1, composite=comp, create_graph=True)
    return (relevance ** 2).sum()


def test_second_order_matches_finite_differences():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    comp = LayerMap([(nn.Linear, Epsilon(0.1)), (nn.ReLU, Pass())])
    x = torch.randn(2, 4, requires_grad=True)
    params = list(model.parameters())
    loss = _loss_of_relevance(model, x, comp)
    grads = torch.autograd.grad(loss, [x] + params)
    h = 1e-6
    for tensor, grad in zip([x] + params, grads):
        flat = tensor.data.view(-1)
        for i in range(0, flat.numel(), max(1, flat.numel() // 6)):
            old = flat[i].item()
            flat[i] = old + h
            up = _loss_of_relevance(model, x.detach(), comp).item()
            flat[i] = old - h
            down = _loss_of_relevance(model, x.detach(), comp).item()
            flat[i] = old
            assert abs((up - down) / (2 * h) - grad.view(-1)[i].item()) < 1e-5


def _traced_bytes(fn, warmup: int = 30, repeats: int = 1000) -> int:
    for _ in range(warmup):
        fn()
    gc.collect()
    tracemalloc.start()
    start = tracemalloc.get_traced_memory()[0]
    for _ in range(repeats):
        fn()
    gc.collect()
    end = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return end - start


def test_memory_flat_over_1000_attributions():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(4, 8)
    comp = lrpcli.composites.get("epsilon_gamma_box", low=-3.0, high=3.0)
    grown = _traced_bytes(lambda: lrpcli.attribute(model, x, 0, composite=comp))
    assert grown < 64 * 1024, f"new context each time: memory grew by {grown} bytes over 1000 attributions"
    with comp.context(model) as m:
        def once():
            xi = x.clone().requires_grad_(True)
            out = m(xi)
            torch.autograd.grad(out, xi, lrpcli.initial_relevance(out, 0))
        grown = _traced_bytes(once)
    assert grown < 64 * 1024, f"one context: memory grew by {grown} bytes over 1000 attributions"
    assert hooks_of(model) == 0


class _OtherReLU(nn.ReLU):
    """A ReLU the session does not recognise as nn.ReLU: its producer keeps z (the reference behaviour)."""


def _relu_chain(relu_type: type, lower_rule, upper_rule) -> tuple[nn.Module, object]:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), relu_type(), nn.Conv2d(6, 5, 3, padding=1), relu_type(),
                          nn.Conv2d(5, 4, 3, padding=1), relu_type(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3)).double()
    comp = Mixture([NameMap([("2", lower_rule), ("4", upper_rule)]),
                    LayerMap([(nn.Conv2d, Gamma(0.25)), (nn.Linear, Epsilon(1e-6)), (nn.ReLU, Pass()),
                              (nn.Flatten, Pass())])])
    return model, comp


LOWER_RULES = [Gamma(0.25), Epsilon(1e-6), AlphaBeta(), Gamma(0.25, zero_params=["bias"]),
               Epsilon(0.01, zero_params=["bias"]), Gamma(0.25, stabilizer=Stabilizer(1e-6, "rms")),
               Epsilon(1e-6, stabilizer=Stabilizer(1e-6, "rms"))]


@pytest.mark.parametrize("lower_rule", LOWER_RULES, ids=["gamma", "epsilon", "alphabeta", "gamma_zb", "epsilon_zb",
                                                         "gamma_rms", "epsilon_rms"])
@pytest.mark.parametrize("upper_rule,recomputes", [(Gamma(0.5), 0), (Flat(), 1)], ids=["proportional", "flat"])
def test_rectified_output_gives_the_same_relevance(monkeypatch, lower_rule, upper_rule, recomputes):
    """A layer followed by a ReLU keeps relu(z), not z; the relevance is the same as with z kept: exactly the
    same where no relevance reaches z <= 0 (a rule proportional to its input above; Gamma and Epsilon then use
    their branch for z > 0 alone), and through one recomputed forward where some does (Flat above gives
    relevance to inputs that are 0)."""
    import lrpcli.engine.hooks as hooks

    x = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    model, comp = _relu_chain(nn.ReLU, lower_rule, upper_rule)
    reference_model, _ = _relu_chain(_OtherReLU, lower_rule, upper_rule)
    reference_model.load_state_dict(model.state_dict())
    calls = []
    original = layercall.forward
    monkeypatch.setattr(layercall, "forward", lambda *a: calls.append(1) or original(*a))
    got = lrpcli.attribute(model, x, 1, composite=comp)
    # Gamma with an rms stabilizer keeps z whole (relu(z) is recomputed): nothing to restore
    whole = lower_rule.rms_at_forward() and lower_rule.denominators_take_a_forward
    assert len(calls) == (0 if whole else recomputes)
    rectified = []
    monkeypatch.setattr(hooks.LayerCall, "rectify", lambda self, y: rectified.append(self.name))
    want = lrpcli.attribute(reference_model, x, 1, composite=comp)
    assert rectified == []  # the reference really kept z
    assert (want != 0).any()
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("upper_rule,known", [(Gamma(0.5), [True, True, True]), (Flat(), [False, True])],
                         ids=["proportional", "flat"])
def test_relevance_made_by_a_proportional_rule_needs_no_zero_check(monkeypatch, upper_rule, known):
    """Below a rule proportional to its input (through the ReLU's Pass, and Flatten's) the relevance is known to
    be zero where relu(z) is: restore_output skips its pass over both tensors. Under Flat (layer "4") it is not
    known, and the check runs (and, Flat giving relevance to zero inputs, z is recomputed: same numbers as in
    test_rectified_output_gives_the_same_relevance)."""
    import lrpcli.engine.hooks as hooks

    x = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    model, comp = _relu_chain(nn.ReLU, Gamma(0.25), upper_rule)
    seen, checks = [], []
    original, logical_and = hooks.ZeroNotes.known, torch.logical_and
    monkeypatch.setattr(hooks.ZeroNotes, "known", lambda n, r, o: seen.append(original(n, r, o)) or seen[-1])
    monkeypatch.setattr(torch, "logical_and", lambda *a: checks.append(1) or logical_and(*a))
    lrpcli.attribute(model, x, 1, composite=comp)
    assert seen == known  # backward order: "4" (under the Linear; not rectified under Flat), "2", "0"
    assert len(checks) == known.count(False)


@pytest.mark.parametrize("recorded", [True, False], ids=["recorder", "no_recorder"])
def test_zero_note_passes_a_winner_takes_all_max_pool(monkeypatch, recorded):
    """A MaxPool (the Gradient rule; hooked with a recorder, and without one where its input is a ReLU output that
    the layer below keeps) hands the note on: an input of 0 that wins its window made the output 0, whose
    relevance is 0. The relevance is the same as with z kept."""
    import lrpcli.engine.hooks as hooks
    from lrpcli.engine.recorder import Recorder

    def chain(relu_type: type) -> nn.Module:
        torch.manual_seed(6)
        return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), relu_type(), nn.MaxPool2d(2),
                             nn.Conv2d(4, 3, 3, padding=1), relu_type(), nn.Flatten(), nn.Linear(3 * 3 * 3, 2)).double()

    from lrpcli.engine.rules import Gradient

    comp = LayerMap([(nn.Conv2d, Gamma(0.25)), (nn.Linear, Epsilon(1e-6)), (nn.ReLU, Pass()), (nn.Flatten, Pass()),
                     (nn.MaxPool2d, Gradient())])
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    seen = []
    original = hooks.ZeroNotes.known
    monkeypatch.setattr(hooks.ZeroNotes, "known", lambda n, r, o: seen.append(original(n, r, o)) or seen[-1])

    def attribute(model: nn.Module) -> torch.Tensor:
        with comp.context(model, recorder=Recorder() if recorded else None) as m:
            xi = x.clone().requires_grad_(True)
            out = m(xi)
            return torch.autograd.grad(out, xi, lrpcli.initial_relevance(out, 1))[0]

    got = attribute(chain(nn.ReLU))
    assert seen == [True, True, True]  # conv "3" (under the Linear), the pool's note, conv "0"
    want = attribute(chain(_OtherReLU))
    assert (want != 0).any()
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_zero_note_holds_only_while_both_tensors_are_unchanged():
    from lrpcli.engine.hooks import ZeroNotes

    notes = ZeroNotes()
    mark_zeros, zero_where = notes.mark, notes.known
    y = torch.relu(torch.randn(2, 3, 4))
    r = y * torch.randn(2, 3, 4)
    mark_zeros([y], [r])
    assert zero_where(r, y.detach())                       # the same elements: known
    assert not zero_where(r, y.clone())                    # equal values elsewhere: not known
    assert not zero_where(r * 1, y)                        # another tensor: no note
    r2 = y * 2.0
    mark_zeros([y], [r2])
    r2.add_(1.0)                                           # changed after the note
    assert not zero_where(r2, y)
    y.mul_(1.0)                                            # the input changed after the note
    assert not zero_where(r, y)
    z = torch.relu(torch.randn(4))
    r3 = z * 3.0
    mark_zeros([z], [r3])
    ptr = z.data_ptr()
    del z                                                  # the input is gone
    assert not zero_where(r3, torch.empty(0)) and ptr


def test_rectified_output_releases_z():
    """After the forward, a conv followed by a ReLU no longer holds its own output (only the ReLU's)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3))
    seen = []
    import lrpcli.engine.hooks as hooks

    original = hooks.LayerCall.rectify

    def spy(self, y):
        original(self, y)
        seen.append((self.name, self.output.data_ptr() == y.data_ptr()))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hooks.LayerCall, "rectify", spy)
        lrpcli.attribute(model, torch.randn(2, 1, 7, 7), 0, composite=LayerMap(
            [(nn.Conv2d, Epsilon(1e-6)), (nn.ReLU, Pass())]))
    assert seen == [("0", True)]


def test_large_layers_split_over_the_batch_give_the_same_relevance(monkeypatch):
    """Rules on slices of the batch (CHUNK_BYTES small) give the relevance of one piece: every rule is per
    sample, also the rms stabilizer and a ZBox with bounds per sample (which is never split)."""
    import lrpcli.engine.hooks as hooks

    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 4, 3), nn.ReLU(),
                          nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4, 2)).double()
    x = torch.randn(5, 3, 5, 5, dtype=torch.float64)
    low = -torch.rand(5, 3, 5, 5, dtype=torch.float64) - 2
    rules = [(nn.ReLU, Pass()), (nn.Flatten, Pass()), (nn.Linear, Epsilon(1e-3))]
    composites = [
        Mixture([NameMap([("0", ZBox(low=low, high=3.0)), ("2", Gamma(0.25, stabilizer=Stabilizer(0.1, "rms"))),
                          ("4", AlphaBeta())]), LayerMap(rules)]),
        Mixture([NameMap([("0", ZBox(low=-3.0, high=3.0)), ("2", ZPlus()), ("4", Gamma(0.5))]), LayerMap(rules)]),
    ]
    original = hooks.LayerCall._rows
    split: list[str] = []

    def spy(self, a, b):
        split.append(self.name)
        return original(self, a, b)

    for comp in composites:
        whole = lrpcli.attribute(model, x, 1, composite=comp)
        split.clear()
        monkeypatch.setattr(layercall, "CHUNK_BYTES", 64)
        monkeypatch.setattr(hooks.LayerCall, "_rows", spy)
        pieces = lrpcli.attribute(model, x, 1, composite=comp)
        monkeypatch.undo()
        assert {"2", "4"} <= set(split)
        assert ("0" in split) == (comp is composites[1])  # per-sample bounds are never split
        torch.testing.assert_close(pieces, whole, atol=1e-12, rtol=0)


@pytest.mark.parametrize("sliced", [False, True])
def test_channels_last_model_keeps_its_layout_through_the_rules(monkeypatch, sliced):
    """A channels-last model and input: the rules allocate their buffers in that layout (mixing layouts made every
    element-wise pass slow), the pointwise matrix-product path stands aside, and the numbers are those of NCHW."""

    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 1), nn.ReLU(),
                          nn.Conv2d(6, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3)).double()
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    comp = Mixture([NameMap([("0", AlphaBeta()), ("2", ZPlus()), ("4", Gamma(0.25))]),
                    LayerMap([(nn.ReLU, Pass()), (nn.Flatten, Pass()), (nn.AdaptiveAvgPool2d, Norm()),
                              (nn.Linear, Epsilon(1e-6))])])
    whole = lrpcli.attribute(model, x, 1, composite=comp)
    if sliced:
        monkeypatch.setattr(layercall, "CHUNK_BYTES", 64)
    cl = torch.channels_last
    r = lrpcli.attribute(model.to(memory_format=cl), x.contiguous(memory_format=cl), 1, composite=comp)
    torch.testing.assert_close(r, whole, atol=1e-12, rtol=0)
    assert r.is_contiguous(memory_format=cl) and not r.is_contiguous()


@pytest.mark.parametrize("activation", ["deconvnet", "guided_backprop", "beta_smooth"])
def test_sliced_activation_rules_give_the_same_relevance(monkeypatch, activation):
    """Activation rules are sliced too, also DeconvNet, which keeps only shape stand-ins of its input."""
    import lrpcli.engine.hooks as hooks
    from lrpcli.engine.rules import BetaSmooth, DeconvNet, GuidedBackprop

    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(125, 2)).double()
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    rule = {"deconvnet": DeconvNet(), "guided_backprop": GuidedBackprop(), "beta_smooth": BetaSmooth()}[activation]
    comp = LayerMap([(nn.ReLU, rule), (nn.Flatten, Pass()), (nn.Conv2d, Epsilon(1e-3)), (nn.Linear, Epsilon(1e-3))])
    whole = lrpcli.attribute(model, x, 1, composite=comp)
    split: list[str] = []
    original_rows = hooks.LayerCall._rows

    def rows(self, a, b):
        split.append(self.name)
        return original_rows(self, a, b)

    monkeypatch.setattr(layercall, "CHUNK_BYTES", 64)
    monkeypatch.setattr(hooks.LayerCall, "_rows", rows)
    pieces = lrpcli.attribute(model, x, 1, composite=comp)
    monkeypatch.undo()
    assert "1" in split and pieces.device == x.device
    torch.testing.assert_close(pieces, whole, atol=1e-12, rtol=0)


@pytest.mark.parametrize("later", ["alpha_beta", "gamma", "zplus", "epsilon"])
def test_batch_slices_are_written_into_the_result_and_pass_layers_are_not_sliced(monkeypatch, later):
    """Slicing the batch bounds a rule's temporaries; the slices' relevance goes straight into the whole batch's
    result (no copy afterwards), and a Pass layer, which makes no temporaries, is never sliced."""
    import lrpcli.engine.hooks as hooks

    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 4, 3), nn.ReLU(),
                          nn.Flatten(), nn.Linear(36, 2)).double()
    x = torch.randn(5, 3, 5, 5, dtype=torch.float64)
    rule = {"alpha_beta": AlphaBeta(), "gamma": Gamma(0.25), "zplus": ZPlus(), "epsilon": Epsilon(0.01)}[later]
    comp = Mixture([NameMap([("0", Epsilon(1e-3)), ("2", rule)]),
                    LayerMap([(nn.ReLU, Pass()), (nn.Flatten, Pass()), (nn.Linear, Epsilon(1e-3))])])
    whole = lrpcli.attribute(model, x, 1, composite=comp)
    original_rows = hooks.LayerCall._rows
    split: list[str] = []
    copies: list[tuple[int, ...]] = []

    def rows(self, a, b):
        split.append(self.name)
        return original_rows(self, a, b)

    original_setitem = torch.Tensor.__setitem__

    def setitem(self, key, value):
        copies.append(tuple(self.shape))
        return original_setitem(self, key, value)

    monkeypatch.setattr(layercall, "CHUNK_BYTES", 64)
    monkeypatch.setattr(hooks.LayerCall, "_rows", rows)
    monkeypatch.setattr(torch.Tensor, "__setitem__", setitem)
    pieces = lrpcli.attribute(model, x, 1, composite=comp)
    monkeypatch.undo()
    assert {"0", "2"} <= set(split) and not {"1", "3", "4"} & set(split)
    assert copies == []
    torch.testing.assert_close(pieces, whole, atol=1e-12, rtol=0)


def test_submodules_called_directly_leave_no_producer_records():
    """Outside a forward of the whole model nothing is recorded for rectification (so nothing accumulates), and
    the relevance through a submodule called directly is still computed."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()), nn.Conv2d(2, 2, 3))
    comp = LayerMap([(nn.Conv2d, Epsilon(1e-6)), (nn.ReLU, Pass())])
    with comp.context(model) as m:
        session = lrpcli.hooks.sessions_of(model)[0]
        for _ in range(20):
            x = torch.randn(2, 1, 6, 6, requires_grad=True)
            out = m[0](x)
            (r,) = torch.autograd.grad(out, x, out)
            assert r.shape == x.shape and (r != 0).any()
        assert session._producers == {}
        m(torch.randn(2, 1, 7, 7))
        assert session._producers == {} and not session._in_root


def test_inputs_known_nonnegative_from_the_graph_skip_the_sign_pass(monkeypatch):
    """A conv fed by a hooked ReLU (also through a pooling layer that reads its input) knows x >= 0 from the graph;
    the first layer, a view (Flatten) and a ReLU output changed in place do not. Attributions are bitwise those
    computed with the sign pass."""
    import lrpcli.engine.hooks as hooks

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.AvgPool2d(2),
                          nn.Conv2d(4, 3, 1), nn.Flatten(), nn.Linear(12, 3)).double()
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    seen = {}
    original = hooks.LayerCall.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        seen[self.name] = self.input_nonnegative

    def run() -> dict:
        results = {}
        for name in ("epsilon_alpha2_beta1", "epsilon_gamma_box", "epsilon_plus"):
            extra = {"low": -3.0, "high": 3.0} if name == "epsilon_gamma_box" else {}
            results[name] = lrpcli.attribute(model, x, 1, composite=name, **extra)
        return results

    monkeypatch.setattr(hooks.LayerCall, "__init__", init)
    results = run()
    assert seen["0"] is False and seen["2"] is True and seen["5"] is True and seen["7"] is False
    monkeypatch.setattr(hooks, "known_nonnegative", lambda x, depth=4: False)
    for key, again in run().items():
        assert torch.equal(again, results[key]), key
    monkeypatch.undo()

    outputs = []
    handle = model[2].register_forward_pre_hook(lambda module, args: outputs.append(args[0]))  # the ReLU's result
    with lrpcli.composites.get("epsilon_plus").context(model) as m:
        m(x.clone().requires_grad_(True))
        relu_out = outputs[-1]
        assert hooks.known_nonnegative(relu_out)
        with torch.no_grad():
            relu_out.sub_(0.5)  # another version: no longer known (the next layer would read x again)
        assert not hooks.known_nonnegative(relu_out)
    handle.remove()


@pytest.mark.parametrize("rule_name", ["alpha_beta", "gamma"])
@pytest.mark.parametrize("layer", ["conv", "conv_transpose"])
def test_mixed_sign_inputs_take_the_fused_path_with_the_general_result(monkeypatch, rule_name, layer):
    """A first layer sees inputs of both signs: AlphaBeta stacks [x+, x-] and back-projects through one block
    weight (x- with W+ and W- swapped), Gamma back-projects by x and |x| (``backproject_magnitude``); the
    result equals the general sign-split path's."""
    from lrpcli.engine.rules.signsplit import SignSplit

    torch.manual_seed(6)
    first = nn.Conv2d(3, 4, 3, padding=1) if layer == "conv" else nn.ConvTranspose2d(3, 4, 3, stride=2)
    model = nn.Sequential(first, nn.ReLU(), nn.Conv2d(4, 2, 3)).double()
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64)
    rule = AlphaBeta() if rule_name == "alpha_beta" else Gamma(0.25)
    comp = LayerMap([(nn.Conv2d, rule), (nn.ConvTranspose2d, rule), (nn.ReLU, Pass())])
    taken: list[str] = []
    pair, magnitude = SignSplit.backproject_pair, SignSplit.backproject_magnitude

    def spy_pair(self, buf, fill):
        taken.append("stacked" if self.x_stacked is not None else "pair")
        return pair(self, buf, fill)

    def spy_magnitude(self, *args):
        taken.append("magnitude")
        return magnitude(self, *args)

    monkeypatch.setattr(SignSplit, "backproject_pair", spy_pair)
    monkeypatch.setattr(SignSplit, "backproject_magnitude", spy_magnitude)
    fused = lrpcli.attribute(model, x, 1, composite=comp)
    # backward order: the second layer (x >= 0; Gamma's own stacked pair), then the first (mixed)
    assert taken == (["pair", "stacked"] if rule_name == "alpha_beta" else ["magnitude"])
    monkeypatch.setattr(SignSplit, "pair_fast", property(lambda self: False))
    general = lrpcli.attribute(model, x, 1, composite=comp)
    torch.testing.assert_close(fused, general, atol=1e-12, rtol=1e-10)
