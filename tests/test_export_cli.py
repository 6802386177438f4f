"""``lrpcli export``: the written program (and its ONNX form) equals eager attribution; bad input is one line."""

from __future__ import annotations

import textwrap

import pytest
import torch
from click.testing import CliRunner

import lrpcli
from lrpcli.cli import main

MODEL = '''
import torch
from torch import nn


class Head(nn.Module):
    def __init__(self, branch):
        super().__init__()
        self.branch = branch
        self.pool, self.linear = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 3)

    def forward(self, x):
        if self.branch and bool(x.mean() > 0):
            x = x + 1
        return self.linear(self.pool(x).flatten(1))


def build(branch=False):
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), Head(branch))
'''

CONFIG = '''
model:
  entrypoint: "tiny.py:build"
  kwargs: {{branch: {branch}}}
input: {{resize: 16, crop: 16, mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25], mode: RGB}}
canonizers: [vgg]
composite: {{name: epsilon_gamma_box, low: auto, high: auto}}
attribution: {{method: lrp, target: prediction}}
'''


def run(*args: str):
    return CliRunner().invoke(main, list(args), prog_name="lrpcli")


@pytest.fixture
def config(tmp_path):
    (tmp_path / "tiny.py").write_text(MODEL)
    path = tmp_path / "tiny.yaml"
    path.write_text(textwrap.dedent(CONFIG.format(branch="false")))
    return path


def _eager(config, x, target):
    from lrpcli.explainer.build import load_config
    from lrpcli.explainer.explainer import composite_from_config
    from lrpcli.explainer.models import load_model

    cfg = load_config(config)
    return lrpcli.attribute(load_model(cfg), x, target, composite_from_config(cfg), return_output=True)


def test_export_writes_a_program_that_equals_eager(config, tmp_path):
    out = tmp_path / "attributor.pt2"
    result = run("export", str(config), "-o", str(out), "--example-size", "12", "20")
    assert result.exit_code == 0, result.output
    assert result.output == f"wrote {out}: (x [N, 3, 12, 20], class per sample) -> (logits, relevance)\n"
    program = torch.export.load(out).module()
    for n in (1, 3):
        x, target = torch.randn(n, 3, 12, 20), torch.arange(n) % 3
        logits, relevance = program(x, target)
        ref_out, ref = _eager(config, x, target)
        torch.testing.assert_close(logits, ref_out, rtol=1e-6, atol=1e-6)
        assert float((relevance - ref).abs().max() / ref.abs().max()) <= 1e-5


@pytest.mark.slow
def test_onnx_equals_eager_in_onnxruntime(config, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    onnx_path = tmp_path / "attributor.onnx"
    result = run("export", str(config), "-o", str(tmp_path / "a.pt2"), "--onnx", str(onnx_path))
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == f"wrote {onnx_path}"
    session = ort.InferenceSession(str(onnx_path))
    assert [i.name for i in session.get_inputs()] == ["x", "target"]
    for n in (1, 4):
        x, target = torch.randn(n, 3, 16, 16), torch.arange(n) % 3
        logits, relevance = (torch.from_numpy(a) for a in session.run(None, {"x": x.numpy(), "target": target.numpy()}))
        ref_out, ref = _eager(config, x, target)
        torch.testing.assert_close(logits, ref_out, rtol=1e-5, atol=1e-5)
        assert float((relevance - ref).abs().max() / ref.abs().max()) <= 1e-5


def test_data_dependent_forward_is_one_line_exit_2(config, tmp_path):
    config.write_text(textwrap.dedent(CONFIG.format(branch="true")))
    result = run("export", str(config), "-o", str(tmp_path / "a.pt2"))
    assert result.exit_code == 2
    assert result.output.startswith("lrpcli: error: cannot capture the model for export at module '6': its forward "
                                    "branches on a tensor's values"), result.output
    assert result.output.count("\n") == 1
    assert not (tmp_path / "a.pt2").exists()


@pytest.mark.parametrize(("output", "message"), [
    ("missing/a.pt2", "--output: folder {tmp}/missing does not exist; create it or give another path"),
    (".", "--output: {tmp} is a folder; give a file name, e.g. {tmp}/attributor.pt2"),
])
def test_unwritable_output_is_one_line_exit_2(config, tmp_path, output, message):
    target = tmp_path / output if output != "." else tmp_path
    result = run("export", str(config), "-o", str(target))
    assert result.exit_code == 2
    assert result.output == "lrpcli: error: " + message.format(tmp=tmp_path) + "\n"


def test_missing_config_and_other_methods_are_one_line(config, tmp_path):
    result = run("export", str(tmp_path / "nope.yaml"), "-o", str(tmp_path / "a.pt2"))
    assert result.exit_code == 2 and result.output.startswith("lrpcli: error: ") and result.output.count("\n") == 1
    config.write_text(config.read_text().replace("method: lrp", "method: smoothgrad"))
    result = run("export", str(config), "-o", str(tmp_path / "a.pt2"))
    assert result.exit_code == 2
    assert result.output.splitlines()[-1] == (f"lrpcli: error: {config}: attribution.method: export captures lrp, "
                                              "not smoothgrad; set attribution.method: lrp")


@pytest.mark.slow
def test_unconvertible_onnx_operation_is_one_line_naming_it_and_the_layer(config, tmp_path, monkeypatch):
    """Without its translation prims.signbit (torch.copysign in the stabilizers) cannot be converted."""
    pytest.importorskip("onnxscript")
    import lrpcli.explainer.export_onnx

    monkeypatch.setattr(lrpcli.explainer.export_onnx, "_translations", dict)
    result = run("export", str(config), "-o", str(tmp_path / "a.pt2"), "--onnx", str(tmp_path / "a.onnx"))
    assert result.exit_code == 2
    assert result.output.splitlines()[-1] == (
        "lrpcli: error: --onnx: the ONNX exporter cannot convert operation prims.signbit.default (used by layer "
        "'6.linear'); the .pt2 program does not need ONNX and runs as is")
    assert (tmp_path / "a.pt2").exists() and not (tmp_path / "a.onnx").exists()
