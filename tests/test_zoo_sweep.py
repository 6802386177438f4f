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

import sys
from pathlib import Path

import pytest
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "share" / "bench"))
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
