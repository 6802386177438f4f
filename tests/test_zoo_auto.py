"""The shipped `*_auto` configs' architectures, random weights, CPU, float64: `canonizers: [auto]` and
`composite: auto` leave no module without a rule and conserve relevance.

Built from each shipped config (its canonizers and composite), with the weights left out (no download) and
biases zeroed in the model and in the rules, so relevance can only be conserved or lost to the stabilizer.
The rms stabilizer (epsilon 1e-6 relative to each layer's denominator) loses a few 1e-5 across these
networks: measured ratios 0.99997-0.99998 at 32-96 pixels, hence the tolerance of 1e-4.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from test_zoo import _zero_biases

import lrpcli
from lrpcli.explainer.build import load_config
from lrpcli.explainer.explainer import Explainer
from lrpcli.explainer.models import load_model

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
AUTO = [  # (shipped config, its architecture, input size)
    ("efficientnet_b0_auto", "efficientnet_b0", 32),
    ("mobilenet_v3_large_auto", "mobilenet_v3_large", 32),
    ("regnet_y_400mf_auto", "regnet_y_400mf", 32),
]
TOLERANCE = 1e-4   # |input relevance / output relevance - 1|


@pytest.mark.parametrize("stem,arch,size", AUTO, ids=[a[1] for a in AUTO])
def test_auto_config_covers_and_conserves(stem, arch, size):
    config = load_config(CONFIGS / f"{stem}.yaml", {"composite.zero_params": ["bias"]})
    assert config.composite.name == "auto" and list(config.canonizers) == ["auto"]
    model = load_model({"model": {"name": arch, "weights": None}}).double()
    _zero_biases(model)
    x = torch.randn(2, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", lrpcli.UnhandledModuleWarning)
        with Explainer.from_config(config, model) as explainer:
            result = explainer(x)
            assert lrpcli.hooks.sessions_of(model)[0].unhandled() == []
    assert result.relevance.shape == x.shape and torch.isfinite(result.relevance).all()
    ratio = result.relevance.flatten(1).sum(1) / result.initial.flatten(1).sum(1)
    torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0, atol=TOLERANCE)
