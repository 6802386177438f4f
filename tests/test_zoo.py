"""Model zoo check: torchvision architectures and a small U-Net, random weights, CPU, float64.

For each: attribution is finite and shaped like the input, no computing module is left without a rule, the
composite is exactly conservative once biases are out of the rules, and the model is bitwise unchanged after.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from torch import nn

import lrpcli

ZOO = [  # (builder, canonizers, input size): 64x64 where the architecture allows, smaller for the slow ones
    ("vgg11_bn", ["vgg"], 64),
    ("vgg16", ["vgg"], 64),
    ("resnet18", ["resnet"], 64),
    ("resnet50", ["resnet"], 64),
    ("densenet121", ["densenet"], 32),
    ("mobilenet_v2", ["mobilenet"], 32),
    ("efficientnet_b0", ["efficientnet"], 32),
]
# relative scale stabilizers: random-init BatchNorm statistics make some activations tiny (1e-60 in
# efficientnet), where an absolute epsilon would swallow the relevance
EXACT = {"zero_params": ["bias"], "epsilon": 1e-12, "stabilizer": lrpcli.Stabilizer(1e-9, "rms")}


class UNet(nn.Module):
    """Conv, ConvTranspose, Upsample and concatenation; one output channel (segmentation)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.pool = nn.MaxPool2d(2)
        self.enc2 = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
        self.up_t = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.bottom = nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(16, 16, 1), nn.ReLU(), nn.Upsample(scale_factor=2))
        self.dec = nn.Sequential(nn.Conv2d(8 + 8 + 16, 8, 3, padding=1), nn.ReLU())
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.head = nn.Conv2d(8, 1, 1)

    def forward(self, x):
        a = self.enc1(x)
        b = self.enc2(self.pool(a))
        skip = torch.cat([self.up_t(b), self.up(self.bottom(b))], dim=1)
        c = self.dec(torch.cat([a, skip], dim=1))
        return self.head(c)


def _zoo_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)().double().eval()
    _zero_biases(model)
    return model


def _zero_biases(model: nn.Module) -> None:
    """Biases out of the forward (merged BatchNorm shifts too), with non-trivial BatchNorm scales: relevance
    can then only be conserved, never absorbed."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.zero_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.zero_()
            elif isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)) and m.bias is not None:
                m.bias.zero_()


def _check(model: nn.Module, x: torch.Tensor, target, canonizers, composite="epsilon_gamma_box") -> None:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out_before = model(x)
    recorder = lrpcli.Recorder()
    used = lrpcli.composites.parameters(composite)
    comp = lrpcli.composites.get(composite, **{k: v for k, v in EXACT.items() if k in used})
    with warnings.catch_warnings():
        warnings.simplefilter("error", lrpcli.UnhandledModuleWarning)   # nothing computes without a rule
        with comp.context(model, canonizers=canonizers, recorder=recorder) as m:
            xi = x.clone().requires_grad_(True)
            out = m(xi)
            seed = lrpcli.initial_relevance(out, target)
            (relevance,) = torch.autograd.grad(out, xi, seed)
            session = lrpcli.hooks.sessions_of(model)[0]
            assert session.unhandled() == []
    assert relevance.shape == x.shape and torch.isfinite(relevance).all()
    torch.testing.assert_close(out, out_before, rtol=1e-5, atol=1e-9)
    total = relevance.flatten(1).sum(1)
    expected = seed.flatten(1).sum(1)
    torch.testing.assert_close(total, expected, rtol=1e-4, atol=0)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(model(x), out_before)


@pytest.mark.parametrize("name,canonizers,size", ZOO, ids=[z[0] for z in ZOO])
def test_torchvision_zoo(name, canonizers, size):
    model = _zoo_model(name)
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    _check(model, x, 1, canonizers)


@pytest.mark.parametrize("composite", ["epsilon_plus", "epsilon_alpha2_beta1", "excitation_backprop"])
def test_resnet_other_exact_composites(composite):
    model = _zoo_model("resnet18")
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    _check(model, x, 1, ["resnet"], composite)


def test_generic_residual_canonizer_matches_resnet_blocks():
    model = _zoo_model("resnet18")
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    blocks = lrpcli.attribute(model, x, 2, composite="epsilon_gamma_box", canonizers=["resnet"])
    generic = lrpcli.attribute(model, x, 2, composite="epsilon_gamma_box", canonizers=["merge_batchnorm", "residual"])
    torch.testing.assert_close(blocks, generic, rtol=1e-9, atol=1e-12)


def test_unet_segmentation():
    torch.manual_seed(0)
    model = UNet().double().eval()
    _zero_biases(model)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    mask = torch.zeros(2, 1, 32, 32, dtype=torch.float64)
    mask[:, :, 4:9, 5:12] = 1.0
    _check(model, x, lambda out: out * mask, ["merge_batchnorm"])
