"""LayerScale and the class token of a DeiT III-like transformer (timm's ``deit3_*``: LayerScale initialised to
1e-6, the class token to N(0, 1e-6), no position embedding on the class token), biases zeroed, float64.

LayerScale (gamma * x, a product with a parameter) is linear and passes relevance unchanged. What a zoo sweep
saw as a conservation gap is the rms stabilizer's share: its term is epsilon times the rms over the whole sample
(the patch tokens, O(1)), while the class-token row, where the head reads and nearly all relevance flows, stays
near 1e-6 through every residual Sum. The gap is proportional to epsilon and vanishes with it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import lrpcli
from lrpcli.engine.composites import get
from lrpcli.engine.functional_modules import AttentionProduct, Scaled
from lrpcli.engine.recorder import Recorder
from lrpcli.engine.rules import ConstantOperand, Stabilizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "share" / "bench"))
import bench_zoo  # noqa: E402

DT = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


class LayerScale(nn.Module):
    """timm's LayerScale: a per-channel factor, written as a product (torch.fx inlines it to ``Scaled``)."""

    def __init__(self, dim: int, init: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, init: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.ls1, self.ls2 = LayerScale(dim, init), LayerScale(dim, init)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        weights = (q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5).softmax(dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(b, n, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attention(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class TinyDeiT3(nn.Module):
    """Patch embedding, position embedding on the patches only, class token in front, blocks, the head on the
    class token."""

    def __init__(self, init: float = 1e-6, cls_std: float = 1e-6, dim: int = 16, depth: int = 2) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 8, stride=8)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * cls_std)
        self.pos_embed = nn.Parameter(torch.randn(1, 16, dim) * 0.02)
        self.blocks = nn.Sequential(*(Block(dim, 2, init) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.head(self.norm(self.blocks(x))[:, 0])


def tiny_deit3(init: float = 1e-6, cls_std: float = 1e-6) -> nn.Module:
    torch.manual_seed(0)
    model = TinyDeiT3(init, cls_std).to(DT).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
    return model


def conservation(model: nn.Module, epsilon: float, recorder: Recorder | None = None) -> float:
    """(input + class token + position embedding relevance) / output relevance with the sweep's exactly
    conservative rules (biases out of the rules, attention weights constant) at this epsilon."""
    stab = Stabilizer(epsilon, "rms")
    composite = get("auto", epsilon=epsilon, stabilizer=stab, zero_params=["bias"], low=-4.0, high=4.0,
                    overrides=[(AttentionProduct, ConstantOperand(stabilizer=stab))])
    x = torch.randn(1, 3, 32, 32, dtype=DT, generator=torch.Generator().manual_seed(1))
    with composite.context(model, canonizers=["auto"], recorder=recorder) as m:
        xi = x.clone().requires_grad_()
        out = m(xi)
        seed = lrpcli.initial_relevance(out, out.argmax(1), "output")
        grads = torch.autograd.grad(out, [xi, model.cls_token, model.pos_embed], seed)
    return sum(g.sum().item() for g in grads) / seed.sum().item()


def test_layerscale_passes_relevance_unchanged():
    model, recorder = tiny_deit3(), Recorder()
    conservation(model, 1e-12, recorder)
    layers, rules, r_in, r_out = recorder.table()
    scaled = [i for i, name in enumerate(layers) if recorder.types[name] == Scaled.__name__]
    assert len(scaled) == 6 and {rules[i] for i in scaled} == {"Pass()"}
    torch.testing.assert_close(r_in[:, scaled], r_out[:, scaled], rtol=1e-14, atol=0)
    layer_scales = [i for i in scaled if r_out[0, i] != 0]  # the other two scale the attention logits
    assert len(layer_scales) == 4  # relevance does go through them


def test_the_gap_is_the_stabilizers_share_and_vanishes_with_epsilon():
    """Proportional to epsilon (a rule or routing loss would not be); gone with an O(1) class token; within
    the sweep's tolerance at the sweep's epsilon."""
    model = tiny_deit3()
    gaps = {eps: conservation(model, eps) - 1 for eps in (1e-10, 1e-12)}
    assert abs(gaps[1e-12]) > 1e-6  # the sign is that of the stabilizer's term against the relevance
    assert gaps[1e-10] / gaps[1e-12] == pytest.approx(100, rel=0.01)
    assert abs(conservation(tiny_deit3(cls_std=1.0), 1e-10) - 1) < 1e-8
    assert abs(conservation(tiny_deit3(init=1.0), 1e-10) - 1) < 1e-8  # the branches lift the class token
    swept = bench_zoo.EXACT["composite.epsilon"]
    assert bench_zoo.EXACT["composite.stabilizer"] == {"epsilon": swept, "mode": "rms"}
    assert abs(conservation(model, swept) - 1) < bench_zoo.TOLERANCE / 10


@pytest.mark.slow
def test_timm_deit3_gap_scales_with_epsilon():
    """The real model (timm, random weights): the same proportionality, and the sweep row is ok."""
    pytest.importorskip("timm")
    name = bench_zoo.TIMM + "deit3_small_patch16_224"
    row = bench_zoo.sweep_one(name, 350.0, repeats=0, conserve=True)
    assert row.status == "ok", row.cells()
