"""CUDA: the same relevance as on the CPU, and explain on the GPU. Skipped cleanly without a GPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

import lrpcli

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("composite", ["epsilon_gamma_box", "epsilon_plus", "epsilon_alpha2_beta1_flat"])
def test_cuda_matches_cpu(composite):
    torch.manual_seed(0)
    model = torchvision.models.resnet18().double().eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    cpu = lrpcli.attribute(model, x, 3, composite=composite, canonizers=["resnet"])
    gpu = lrpcli.attribute(model.cuda(), x.cuda(), 3, composite=composite, canonizers=["resnet"])
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-7, atol=1e-9)


def test_explain_on_cuda(tmp_path):
    from click.testing import CliRunner

    from lrpcli.cli import main
    from lrpcli.store import open_results

    out = tmp_path / "o.h5"
    result = CliRunner().invoke(main, ["explain", str(ROOT / "configs" / "demo.yaml"), str(ROOT / "share/demo/images"),
                                       "-o", str(out), "--device", "cuda", "--num-workers", "0", "-q"])
    assert result.exit_code == 0, result.output
    r = open_results(out)
    assert r.attribution.shape == (64, 3, 64, 64) and np.isfinite(r.attribution).all()
    assert (r.prediction.argmax(1) == r.label).mean() > 0.9
