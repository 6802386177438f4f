"""``lrpcli debug``'s per-layer detail columns on layers run over batch x windows (Swin) and on operands shared
by all samples (position biases, masks, parameters): per sample, a batch gives what each sample alone gives.

A window-attention block runs its layers on ``B * windows`` rows, batch-major (torchvision's
``shifted_window_attention`` and timm's ``window_partition`` both reshape (B, nH, nW, ...) to B * nH * nW rows,
so row r is sample r // windows). ``Windowed`` does the same with 2 windows of 2 tokens; its relevance is
derived by hand below. float64 throughout.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import lrpcli
from lrpcli.cli import main
from lrpcli.commands.debug.report import DETAIL_FIELDS
from lrpcli.engine.composites import get
from lrpcli.engine.hooks import UnhandledModuleWarning
from lrpcli.engine.modules import Sum
from lrpcli.engine.recorder import Recorder, fold_batch
from lrpcli.engine.rules import Stabilizer

DT = torch.float64
EXACT = {"epsilon": 1e-12, "stabilizer": Stabilizer(1e-12, "rms")}


class Root(nn.Module):
    """sqrt(|h|), left without a rule: its plain gradient is NaN where h is exactly 0."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.abs().sqrt()


class Windowed(nn.Module):
    """Tokens (B, 4, 2) in 2 windows of 2 tokens: ``mid`` (identity weights) runs on (B * 2, 2, 2) rows.

    With ``fc`` summing w_j sqrt|h_j| (w = 1..8, flattened index j = 2 * token + channel) and the target logit as
    the output relevance, Epsilon on ``fc`` gives R_j = w_j sqrt|h_j|, Root's gradient turns it into
    w_j sign(h_j) / 2 (NaN at h_j = 0), and ``mid`` (identity) hands that on: the relevance at mid's input is
    w_j sign(x_j) / 2, except that a NaN arriving at one channel of a token reaches both channels of that token
    (mid's rule sums over its outputs: 0 x NaN).
    """

    def __init__(self) -> None:
        super().__init__()
        self.mid = nn.Linear(2, 2, bias=False)
        self.root = Root()
        self.flat = nn.Flatten()
        self.fc = nn.Linear(8, 2, bias=False)
        with torch.no_grad():
            self.mid.weight.copy_(torch.eye(2))
            self.fc.weight.copy_(torch.stack([torch.arange(1.0, 9.0), torch.ones(8)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        h = self.mid(x.reshape(b * 2, 2, 2)).reshape(b, 4, 2)
        return self.fc(self.flat(self.root(h)))


# sample 0: all positive; sample 1: negatives in both windows and an exact 0 (NaN) in its second window
X = torch.tensor([[1.0, 2, 3, 4, 5, 6, 7, 8], [1, -1, 1, 1, -1, 0, 1, -1]], dtype=DT).reshape(2, 4, 2)


def _details(model: nn.Module, x: torch.Tensor, canonizers: list[str] = ()) -> dict[str, dict[str, np.ndarray]]:
    """Per layer call: DETAIL_FIELDS and the conservation sums, per sample (target class 0)."""
    recorder = Recorder(detail=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnhandledModuleWarning)
        with get("epsilon_plus", **EXACT).context(model, recorder=recorder, canonizers=list(canonizers)) as m:
            xi = x.clone().requires_grad_(True)
            out = m(xi)
            torch.autograd.grad(out, xi, lrpcli.initial_relevance(out, torch.zeros(x.shape[0], dtype=torch.long)))
    layers, _, r_in, r_out = recorder.table()
    n = recorder.batch()
    result = {}
    for j, key in enumerate(layers):
        values = {k: v.numpy() for k, v in recorder.sample_details(key, n).items()}
        values.update(relevance_in=r_in[:, j].numpy(), relevance_out=r_out[:, j].numpy())
        result[key] = values
    return result


def test_window_layer_details_per_sample_by_hand():
    """mid's input relevance is w_j sign(x_j) / 2: sample 0 is (0.5, 1, ..., 4), sample 1 (0.5, -1, 1.5, 2 | NaN,
    NaN, 3.5, -4) (| between its windows); the first 2 rows of the batch would be sample 0's 2 windows."""
    mid = _details(Windowed().to(DT), X)["mid"]
    want = {"negative_share": [0.0, 5 / 12.5], "max": [4.0, 3.5], "min": [0.5, -4.0], "nan": [0, 2], "inf": [0, 0],
            "nonfinite_out": [0, 1], "input_negative": [0, 1]}
    for name, values in want.items():
        np.testing.assert_allclose(mid[name], values, rtol=1e-9, atol=0, err_msg=name)
    np.testing.assert_allclose(mid["relevance_out"], [18.0, math.nan], rtol=1e-9)  # NaN: sample 1 summed a NaN


def test_batch_details_equal_each_sample_alone():
    """Every detail column and both sums of every layer, per sample: the batch of 2 (mid on 4 rows) gives what
    each sample gives alone (mid on 2 rows, where windows cannot be confused with the batch)."""
    batch = _details(Windowed().to(DT), X)
    alone = [_details(Windowed().to(DT), X[i:i + 1]) for i in range(2)]
    assert list(batch) == ["mid", "flat", "fc"]
    for layer, values in batch.items():
        for name in (*DETAIL_FIELDS, "relevance_in", "relevance_out"):
            want = np.concatenate([a[layer][name] for a in alone])
            np.testing.assert_allclose(values[name], want, rtol=1e-12, atol=0, err_msg=f"{layer} {name}")


def test_fold_batch_reductions():
    rows = torch.tensor([1.0, 5, -2, 3, 0, 4], dtype=DT)  # 2 samples x 3 windows, batch-major
    assert fold_batch(rows, 2).tolist() == [4.0, 7.0]
    assert fold_batch(rows, 2, "amax").tolist() == [5.0, 4.0]
    assert fold_batch(rows, 2, "amin").tolist() == [-2.0, 0.0]
    counts = torch.tensor([0, 1, 0, 2])
    assert torch.isnan(fold_batch(counts, 3)).all() and fold_batch(counts, 3).dtype == DT


def test_torchvision_window_rows_are_batch_major(monkeypatch):
    """What ``fold_batch`` assumes, on torchvision's own shifted-window attention: its qkv projection runs on
    B * windows rows, sample b's windows at rows b * windows ... (b + 1) * windows - 1."""
    swin = pytest.importorskip("torchvision.models.swin_transformer")
    seen = []
    linear = swin.F.linear

    def spy(x: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
        seen.append(x.detach().clone())
        return linear(x, *args)

    monkeypatch.setattr(swin.F, "linear", spy)
    attention = swin.ShiftedWindowAttention(4, window_size=[2, 2], shift_size=[1, 1], num_heads=1)
    x = torch.stack([torch.full((4, 4, 4), 1.0), torch.full((4, 4, 4), 2.0)])  # (B, H, W, C): sample b holds b + 1
    attention(x)
    rows = seen[0]  # qkv's input: (2 samples x 4 windows, 4 tokens, C)
    assert rows.shape == (8, 4, 4) and rows[:4].eq(1).all() and rows[4:].eq(2).all()


class Shared(nn.Module):
    """h + a detached bias (a constant, as Swin's position bias) and h + a parameter (a position embedding),
    both broadcast over the batch: neither has per-sample rows."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3, bias=False)
        self.add_constant = Sum()
        self.add_parameter = Sum()
        self.pos = nn.Parameter(torch.tensor([[0.5, -0.25, 1.0]], dtype=DT))
        self.fc = nn.Linear(3, 1, bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(torch.eye(3))
            self.fc.weight.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = torch.tensor([[1.0, 2.0, -0.5]], dtype=x.dtype)
        return self.fc(self.add_parameter(self.add_constant(self.lin(x), bias), self.pos))


def test_shared_operands_stay_out_of_the_sample_rows():
    """The constant keeps its share (absorbed, as a bias: in < out) and is in no detail column, so a batch gives
    each sample's own numbers; the parameter's share (summed over the batch by the rule) counts an equal part
    per sample, so the batch total of relevance_in is right."""
    model = Shared().to(DT)
    x = torch.tensor([[1.0, 2.0, 3.0], [-2.0, 0.5, 4.0]], dtype=DT)
    batch = _details(model, x)
    alone = [_details(model, x[i:i + 1]) for i in range(2)]
    for name in (*DETAIL_FIELDS, "relevance_in", "relevance_out"):
        want = np.concatenate([a["add_constant"][name] for a in alone])
        np.testing.assert_allclose(batch["add_constant"][name], want, rtol=1e-12, atol=0, err_msg=name)
    # by hand (Epsilon on fc with the target the sum: R_k = z_k; Sum under Norm: each term keeps its own value)
    h = x + torch.tensor([1.0, 2.0, -0.5], dtype=DT)
    pos = model.pos.detach()
    z = h + pos
    constant, parameter = batch["add_constant"], batch["add_parameter"]
    np.testing.assert_allclose(constant["relevance_out"], h.sum(1).numpy(), rtol=1e-9)
    np.testing.assert_allclose(constant["relevance_in"], x.sum(1).numpy(), rtol=1e-9)  # the bias's share stays
    np.testing.assert_allclose(parameter["relevance_out"], z.sum(1).numpy(), rtol=1e-9)
    # pos gets sum_b pos_k over the batch of 2: half of it per sample
    np.testing.assert_allclose(parameter["relevance_in"], (h.sum(1) + 2 * pos.sum() / 2).numpy(), rtol=1e-9)
    np.testing.assert_allclose(parameter["max"], h.amax(1).numpy(), rtol=1e-9)  # the details: h's share only
    np.testing.assert_allclose(constant["min"], x.amin(1).numpy(), rtol=1e-9)


# ------------------------------------------------------------------------------------------------ the CLI
WINDOWED_ENTRY = """\
import torch
from torch import nn

import sys
sys.path.insert(0, {tests!r})
from test_debug_windows import Windowed


class Tokens(nn.Module):
    def forward(self, x):
        return x.reshape(x.shape[0], -1)[:, :8].reshape(x.shape[0], 4, 2)  # 2x2 RGB images -> (B, 4, 2)


def build():
    return nn.Sequential(Tokens(), Windowed()).double()
"""

SWIN_ENTRY = """\
import torch
import torchvision


def build():
    torch.manual_seed(0)
    return torchvision.models.swin_t().double().eval()


def tiny():
    from torchvision.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    return SwinTransformer(patch_size=[4, 4], embed_dim=8, depths=[2, 2], num_heads=[2, 2], window_size=[2, 2],
                           num_classes=4).double().eval()


def timm_swin():
    import timm

    torch.manual_seed(0)
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=56).double().eval()
"""


def _debug_json(tmp_path: Path, entry: str, size: int, batch_size: int, canonizers: str = "[transformer]",
                composite: str = "attn_lrp") -> dict[str, dict]:
    """``lrpcli debug -n 2 --format json`` on 2 seeded noise inputs, run in batches of ``batch_size``."""
    path = tmp_path / f"run{batch_size}.yaml"
    path.write_text(f'model: {{entrypoint: "{entry}"}}\n'
                    f"input: {{resize: {size}, crop: {size}, mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}}\n"
                    f"canonizers: {canonizers}\ncomposite: {{name: {composite}}}\n"
                    f"run: {{device: cpu, num_workers: 0, batch_size: {batch_size}}}\n")
    result = CliRunner().invoke(main, ["debug", str(path), "-n", "2", "--format", "json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return {row["layer"]: row for row in json.loads(result.stdout)["layers"]}


def _assert_same_rows(batched: dict[str, dict], alone: dict[str, dict], rtol: float) -> None:
    assert list(batched) == list(alone)
    for layer, row in batched.items():
        for key, value in row.items():
            other = alone[layer][key]
            if key == "worst_sample" or not isinstance(value, float) or not isinstance(other, float):
                if key != "worst_sample":
                    assert value == other, (layer, key)
                continue
            assert value == pytest.approx(other, rel=rtol, abs=1e-300), (layer, key, value, other)


def test_cli_window_layer_columns_equal_batch_one(tmp_path):
    """The debug table of ``Windowed`` in one batch of 2 is the table of the 2 samples run one at a time."""
    tests = str(Path(__file__).resolve().parent)
    (tmp_path / "win.py").write_text(WINDOWED_ENTRY.format(tests=tests))
    rows = {b: _debug_json(tmp_path, "win.py:build", 2, b, "[]", "epsilon_plus") for b in (2, 1)}
    assert rows[2]["1.mid"]["max"] is not None
    _assert_same_rows(rows[2], rows[1], 1e-12)


@pytest.mark.parametrize("package,entry,size,layer", [
    # Swin's position bias (a constant broadcast over the batch) made debug fail with a reshape error
    ("torchvision", "tiny", 32, "features.1.1.attn.position_bias"),
    # torchvision swin_t, random weights, 64x64: every column of every layer at batch 2 equals batch 1
    pytest.param("torchvision", "build", 64, "features.1.1.attn.position_bias", marks=pytest.mark.slow),
    # timm's swin_tiny at 56x56: stage 0 runs its attention on B x 4 windows
    pytest.param("timm", "timm_swin", 56, "layers.0.blocks.0.attn.proj", marks=pytest.mark.slow),
], ids=["torchvision_tiny", "torchvision_swin_t", "timm_swin_tiny"])
def test_cli_swin_equals_batch_one(tmp_path, package, entry, size, layer):
    """Swin models in ``lrpcli debug``: the window layer's row exists and every column at batch 2 equals batch 1."""
    pytest.importorskip(package)
    (tmp_path / "swin.py").write_text(SWIN_ENTRY)
    rows = {b: _debug_json(tmp_path, f"swin.py:{entry}", size, b) for b in (2, 1)}
    assert layer in rows[2]
    if layer.endswith("position_bias"):  # the constant shared by the batch gets its columns
        assert rows[2][layer]["max"] is not None
    _assert_same_rows(rows[2], rows[1], 1e-9)
