"""The torch-free catalogue (lrpcli.catalogue) and the engine registries name the same things."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from lrpcli import catalogue, store
from lrpcli.engine import canonizers, composites, rules
from lrpcli.engine.composites.builtin import BUILDERS
from lrpcli.spec.config import DEFAULTS


def test_every_declared_composite_has_a_builder_taking_its_parameters():
    assert set(BUILDERS) == set(catalogue.COMPOSITES)
    for name, decl in catalogue.COMPOSITES.items():
        keywords = {p.name for p in inspect.signature(BUILDERS[name]).parameters.values() if p.kind is p.KEYWORD_ONLY}
        assert keywords - {"overrides"} == set(decl.params), name
        assert set(decl.params) <= set(catalogue.PARAMS), name
        assert composites.parameters(name) == decl.params and composites.describe(name) == decl.description


def test_a_builder_that_does_not_take_its_declared_parameters_is_refused():
    from lrpcli.engine.composites.builtin import builds

    catalogue.declare("_test_only", "a test", ("epsilon",))
    try:
        with pytest.raises(TypeError, match=r"composite '_test_only': builder takes \[\], declared \['epsilon'\]"):
            builds("_test_only")(lambda *, overrides=None, **options: None)
    finally:
        del catalogue.COMPOSITES["_test_only"]


def test_config_defaults_are_the_declared_ones():
    for name, param in catalogue.PARAMS.items():
        assert DEFAULTS["composite"][name] == param.default
    assert list(DEFAULTS["composite"]) == ["name", "epsilon", "gamma", "low", "high", "zero_params", "stabilizer",
                                           "rules", "maxpool", "beta", "strict"]


def test_builder_defaults_come_from_the_declaration():
    layer = __import__("torch").nn.Linear(3, 2)
    rule = composites.get("epsilon_plus").rule_for("fc", layer, {})
    assert rule.epsilon == catalogue.PARAMS["epsilon"].default
    assert composites.get("beta_smooth").rule_for("r", __import__("torch").nn.ReLU(), {}).beta == 10.0


def test_register_keeps_working():
    built = {}

    def build(*, epsilon: float = 0.5, overrides=None, **options):
        built["epsilon"] = epsilon
        return composites.get("epsilon_plus", epsilon=epsilon, overrides=overrides, **options)

    composites.register("_test_registered", build, ("epsilon",), "for a test")
    try:
        assert "_test_registered" in composites.names()
        assert composites.describe("_test_registered") == "for a test"
        composites.get("_test_registered")
        assert built == {"epsilon": 0.5}  # the builder's own default wins over the declared one
        with pytest.raises(ValueError, match="does not use gamma"):
            composites.get("_test_registered", gamma=0.1)
    finally:
        del catalogue.COMPOSITES["_test_registered"], BUILDERS["_test_registered"]


def test_rule_canonizer_and_compression_names_match_the_engine():
    assert tuple(rules.names()) == catalogue.RULE_NAMES
    assert rules.ALIASES == catalogue.RULE_ALIASES
    assert tuple(canonizers.names()) == catalogue.CANONIZER_NAMES
    assert store.COMPRESSIONS == catalogue.COMPRESSIONS


def test_readme_composite_table_matches_declarations():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = {}
    for line in readme.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].strip("`") in catalogue.COMPOSITES:
            rows[cells[0].strip("`")] = (cells[1], cells[2])
    assert rows == {name: (", ".join(d.params) or "none", d.description) for name, d in catalogue.COMPOSITES.items()}


def test_validating_a_config_imports_no_torch_and_no_engine():
    code = ("import sys; from lrpcli.spec.config import validate; "
            "validate({'model': {'name': 'resnet18'}, 'canonizers': ['vgg'], 'output': {'compression': 'lzf'}, "
            "'composite': {'rules': [{'type': 'Linear', 'rule': {'name': 'epsilon', 'epsilon': 0.1}}]}}); "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.split('.')[:2] in "
            "(['lrpcli', 'rules'], ['lrpcli', 'composites'], ['lrpcli', 'canonizers'], ['lrpcli', 'models'], "
            "['lrpcli', 'store'])))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_composite_section_fields_come_from_the_declared_parameters():
    from lrpcli.spec.schema import PARAM_CHECKS, CompositeSpec

    fields = CompositeSpec.model_fields
    assert [k for k in fields if k in catalogue.PARAMS] == list(catalogue.PARAMS)
    for name, param in catalogue.PARAMS.items():
        assert fields[name].description == param.description and param.kind in PARAM_CHECKS


def test_engine_checks_are_passed_in():
    from lrpcli.errors import ConfigError
    from lrpcli.spec.config import validate
    from lrpcli.spec.schema import Bad, EngineChecks

    def no_such_model(name: str) -> None:
        raise Bad(f"no model {name!r} here")

    raw = {"model": {"name": "anything"}}
    assert validate(raw).model.name == "anything"  # the schema alone knows no model names
    with pytest.raises(ConfigError, match=r"^api: model.name: no model 'anything' here$"):
        validate(raw, source="api", checks=EngineChecks(model_name=no_such_model))


def test_gradient_space_is_declared_and_matches_the_built_seed():
    from lrpcli.commands.debug.stats import GRADIENT_SPACE

    for name, decl in catalogue.COMPOSITES.items():
        assert (composites.get(name).seed != "output") == decl.gradient_space, name
    assert GRADIENT_SPACE == ("guided_backprop", "deconvnet", "beta_smooth")


def test_readme_rule_table_matches_the_rule_classes():
    """Each rule is declared once, by its class (name, keyword parameters and defaults); README's rule table
    lists every class with those parameters (the shared stabilizer and zero_params aside)."""
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme.split("### Rules", 1)[1].split("\n\n")[2]
    shown = {}
    for line in table.splitlines()[2:]:
        for call in re.findall(r"`(\w+)\(([^)]*)\)`", line.split("|")[1]):
            shown[call[0]] = [p.strip() for p in call[1].split(",") if p.strip()]
    by_class = {cls.__name__: cls for cls in rules.RULES.values()}
    assert set(shown) == set(by_class)
    for name, params in shown.items():
        signature = {p.name: p.default for p in inspect.signature(by_class[name].__init__).parameters.values()
                     if p.name not in ("self", "stabilizer", "zero_params") and p.kind is p.POSITIONAL_OR_KEYWORD}
        assert [p.split("=")[0] for p in params] == list(signature), name
        for param in params:
            if "=" in param:
                key, value = param.split("=")
                assert float(value) == signature[key], name
