"""``composite: auto`` chooses from the canonized model: attention written functionally (LeViT: no
nn.MultiheadAttention, no LayerNorm, BatchNorm everywhere) is only visible once the ``functional`` canonizer has
routed its softmax and products through lrpcli's modules. The choice is kept per session. float64."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lrpcli.engine.composites import get
from lrpcli.engine.composites.builtin import AutoComposite
from lrpcli.engine.composites.layers import BATCHNORMS
from lrpcli.engine.functional_modules import AttentionProduct
from lrpcli.engine.rules import BatchNormRule, ConstantOperand, Stabilizer
from tests.test_composite_auto import relevance_of, tiny_cnn
from tests.test_zoo_transformers import tiny_vit

DT = torch.float64
RMS = {"epsilon": 1e-6, "mode": "rms"}
BOX = {"low": -4.0, "high": 4.0}
ATTN_NOTE = "auto: composite attn_lrp rules (attention or LayerNorm found), stabilizer rms 1e-06"
CNN_NOTE = "auto: composite epsilon_gamma_box rules (no attention or LayerNorm), stabilizer rms 1e-06"

pytestmark = pytest.mark.usefixtures("one_thread")


class LinearBN(nn.Module):
    """LeViT's LinearNorm: a Linear, then a BatchNorm1d over the flattened tokens."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__()
        self.linear = nn.Linear(a, b, bias=False)
        self.bn = nn.BatchNorm1d(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.linear(x).flatten(0, 1)).reshape(x.shape[0], x.shape[1], -1)


class TinyLeViT(nn.Module):
    """A conv stem, then one LeViT attention block written functionally (q k^T times a scale plus a learned
    position bias, softmax, times v), a residual MLP, a mean over tokens and a head."""

    def __init__(self, dim: int = 8, heads: int = 2, tokens: int = 16) -> None:
        super().__init__()
        self.heads, self.key = heads, dim // heads
        self.stem = nn.Sequential(nn.Conv2d(3, dim, 3, stride=2, padding=1), nn.BatchNorm2d(dim), nn.Hardswish())
        self.qkv = LinearBN(dim, 3 * dim)
        self.attention_biases = nn.Parameter(torch.randn(heads, tokens, tokens) * 0.1)
        self.proj = nn.Sequential(nn.Hardswish(), LinearBN(dim, dim))
        self.mlp = nn.Sequential(LinearBN(dim, 2 * dim), nn.Hardswish(), LinearBN(2 * dim, dim))
        self.head = nn.Linear(dim, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x).flatten(2).transpose(1, 2)
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, self.heads, 3 * self.key).permute(0, 2, 1, 3).split(self.key, dim=3)
        attn = (q @ k.transpose(-2, -1)) * self.key ** -0.5 + self.attention_biases
        x = x + self.proj((attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c))
        x = x + self.mlp(x)
        return self.head(x.mean(1))


def tiny_levit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = TinyLeViT().to(DT).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
    return model


def _relevance(model: nn.Module, composite, x: torch.Tensor,
               canonizers: list[str]) -> tuple[torch.Tensor, float, list[str], list[str]]:
    """(input relevance, output relevance, session notes, modules left without a rule)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        grad, total, session = relevance_of(model, composite, x, canonizers)
    return grad, total, session.notes, [f"{a.name} ({a.type_name})" for a in session.unhandled()]


def test_levit_like_attention_found_after_the_canonizers():
    """Nothing at entry says attention; after ``canonizers: auto`` the Softmax and AttentionProduct do: the
    attn_lrp rules (the same relevance as attn_lrp with the rms stabilizer), every module covered."""
    model, x = tiny_levit(), torch.randn(2, 3, 8, 8, dtype=DT)
    assert not AutoComposite.wants_transformer(model)
    auto, _, notes, left = _relevance(model, get("auto", **BOX), x, ["auto"])
    # auto adds BatchNormRule for the BatchNorms merge_batchnorm cannot fold (after LeViT's flatten)
    batchnorm = [(BATCHNORMS, BatchNormRule(Stabilizer(**RMS)))]
    ref, _, _, ref_left = _relevance(model, get("attn_lrp", stabilizer=RMS, overrides=batchnorm, **BOX), x,
                                     ["auto"])
    cnn, _, _, cnn_left = _relevance(model, get("epsilon_gamma_box", stabilizer=RMS, **BOX), x, ["auto"])
    assert ATTN_NOTE in notes and CNN_NOTE not in notes
    assert left == [] and ref_left == []
    assert torch.equal(auto, ref) and auto.abs().sum() > 0
    assert {n.split(" ")[1] for n in cnn_left} == {"(MatMul)", "(Softmax)", "(AttentionProduct)"}
    assert not torch.equal(auto, cnn)


def test_levit_like_conserves_with_exact_rules():
    """Biases zeroed, epsilon 1e-12, attention weights constant (the sweep's exact variant): conservative."""
    model, x = tiny_levit(), torch.randn(1, 3, 8, 8, dtype=DT)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
    stab = Stabilizer(1e-12, "rms")
    composite = get("auto", epsilon=1e-12, stabilizer=stab, zero_params=["bias"],
                    overrides=[(AttentionProduct, ConstantOperand(stabilizer=stab))], **BOX)
    relevance, total, notes, left = _relevance(model, composite, x, ["auto"])
    assert ATTN_NOTE.replace("1e-06", "1e-12") in notes and left == []
    # the attention biases are constant addends of the logits (AttentionBias): no relevance leaves there
    assert abs(relevance.sum().item() / total - 1) < 1e-9


def test_without_canonizers_the_choice_says_what_it_saw():
    """No canonizer: the functional attention stays invisible, and the note says so (CNN rules)."""
    _, _, notes, _ = _relevance(tiny_levit(), get("auto", **BOX), torch.randn(1, 3, 8, 8, dtype=DT), [])
    assert CNN_NOTE in notes


def test_products_of_activations_choose_attn_lrp():
    class Gated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3)
            self.head = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head((torch.relu(self.a(x)) * torch.tanh(self.b(x))).mean((2, 3)))

    torch.manual_seed(0)
    model = Gated().to(DT).eval()
    _, _, notes, left = _relevance(model, get("auto", **BOX), torch.randn(1, 3, 6, 6, dtype=DT), ["auto"])
    assert "auto: composite attn_lrp rules (products of two activations found), stabilizer rms 1e-06" in notes
    assert left == []


def test_one_composite_chooses_per_session():
    """Sessions of one auto composite on a ViT and a CNN, the second entered while the first is open: each keeps
    its own choice (a choice held by the composite would give the ViT the CNN rules, LayerNorm uncovered)."""
    composite = get("auto", **BOX)
    vit, cnn = tiny_vit().to(DT), tiny_cnn()
    xv, xc = torch.randn(1, 3, 32, 32, dtype=DT), torch.randn(1, 3, 8, 8, dtype=DT)
    ref_vit, _, _, _ = _relevance(vit, get("attn_lrp", stabilizer=RMS, **BOX), xv, ["auto"])
    ref_cnn, _, _, _ = _relevance(cnn, get("epsilon_gamma_box", stabilizer=RMS, **BOX), xc, ["auto"])
    first, second = composite.context(vit, canonizers=["auto"]), composite.context(cnn, canonizers=["auto"])
    with first as mv, second as mc:
        got = []
        for m, x in ((mv, xv), (mc, xc)):
            xi = x.clone().requires_grad_()
            out = m(xi)
            seed = torch.zeros_like(out)
            seed[:, 1] = out[:, 1]
            got.append(torch.autograd.grad(out, xi, seed)[0])
    assert torch.equal(got[0], ref_vit) and torch.equal(got[1], ref_cnn)
    assert ATTN_NOTE in first.notes and CNN_NOTE in second.notes
    assert first.unhandled() == [] and second.unhandled() == []
