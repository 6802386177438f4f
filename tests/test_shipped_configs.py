"""The configs under configs/ are valid, and the ImageNet ones fail offline with advice, not a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from lrpcli.cli import main
from lrpcli.explainer.build import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_config_validates(path):
    config = load_config(path)
    assert config.composite.name in path.stem or path.stem in ("demo", "demo_vit")


def test_pretrained_weights_offline_error_mentions_local_path(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))   # nothing cached
    cfg = next(p for p in CONFIGS if p.stem == "vgg16_epsilon_gamma_box")
    data = Path(__file__).resolve().parents[1] / "share" / "demo" / "images"
    result = CliRunner().invoke(main, ["explain", str(cfg), str(data), "-o", str(tmp_path / "o.h5"),
                                       "--max-samples", "1", "-q"])
    if result.exit_code == 0:
        pytest.skip("the weights could be downloaded here")
    assert result.exit_code == 2
    assert "weights" in result.stderr and "path" in result.stderr and "Traceback" not in result.output
