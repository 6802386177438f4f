"""The Explainer (the one attribution step) against hooks-free formulas, and the one target resolver, exactly."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

import lrpcli
from lrpcli.engine.composites import LayerMap
from lrpcli.engine.rules import Epsilon, Pass
from lrpcli.explainer.build import load_config
from lrpcli.explainer.explainer import Explainer, TargetError, initial_relevance, resolve_target

try:
    from tests.reference_lrp import RefRule, reference_lrp
except ImportError:  # pytest run from inside tests/
    from reference_lrp import RefRule, reference_lrp

ROOT = Path(__file__).resolve().parents[1]
EPS = 0.25


def dense_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 2 * 2, 4)).eval()


def epsilon_everywhere() -> LayerMap:
    return LayerMap([((nn.Conv2d, nn.Linear), Epsilon(EPS)), ((nn.ReLU, nn.Flatten), Pass())])


def reference(net: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Epsilon-LRP written out layer by layer on dense matrices (tests/reference_lrp.py), no hooks."""
    conv, _, _, linear = net
    a = torch.relu(conv(x)).detach()
    out = linear(a.flatten(1)).detach()
    relevance = torch.zeros_like(out)
    relevance[torch.arange(len(target)), target] = out[torch.arange(len(target)), target]
    rule = RefRule("epsilon", eps=EPS)
    r_a, _ = reference_lrp(linear, a.flatten(1), relevance, rule)
    r_x, _ = reference_lrp(conv, x, r_a.view_as(a), rule)
    return r_x


@pytest.mark.usefixtures("float64")
def test_relevance_equals_the_layer_by_layer_formula_over_batches_in_one_context():
    net = dense_net()
    batches = [torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    labels = [torch.tensor([0, 3, 1]), torch.tensor([2, 2, 0])]
    recorder = lrpcli.Recorder()
    with Explainer(net, epsilon_everywhere(), target="label", recorder=recorder) as explainer:
        session = explainer.session
        results = [explainer(x, y) for x, y in zip(batches, labels)]
        assert lrpcli.hooks.sessions_of(net) == [session]  # one context for both batches
    assert lrpcli.hooks.sessions_of(net) == []
    for x, y, result in zip(batches, labels, results):
        torch.testing.assert_close(result.relevance, reference(net, x, y), rtol=1e-10, atol=1e-12)
        assert torch.equal(result.target, y) and result.note is None
        torch.testing.assert_close(result.output, net(x))
        torch.testing.assert_close(result.initial, initial_relevance(net(x), y))
    layers, _, _, r_out = recorder.table()
    assert layers == ["0", "1", "2", "3"]
    # the recorder's numbers are the last batch's: the relevance at the output of the last layer
    torch.testing.assert_close(r_out[:, 3], results[1].initial.sum(1))


@pytest.mark.usefixtures("float64")
def test_without_a_composite_it_is_the_gradient_and_the_methods_go_through_it():
    net = dense_net()
    x = torch.randn(2, 2, 4, 4)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(net(xg)[:, 1].sum(), xg)
    result = Explainer(net, target=1)(x)
    torch.testing.assert_close(result.relevance, grad)
    torch.testing.assert_close(Explainer(net, method="input_x_gradient", target=1)(x).relevance, grad * x)
    assert torch.equal(Explainer(net, method="smoothgrad", target=1, noise_level=0.0, n_iter=3)(x).relevance,
                       lrpcli.attributors.smoothgrad(net, x, 1, noise_level=0.0, n_iter=3)[1])
    with pytest.raises(TypeError, match="^smoothgrad: unexpected option window; its options: noise_level, n_iter, "
                                        "seed, memory_budget$"):
        Explainer(net, method="smoothgrad", window=3)


def test_check_runs_before_the_target_and_forward_error_wraps_the_model_failure():
    net = dense_net()
    seen = []

    def check(output):
        seen.append(tuple(output.shape))
        raise RuntimeError("checked")

    with pytest.raises(RuntimeError, match="^checked$"):
        Explainer(net, target="label")(torch.randn(2, 2, 4, 4), check=check)  # no labels: would be a TargetError
    assert seen == [(2, 4)]
    with pytest.raises(KeyError) as info:
        Explainer(net)(torch.randn(2, 1, 4, 4), forward_error=lambda err: KeyError("wrapped"))
    assert isinstance(info.value.__cause__, RuntimeError)  # the model's own error, chained


@pytest.mark.filterwarnings("ignore::lrpcli.errors.ConfigWarning")  # demo's canonizers do nothing for smoothgrad
def test_from_config_reads_method_options_and_target():
    config = load_config(ROOT / "configs" / "demo.yaml", {"attribution.method": "smoothgrad",
                                                          "attribution.target": 2, "run.seed": 7})
    explainer = Explainer.from_config(config, dense_net())
    assert (explainer.method, explainer.target, explainer.composite) == ("smoothgrad", 2, None)
    assert explainer.options["seed"] == 7
    lrp = Explainer.from_config(load_config(ROOT / "configs" / "demo.yaml"), dense_net())
    assert (lrp.method, lrp.target, lrp.composite.name) == ("gradient", "label", config.composite.name)


OUT = torch.tensor([[0.1, 0.9, 0.3, -1.0], [2.0, 0.0, 0.5, 0.4], [0.0, 0.2, 0.1, 0.7]])


@pytest.mark.parametrize("target, labels, policy, index, note", [
    (None, None, "error", [1, 0, 3], None),
    ("prediction", None, "error", [1, 0, 3], None),
    (2, None, "error", [2, 2, 2], None),
    ([0, 1, 3], None, "error", [0, 1, 3], None),
    (torch.tensor([3, 3, 0]), None, "error", [3, 3, 0], None),
    ("label", torch.tensor([1, 2, 0]), "error", [1, 2, 0], None),
    ("label", torch.tensor([1, 2, 0]), "prediction", [1, 2, 0], None),
    ("label", torch.tensor([-1, -1, -1]), "prediction", [1, 0, 3],
     "attribution.target is label, but these inputs have no labels: explaining the prediction"),
    ("label", None, "prediction", [1, 0, 3],
     "attribution.target is label, but these inputs have no labels: explaining the prediction"),
])
def test_class_targets(target, labels, policy, index, note):
    got, got_note = resolve_target(OUT, target, labels, missing_label=policy)
    assert got.dtype == torch.long and got.tolist() == index and got_note == note


def test_dense_targets_are_the_initial_relevance_as_is():
    dense = torch.arange(12.0).view(3, 4)
    got, _ = resolve_target(OUT, dense)
    assert torch.equal(got, dense)
    got, _ = resolve_target(OUT, lambda out: out * 2)
    assert torch.equal(got, OUT * 2)
    assert torch.equal(initial_relevance(OUT, dense, "onehot"), dense)


def test_spatial_outputs_predict_by_the_class_sum():
    out = torch.zeros(2, 3, 2, 2)
    out[0, 2] = 1.0
    out[1, 0, 0, 0], out[1, 1] = 5.0, 2.0  # class 1 sums to 8, class 0 to 5
    assert resolve_target(out, None)[0].tolist() == [2, 1]


def test_initial_relevance_masks_the_output_or_gives_a_one_hot():
    assert initial_relevance(OUT, 1).tolist() == [[0.0, OUT[0, 1].item(), 0.0, 0.0],
                                                  [0.0, 0.0, 0.0, 0.0], [0.0, OUT[2, 1].item(), 0.0, 0.0]]
    assert initial_relevance(OUT, [0, 1, 3], "onehot").tolist() == [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0],
                                                                    [0.0, 0.0, 0.0, 1.0]]


@pytest.mark.parametrize("output, target, labels, error, message", [
    (OUT, 4, None, ValueError, "target: class index out of range for 4 outputs: [4, 4, 4]"),
    (OUT, [0, 1], None, ValueError,
     "target: expected an int, 3 class indices, or a tensor shaped like the output (3, 4); got shape (2,)"),
    (OUT, "labels", None, ValueError,
     "target: expected an int, 3 class indices, or a tensor shaped like the output (3, 4); got 'labels'"),
    (OUT, True, None, TypeError, "target: expected a class index, a tensor or a callable, got a bool"),
    (OUT, "label", None, ValueError, "target: label needs the inputs' class labels, and these inputs have none; "
                                     "give labels, or explain the prediction"),
    (OUT, "label", torch.tensor([0, 1, -1]), ValueError,
     "target: label needs the inputs' class labels, and these inputs have none; give labels, or explain the "
     "prediction"),
    (OUT, lambda out: out[:, 0], None, ValueError,
     "target callable must return a tensor shaped like the output (3, 4), got (3,)"),
    (torch.zeros(3), 0, None, ValueError,
     "class targets need an output with a class dimension (dim 1); output is (3,): pass a tensor shaped like the "
     "output instead"),
])
def test_bad_targets(output, target, labels, error, message):
    with pytest.raises(error) as info:
        resolve_target(output, target, labels)
    assert str(info.value) == message and isinstance(info.value, TargetError)


def test_the_engine_does_not_import_the_explainer():
    files = sorted((ROOT / "lrpcli" / "engine").rglob("*.py"))
    assert len(files) > 8
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [a.name for a in node.names]
                assert not any(n.split(".")[-1] in ("explainer", "api", "attributors", "methods") for n in names), \
                    f"{path.name} imports {names}"
