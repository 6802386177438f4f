"""``lrpcli debug``: hand-computed sums, unhandled modules, the explosion diagnosis, formats and stored runs.

Models are tiny and built with known weights by entrypoint files written into tmp dirs; inputs are 1x1 images
whose normalised values are chosen exactly, so every expected number below is derived by hand.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from lrpcli.cli import main
from lrpcli.commands.debug.command import FORMATS
from lrpcli.commands.debug.format import RENDERERS, cell

# --------------------------------------------------------------------------------------------- helpers
DENSE = """\
from collections import OrderedDict

import torch
from torch import nn


def build():
    # the worked example of tests/test_rules_handcomputed.py: W = [[1.5, 1, -0.5], [-1, 1, 0.5]], b = [0.25, -0.5]
    fc = nn.Linear(3, 2)
    with torch.no_grad():
        fc.weight.copy_(torch.tensor([[1.5, 1.0, -0.5], [-1.0, 1.0, 0.5]]))
        fc.bias.copy_(torch.tensor([0.25, -0.5]))
    return nn.Sequential(OrderedDict(flat=nn.Flatten(), fc=fc))
"""

# x = [2, -1, 1] from the pixel (255, 0, 255): (1 - 0.5) / 0.25, (0 - 0.5) / 0.5, (1 - 0.5) / 0.5
DENSE_INPUT = "input: {resize: 1, crop: 1, mean: [0.5, 0.5, 0.5], std: [0.25, 0.5, 0.5], mode: RGB}\n"

UNHANDLED = """\
import torch
from torch import nn


class Twice(nn.Module):
    def forward(self, x):
        return 2 * x


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.twice = Twice()
        self.relu = nn.ReLU()
        self.unused = nn.Tanh()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.flat(self.pool(self.relu(self.twice(self.conv(x))))))


def build():
    torch.manual_seed(0)
    return Net()
"""

RESIDUAL = """\
import torch
from torch import nn

import lrpcli


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(1, 2, 1)
        self.relu0 = nn.ReLU()
        self.conv1 = nn.Conv2d(2, 2, 1)
        self.sum = lrpcli.Sum()
        self.relu1 = nn.ReLU()
        self.flat = nn.Flatten()
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        h = self.relu0(self.conv0(x))
        return self.fc(self.flat(self.relu1(self.sum(self.conv1(h), h))))


def build():
    m = Block()
    with torch.no_grad():
        m.conv0.weight.fill_(1.0)
        m.conv0.bias.zero_()
        m.conv1.weight.copy_(torch.tensor([[-1.0, 0.0], [0.0, -5.0]]).view(2, 2, 1, 1))
        m.conv1.bias.copy_(torch.tensor([0.02, 4.01]))
        m.fc.weight.copy_(torch.tensor([[1.0, -1.0], [0.0, 0.0]]))
        m.fc.bias.zero_()
    return m
"""

BATCHNORM = """\
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.relu(self.bn(self.conv(x)))
        h = h + self.conv2(h)
        return self.fc(self.flat(self.pool(h)))


def build():
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    return net.eval()
"""

ODD = """\
import torch
from torch import nn


class Root(nn.Module):
    def forward(self, x):
        return x.abs().sqrt()  # backward at exactly 0: 0 * inf = NaN


def build():
    conv = nn.Conv2d(3, 2, 1)
    with torch.no_grad():
        conv.weight[1].zero_()
        conv.bias[1] = 0.0  # channel 1 is exactly 0
    return nn.Sequential(conv, Root(), nn.Flatten(), nn.Linear(2 * 2 * 2, 2))


def half():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 2 * 2, 4), nn.ReLU(), nn.Linear(4, 2)).half()
"""


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["debug", *map(str, args)], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def setup(tmp_path: Path, model: str, config: str, name: str = "net") -> Path:
    (tmp_path / f"{name}.py").write_text(model)
    path = tmp_path / f"{name}.yaml"
    lines = [line.strip() for line in config.splitlines() if line.strip()]  # top-level keys, flow style
    path.write_text("\n".join([f'model: {{entrypoint: "{name}.py:build"}}', *lines,
                               "run: {device: cpu, num_workers: 0}", ""]))
    return path


def image(folder: Path, name: str, pixel: tuple[int, ...], mode: str = "RGB") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (1, 1), pixel if len(pixel) > 1 else pixel[0]).save(folder / name)
    return folder


def table_rows(text: str) -> dict[str, list[str]]:
    """The conservation table's rows by layer name, split into cells."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == ["layer"] and "in/out" in line)
    rows = {}
    for line in lines[start + 1:]:
        if not line.strip():
            break
        cells = line.split()
        rows[cells[0]] = cells
    return rows


def assignment_rows(text: str) -> dict[str, tuple[str, str]]:
    """The rule assignment section: layer -> (type, rule as printed)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Rule assignment")) + 2
    rows = {}
    for line in lines[start:]:
        if not line.startswith("  "):
            break
        _, name, kind, rule = line.split(maxsplit=3)
        rows[name] = (kind, rule)
    return rows


def diagnoses(data: dict, kind: str) -> list[dict]:
    return [d for d in data["diagnoses"] if d["kind"] == kind]


# ------------------------------------------------------------------------------------ hand-computed sums
@pytest.fixture
def dense(tmp_path: Path) -> tuple[Path, Path]:
    config = setup(tmp_path, DENSE, DENSE_INPUT + """\
        composite: {name: epsilon_plus, epsilon: 1.0e-6}
        attribution: {target: 0}
        """)
    return config, image(tmp_path / "data", "x.png", (255, 0, 255))


def test_dense_sums_equal_the_worked_example(dense):
    config, data = dense
    code, out, err = run(config, data)
    assert code == 0, err
    rows = table_rows(out)
    # z = [1.75, -3], R = [1.75, 0]; Epsilon(1e-6): R_in = [3, -1, -0.5] (sum 1.5; the bias took 0.25)
    assert rows["fc"][:8] == ["fc", "Linear", "Epsilon", "1.75", "1.5", "0.8571", "0.8571", "33.3%"]
    assert rows["fc"][9:] == ["3", "-1", "0", "0"]  # max, min of [3, -1, -0.5]; no NaN, no Inf
    assert rows["flat"][:6] == ["flat", "Flatten", "Pass", "1.5", "1.5", "1"]
    assert "output relevance 1.75 -> input relevance 1.5 (means)" in out
    assert assignment_rows(out) == {"flat": ("Flatten", "pass"), "fc": ("Linear", "Epsilon(epsilon=1e-06)")}
    assert "Unhandled modules: none" in out
    # 0.25 of 1.75 (14%) went to the bias
    assert "[bias] fc: 14% of the relevance arriving at this Epsilon layer is absorbed by its bias" in out


def test_zero_bias_compares_what_the_bias_absorbed(dense):
    config, data = dense
    code, out, err = run(config, data, "--zero-bias", "--format", "json")
    assert code == 0, err
    zero = json.loads(out)["zero_bias"]
    # without the bias the denominator is z - b = 1.5, so the input gets all 1.75
    assert zero["input"] == pytest.approx(1.75, rel=1e-5) and zero["output"] == pytest.approx(1.75)
    (row,) = zero["layers"]
    assert row["layer"] == "fc"
    assert row["absorbed"] == pytest.approx(0.25, rel=1e-4) and row["share"] == pytest.approx(1 / 7, rel=1e-4)
    assert row["absorbed_zero_bias"] == pytest.approx(0.0, abs=1e-5)
    code, out, _ = run(config, data, "--zero-bias")
    assert "input relevance 1.5 with biases, 1.75 without" in out
    assert "without biases 0% is absorbed" in out


# ----------------------------------------------------------------------------------------- unhandled
def test_unhandled_module_is_flagged_and_strict_fails(tmp_path):
    config = setup(tmp_path, UNHANDLED, """\
        input: {resize: 8, crop: 8}
        composite: {name: epsilon_plus}
        """)
    code, out, err = run(config, "--samples", "2")  # random inputs; target label -> the prediction
    assert code == 0, err
    assert "2 random inputs (3, 8, 8)" in out
    rules = assignment_rows(out)
    assert rules["twice"] == ("Twice", "NO RULE (plain gradient)")
    assert rules["unused"] == ("Tanh", "- (did not run)") and rules["relu"] == ("ReLU", "pass")
    assert list(rules) == ["conv", "twice", "relu", "pool", "flat", "fc", "unused"]  # forward order, idle last
    assert "Unhandled modules (1, the plain gradient flows through them): twice (Twice)" in out
    assert "[no rule] twice: Twice computes something but got no rule" in out
    assert "twice" not in table_rows(out)  # no rule, no conservation row
    code, out, err = run(config, "--samples", "2", "--strict")
    assert code == 1 and "NO RULE" in out
    assert "lrpcli: 1 computing module got no rule (--strict): twice (Twice)" in err


def test_canonizer_effects_are_listed(tmp_path):
    config = setup(tmp_path, BATCHNORM, """\
        input: {resize: 6, crop: 6}
        canonizers: [merge_batchnorm, residual]
        composite: {name: epsilon_gamma_box}
        """)
    code, out, err = run(config, "--samples", "1", "--format", "json")
    assert code == 0, err
    data = json.loads(out)
    assert "bn: merged into conv" in data["notes"]
    assert any(n.startswith("residual: 1 tensor additions") for n in data["notes"])
    names = [a["name"] for a in data["assignments"]]
    assert "lrpcli_sum_0" in names and not data["unhandled"] and not diagnoses(data, "batchnorm")
    # without the canonizer the BatchNorm runs as Pass: flagged
    plain = setup(tmp_path, BATCHNORM, "input: {resize: 6, crop: 6}\n", name="plain")
    code, out, err = run(plain, "--samples", "1", "--format", "json")
    assert [d["layer"] for d in diagnoses(json.loads(out), "batchnorm")] == ["bn"]


# ------------------------------------------------------------------------------------------- explosion
def expected_residual() -> dict[str, float]:
    """The residual block by hand: x = 1, h = relu(conv0 x) = [1, 1], conv1 h = [-0.98, -0.99] (W = diag(-1, -5),
    b = [0.02, 4.01]), the Sum's inputs cancel to s = [0.02, 0.01], logit 0 = s0 - s1 = 0.01."""
    h = np.array([1.0, 1.0])
    w = np.array([-1.0, -5.0])
    z = w * h + np.array([0.02, 4.01])
    s = z + h
    logit = s[0] - s[1]
    r_s = s * np.array([1.0, -1.0]) * logit / (logit + 1e-6)  # fc: Epsilon(1e-6)
    density = r_s / (s + 1e-12)  # Sum: Norm, stabilizer 1e-12
    r_branch = z * density  # conv1's output relevance: -0.98 and +0.99 nearly cancel
    # conv1: Gamma(0.25) with z < 0 and x >= 0, W <= 0: den = z + 0.25 * x W, numerators 1.25 * x W
    r_conv1_in = 1.25 * h * w * r_branch / (z + 0.25 * h * w)
    return {"logit": logit, "conv1_out": r_branch.sum(), "conv1_in": r_conv1_in.sum(),
            "input": (r_conv1_in + h * density).sum()}


def test_unstable_residual_explodes_at_the_right_layer(tmp_path):
    config = setup(tmp_path, RESIDUAL, """\
        input: {resize: 1, crop: 1, mean: [0.0], std: [1.0], mode: L}
        composite: {name: epsilon_gamma_box, gamma: 0.25, epsilon: 1.0e-6, stabilizer: {epsilon: 1.0e-12}}
        attribution: {target: 0}
        """)
    data = image(tmp_path / "data", "one.png", (255,), mode="L")
    want = expected_residual()
    assert want["conv1_in"] / want["conv1_out"] > 100  # 176: the reason the test exists
    code, out, err = run(config, data, "--format", "json")
    assert code == 0, err
    result = json.loads(out)
    rules = {a["name"]: a["rule"] for a in result["assignments"]}
    assert rules["conv0"].startswith("ZBox") and rules["conv1"].startswith("Gamma")
    assert rules["sum"] == "Norm(stabilizer=1e-12/sign)"
    rows = {r["layer"]: r for r in result["layers"]}
    assert rows["conv1"]["out_mean"] == pytest.approx(want["conv1_out"], rel=1e-3)
    assert rows["conv1"]["in_mean"] == pytest.approx(want["conv1_in"], rel=1e-4)
    assert result["header"]["input"] == pytest.approx(want["input"], rel=1e-4)
    assert result["header"]["output"] == pytest.approx(want["logit"], rel=1e-4)
    explosions = diagnoses(result, "explosion")
    assert explosions and {d["layer"] for d in explosions} == {"conv1"}
    # the input total, blamed on conv1 too
    assert any("the relevance at the input totals" in d["message"] for d in explosions)
    assert "mode: rms" in explosions[0]["remedy"]
    code, text, _ = run(config, data)
    assert "[explosion] conv1: |relevance| grows 176.6x across this Gamma layer" in text
    assert table_rows(text)["conv1"][5] == "176.6"


def test_nan_and_float16_are_diagnosed(tmp_path):
    config = setup(tmp_path, ODD, """\
        input: {resize: 2, crop: 2}
        composite: {name: epsilon_plus}
        """)
    code, out, err = run(config, "--samples", "2", "--format", "json")
    assert code == 0, err
    data = json.loads(out)
    assert data["unhandled"] == ["1"]
    (nan,) = diagnoses(data, "nan/inf")  # made by the unhandled Root above the conv: named where it arrives
    assert nan["layer"] == "0" and "from above it" in nan["message"]
    assert json.loads(out)["layers"][0]["nan"] > 0
    half = tmp_path / "half.yaml"
    half.write_text(config.read_text().replace(":build", ":half"))
    code, out, err = run(half, "--samples", "2", "--format", "json")
    assert code == 0, err
    (low,) = diagnoses(json.loads(out), "precision")
    assert low["layer"] == "0" and "float16" in low["message"]


# ------------------------------------------------------------------------------------------------ formats
def test_json_csv_and_markdown_match_the_table(tmp_path):
    config = setup(tmp_path, BATCHNORM, """\
        input: {resize: 6, crop: 6}
        canonizers: [merge_batchnorm, residual]
        """)
    code, text, err = run(config, "--samples", "3")
    assert code == 0, err
    _, raw, _ = run(config, "--samples", "3", "--format", "json")
    data = json.loads(raw)
    rows = table_rows(text)
    assert [r["layer"] for r in data["layers"]] == list(rows)
    assert data["columns"][:3] == ["layer", "type", "rule"] and data["columns"][-1] == "worst_sample"
    numeric = data["columns"][3:-1]
    assert len(numeric) == 10  # out, in, in/out (mean, worst), neg (mean, worst), max, min, nan, inf
    for row in data["layers"]:
        cells = rows[row["layer"]]
        assert cells[1] == row["type"] and cells[2] == row["rule"].split("(")[0]
        value = {k: float(row[k]) if isinstance(row[k], str) else row[k] for k in numeric}  # "inf" strings
        assert cells[3:] == [cell(k, value[k]) for k in numeric], row["layer"]
    h = data["header"]
    assert f"output relevance {cell('output', h['output'])} -> input relevance {cell('input', h['input'])}" in text
    assert [d["layer"] for d in data["diagnoses"]] == [
        line.split("] ", 1)[1].split(":", 1)[0] for line in text.splitlines() if line.startswith("  [")]
    _, raw_csv, _ = run(config, "--samples", "3", "--format", "csv")
    parsed = list(csv.DictReader(io.StringIO(raw_csv)))
    assert [r["layer"] for r in parsed] == list(rows)
    for row, ref in zip(parsed, data["layers"]):
        assert float(row["out_mean"]) == ref["out_mean"] and float(row["in_mean"]) == ref["in_mean"]
    assert set(FORMATS) == set(RENDERERS)
    _, md, _ = run(config, "--samples", "3", "--format", "markdown")
    assert "## Conservation" in md and "| layer | type | rule | out |" in md
    first = data["layers"][0]
    assert f"| {first['layer']} | {first['type']} |" in md


def test_layers_glob_filters_rows(dense):
    config, data = dense
    code, out, err = run(config, data, "--layers", "f?", "--format", "json")
    assert code == 0, err
    assert [r["layer"] for r in json.loads(out)["layers"]] == ["fc"]
    code, out, err = run(config, data, "--layers", "nothing*")
    assert code == 2 and "--layers: no layer matches nothing*" in err


# ----------------------------------------------------------------------------------------- stored runs
def test_stored_run_gives_the_same_table_without_the_model(dense, tmp_path):
    config, data = dense
    image(data, "y.png", (255, 255, 255))  # x = [2, 1, 1]: z0 = 3.75, relevance at the input 3.5
    out_h5 = tmp_path / "run.h5"
    result = CliRunner().invoke(main, ["explain", str(config), str(data), "-o", str(out_h5), "-q"])
    assert result.exit_code == 0, result.output
    code, live, err = run(config, data, "--format", "json")
    assert code == 0, err
    code, stored, err = run(out_h5, "--format", "json")
    assert code == 0, err
    live, stored = json.loads(live), json.loads(stored)
    assert stored["mode"] == "stored" and stored["assignments"] is None
    # no types and no detail numbers in a file: those columns are left out of the table and the json alike
    assert stored["columns"] == ["layer", "rule", "out_mean", "in_mean", "ratio_mean", "ratio_worst", "worst_sample"]
    keys = ("layer", "rule", "out_mean", "in_mean", "ratio_mean", "ratio_worst")
    # the same Recorder numbers: equal, not just close
    assert [[r[k] for k in keys] for r in stored["layers"]] == [[r[k] for k in keys] for r in live["layers"]]
    assert stored["header"]["output"] == live["header"]["output"]
    assert stored["header"]["input"] == pytest.approx(live["header"]["input"], rel=1e-6)  # from the float32 map
    code, text, err = run(out_h5)
    # means of (1.75, 3.75) and (1.5, 3.5); in/out (6/7 + 14/15) / 2, worst 6/7
    assert code == 0 and table_rows(text)["fc"] == ["fc", "Epsilon", "2.75", "2.5", "0.8952", "0.8571"]
    assert "2 stored samples" in text
    assert run(out_h5, data)[0] == 2 and run(out_h5, "--zero-bias")[0] == 2


def test_bad_inputs_are_one_line_errors(tmp_path, dense):
    config, data = dense
    code, _, err = run(tmp_path / "missing.yaml")
    assert code == 2 and "config file not found" in err
    gradient = setup(tmp_path, DENSE, DENSE_INPUT + "composite: {name: guided_backprop}\n", name="grad")
    code, _, err = run(gradient, data, "--zero-bias")
    assert code == 2 and "composite.zero_params" in err
    code, out, err = run(gradient, data)
    assert code == 0 and "conservation is not expected" in out
    wrong = setup(tmp_path, DENSE, "input: {resize: 2, crop: 2}\n", name="wrong")  # 12 features for Linear(3, 2)
    code, _, err = run(wrong)
    assert code == 1 and "running the model with composite 'epsilon_gamma_box' on inputs of shape (4, 3, 2, 2)" in err
    target = setup(tmp_path, DENSE, DENSE_INPUT + "attribution: {target: 5}\n", name="target")
    code, _, err = run(target, data)
    assert code == 2 and "attribution.target: target: class index out of range for 2 outputs" in err
    code, _, err = run(config, tmp_path / "nowhere")
    assert code == 2 and "nowhere does not exist" in err


def test_composite_strict_in_the_config_acts_like_strict(tmp_path):
    config = setup(tmp_path, UNHANDLED, """\
        input: {resize: 4, crop: 4}
        composite: {name: epsilon_plus, strict: true}
        """)
    code, out, err = run(config, "--samples", "1")
    assert code == 1 and "NO RULE" in out and "(composite.strict): twice (Twice)" in err
