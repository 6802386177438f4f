"""``lrpcli.export``: the captured attribution equals eager ``lrpcli.attribute`` for every batch size from one
export, and the saved program runs where lrpcli cannot be imported."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import lrpcli
from lrpcli.explainer.export_program import ExportError

ROOT = Path(__file__).resolve().parents[1]
SIZES = (1, 3, 8)
F32, F64 = 1e-5, 1e-10  # the largest difference allowed, relative to the largest relevance


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _check(program: nn.Module, model: nn.Module, shape: tuple[int, ...], classes: int, tolerance: float,
           dtype: torch.dtype = torch.float32, **kwargs) -> list[float]:
    """The program against eager attribution at batch sizes 1, 3 and 8; the relative differences."""
    found = []
    for n in SIZES:
        torch.manual_seed(n)
        x = torch.randn((n,) + shape, dtype=dtype)
        target = torch.arange(n) % classes
        logits, relevance = program(x, target)
        out, ref = lrpcli.attribute(model, x, target, return_output=True, **kwargs)
        assert relevance.shape == x.shape and relevance.dtype == dtype
        torch.testing.assert_close(logits, out, rtol=1e-6, atol=1e-6)
        found.append(_relative(relevance, ref))
    assert max(found) <= tolerance, found
    return found


@pytest.fixture(scope="module")
def demo():
    """The shipped demo model and composite from configs/demo.yaml, exported once (batch of 2)."""
    from lrpcli.explainer.build import load_config
    from lrpcli.explainer.explainer import composite_from_config
    from lrpcli.explainer.models import load_model

    config = load_config(ROOT / "configs" / "demo.yaml")
    model, composite = load_model(config), composite_from_config(config)
    torch.manual_seed(0)
    program = lrpcli.export(model, composite, example=torch.randn(2, 3, 64, 64))
    return model, composite, program


def test_demo_equals_eager_for_every_batch_size(demo):
    model, composite, program = demo
    _check(program.module(), model, (3, 64, 64), 4, F32, composite=composite)


def test_program_refuses_a_class_out_of_range(demo):
    _, _, program = demo
    with pytest.raises(RuntimeError, match="target class out of range: the model has 4 outputs"):
        program.module()(torch.randn(2, 3, 64, 64), torch.tensor([0, 4]))
    assert torch.is_grad_enabled()  # the failed check leaves the caller's grad mode as it was


def test_saved_program_runs_without_lrpcli(demo, tmp_path):
    """Loaded in a fresh interpreter whose path holds torch's site-packages only: lrpcli is not importable."""
    model, composite, program = demo
    torch.export.save(program, tmp_path / "attributor.pt2")
    torch.manual_seed(5)
    x, target = torch.randn(5, 3, 64, 64), torch.tensor([3, 2, 1, 0, 1])
    torch.save((x, target), tmp_path / "inputs.pt")
    site = str(Path(torch.__file__).resolve().parents[1])
    code = textwrap.dedent(f"""
        import sys
        sys.path[:] = [p for p in sys.path if 'site-packages' not in p] + [{site!r}]
        try:
            import lrpcli
        except ModuleNotFoundError:
            pass
        else:
            raise SystemExit('lrpcli is importable')
        import torch
        attributor = torch.export.load('attributor.pt2').module()
        x, target = torch.load('inputs.pt')
        torch.save(attributor(x, target), 'outputs.pt')
    """)
    done = subprocess.run([sys.executable, "-I", "-S", "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    logits, relevance = torch.load(tmp_path / "outputs.pt")
    out, ref = lrpcli.attribute(model, x, target, composite=composite, return_output=True)
    torch.testing.assert_close(logits, out, rtol=1e-6, atol=1e-6)
    assert _relative(relevance, ref) <= F32


class _Tiny(nn.Module):
    def __init__(self, branch: bool = False) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(6, 8, 3, padding=1), nn.ReLU())
        self.head = _Head(branch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class _Head(nn.Module):
    def __init__(self, branch: bool) -> None:
        super().__init__()
        self.branch = branch
        self.pool, self.linear = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.branch and x.sum() > 0:  # data-dependent control flow: cannot be captured
            x = x * 2
        return self.linear(self.pool(x).flatten(1))


def _tiny(dtype: torch.dtype = torch.float32, branch: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = _Tiny(branch).to(dtype).eval()
    with torch.no_grad():
        model.features[1].running_mean.normal_(0, 0.1)
        model.features[1].running_var.uniform_(0.5, 2.0)
    return model


def test_float64_and_an_initial_relevance_as_input(float64):
    """The second form: the program takes the initial relevance (shaped like the output) for the target."""
    model = _tiny(torch.float64)
    kwargs = {"composite": "epsilon_gamma_box", "canonizers": ["vgg"], "low": -3.0, "high": 3.0}
    program = lrpcli.export(model, example=torch.randn(2, 3, 16, 16), target="relevance", **kwargs).module()
    found = []
    for n in SIZES:
        x = torch.randn(n, 3, 16, 16)
        seed = torch.randn(n, 5)
        logits, relevance = program(x, seed)
        ref = lrpcli.attribute(model, x, seed, **kwargs)
        torch.testing.assert_close(logits, model(x), rtol=0, atol=1e-12)
        found.append(_relative(relevance, ref))
    assert max(found) <= F64, found


@pytest.mark.slow
def test_demo_float64_from_a_one_sample_example(float64):
    """A one-sample example still gives a program for any batch size (it is traced at two samples)."""
    from lrpcli.explainer.build import load_config
    from lrpcli.explainer.explainer import composite_from_config
    from lrpcli.explainer.models import load_model

    config = load_config(ROOT / "configs" / "demo.yaml")
    model, composite = load_model(config).double(), composite_from_config(config)
    program = lrpcli.export(model, composite, example=torch.randn(1, 3, 64, 64)).module()
    _check(program, model, (3, 64, 64), 4, F64, torch.float64, composite=composite)


def test_static_batch_runs_the_example_batch_size_only():
    model = _tiny()
    program = lrpcli.export(model, example=torch.randn(3, 3, 16, 16), dynamic_batch=False).module()
    logits, relevance = program(torch.randn(3, 3, 16, 16), torch.tensor([0, 1, 2]))
    assert relevance.shape == (3, 3, 16, 16) and logits.shape == (3, 5)
    with pytest.raises(Exception, match="3"):
        program(torch.randn(2, 3, 16, 16), torch.tensor([0, 1]))


def test_data_dependent_forward_is_one_line_naming_the_module():
    with pytest.raises(ExportError) as err:
        lrpcli.export(_tiny(branch=True), example=torch.randn(2, 3, 16, 16))
    message = str(err.value)
    assert message.startswith("cannot capture the model for export at module 'head': its forward branches on a "
                              "tensor's values"), message
    assert "\n" not in message


def test_small_resnet_equals_eager():
    """One basic block per stage (resnet18 has two): the residual canonizer and merged BatchNorms."""
    from torchvision.models.resnet import BasicBlock, ResNet

    torch.manual_seed(0)
    model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10).eval()
    kwargs = {"composite": "epsilon_gamma_box", "canonizers": ["resnet"]}
    program = lrpcli.export(model, example=torch.randn(2, 3, 32, 32), **kwargs).module()
    _check(program, model, (3, 32, 32), 10, F32, **kwargs)


def _vit() -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                              num_classes=10).eval()
    with torch.no_grad():  # torchvision starts the head at zero: every logit, and so every relevance, would be 0
        model.heads.head.weight.normal_(0, 32 ** -0.5)
    return model


ZOO = [  # (builder, canonizers, composite, input size)
    ("vgg11", ["vgg"], "epsilon_gamma_box", 32),
    ("vgg16", ["vgg"], "epsilon_gamma_box", 32),
    ("resnet18", ["resnet"], "epsilon_gamma_box", 32),
    ("resnet50", ["resnet"], "epsilon_gamma_box", 32),
    ("densenet121", ["densenet"], "epsilon_gamma_box", 32),
    ("efficientnet_b0", ["efficientnet"], "epsilon_gamma_box", 32),
    ("mobilenet_v3_small", ["mobilenet"], "epsilon_gamma_box", 32),
    ("vit", ["transformer"], "attn_lrp", 32),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,canonizers,composite,size", ZOO, ids=[z[0] for z in ZOO])
def test_torchvision_zoo_equals_eager(name, canonizers, composite, size):
    import torchvision

    torch.manual_seed(0)
    model = _vit() if name == "vit" else getattr(torchvision.models, name)(num_classes=10).eval()
    kwargs = {"composite": composite, "canonizers": canonizers}
    if name == "efficientnet_b0":  # random-init BatchNorms make tiny activations: a relative stabilizer
        kwargs.update(epsilon=1e-12, stabilizer=lrpcli.Stabilizer(1e-9, "rms"))
    program = lrpcli.export(model, example=torch.randn(2, 3, size, size), **kwargs).module()
    _check(program, model, (3, size, size), 10, F32, **kwargs)


def test_readme_export_and_deploying_examples_run(tmp_path, monkeypatch):
    """The 'lrpcli export' section's Python blocks, in one namespace, in a scratch folder: the library example
    writes attributor.pt2, the serving example loads and runs it."""
    import re

    text = (ROOT / "README.md").read_text()
    section = text[text.index("## `lrpcli export`"):text.index("## Python API")]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 2 and len([ln for ln in blocks[1].splitlines() if ln.strip()]) == 5
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - our own documentation
    assert namespace["logits"].shape == (4, 10) and namespace["heatmaps"].shape == (4, 32, 32)
    ref = lrpcli.attribute(namespace["model"], namespace["x"], torch.tensor([0, 1, 2, 3]), "epsilon_plus")
    assert _relative(namespace["relevance"], ref) <= F32
