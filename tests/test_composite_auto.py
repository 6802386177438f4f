"""``composite: auto``: the attn_lrp rules on a model with attention or LayerNorm, the epsilon_gamma_box rules on a
CNN, with a scale-relative (rms) stabilizer unless told otherwise; the session notes say which."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import torch
from torch import nn

from lrpcli.engine.composites import get
from lrpcli.engine.rules import Stabilizer
from tests.test_zoo_transformers import tiny_convnext, tiny_vit

DT = torch.float64
RMS = {"epsilon": 1e-6, "mode": "rms"}

pytestmark = pytest.mark.usefixtures('one_thread')


def tiny_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(32, 5)).to(DT).eval()


def relevance_of(model: nn.Module, composite, x: torch.Tensor, canonizers: Sequence[str] = ("auto",)
                 ) -> tuple[torch.Tensor, float, Any]:
    """(input relevance for class 1, its output relevance, the session) under ``composite.context``."""
    session = composite.context(model, canonizers=list(canonizers))
    with session as m:
        xi = x.clone().requires_grad_()
        out = m(xi)
        seed = torch.zeros_like(out)
        seed[:, 1] = out[:, 1]
        (grad,) = torch.autograd.grad(out, xi, seed)
    return grad, seed.sum().item(), session


def _relevance(model: nn.Module, composite, x: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    grad, _, session = relevance_of(model, composite, x)
    return grad, session.notes


@pytest.mark.parametrize("make", [tiny_vit, tiny_convnext], ids=["vit", "convnext"])
def test_auto_on_a_transformer_is_attn_lrp_with_rms(make):
    model = make()
    x = torch.randn(2, 3, 32, 32, dtype=DT)
    auto, notes = _relevance(model, get("auto", low=-6.0, high=6.0), x)
    ref, _ = _relevance(model, get("attn_lrp", low=-6.0, high=6.0, stabilizer=RMS), x)
    assert torch.equal(auto, ref)
    assert auto.abs().sum() > 0
    assert "auto: composite attn_lrp rules (attention or LayerNorm found), stabilizer rms 1e-06" in notes


def test_auto_on_a_cnn_is_epsilon_gamma_box_with_rms():
    model = tiny_cnn()
    x = torch.randn(2, 3, 8, 8, dtype=DT)
    auto, notes = _relevance(model, get("auto", low=-3.0, high=3.0), x)
    ref, _ = _relevance(model, get("epsilon_gamma_box", low=-3.0, high=3.0, stabilizer=RMS), x)
    sign, _ = _relevance(model, get("epsilon_gamma_box", low=-3.0, high=3.0), x)
    assert torch.equal(auto, ref)
    assert not torch.equal(auto, sign)  # the stabilizer mode matters, so the equality above says something
    assert "auto: composite epsilon_gamma_box rules (no attention or LayerNorm), stabilizer rms 1e-06" in notes


def test_auto_stabilizer_keeps_rms_unless_the_mode_is_given():
    assert get("auto").stabilizer == Stabilizer(1e-6, "rms")
    assert get("auto", stabilizer=1e-9).stabilizer == Stabilizer(1e-9, "rms")
    assert get("auto", stabilizer={"mode": "sign"}).stabilizer == Stabilizer(1e-6, "sign")


def test_auto_in_a_config_defaults_to_rms(tmp_path):
    from lrpcli.explainer.build import load_config

    def stab(extra: str) -> dict:
        path = tmp_path / "c.yaml"
        path.write_text("model: {entrypoint: 'torchvision.models:resnet18'}\ncomposite:\n  name: auto\n" + extra)
        return dict(load_config(path).composite.stabilizer)

    assert stab("") == RMS
    assert stab("  stabilizer: {epsilon: 1.0e-9}\n") == {"epsilon": 1e-9, "mode": "rms"}
    assert stab("  stabilizer: 1.0e-9\n") == {"epsilon": 1e-9, "mode": "rms"}
    assert stab("  stabilizer: {mode: clip}\n") == {"epsilon": 1e-6, "mode": "clip"}
    epsilon_plus = tmp_path / "e.yaml"
    epsilon_plus.write_text("model: {entrypoint: 'torchvision.models:resnet18'}\ncomposite: {name: epsilon_plus}\n")
    assert dict(load_config(epsilon_plus).composite.stabilizer) == {"epsilon": 1e-6, "mode": "sign"}


def test_auto_outside_a_context_says_how_to_use_it():
    with pytest.raises(RuntimeError, match="composite 'auto' chooses its rules from the model"):
        get("auto").rule_for("fc", nn.Linear(2, 2), {})
