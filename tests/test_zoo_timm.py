"""timm's models through ``composite: auto`` and ``canonizers: auto`` (share/bench/bench_zoo.py ``--timm``, the
model given as a user gives it: ``model.entrypoint: timm:create_model``).

What timm does differently from torchvision, each reproduced in a tiny module so that it runs without timm:
``BatchNormAct2d`` (a BatchNorm2d subclass with ``drop`` and ``act`` children that calls ``F.batch_norm`` itself),
``F.scaled_dot_product_attention`` fed options handed down from the model's forward arguments, and layers run
over batch x windows (Swin) under the Recorder. timm's own LayerNorm classes and the sweep need timm. float64.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lrpcli
from lrpcli.engine.composites import get
from lrpcli.engine.recorder import Recorder, fold_batch
from lrpcli.engine.rules import Stabilizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "share" / "bench"))
import bench_zoo  # noqa: E402
from test_zoo_sweep import _check  # noqa: E402  (the same checks as the torchvision sweep)

DT = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")
EXACT = {"epsilon": 1e-12, "stabilizer": Stabilizer(1e-12, "rms"), "zero_params": ["bias"]}


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's structure: batch norm computed functionally, then its own ``drop`` and ``act`` children."""

    def __init__(self, c: int) -> None:
        super().__init__(c)
        self.drop = nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return self.act(self.drop(x))


class ConvNet(nn.Module):
    def __init__(self, fused: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = BatchNormAct2d(4) if fused else nn.BatchNorm2d(4)
        self.act = nn.Identity() if fused else nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.act(self.bn(self.conv(x)))).flatten(1))


def _lrp(composite, model: nn.Module, x: torch.Tensor, notes: list[str] | None = None) -> tuple[torch.Tensor, float]:
    """(input relevance, output relevance) with the auto canonizers."""
    with composite.context(model, canonizers=["auto"]) as m:
        xi = x.clone().requires_grad_(True)
        out = m(xi)
        seed = lrpcli.initial_relevance(out, out.argmax(1), "output")
        relevance = torch.autograd.grad(out, xi, seed)[0]
        if notes is not None:
            notes.extend(lrpcli.hooks.sessions_of(m)[0].notes)
    return relevance, seed.sum().item()


def test_batchnorm_act_gives_what_batchnorm_then_relu_gives():
    """Split into a plain BatchNorm (merged into the conv) and its act: the relevance of the same network written
    with nn.BatchNorm2d + nn.ReLU, bit for bit within float64 rounding; conservative; the module is back after."""
    gen = torch.Generator().manual_seed(0)
    fused, plain = ConvNet(True).to(DT).eval(), ConvNet(False).to(DT).eval()
    with torch.no_grad():
        for p in fused.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=DT))
        fused.bn.running_var.copy_(torch.rand(4, generator=gen, dtype=DT) + 0.5)
    plain.load_state_dict(fused.state_dict())
    fused.bn.bias.data.zero_()
    plain.bn.bias.data.zero_()
    x = torch.randn(2, 3, 6, 6, generator=gen, dtype=DT)
    notes: list[str] = []
    got, total = _lrp(get("epsilon_gamma_box", **EXACT), fused, x, notes)
    want, _ = _lrp(get("epsilon_gamma_box", **EXACT), plain, x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert abs(got.sum().item() / total - 1) < 1e-9
    assert "bn.0: merged into conv" in notes  # the plain BatchNorm of the split
    assert "merge_batchnorm: BatchNorm + activation modules split: BatchNormAct2d x1" in notes
    assert type(fused.bn) is BatchNormAct2d and fused(x).shape == (2, 3)


class SdpaBlock(nn.Module):
    """timm's Attention: ``F.scaled_dot_product_attention`` with ``attn_mask`` and ``is_causal`` handed down from
    the model's forward, which torch.fx makes placeholders."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.head = nn.Linear(d, 3, bias=False)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, 2, d // 2).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.head(self.proj(y.transpose(1, 2).reshape(b, n, d)).mean(1))


def test_sdpa_with_options_from_the_forward_is_routed_and_conserves():
    """With the attention weights constant (cp_lrp) every rule is conservative: input relevance = output."""
    torch.manual_seed(0)
    model = SdpaBlock().to(DT).eval()
    x = torch.randn(2, 5, 8, dtype=DT)
    notes: list[str] = []
    relevance, total = _lrp(get("cp_lrp", **EXACT), model, x, notes)
    assert not any("left on the plain gradient" in n for n in notes), notes
    assert any("attention x1" in n for n in notes), notes
    assert abs(relevance.sum().item() / total - 1) < 1e-9


class PoolMixer(nn.Module):
    """PoolFormer's token mixer: ``pool(x) - x``, a difference of two activations."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1, bias=False)
        self.pool = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
        self.fc = nn.Linear(4, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        return self.fc((self.pool(h) - h).mean((2, 3)))


def test_difference_of_activations_is_routed_and_conserves():
    torch.manual_seed(0)
    model = PoolMixer().to(DT).eval()
    x = torch.randn(2, 3, 5, 5, dtype=DT)
    notes: list[str] = []
    relevance, total = _lrp(get("epsilon_gamma_box", **EXACT), model, x, notes)
    assert "functional: routed through modules: difference x1, reduce x1" in notes, notes
    assert abs(relevance.sum().item() / total - 1) < 1e-9


class CrossCovariance(nn.Module):
    """EdgeNeXt's pieces: attention over normalised q and k (``F.normalize``), and a position grid built from the
    input's shape alone (a constant: its cumsum must not be named as left on the gradient)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(4, 12, bias=False)
        self.pos = nn.Linear(1, 4, bias=False)
        self.head = nn.Linear(4, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        grid = (~torch.zeros((b, n)).to(dtype=torch.bool)).cumsum(1, dtype=x.dtype)
        x = x + self.pos(grid[..., None])
        q, k, v = self.qkv(x).chunk(3, -1)
        attn = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)).softmax(-1)
        return self.head((attn @ v).mean(1))


def test_normalize_and_shape_constants_are_routed():
    torch.manual_seed(0)
    model = CrossCovariance().to(DT).eval()
    x = torch.randn(2, 5, 4, dtype=DT)
    notes: list[str] = []
    _lrp(get("cp_lrp", **EXACT), model, x, notes)
    assert not any("left on the plain gradient" in n for n in notes), notes
    assert any("normalize x2" in n for n in notes), notes


class Windows(nn.Module):
    """A layer run over batch x windows (Swin's window partition): dimension 0 of its tensors is not the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 4, 1)
        self.mix = nn.Linear(4, 4)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4 * 16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        w = self.embed(x).reshape(b, 4, 2, 2, 2, 2).permute(0, 2, 4, 3, 5, 1).reshape(b * 4, 4, 4)
        return self.fc(self.act(self.mix(w)).reshape(b, -1))


def test_recorder_table_folds_windows_to_the_batch():
    """Per sample, what ``mix`` takes in is what ``embed`` hands out (Epsilon/ZPlus chain, no skip)."""
    torch.manual_seed(0)
    model = Windows().to(DT).eval()
    x = torch.randn(2, 3, 4, 4, dtype=DT)
    rec = Recorder()
    with get("epsilon_plus").context(model, recorder=rec) as m:
        xi = x.clone().requires_grad_(True)
        out = m(xi)
        torch.autograd.grad(out, xi, lrpcli.initial_relevance(out, torch.tensor([1, 2])))
        layers, _, r_in, r_out = rec.table()
    assert layers == ["embed", "mix", "act", "fc"] and r_in.shape == (2, 4)
    torch.testing.assert_close(r_in[:, 1], r_out[:, 0], rtol=1e-12, atol=0)
    torch.testing.assert_close(r_in[:, 3], r_out[:, 2], rtol=1e-12, atol=0)


def test_fold_batch():
    sums = torch.arange(6, dtype=DT)
    assert fold_batch(sums, 2).tolist() == [3.0, 12.0]
    assert fold_batch(sums, 6) is sums
    assert torch.isnan(fold_batch(sums, 4)).all() and fold_batch(sums, 4).shape == (4,)


def test_timm_layernorms_get_the_layernorm_rule():
    """timm's LayerNorm (nn.LayerNorm with its own forward) and LayerNorm2d (NCHW channels): conservative."""
    norm = pytest.importorskip("timm.layers.norm")
    torch.manual_seed(0)
    for layer, shape in ((norm.LayerNorm(6), (2, 5, 6)), (norm.LayerNorm2d(6), (2, 6, 3, 3))):
        model = nn.Sequential(layer, nn.Flatten(), nn.LazyLinear(3, bias=False)).to(DT).eval()
        x = torch.randn(*shape, dtype=DT)
        model(x)
        layer.bias.data.zero_()
        relevance, total = _lrp(get("attn_lrp", **EXACT), model, x)
        assert abs(relevance.sum().item() / total - 1) < 1e-9, type(layer).__name__


TIMM_QUICK = ["resnet18"]


@pytest.mark.parametrize("name", TIMM_QUICK)
def test_small_timm_model(name):
    pytest.importorskip("timm")
    _check(bench_zoo.TIMM + name)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in bench_zoo.TIMM_MODELS if n not in bench_zoo.TIMM_EXEMPT])
def test_every_listed_timm_model(name):
    """Also the float32 path of ``lrpcli explain`` (the shipped auto config): coverage and finiteness."""
    pytest.importorskip("timm")
    row = bench_zoo.sweep_one(bench_zoo.TIMM + name, 350.0, repeats=0, conserve=True)
    assert row.status == "ok", row.cells()


def test_timm_models_come_through_the_entrypoint():
    config = bench_zoo.config_for("timm:resnet50")
    assert config["model"]["entrypoint"] == "timm:create_model"
    assert config["model"]["kwargs"] == {"model_name": "resnet50", "pretrained": False}
    assert bench_zoo.select("resnet*,timm:vgg11", timm=True) == ["timm:resnet50", "timm:resnet18", "timm:vgg11"]
