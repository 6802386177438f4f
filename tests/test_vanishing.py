"""Relevance swallowed by an absolute stabilizer is reported once per run, naming the layer and the share lost."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from lrpcli.cli import main
from lrpcli.engine.recorder import vanishing_layer
from lrpcli.engine.rules import Epsilon, Gamma, Pass, Stabilizer

MODEL = '''
import torch
from torch import nn


class Small(nn.Module):
    """Weights scaled by SCALE; biases zero below 1 (1e-4: logits about 1e-8, far below epsilon 1e-6)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(4, 2)
        with torch.no_grad():
            for name, p in self.named_parameters():
                p.mul_(0.0 if name.endswith("bias") and SCALE < 1 else SCALE)

    def forward(self, x):
        return self.fc(self.flat(self.pool(self.relu(self.conv(x)))))


def build():
    return Small().eval()
'''


def _setup(tmp_path: Path, scale: float, stabilizer: str) -> list[str]:
    (tmp_path / "small.py").write_text(MODEL.replace("SCALE", repr(scale)))
    for cls in ("a", "b"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(3):
            pixels = np.random.default_rng(i + 10 * (cls == "b")).integers(0, 255, (12, 12, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / cls / f"{i}.png")
    (tmp_path / "c.yaml").write_text(
        f"model: {{entrypoint: '{tmp_path / 'small.py'}:build'}}\n"
        "input: {resize: 12, crop: 12, mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}\n"
        f"composite: {{name: epsilon_plus, epsilon: 1.0e-6{stabilizer}}}\n"
        "run: {batch_size: 2, device: cpu}\n")
    result = CliRunner().invoke(main, ["explain", str(tmp_path / "c.yaml"), str(tmp_path / "data"), "-o",
                                       str(tmp_path / "o.h5"), "--num-workers", "0", "-q"], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    return result.stderr.splitlines()


def test_tiny_activations_warn_once_naming_the_layer(tmp_path):
    lines = _setup(tmp_path, 1e-4, "")
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith("lrpcli: warning: layer 'fc' (Epsilon) loses ")
    lost = float(line.split(" loses ")[1].split("%")[0])
    assert 99.0 < lost <= 100.0
    assert "absolute epsilon 1e-06" in line and "composite.stabilizer: {mode: rms}" in line


def test_the_rms_stabilizer_does_not_warn(tmp_path):
    assert _setup(tmp_path, 1e-4, ", stabilizer: {mode: rms}") == []


def test_a_bias_taking_the_relevance_does_not_warn(tmp_path):
    """Measured: with ordinary weights this model's fc bias takes 98.7 % of the relevance; not the stabilizer."""
    assert _setup(tmp_path, 1.0, "") == []


def _one(r_in: float, r_out: float, rule=None, total: float = 1.0, scale: float = 1e-8):
    rule = rule or Epsilon(1e-6)
    return vanishing_layer(["a", "b"], {"a": Pass(), "b": rule}, torch.tensor([[1.0, r_in]]),
                           torch.tensor([[1.0, r_out]]), total, {"a": 1e-8, "b": scale})


def test_criterion():
    assert _one(0.2, 1.0) == ("b", _one(0.2, 1.0)[1], pytest.approx(0.8))
    assert _one(0.6, 1.0) is None  # keeps more than half
    assert _one(-0.2, 1.0) is None  # a sign flip is not what a stabilizer does
    assert _one(0.0, 1e-4) is None  # too little relevance to judge
    assert _one(0.2, 1.0, Epsilon(1e-6, stabilizer=Stabilizer(1e-6, "rms"))) is None
    assert _one(0.2, 1.0, Gamma(0.25))[0] == "b"
    assert _one(0.2, 1.0, Pass()) is None
    assert _one(0.2, 1.0, scale=1e-5) is None  # ordinary activations: a bias took it
