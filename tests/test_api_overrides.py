"""``lrpcli.attribute(overrides=...)``: the accepted forms, and clear errors for everything else."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lrpcli
from lrpcli.engine import rules
from lrpcli.engine.rules import Epsilon, Pass, ZPlus

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval()


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def attribute(net, **kwargs):
    return lrpcli.attribute(net, X, 0, **kwargs)


def test_pairs_names_and_mappings_give_the_same_relevance(net):
    expected = attribute(net, overrides=[("3", Epsilon(0.5)), (nn.Conv2d, ZPlus())])
    forms = [
        [("3", "epsilon"), (nn.Conv2d, "zplus")],  # the call's epsilon below
        [("3", {"name": "epsilon", "epsilon": 0.5}), ((nn.Conv2d,), "z_plus")],
        [{"match": "3", "rule": {"name": "epsilon", "epsilon": 0.5}}, {"type": "Conv2d", "rule": "zplus"}],
        [{"match": "3", "rule": "epsilon"}, {"type": nn.Conv2d, "rule": "zplus"}],
    ]
    for overrides in forms:
        got = attribute(net, overrides=overrides, epsilon=0.5)
        assert torch.equal(got, expected), overrides
    assert not torch.equal(attribute(net), expected)  # the overrides did change something


def test_string_rule_in_a_pair_no_longer_fails(net):
    relevance = attribute(net, overrides=[("2", "pass")])
    assert torch.equal(relevance, attribute(net, overrides=[("2", Pass())]))


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        ("abc", TypeError, "lrpcli.attribute: overrides: expected a list of (glob or module class, rule) pairs"),
        ({"match": "3", "rule": "epsilon"}, TypeError, "lrpcli.attribute: overrides: expected a list"),
        (["3"], TypeError, "lrpcli.attribute: overrides[0]: expected a (glob or module class, rule) pair"),
        ([("3", 5)], TypeError, "lrpcli.attribute: overrides[0]: expected a Rule (e.g. lrpcli.rules.Epsilon(0.25))"),
        ([(3, "pass")], TypeError, "lrpcli.attribute: overrides[0]: expected a module-name glob, an nn.Module class"),
        ([("3", "epsilonn")], ValueError,
         "lrpcli.attribute: overrides[0][1]: unknown rule 'epsilonn'; did you mean 'epsilon'?"),
        ([("3", "pass"), {"match": "3"}], ValueError, "lrpcli.attribute: overrides[1].rule: missing"),
        ([{"match": "3", "rule": "pass", "when": 1}], ValueError, "lrpcli.attribute: overrides[0].when: unknown key"),
        ([{"match": "3", "rule": {"name": "epsilon", "epsilon": 0}}], ValueError,
         "lrpcli.attribute: overrides[0].rule.epsilon: expected a number > 0, got 0"),
        ([{"type": "Lineer", "rule": "pass"}], ValueError,
         "lrpcli.attribute: overrides[0].type: unknown module type 'Lineer'; did you mean 'Linear'?"),
    ],
)
def test_wrong_forms_are_refused_with_the_item(net, overrides, error, message):
    with pytest.raises(error) as info:
        attribute(net, overrides=overrides)
    assert str(info.value).startswith(message), str(info.value)


def test_composite_typo_has_did_you_mean(net):
    with pytest.raises(ValueError, match=r"^unknown composite 'epsilon_gama_box'; did you mean 'epsilon_gamma_box'\? "):
        attribute(net, composite="epsilon_gama_box")


@pytest.mark.parametrize("epsilon", [0, 0.0, -1e-3])
def test_epsilon_rule_needs_a_positive_epsilon(epsilon):
    with pytest.raises(ValueError, match=r"^Epsilon: epsilon must be > 0, got "):
        rules.Epsilon(epsilon)
    assert rules.Epsilon(1e-12).epsilon == 1e-12
