"""Config loading: every bad input is one line naming the file, the key path and the value."""

from __future__ import annotations

import importlib
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from lrpcli.errors import ConfigError
from lrpcli.explainer.build import composite_kwargs, load_config, resolve_baseline, resolve_bounds
from lrpcli.explainer.runtime import resolve_device
from lrpcli.spec.config import DEFAULTS, Config, resolve_path


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


MINIMAL = """\
model:
  name: resnet18
"""


def load(tmp_path: Path, text: str, overrides: dict | None = None) -> Config:
    return load_config(write(tmp_path, text), overrides)


def error(tmp_path: Path, text: str, overrides: dict | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def registry(name: str):
    """An engine registry (rules, composites, canonizers) by name."""
    return importlib.import_module(f"lrpcli.engine.{name}")


# ----------------------------------------------------------------------------------------------- reading
def test_missing_file_names_it(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


def test_yaml_syntax_error_shows_line(tmp_path):
    text = "model:\n  name: resnet18\ninput:\n  crop: [224\n  resize: 256\n"
    message = error(tmp_path, text)
    assert message.startswith(f"{tmp_path / 'c.yaml'}: line ")
    assert "invalid YAML" in message
    line = int(message.split("line ")[1].split(",")[0])
    assert 4 <= line <= 6


def test_yaml_bad_indentation_line(tmp_path):
    message = error(tmp_path, "model:\n  name: resnet18\n weights: x\n")
    assert "line 3" in message


def test_duplicate_key_is_an_error(tmp_path):
    message = error(tmp_path, "model:\n  name: resnet18\n  name: vgg16\n")
    assert "line 3" in message and "duplicate key 'name'" in message and "line 2" in message


def test_empty_and_non_mapping(tmp_path):
    assert "empty" in error(tmp_path, "")
    assert "expected a mapping" in error(tmp_path, "- a\n- b\n")


def test_not_utf8(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"model:\n  name: \xff\xfe\n")
    with pytest.raises(ConfigError, match="UTF-8"):
        load_config(path)


# ------------------------------------------------------------------------------------- defaults, output
def test_defaults_filled_and_frozen(tmp_path):
    c = load(tmp_path, MINIMAL)
    assert c.model.name == "resnet18" and c.model.weights is None and dict(c.model.kwargs) == {}
    assert c.input.resize == 256 and c.input.crop == 224 and c.input.mode == "RGB"
    assert list(c.input.mean) == [0.485, 0.456, 0.406]
    assert c.run.batch_size == 16 and c.run.num_workers == "auto" and c.run.device == "auto"
    assert c.run.max_samples is None and c.run.seed == 0
    assert c.output.path == "out.h5" and c.output.dtype == "float32" and c.output.store_input is True
    assert list(c.output.layers) == []
    assert c.attribution.method == "lrp" and c.attribution.target == "label"
    assert (
        c.attribution.noise_level == 0.1 and c.attribution.n_iter == 20 and c.attribution.baseline == "zeros"
    )
    assert list(c.attribution.window) == [8, 8] and list(c.attribution.stride) == [8, 8]
    assert c.attribution.fill == 0.0
    assert c.composite.low == "auto" and c.composite.maxpool == "wta" and c.composite.strict is False
    assert c["run"]["batch_size"] == 16
    assert c.base_dir == tmp_path.resolve()
    assert c.source == str(tmp_path / "c.yaml")
    with pytest.raises(AttributeError):
        c.run.batch_size = 3
    with pytest.raises(AttributeError, match="no key"):
        _ = c.run.nothing


def test_to_dict_is_plain_and_to_yaml_round_trips(tmp_path):
    text = """\
    model: {name: resnet18, kwargs: {num_classes: 10}}
    composite:
      rules:
        - {match: "conv1", rule: zbox}
        - {type: Linear, rule: {name: epsilon, epsilon: 0.25}}
    output: {layers: [layer4]}
    """
    c = load(tmp_path, text)
    d = c.to_dict()
    assert isinstance(d, dict) and isinstance(d["composite"]["rules"], list)
    assert list(d) == list(DEFAULTS)
    d["run"]["batch_size"] = 99  # a copy
    assert c.run.batch_size == 16
    again = load(tmp_path, c.to_yaml())
    assert again.to_dict() == c.to_dict()
    assert yaml.safe_load(c.to_yaml()) == c.to_dict()


def test_config_pickles(tmp_path):
    import pickle

    c = load(tmp_path, MINIMAL)
    assert pickle.loads(pickle.dumps(c)).to_dict() == c.to_dict()


# --------------------------------------------------------------------------------------- unknown keys
def test_unknown_key_did_you_mean(tmp_path):
    message = error(tmp_path, MINIMAL + "composite:\n  gama: 0.5\n")
    assert message == (
        f"{tmp_path / 'c.yaml'}: composite.gama: unknown key; did you mean 'gamma'? "
        "(allowed: name, epsilon, gamma, low, high, zero_params, stabilizer, rules, maxpool, beta, strict, "
        "canonizers)"
    )


def test_unknown_section_did_you_mean(tmp_path):
    assert "did you mean 'input'" in error(tmp_path, MINIMAL + "inputs:\n  crop: 10\n")


def test_key_in_wrong_section_points_to_right_one(tmp_path):
    message = error(tmp_path, MINIMAL + "batch_size: 4\n")
    assert "batch_size: unknown key; did you mean 'run.batch_size'?" in message
    assert "did you mean 'run.seed'" in error(tmp_path, MINIMAL + "input:\n  seed: 3\n")


# ------------------------------------------------------------------------------------------ wrong types
def test_gamma_wrong_type_message_exact(tmp_path):
    message = error(tmp_path, MINIMAL + "composite:\n  gamma: high\n")
    assert message == f"{tmp_path / 'c.yaml'}: composite.gamma: expected a number >= 0, got 'high'"


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        ("composite:\n  epsilon: 0\n", "composite.epsilon", "a number > 0, got 0"),
        ("composite:\n  gamma: -1\n", "composite.gamma", "a number >= 0, got -1"),
        ("composite:\n  gamma: true\n", "composite.gamma", "got true"),
        ("run:\n  batch_size: 0\n", "run.batch_size", "an integer >= 1, got 0"),
        ("run:\n  batch_size: '8'\n", "run.batch_size", "an integer >= 1, got '8'"),
        ("run:\n  num_workers: -1\n", "run.num_workers", "auto or an integer >= 0, got -1"),
        ("run:\n  num_workers: 1.5\n", "run.num_workers", "auto or an integer >= 0, got 1.5"),
        ("run:\n  num_workers: true\n", "run.num_workers", "auto or an integer >= 0, got true"),
        ("run:\n  num_workers: many\n", "run.num_workers", "auto or an integer >= 0, got 'many'"),
        ("run:\n  device: gpu\n", "run.device", "auto, cpu, cuda or cuda:N, got 'gpu'"),
        ("run:\n  max_samples: 0\n", "run.max_samples", "an integer >= 1 or null, got 0"),
        ("run:\n  seed: 1.5\n", "run.seed", "an integer from 0 to 9223372036854775807, got 1.5"),
        ("output:\n  dtype: float64\n", "output.dtype", "one of float32, float16, got 'float64'"),
        ("output:\n  store_input: 'no'\n", "output.store_input", "true or false, got 'no'"),
        ("output:\n  compression: zstd\n", "output.compression", "one of auto, lzf, none, got 'zstd'"),
        ("output:\n  layers: layer4.0\n", None, None),  # a single string is accepted as a list
        ("output:\n  layers: [1]\n", "output.layers[0]", "a non-empty string, got 1"),
        ("input:\n  mode: CMYK\n", "input.mode", "one of RGB, L, got 'CMYK'"),
        ("input:\n  crop: 300\n", "input.crop", "an integer <= input.resize (256), got 300"),
        ("input:\n  resize: -3\n", "input.resize", "an integer >= 1 or null, got -3"),
        (
            "input:\n  mean: [0.5, 0.5]\n",
            "input.mean",
            "a list of 3 numbers (one per RGB channel), got [0.5, 0.5]",
        ),
        ("input:\n  std: [1, 0, 1]\n", "input.std[1]", "a number > 0, got 0"),
        ("attribution:\n  method: lime\n", "attribution.method", "got 'lime'"),
        (
            "attribution:\n  target: -1\n",
            "attribution.target",
            "label, prediction or a class index >= 0, got -1",
        ),
        ("attribution:\n  target: predicted\n", "attribution.target", "got 'predicted'"),
        ("attribution:\n  window: [8, 8, 8]\n", "attribution.window", "a list of 2"),
        ("attribution:\n  n_iter: 0\n", "attribution.n_iter", "an integer >= 1, got 0"),
        ("attribution:\n  baseline: gray\n", "attribution.baseline", "zeros, black, white or a number"),
        (
            "composite:\n  stabilizer: {mode: abs}\n",
            "composite.stabilizer.mode",
            "sign, clip, rms, got 'abs'",
        ),
        ("composite:\n  stabilizer: {epsilon: 0}\n", "composite.stabilizer.epsilon", "a number > 0, got 0"),
        ("composite:\n  stabilizer: {eps: 1}\n", "composite.stabilizer.eps", "did you mean 'epsilon'"),
        ("composite:\n  zero_params: [weight]\n", "composite.zero_params[0]", "one of bias, got 'weight'"),
        ("composite:\n  maxpool: max\n", "composite.maxpool", "one of wta, average, got 'max'"),
        ("composite:\n  strict: 1\n", "composite.strict", "true or false, got 1"),
        ("composite:\n  low: lowest\n", "composite.low", "auto, a number or a list of 3 numbers"),
        ("composite:\n  low: [0, 0]\n", "composite.low", "a list of 3 numbers (one per channel), got [0, 0]"),
        ("composite:\n  low: 1\n  high: 0\n", "composite.high", "above composite.low (1)"),
        ("composite: [1]\n", "composite", "a mapping"),
        ("model:\n  kwargs: [1]\n", "model.kwargs", "a mapping"),
    ],
)
def test_wrong_values_name_key_and_value(tmp_path, text, key, expected):
    base = MINIMAL if not text.startswith("model:") else "model:\n  name: resnet18\n"
    if text.startswith("model:"):
        text = base + text[len("model:\n") :]
    else:
        text = base + text
    if key is None:
        load(tmp_path, text)
        return
    message = error(tmp_path, text)
    assert message.startswith(f"{tmp_path / 'c.yaml'}: {key}: "), message
    assert expected in message, message


def test_numeric_strings_accepted(tmp_path):
    # YAML 1.1 reads 1e-6 (no dot) as a string; it is still a number to the user.
    c = load(tmp_path, MINIMAL + "composite:\n  epsilon: 1e-6\n  stabilizer: {epsilon: 1e-4, mode: RMS}\n")
    assert c.composite.epsilon == 1e-6
    assert dict(c.composite.stabilizer) == {"epsilon": 1e-4, "mode": "rms"}


def test_model_needs_exactly_one_of_name_entrypoint(tmp_path):
    assert "model: needs exactly one of model.name" in error(tmp_path, "model:\n  weights: x.pt\n")
    assert "not both" in error(tmp_path, "model:\n  name: resnet18\n  entrypoint: m.py:build\n")
    assert "model: missing" in error(tmp_path, "run:\n  seed: 1\n")
    message = error(tmp_path, "model:\n  entrypoint: build\n")
    assert "model.entrypoint: expected 'pkg.module:function'" in message and "'build'" in message


def test_unknown_model_name_lists_close(tmp_path):
    message = error(tmp_path, "model:\n  name: resnt18\n")
    assert message.startswith(f"{tmp_path / 'c.yaml'}: model.name: unknown torchvision model 'resnt18'")
    assert "resnet18" in message


def test_gray_mode_defaults_and_lengths(tmp_path):
    c = load(tmp_path, MINIMAL + "input:\n  mode: l\n  crop: null\n")
    assert c.input.mode == "L" and len(c.input.mean) == 1 and len(c.input.std) == 1 and c.input.crop is None
    message = error(tmp_path, MINIMAL + "input:\n  mode: L\n  mean: [0.1, 0.2, 0.3]\n")
    assert "input.mean: expected a list of 1 numbers (one per L channel)" in message


# --------------------------------------------------------------------------------------------- overrides
def test_overrides_apply_and_validate(tmp_path):
    c = load(
        tmp_path,
        MINIMAL,
        {
            "run.batch_size": 8,
            "run.device": "cpu",
            "output.path": "x.h5",
            "run.max_samples": 10,
            "run.seed": None,
        },
    )
    assert (c.run.batch_size, c.run.device, c.output.path, c.run.max_samples, c.run.seed) == (
        8,
        "cpu",
        "x.h5",
        10,
        0,
    )
    assert error(tmp_path, MINIMAL, {"run.batch_size": 0}) == (
        "command line: run.batch_size: expected an integer >= 1, got 0"
    )
    assert "command line: run.device" in error(tmp_path, MINIMAL, {"run.device": "tpu"})
    assert "command line: run.batchsize: unknown key; did you mean 'batch_size'?" in error(
        tmp_path, MINIMAL, {"run.batchsize": 3}
    )
    assert "command line: batch_size: unknown override key" in error(tmp_path, MINIMAL, {"batch_size": 3})


def test_override_wins_over_file(tmp_path):
    c = load(tmp_path, MINIMAL + "run:\n  batch_size: 64\n", {"run.batch_size": 2})
    assert c.run.batch_size == 2
    # errors in the file still name the file
    assert error(tmp_path, MINIMAL + "run:\n  seed: -1\n", {"run.batch_size": 2}).startswith(
        str(tmp_path / "c.yaml")
    )


# ---------------------------------------------------------------------------------------- bounds, misc
def test_low_high_auto_values(tmp_path):
    c = load(tmp_path, MINIMAL)
    low, high = resolve_bounds(c)
    mean = torch.tensor([0.485, 0.456, 0.406])
    std = torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(low, (0 - mean) / std) and torch.allclose(high, (1 - mean) / std)
    assert low.shape == (3,) and low.dtype == torch.float32


def test_low_high_numbers_and_lists(tmp_path):
    c = load(tmp_path, MINIMAL + "composite:\n  low: -3\n  high: [1, 2, 3]\n")
    low, high = resolve_bounds(c)
    assert low == -3.0 and torch.equal(high, torch.tensor([1.0, 2.0, 3.0]))
    c = load(tmp_path, MINIMAL + "input: {mode: L, mean: [0.5], std: [0.5]}\n")
    low, high = resolve_bounds(c)
    assert torch.allclose(low, torch.tensor([-1.0])) and torch.allclose(high, torch.tensor([1.0]))


def test_baseline(tmp_path):
    assert resolve_baseline(load(tmp_path, MINIMAL)) == 0.0
    black = resolve_baseline(load(tmp_path, MINIMAL + "attribution: {method: integrated_gradients, baseline: black}\n"))
    assert black.shape == (3, 1, 1)
    assert torch.allclose(black.flatten(), resolve_bounds(load(tmp_path, MINIMAL))[0])
    assert black.expand(2, 3, 5, 4).shape == (2, 3, 5, 4)
    ig = "attribution: {method: integrated_gradients, baseline: 0.5}\n"
    assert resolve_baseline(load(tmp_path, MINIMAL + ig)) == 0.5


def test_window_int_and_target_int(tmp_path):
    c = load(tmp_path, MINIMAL + "attribution: {window: 16, target: 3, method: Occlusion}\n")
    assert list(c.attribution.window) == [16, 16] and c.attribution.target == 3
    assert c.attribution.method == "occlusion"


def test_resolve_path_base_dir_then_cwd(tmp_path, monkeypatch):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "w.pt").write_bytes(b"")
    (tmp_path / "w2.pt").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    assert resolve_path("w.pt", tmp_path / "cfg") == tmp_path / "cfg" / "w.pt"
    assert resolve_path("w2.pt", tmp_path / "cfg") == Path.cwd() / "w2.pt"
    assert resolve_path("none.pt", tmp_path / "cfg") is None


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="run.device: 'cuda' requested but CUDA is not available"):
            resolve_device("cuda")
    else:
        with pytest.raises(ConfigError, match="does not exist"):
            resolve_device("cuda:99")


# ---------------------------------------------------------------------------------- registry-backed keys
def test_unknown_composite_lists_valid(tmp_path):
    composites = registry("composites")
    message = error(tmp_path, MINIMAL + "composite:\n  name: epsilon_gamma_bx\n")
    assert message.startswith(f"{tmp_path / 'c.yaml'}: composite.name: unknown composite 'epsilon_gamma_bx'")
    assert "did you mean 'epsilon_gamma_box'" in message
    for name in composites.names():
        assert name in message


def test_unknown_canonizer_lists_valid(tmp_path):
    canonizers = registry("canonizers")
    message = error(tmp_path, MINIMAL + "canonizers: [resnet, vgg16]\n")
    assert message.startswith(f"{tmp_path / 'c.yaml'}: canonizers[1]: unknown canonizer 'vgg16'")
    for name in canonizers.names():
        assert name in message
    assert "expected a list of canonizer names" in error(tmp_path, MINIMAL + "canonizers: {a: 1}\n")


def test_canonizers_inside_composite_move_to_top(tmp_path):
    registry("canonizers")
    c = load(tmp_path, MINIMAL + "composite:\n  canonizers: [resnet]\n")
    assert list(c.canonizers) == ["resnet"] and "canonizers" not in c.composite
    assert "given twice" in error(tmp_path, MINIMAL + "canonizers: [vgg]\ncomposite:\n  canonizers: [vgg]\n")


def test_rules_validated(tmp_path):
    rules = registry("rules")
    base = MINIMAL + "composite:\n  rules:\n"
    message = error(tmp_path, base + "    - {match: conv1, rule: zbx}\n")
    assert message.startswith(f"{tmp_path / 'c.yaml'}: composite.rules[0].rule: unknown rule 'zbx'")
    assert "did you mean 'zbox'" in message
    for name in rules.names():
        assert name in message
    message = error(
        tmp_path,
        base + "    - {match: conv1, rule: zbox}\n    - {type: Linear, rule: {name: epsilon, epsilon: -1}}\n",
    )
    assert message.startswith(
        f"{tmp_path / 'c.yaml'}: composite.rules[1].rule.epsilon: expected a number > 0"
    )
    message = error(tmp_path, base + "    - {type: Linear, rule: {name: epsilon, epsilo: 0.1}}\n")
    assert "composite.rules[0].rule.epsilo:" in message and "epsilo" in message
    message = error(tmp_path, base + "    - {type: Linaer, rule: epsilon}\n")
    assert "composite.rules[0].type: unknown module type 'Linaer'; did you mean 'Linear'?" in message
    assert "exactly one of match" in error(tmp_path, base + "    - {rule: epsilon}\n")
    assert "exactly one of match" in error(tmp_path, base + "    - {match: a, type: Linear, rule: epsilon}\n")
    assert "composite.rules[0].rule: missing" in error(tmp_path, base + "    - {match: a}\n")
    assert "composite.rules[0].rul: unknown key; did you mean 'rule'" in error(
        tmp_path, base + "    - {match: a, rul: epsilon}\n"
    )
    assert "composite.rules[0].rule.name: missing" in error(
        tmp_path, base + "    - {match: a, rule: {epsilon: 1}}\n"
    )
    message = error(tmp_path, base + "    - {match: a, rule: {name: zbox, low: 2, high: 1}}\n")
    assert message.startswith(f"{tmp_path / 'c.yaml'}: composite.rules[0].rule.high:")


def test_composite_kwargs_build_a_composite(tmp_path):
    composites = registry("composites")
    rules = registry("rules")
    text = """\
    model: {name: resnet18}
    canonizers: [resnet]
    composite:
      name: epsilon_gamma_box
      epsilon: 0.5
      gamma: 0.1
      stabilizer: {epsilon: 0.001, mode: rms}
      zero_params: [bias]
      rules:
        - {match: "conv1", rule: zbox}
        - {type: Linear, rule: epsilon}
        - {type: Sum, rule: norm}
        - {type: torch.nn.Conv2d, rule: {name: gamma, gamma: 0.5}}
    """
    c = load(tmp_path, text)
    kw = composite_kwargs(c)
    assert kw["epsilon"] == 0.5 and kw["gamma"] == 0.1 and kw["zero_params"] == ["bias"]
    assert kw["stabilizer"] == rules.Stabilizer(0.001, "rms")
    assert kw["canonizers"] == ["resnet"] and kw["strict"] is False and kw["maxpool"] == "wta"
    low, high = resolve_bounds(c)
    assert torch.equal(kw["low"], low) and torch.equal(kw["high"], high)
    (m0, r0), (m1, r1), (m2, r2), (m3, r3) = kw["overrides"]
    assert m0 == "conv1" and isinstance(r0, rules.ZBox) and torch.allclose(r0.low, low)
    # composite-level values reach override rules that did not set them
    assert m1 is torch.nn.Linear and isinstance(r1, rules.Epsilon) and r1.epsilon == 0.5
    assert r1.stabilizer.mode == "rms" and r1.zero_params == ("bias",)
    assert m2.__name__ == "Sum" and isinstance(r2, rules.Norm)
    assert m3 is torch.nn.Conv2d and r3.gamma == 0.5
    composite = composites.get(c.composite.name, **kw)
    assert composite is not None


def test_composite_param_it_does_not_use_is_an_error(tmp_path):
    composites = registry("composites")
    used = composites.parameters("epsilon_plus")
    assert "gamma" not in used
    message = error(tmp_path, MINIMAL + "composite:\n  name: epsilon_plus\n  gamma: 0.5\n")
    assert message.startswith(
        f"{tmp_path / 'c.yaml'}: composite.gamma: composite 'epsilon_plus' does not use gamma"
    )
    c = load(tmp_path, MINIMAL + "composite:\n  name: epsilon_plus\n  epsilon: 0.01\n")
    assert c.composite.gamma is None and c.composite.low is None and c.composite.epsilon == 0.01
    kw = composite_kwargs(c)
    assert "gamma" not in kw and "low" not in kw and kw["epsilon"] == 0.01
    composites.get("epsilon_plus", **kw)
    # the resolved config (with its nulls) loads again
    assert load(tmp_path, c.to_yaml()).to_dict() == c.to_dict()


@pytest.mark.parametrize("name", ["epsilon_gamma_box", "epsilon_plus", "guided_backprop", "beta_smooth"])
def test_every_builtin_composite_builds_from_defaults(tmp_path, name):
    composites = registry("composites")
    if name not in composites.names():
        pytest.skip(f"{name} not registered")
    c = load(tmp_path, MINIMAL + f"composite:\n  name: {name}\n")
    composites.get(name, **composite_kwargs(c))


def test_composite_epsilon_reaches_the_rules(tmp_path):
    """'My epsilon does nothing': a different composite.epsilon must give a different composite."""
    composites = registry("composites")
    a = composites.get(
        "epsilon_plus", **composite_kwargs(load(tmp_path, MINIMAL + "composite: {name: epsilon_plus}\n"))
    )
    b = composites.get(
        "epsilon_plus",
        **composite_kwargs(load(tmp_path, MINIMAL + "composite: {name: epsilon_plus, epsilon: 0.5}\n")),
    )
    layer = torch.nn.Linear(3, 2)
    assert repr(a.rule_for("fc", layer, {})) != repr(b.rule_for("fc", layer, {}))


# ------------------------------------------------------------------------------------------ run.num_workers
def test_num_workers_message_exact(tmp_path):
    message = error(tmp_path, MINIMAL + "run:\n  num_workers: some\n")
    assert message == f"{tmp_path / 'c.yaml'}: run.num_workers: expected auto or an integer >= 0, got 'some'"
    message = error(tmp_path, MINIMAL, {"run.num_workers": "-2"})
    assert message == "command line: run.num_workers: expected auto or an integer >= 0, got '-2'"


@pytest.mark.parametrize(("given", "resolved"), [("auto", "auto"), ("AUTO ", "auto"), (0, 0), (3, 3), (2.0, 2)])
def test_num_workers_values(tmp_path, given, resolved):
    c = load(tmp_path, MINIMAL, {"run.num_workers": given})
    assert c.run.num_workers == resolved and type(c.run.num_workers) is type(resolved)
    assert f"num_workers: {resolved}" in c.to_yaml()


@pytest.mark.parametrize(
    ("device", "samples", "batch", "cpus", "expected"),
    [
        ("cpu", 50_000, 16, 64, 0),  # CPU: decode in a thread, the cores belong to the attribution
        ("cpu", 4, 16, 2, 0),
        ("cuda", 50_000, 64, 16, 8),  # capped at MAX_AUTO_WORKERS
        ("cuda", 50_000, 64, 4, 3),  # one core left to the main process
        ("cuda", 50_000, 64, 1, 0),
        ("cuda", 64, 16, 16, 2),  # 4 batches: one process per two batches
        ("cuda", 65, 16, 16, 2),  # 5 batches
        ("cuda", 16, 16, 16, 0),  # 1 batch: in-process
        ("cuda:1", 3 * 64, 64, 16, 1),
        ("cuda", 0, 16, 16, 0),
    ],
)
def test_resolve_num_workers_auto(device, samples, batch, cpus, expected):
    from lrpcli.explainer.runtime import MAX_AUTO_WORKERS, resolve_num_workers

    assert MAX_AUTO_WORKERS == 8
    got = resolve_num_workers("auto", samples=samples, batch_size=batch, device=torch.device(device), cpus=cpus)
    assert got == expected
    # a string device (as make_loader takes) resolves the same
    assert resolve_num_workers("auto", samples=samples, batch_size=batch, device=device, cpus=cpus) == expected


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_resolve_num_workers_explicit_is_kept(device):
    from lrpcli.explainer.runtime import resolve_num_workers

    for n in (0, 1, 2, 17):
        assert resolve_num_workers(n, samples=4, batch_size=16, device=device, cpus=2) == n


def test_resolve_num_workers_default_cpus_is_the_affinity(monkeypatch):
    import os

    from lrpcli.explainer import runtime as config_module

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4}, raising=False)
    assert config_module.available_cpus() == 5
    assert config_module.resolve_num_workers("auto", samples=10_000, batch_size=8, device="cuda") == 4


# ------------------------------------------------------------------------------------- hostile documents
def _bomb(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("where", ["top", "kwargs", "value"])
def test_alias_bomb_is_refused_quickly(tmp_path, where):
    import time

    bomb = _bomb()
    if where == "top":  # as unknown keys
        text = MINIMAL + bomb
    elif where == "kwargs":
        text = "model:\n  name: resnet18\n  kwargs:\n" + textwrap.indent(bomb, "    ")
    else:
        text = MINIMAL + "run:\n  seed:\n" + textwrap.indent(bomb, "    ")
    start = time.perf_counter()
    message = error(tmp_path, text)
    assert time.perf_counter() - start < 5
    assert "invalid YAML: more than 100,000 values with aliases expanded" in message
    assert message.startswith(f"{tmp_path / 'c.yaml'}: line ")


def test_aliases_to_small_values_still_work(tmp_path):
    c = load(tmp_path, "input:\n  mean: &m [0.5, 0.5, 0.5]\n  std: *m\n" + MINIMAL)
    assert list(c.input.std) == [0.5, 0.5, 0.5]


def test_recursive_alias_is_refused(tmp_path):
    message = error(tmp_path, MINIMAL + "x: &a [1, *a]\n")
    assert "alias *a refers to its own anchor" in message


@pytest.mark.parametrize(
    "text",
    [MINIMAL + "x: " + "[" * 100_000 + "]" * 100_000 + "\n",
     "model: {name: resnet18, kwargs: " + "{a: " * 3000 + "1" + "}" * 3000 + "}\n"],
    ids=["lists", "mappings"],
)
def test_deep_nesting_is_one_line(tmp_path, text):
    assert "invalid YAML: lists and mappings nest deeper than 64 levels" in error(tmp_path, text)


def test_nesting_within_the_bound_is_read(tmp_path):
    c = load(tmp_path, "model: {name: resnet18, kwargs: {x: " + "[" * 60 + "]" * 60 + "}}\n")
    assert isinstance(c.model.kwargs.x, tuple)


def test_deep_python_mapping_is_one_line():
    from lrpcli.spec.config import validate

    raw: dict = {"model": {"name": "resnet18", "kwargs": {}}}
    inner = raw["model"]["kwargs"]
    for _ in range(5000):
        inner["a"] = {}
        inner = inner["a"]
    with pytest.raises(ConfigError, match=r"^api: nested too deeply \(at most 64 levels\)$"):
        validate(raw, source="api")


def test_oversized_document_is_refused(tmp_path):
    message = error(tmp_path, MINIMAL + "# " + "x" * (1 << 20) + "\n")
    assert message == f"{tmp_path / 'c.yaml'}: larger than 1024 KiB; a config file is at most that"


@pytest.mark.parametrize("seed", [2**63, 2**70, -1])
def test_seed_out_of_range_names_the_range(tmp_path, seed):
    message = error(tmp_path, MINIMAL + f"run:\n  seed: {seed}\n")
    assert message == (f"{tmp_path / 'c.yaml'}: run.seed: expected an integer from 0 to {2**63 - 1}, "
                       f"got {seed}")


def test_largest_seed_is_accepted(tmp_path):
    assert load(tmp_path, MINIMAL + f"run:\n  seed: {2**63 - 1}\n").run.seed == 2**63 - 1


@pytest.mark.parametrize("overrides", [None, {"output.path": "x.h5"}])
def test_integer_key_at_top_level(tmp_path, overrides):
    message = error(tmp_path, MINIMAL + "1: x\n", overrides)
    assert message.startswith(f"{tmp_path / 'c.yaml'}: 1: unknown key (allowed: model, input,")


# ------------------------------------------------------------------------------ keys the method does not use
def test_keys_the_method_does_not_use_warn_once(tmp_path):
    from lrpcli.errors import ConfigWarning

    text = MINIMAL + ("canonizers: [resnet]\ncomposite: {name: epsilon_plus, rules: [{match: fc, rule: pass}]}\n"
                      "attribution: {method: gradient, n_iter: 5, window: 8}\noutput: {layers: [layer4]}\n")
    with pytest.warns(ConfigWarning) as record:
        load(tmp_path, text)
    assert [str(w.message) for w in record] == [
        f"{tmp_path / 'c.yaml'}: attribution.method gradient does not use composite.name, composite.rules, "
        "canonizers, output.layers, attribution.n_iter; explain ignores them"]


@pytest.mark.parametrize(
    ("attribution", "unused"),
    [("{method: smoothgrad, n_iter: 5, noise_level: 0.2}", None),
     ("{method: integrated_gradients, n_iter: 5, baseline: black, fill: 1}", "attribution.fill"),
     ("{method: occlusion, window: 4, stride: 2, noise_level: 0.3}", "attribution.noise_level"),
     ("{method: lrp, baseline: white}", "attribution.baseline")],
)
def test_each_method_reads_its_own_keys(tmp_path, attribution, unused):
    import warnings

    from lrpcli.errors import ConfigWarning

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        load(tmp_path, MINIMAL + f"attribution: {attribution}\n")
    messages = [str(w.message) for w in record if issubclass(w.category, ConfigWarning)]
    assert messages == ([] if unused is None else [messages[0]])
    if unused is not None:
        assert f"does not use {unused}; explain ignores them" in messages[0]


def test_stored_config_of_another_method_reads_back_without_warning(tmp_path):
    import warnings

    c = load(tmp_path, MINIMAL + "attribution: {method: gradient}\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load(tmp_path, c.to_yaml()).to_dict() == c.to_dict()
