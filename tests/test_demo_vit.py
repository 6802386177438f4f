"""The shipped demo ViT (``share/demo/vit.py``, ``vit.pt``, ``configs/demo_vit.yaml``) on the demo images.

It classifies them; AttnLRP puts clearly more positive relevance inside the object masks than their area share
and than the plain gradient does (on the first 4 images of each class by default, on all 96 through
``lrpcli explain`` with --slow); CP-LRP with biases left out of the rules conserves on the trained weights.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import lrpcli
from lrpcli.cli import main
from lrpcli.explainer.build import composite_kwargs, load_config
from lrpcli.explainer.models import load_weights_file
from lrpcli.store import open_results

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "share" / "demo"
CONFIG = ROOT / "configs" / "demo_vit.yaml"
sys.path.insert(0, str(DEMO))
import vit  # noqa: E402
from masks_share import load_masks, mask_area_share, mask_share  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ("circle", "cross", "square", "triangle")
# Mean share of positive relevance inside the masks, measured on the shipped weights. First 4 images of each
# class: attn_lrp 0.508, gradient 0.309, mask area 0.221. All 96 (lrpcli explain): attn_lrp 0.494, gradient
# 0.277, mask area 0.227. The margins keep about half of the measured distances.
LRP_OVER_AREA = 0.15
LRP_OVER_GRADIENT = 0.12


def _model() -> torch.nn.Module:
    model = vit.build()
    load_weights_file(model, DEMO / "vit.pt")
    return model.eval()


def _subset(per_class: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The first ``per_class`` shipped images of each class, normalised as the config does."""
    names = [f"{c}/{c}_{i:04d}.png" for c in CLASSES for i in range(per_class)]
    arr = np.stack([np.asarray(Image.open(DEMO / "images" / n).convert("RGB"), dtype=np.float32) / 255
                    for n in names])
    x = (torch.from_numpy(arr).permute(0, 3, 1, 2) - 0.5) / 0.25
    return x, torch.arange(len(CLASSES)).repeat_interleave(per_class), names


def _share(relevance: np.ndarray, names: list[str]) -> tuple[float, float]:
    masks = load_masks(DEMO / "masks", names)
    return float(np.nanmean(mask_share(relevance, masks))), float(mask_area_share(masks).mean())


def test_lrp_relevance_sits_on_the_objects_more_than_the_gradient():
    """The config's composite through the Python API, against the plain gradient (composite None)."""
    model = _model()
    x, labels, names = _subset(4)
    kwargs = composite_kwargs(load_config(CONFIG))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a module without a rule, or vanishing relevance, fails the test
        out, lrp = lrpcli.attribute(model, x, labels, "attn_lrp", return_output=True, **kwargs)
    gradient = lrpcli.attribute(model, x, labels, None)
    assert (out.argmax(1) == labels).all()
    assert torch.isfinite(lrp).all()
    lrp_share, area = _share(lrp.numpy(), names)
    gradient_share, _ = _share(gradient.numpy(), names)
    assert lrp_share > area + LRP_OVER_AREA, (lrp_share, area)
    assert lrp_share > gradient_share + LRP_OVER_GRADIENT, (lrp_share, gradient_share)


def test_cp_lrp_conserves_on_the_trained_vit():
    """float64, biases left out of the rules: the relevance at the input, the class token and the position
    embedding adds up to the output relevance; the coverage notes name nothing left on the plain gradient."""
    from lrpcli.engine.composites import get

    model = _model().double()
    x = _subset(1)[0].double()
    params = dict(model.named_parameters())
    embeddings = [params["class_token"], params["encoder.pos_embedding"]]
    comp = get("cp_lrp", epsilon=1e-12, stabilizer=1e-12, low=-2.0, high=2.0, zero_params=["bias"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        session = comp.context(model, canonizers=["transformer"])
        with session as m:
            xi = x.clone().requires_grad_()
            out = m(xi)
            seed = torch.zeros_like(out)
            seed[:, 0] = out[:, 0].abs()
            rx, *re = torch.autograd.grad(out, [xi, *embeddings], seed)
    total = seed.sum().item()
    at_input = rx.sum().item() + sum(r.sum().item() for r in re)
    assert abs(at_input / total - 1) < 1e-6, (at_input, total)
    assert not any("left on the plain gradient" in n for n in session.notes), session.notes


def _explain(out: Path, config: Path) -> str:
    result = CliRunner().invoke(main, ["explain", str(config), str(DEMO / "images"), "-o", str(out),
                                       "--num-workers", "0", "-q"])
    assert result.exit_code == 0, result.output
    return result.stderr


@pytest.mark.slow
def test_make_demo_run_on_all_96_images(tmp_path):
    """What ``make demo`` runs: the shipped config on all 96 images, and the same with method gradient."""
    assert _explain(tmp_path / "lrp.h5", CONFIG) == ""  # no unhandled module, no vanishing relevance
    gradient = tmp_path / "gradient.yaml"
    gradient.write_text("\n".join(line for line in CONFIG.read_text().replace("method: lrp", "method: gradient")
                                  .replace("../share", str(ROOT / "share")).splitlines()
                                  if not line.startswith("canonizers:")))
    _explain(tmp_path / "gradient.h5", gradient)
    lrp, grad = open_results(tmp_path / "lrp.h5"), open_results(tmp_path / "gradient.h5")
    assert len(lrp.label) == 96
    assert (np.asarray(lrp.prediction).argmax(1) == np.asarray(lrp.label)).mean() >= 0.95
    lrp_share, area = _share(lrp.attribution, list(lrp.filename))
    gradient_share, _ = _share(grad.attribution, list(grad.filename))
    assert lrp_share > area + LRP_OVER_AREA, (lrp_share, area)
    assert lrp_share > gradient_share + LRP_OVER_GRADIENT, (lrp_share, gradient_share)
