"""A rule override whose module-name glob matches no module is an error naming where it was written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from lrpcli.cli import main
from lrpcli.engine import composites
from lrpcli.engine.composites import Glob, LayerMap, Mixture, NameMap
from lrpcli.engine.rules import Epsilon, Pass
from lrpcli.errors import ConfigError, UnmatchedPatternError

ROOT = Path(__file__).resolve().parents[1]


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Sequential(nn.Linear(3, 2)))


def test_unmatched_glob_is_refused_when_applied():
    glob = Glob("9", "c.yaml: composite.rules[1].match")
    comp = Mixture([NameMap([(glob, Pass())]), LayerMap([(nn.Linear, Epsilon())])])
    model = net()
    with pytest.raises(UnmatchedPatternError) as info:
        with comp.context(model):
            pass
    assert str(info.value) == ("c.yaml: composite.rules[1].match: '9' matches no module of the model that gets a "
                               "rule (modules without children), e.g. 0, 1, 2.0")
    assert isinstance(info.value, ConfigError) and isinstance(info.value, ValueError)
    assert not model._forward_hooks and not model[0]._forward_hooks  # the failed context left nothing behind


def test_glob_matching_only_a_container_is_refused():
    comp = NameMap([("2", Epsilon())])
    with pytest.raises(UnmatchedPatternError, match=r"^rule override: '2' matches no module"):
        with comp.context(net()):
            pass


def test_matching_globs_and_types_pass():
    comp = Mixture([NameMap([("2.*", Epsilon(0.5)), (nn.Conv2d, Pass())]),
                    LayerMap([(nn.Linear, Epsilon()), (nn.ReLU, Pass())])])
    with comp.context(net()) as m:
        assert m(torch.ones(1, 4)).shape == (1, 2)


def test_named_composite_overrides_are_checked():
    comp = composites.get("epsilon_plus", overrides=[("fc*", Pass())])
    with pytest.raises(UnmatchedPatternError, match=r"^rule override: 'fc\*' matches no module"):
        with comp.context(net()):
            pass


def test_config_rules_name_the_key(tmp_path):
    config = (ROOT / "configs" / "demo.yaml").read_text().replace("../share", str(ROOT / "share"))
    config = config.replace("  high: auto\n", "  high: auto\n  rules:\n    - {type: Linear, rule: epsilon}\n"
                                              "    - {match: 'featurs.*', rule: pass}\n")
    path = tmp_path / "c.yaml"
    path.write_text(config)
    result = CliRunner().invoke(main, ["debug", str(path), "-n", "1"])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == (
        f"lrpcli: error: {path}: composite.rules[1].match: 'featurs.*' matches no module of the model that gets a "
        "rule (modules without children), e.g. features.0, features.1, features.2, features.3, features.4")


def test_name_map_refuses_a_pair_without_a_rule():
    expected = r"^NameMap: pairs\[1\]: expected \(glob or module class, Rule\), got \('2', 'pass'\)"
    with pytest.raises(TypeError, match=expected):
        composites.get("epsilon_plus", overrides=[("0", Pass()), ("2", "pass")])
