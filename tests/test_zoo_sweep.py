"""The zoo sweep as tests: every model of ``torchvision.models.list_models(module=torchvision.models)`` through
``composite: auto`` and ``canonizers: auto`` (share/bench/bench_zoo.py, the code ``make bench BENCH_ARGS=--zoo``
runs), random weights, at the smallest input size each accepts.

For each: nothing left on the plain gradient (no module without a rule, no functional operation the canonizers
could not route, nothing untraced), finite relevance, and in float64 with biases zeroed and the attention
weights held constant (every rule on the path conservative) (input + embedding relevance) / output relevance
within 1e-6 of 1. The default run keeps a few small models of different families (concatenation, gates and
hardswish, channel shuffle); the whole list is ``--slow`` (an hour and more on two cores).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torchvision

BENCH = Path(__file__).resolve().parents[1] / "share" / "bench"
sys.path.insert(0, str(BENCH))
import bench_zoo  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

ALL = torchvision.models.list_models(module=torchvision.models)
QUICK = ["squeezenet1_1", "mobilenet_v3_small", "shufflenet_v2_x0_5"]
MAX_PARAMS_M = 350.0  # vit_h_14 and regnet_y_128gf are above: 5 GB in float64


def _check(name: str) -> None:
    model = bench_zoo.build(name)
    size = bench_zoo.smallest_size(model)
    ratio, _, finite, left = bench_zoo.conservation(name, size)
    assert left == []
    assert finite
    assert abs(ratio - 1) < bench_zoo.TOLERANCE, ratio


@pytest.mark.parametrize("name", QUICK)
def test_small_models_cover_and_conserve(name):
    _check(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
def test_every_torchvision_model(name):
    """Also the float32 path of ``lrpcli explain`` (the shipped auto config unchanged): coverage and finiteness."""
    row = bench_zoo.sweep_one(name, MAX_PARAMS_M, repeats=0, conserve=True)
    if row.skipped:
        pytest.skip(row.skipped)
    assert row.status == "ok", row.cells()


def test_row_status_names_what_failed():
    row = bench_zoo.ZooRow("m", 1.0, size=32, left=["a (Foo)"], finite=False, conservation=1.1)
    assert row.status == "FAIL coverage+non-finite+conservation"
    assert bench_zoo.ZooRow("m", 1.0, size=32, left=[], finite=True, conservation=1 + 1e-9).status == "ok"
    assert bench_zoo.ZooRow("m", 900.0, skipped="too big").status == "skipped"


def test_coverage_left_reads_modules_and_notes():
    class Session:
        notes = ["functional: routed through modules: sum x2", "functional: left on the plain gradient: exp x1",
                 "functional: Foo at <model> (not traced) computes outside its modules: nothing",
                 "functional: Bar at <model> (not traced) computes outside its modules: sum x1"]

        def unhandled(self):
            class A:
                name, type_name = "head", "Tanhshrink"
            return [A()]

    assert bench_zoo.coverage_left(Session()) == [
        "head (Tanhshrink)", "functional: left on the plain gradient: exp x1",
        "functional: Bar at <model> (not traced) computes outside its modules: sum x1"]


def test_parameter_count_with_and_without_the_meta_device():
    """squeezenet builds on the meta device; RegNet's builders compute with tensors and are built for real."""
    assert round(bench_zoo.parameters_m("squeezenet1_1"), 4) == 1.2355
    assert round(bench_zoo.parameters_m("regnet_x_400mf"), 4) == 5.4960


def test_time_options_reach_the_timing(monkeypatch):
    """--time-size/--time-batch are the input the attribution and the gradient are timed on; coverage keeps its
    own (batch 2 at the smallest size)."""
    attributed, forwarded = [], []

    class Recording(bench_zoo.Explainer):
        def __call__(self, x, *args, **kwargs):
            attributed.append(tuple(x.shape))
            return super().__call__(x, *args, **kwargs)

    build = bench_zoo.build

    def recording_build(name):
        model = build(name)
        model.register_forward_pre_hook(lambda _, args: forwarded.append(tuple(args[0].shape)))
        return model

    monkeypatch.setattr(bench_zoo, "Explainer", Recording)
    monkeypatch.setattr(bench_zoo, "build", recording_build)
    row = bench_zoo.sweep_one("squeezenet1_1", MAX_PARAMS_M, repeats=2, conserve=False, time_size=40, time_batch=3)
    assert row.status == "ok", row.cells()
    assert (row.size, row.time_size, row.time_batch) == (32, 40, 3)
    assert attributed == [(2, 3, 32, 32)] + [(3, 3, 40, 40)] * 3  # coverage, warm-up, two timed pairs
    # the size probes run batch 1; every batched forward of the plain model is the gradient's (warm-up, 2 timed)
    assert {s for s in forwarded if s[0] > 1} == {(3, 3, 40, 40)}
    assert forwarded.count((3, 3, 40, 40)) >= 3
    assert row.ratio > 0
    assert row.cells()[6] == f"{row.ratio:.2f}x @3x40"


def test_time_size_falls_back_to_the_nearest_accepted_size():
    class Picky(torch.nn.Module):
        """Runs on the square sizes ``accepts`` allows only (a ViT: 224; inception_v3: 75 and up)."""

        def __init__(self, accepts):
            super().__init__()
            self.accepts, self.weight = accepts, torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            if not self.accepts(x.shape[-1]):
                raise ValueError("wrong size")
            return x

    vit, inception = Picky(lambda s: s == 224), Picky(lambda s: s >= 75)
    assert bench_zoo.timing_size(vit, 32) == 224
    assert bench_zoo.timing_size(vit, 299) == 224
    assert bench_zoo.timing_size(inception, 32) == 96  # the nearest of SIZES it runs on
    assert bench_zoo.timing_size(inception, 100) == 100
    assert bench_zoo.timing_size(Picky(lambda s: s in (64, 128)), 96) == 128  # equally near: the larger
    with pytest.raises(ValueError, match="runs on neither 50"):
        bench_zoo.timing_size(Picky(lambda s: s == 7), 50)


def test_paired_ratio_is_the_median_of_per_pair_ratios(monkeypatch):
    """Pairs alternate their order, and one slow pair (a neighbour's burst) does not move the result."""
    now = [0.0]
    calls = []

    def advance(name, seconds):
        def run():
            calls.append(name)
            now[0] += seconds.pop(0)
        return run

    monkeypatch.setattr(bench_zoo.time, "perf_counter", lambda: now[0])
    grad = advance("g", [1.0, 1.0, 1.0, 10.0])  # warm-up, then three timed runs; the last one is disturbed
    lrp = advance("a", [5.0, 2.0, 2.0, 2.0])
    assert bench_zoo.paired_ratio(grad, lrp, 3) == 2.0
    assert calls == ["g", "a", "g", "a", "a", "g", "g", "a"]


def test_time_options_parse():
    args = bench_zoo.parse_args([])
    assert (args.time_size, args.time_batch) == (None, 2)
    args = bench_zoo.parse_args(["--time-size", "224", "--time-batch", "8", "--threads", "1"])
    assert (args.time_size, args.time_batch, args.threads) == (224, 8, 1)
    with pytest.raises(SystemExit) as exc:
        bench_zoo.parse_args(["--time-batch", "0"])
    assert exc.value.code == 2


def test_run_passes_the_time_options_through(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("bench_run_zoo", BENCH / "run.py")
    bench_run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_run)
    args = bench_run.parse_args(["--zoo", "--zoo-models", "squeezenet1_1", "--zoo-time-size", "224",
                                 "--zoo-time-batch", "8", "--quick"])
    assert (args.zoo_time_size, args.zoo_time_batch) == (224, 8)
    assert bench_run.parse_args(["--zoo"]).zoo_time_size is None
    with pytest.raises(SystemExit):
        bench_run.parse_args(["--zoo", "--zoo-time-size", "x"])
    assert "--zoo-time-size: expected an integer >= 1, got 'x'" in capsys.readouterr().err
    seen = {}
    monkeypatch.setattr(bench_zoo, "run", lambda *a, **k: seen.update(k, args=a) or [])
    bench_run.zoo_section(args)
    assert seen["args"][0] == ["squeezenet1_1"]
    assert (seen["time_size"], seen["time_batch"]) == (224, 8)


def test_summary_gives_the_time_range_and_the_models_above_the_target():
    rows = [bench_zoo.ZooRow("a", 1.0, size=32, finite=True, ratio=1.2, time_size=224, time_batch=8),
            bench_zoo.ZooRow("b", 1.0, size=32, finite=True, ratio=2.31, time_size=224, time_batch=8),
            bench_zoo.ZooRow("c", 1.0, size=32, finite=True, ratio=2.05, time_size=224, time_batch=8),
            bench_zoo.ZooRow("d", 900.0, skipped="too big")]
    assert bench_zoo.summary(rows) == (
        "3 of 3 models ok (coverage empty, finite, conservation not run); skipped for size: d; time vs gradient "
        "1.20x (a) to 2.31x (b), above 2x: b 2.31x, c 2.05x")
    rows[1].ratio = 1.5
    rows[2].ratio = None
    rows[0].conservation = 1.0
    assert bench_zoo.summary(rows).endswith(
        "(coverage empty, finite, conservation within 1e-06); skipped for size: d; time vs gradient 1.20x (a) to "
        "1.50x (b), above 2x: none")
