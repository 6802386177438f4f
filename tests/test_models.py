"""Model loading: torchvision builders, entrypoints, weights files and the errors users hit."""

from __future__ import annotations

import textwrap
import urllib.error
from pathlib import Path

import pytest
import torch
from torch import nn

from lrpcli.errors import ConfigError
from lrpcli.explainer.build import load_config
from lrpcli.explainer.models import input_shape, load_model

TINY = """\
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, classes)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


def build(classes=3):
    return Tiny(classes)


def not_a_model():
    return 42


def broken():
    raise RuntimeError("boom")
"""


@pytest.fixture
def tiny_file(tmp_path: Path) -> Path:
    path = tmp_path / "models" / "tiny.py"
    path.parent.mkdir()
    path.write_text(TINY)
    return path


def err(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def tiny(classes: int = 3) -> nn.Module:
    ns: dict = {}
    exec(TINY, ns)  # noqa: S102 - the same class as the entrypoint file, for building state_dicts
    return ns["Tiny"](classes)


# ---------------------------------------------------------------------------------------- torchvision
def test_random_init_is_seeded_eval_and_leaves_global_rng(tmp_path):
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = load_model({"name": "resnet18", "kwargs": {"num_classes": 5}}, tmp_path, seed=1)
    assert torch.equal(torch.random.get_rng_state(), before)
    b = load_model({"name": "resnet18", "kwargs": {"num_classes": 5}}, tmp_path, seed=1)
    c = load_model({"name": "resnet18", "kwargs": {"num_classes": 5}}, tmp_path, seed=2)
    assert not a.training and a.fc.out_features == 5
    assert torch.equal(a.fc.weight, b.fc.weight) and not torch.equal(a.fc.weight, c.fc.weight)


def test_unknown_model_name_lists_close_matches(tmp_path):
    message = err(load_model, {"name": "resnet19"}, tmp_path)
    assert message.startswith("config: model.name: unknown torchvision model 'resnet19'")
    assert "resnet18" in message


def test_bad_builder_kwargs(tmp_path):
    message = err(load_model, {"name": "resnet18", "kwargs": {"classes": 3}}, tmp_path)
    assert message.startswith("config: model.kwargs: torchvision.models.resnet18(classes=3) failed")


def test_weights_enum_download_failure_says_use_a_file(tmp_path, monkeypatch):
    import torchvision.models._api as api

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    message = err(load_model, {"name": "resnet18", "weights": "IMAGENET1K_V1"}, tmp_path)
    assert message.startswith(
        "config: model.weights: cannot download ResNet18_Weights.IMAGENET1K_V1 from https://"
    )
    assert "name resolution" in message and "set weights: to its local path" in message


def test_weights_enum_with_incompatible_kwargs(tmp_path):
    message = err(
        load_model, {"name": "resnet18", "weights": "DEFAULT", "kwargs": {"num_classes": 10}}, tmp_path
    )
    assert message.startswith("config: model.kwargs: resnet18(num_classes=10) with weights")


def test_unknown_weights_enum_lists_members(tmp_path):
    message = err(load_model, {"name": "resnet18", "weights": "IMAGENET1K_V2"}, tmp_path)
    assert "model.weights: unknown weights 'IMAGENET1K_V2' for resnet18" in message
    assert "IMAGENET1K_V1" in message and "DEFAULT" in message


def test_weights_file_missing_names_it(tmp_path):
    message = err(load_model, {"name": "resnet18", "weights": "ckpt/model.pth"}, tmp_path)
    assert message.startswith("config: model.weights: file 'ckpt/model.pth' not found (looked in ")
    assert str(tmp_path.resolve()) in message


def test_torchvision_with_local_state_dict(tmp_path):
    ref = load_model({"name": "resnet18", "kwargs": {"num_classes": 4}}, tmp_path, seed=7)
    torch.save(ref.state_dict(), tmp_path / "r.pth")
    model = load_model(
        {"name": "resnet18", "weights": "r.pth", "kwargs": {"num_classes": 4}}, tmp_path, seed=0
    )
    assert torch.equal(model.fc.weight, ref.fc.weight)


# ----------------------------------------------------------------------------------------- entrypoint
def test_entrypoint_from_file_relative_to_base_dir(tmp_path, tiny_file, monkeypatch):
    monkeypatch.chdir(tiny_file.parent)  # cwd elsewhere: base_dir is tried first
    model = load_model({"entrypoint": "models/tiny.py:build", "kwargs": {"classes": 7}}, tmp_path)
    assert type(model).__name__ == "Tiny" and model.fc.out_features == 7 and not model.training


def test_entrypoint_from_file_relative_to_cwd(tmp_path, tiny_file, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = load_model({"entrypoint": "models/tiny.py:build"}, tmp_path / "elsewhere")
    assert model.fc.out_features == 3


def test_entrypoint_from_module_path(tmp_path, monkeypatch):
    pkg = tmp_path / "mypkg_lrpcli_test"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(TINY)
    monkeypatch.chdir(tmp_path / "..")
    model = load_model({"entrypoint": "mypkg_lrpcli_test.nets:build", "kwargs": {"classes": 2}}, tmp_path)
    assert model.fc.out_features == 2
    model = load_model({"entrypoint": "torch.nn:Identity"}, tmp_path)
    assert isinstance(model, nn.Identity)


def test_entrypoint_file_imports_its_siblings(tmp_path):
    (tmp_path / "helpers_lrpcli_test.py").write_text("from torch import nn\nWIDTH = 6\n")
    (tmp_path / "net.py").write_text(
        "from torch import nn\nimport helpers_lrpcli_test as h\n\n"
        "def build():\n    return nn.Linear(2, h.WIDTH)\n"
    )
    assert load_model({"entrypoint": "net.py:build"}, tmp_path).out_features == 6


def test_entrypoint_errors(tmp_path, tiny_file):
    message = err(load_model, {"entrypoint": "models/nothere.py:build"}, tmp_path)
    assert message.startswith("config: model.entrypoint: file 'models/nothere.py' not found (looked in ")
    message = err(load_model, {"entrypoint": "no_such_pkg_xyz.models:build"}, tmp_path)
    assert "model.entrypoint: 'no_such_pkg_xyz.models:build': no module named 'no_such_pkg_xyz'" in message
    message = err(load_model, {"entrypoint": "models/tiny.py:buld"}, tmp_path)
    assert "has no 'buld'; did you mean 'build'?" in message
    message = err(load_model, {"entrypoint": "models/tiny.py:not_a_model"}, tmp_path)
    assert "returned a int, expected a torch.nn.Module" in message
    message = err(load_model, {"entrypoint": "models/tiny.py:broken"}, tmp_path)
    assert "calling broken() failed: RuntimeError: boom" in message
    message = err(load_model, {"entrypoint": "models/tiny.py:build", "kwargs": {"width": 3}}, tmp_path)
    assert message.startswith("config: model.kwargs: build(width=3) failed: TypeError")
    (tmp_path / "syntax.py").write_text("def build(:\n")
    message = err(load_model, {"entrypoint": "syntax.py:build"}, tmp_path)
    assert "importing syntax.py failed: SyntaxError" in message
    message = err(load_model, {"entrypoint": "models/tiny.py:build", "weights": "IMAGENET1K_V1"}, tmp_path)
    assert (
        "model.weights: 'IMAGENET1K_V1' looks like a torchvision weights name, which needs model.name"
        in message
    )


# -------------------------------------------------------------------------------------- weights files
@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {f"module.{k}": v for k, v in sd.items()},  # DataParallel
        lambda sd: {"state_dict": sd, "epoch": 3},
        lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
        lambda sd: {"model": sd, "optimizer": {"lr": 0.1}},
        lambda sd: {"state_dict": {f"model.{k}": v for k, v in sd.items()}},  # Lightning module attribute
    ],
    ids=["plain", "module-prefix", "state_dict-key", "state_dict-module", "model-key", "lightning-prefix"],
)
def test_state_dict_forms(tmp_path, tiny_file, wrap):
    ref = tiny()
    torch.save(wrap(ref.state_dict()), tmp_path / "w.pt")
    model = load_model({"entrypoint": "models/tiny.py:build", "weights": "w.pt"}, tmp_path)
    for key, value in ref.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)


def test_mismatched_state_dict_lists_keys(tmp_path, tiny_file):
    sd = tiny().state_dict()
    sd.pop("fc.bias")
    sd["head.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "w.pt")
    message = err(load_model, {"entrypoint": "models/tiny.py:build", "weights": "w.pt"}, tmp_path)
    assert message.startswith("config: model.weights: 'w.pt' does not fit the model: ")
    assert "1 missing (fc.bias)" in message and "1 unexpected (head.weight)" in message


def test_shape_mismatch_named(tmp_path, tiny_file):
    torch.save(tiny(classes=10).state_dict(), tmp_path / "w.pt")
    message = err(load_model, {"entrypoint": "models/tiny.py:build", "weights": "w.pt"}, tmp_path)
    assert "shape mismatch (fc.weight (10, 4) vs (3, 4) in the model" in message


def test_weights_not_a_torch_file(tmp_path, tiny_file):
    (tmp_path / "w.pt").write_text("hello")
    message = err(load_model, {"entrypoint": "models/tiny.py:build", "weights": "w.pt"}, tmp_path)
    assert message.startswith("config: model.weights: ")
    assert "'w.pt'" in message


def test_pickled_module_refused_with_advice(tmp_path, tiny_file):
    model = load_model({"entrypoint": "models/tiny.py:build"}, tmp_path)
    torch.save(model, tmp_path / "full.pt")
    message = err(load_model, {"entrypoint": "models/tiny.py:build", "weights": "full.pt"}, tmp_path)
    assert "holds Python objects besides tensors" in message and "state_dict()" in message


def test_no_state_dict_inside(tmp_path, tiny_file):
    torch.save({"epoch": torch.tensor(3), "note": [1, 2]}, tmp_path / "w.pt")
    message = err(load_model, {"entrypoint": "models/tiny.py:build", "weights": "w.pt"}, tmp_path)
    assert "holds no state_dict (found: epoch, note)" in message


# ------------------------------------------------------------------------------------ with a config
def test_load_model_from_config_names_file_and_uses_base_dir(tmp_path, tiny_file, monkeypatch):
    torch.save(tiny(classes=5).state_dict(), tmp_path / "models" / "w.pt")
    cfg_path = tmp_path / "models" / "c.yaml"
    cfg_path.write_text(
        textwrap.dedent("""\
        model:
          entrypoint: tiny.py:build
          weights: w.pt
          kwargs: {classes: 5}
        run: {seed: 3}
        """)
    )
    monkeypatch.chdir(tmp_path)
    config = load_config(cfg_path)
    model = load_model(config)
    assert model.fc.out_features == 5
    assert load_model(config.model).fc.out_features == 5  # the section alone knows its file and folder
    bad = tmp_path / "models" / "bad.yaml"
    bad.write_text("model:\n  entrypoint: tiny.py:build\n  weights: missing.pt\n")
    message = err(load_model, load_config(bad))
    assert message.startswith(f"{bad}: model.weights: file 'missing.pt' not found")


def test_input_shape(tmp_path):
    def cfg(text: str):
        path = tmp_path / "c.yaml"
        path.write_text("model: {name: resnet18}\n" + text)
        return load_config(path)

    assert input_shape(cfg("")) == (3, 224, 224)
    assert input_shape(cfg("input: {mode: L, crop: 96, resize: 100}\n")) == (1, 96, 96)
    assert input_shape(cfg("input: {crop: null, resize: 64}\n")) == (3, 64, 64)
    with pytest.raises(ConfigError, match="input.crop: null, and so is input.resize"):
        input_shape(cfg("input: {crop: null, resize: null}\n"))
