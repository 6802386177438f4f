"""``make bench``'s verdicts: which figure meets which target, from chosen timings (no model is run here).

The bench itself takes ten minutes and is not part of the suite; these tests pin the part that turns its
measurements into "ok" and "MISS", so a change to the table cannot quietly pass a missed target.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "share" / "bench"
sys.path.insert(0, str(BENCH))
from bench_explain import PipelineResult  # noqa: E402
from bench_models import EPSILON_REFERENCE, Case, ModelResult  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_run", BENCH / "run.py")
bench_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_run)


def _case(name: str, seconds: list[float], paired: list[float], rules: tuple[str, ...], peak: int = 100) -> Case:
    baseline = Case("vgg16", "gradient", 8, seconds=list(paired), cpu=list(paired))
    return Case("vgg16", name, 8, seconds=list(seconds), cpu=[2 * s for s in seconds], peak=peak, rules=rules,
                baseline=baseline)


def test_model_rows_judge_each_composite_against_its_own_paired_gradient_runs():
    gradient = Case("vgg16", "gradient", 8, seconds=[1.0, 3.0, 1.0], cpu=[1.0, 3.0, 1.0], peak=100)
    cases = [
        # median 2.1 s over paired gradients of median 1.0 s: over the 2.0x line
        _case("epsilon_alpha2_beta1", [2.1, 1.9, 2.2], [1.0, 1.0, 1.1], ("alpha_beta", "epsilon")),
        # 1.6x the gradient's peak memory: over the 1.5x line, time fine
        _case("epsilon_plus", [1.5, 1.4, 1.6], [1.0, 1.0, 1.0], ("epsilon", "zplus"), peak=160),
        # Epsilon-only: the 1.3x line applies; 1.3x exactly is within it
        _case(EPSILON_REFERENCE, [1.35, 1.2, 1.3], [1.0, 1.0, 1.0], ("epsilon",)),
        # a fast composite whose own gradients ran slow still gets its ratio from them
        _case("guided_backprop", [2.4, 2.6, 2.5], [2.0, 2.0, 2.0], ("gradient",)),
    ]
    table = bench_run.Table()
    bench_run.model_rows(table, ModelResult("vgg16", "cpu", 8, gradient, cases), "cpu")
    rows = {r[1]: r for r in table.rows}
    assert rows["plain gradient"][4] == "1.00x (baseline)"
    ab = rows["epsilon_alpha2_beta1"]
    assert ab[4] == "2.10x (pairs 1.90-2.10; cpu 4.20x)" and ab[6] == "<= 2.0x, <= 1.5x" and ab[7] == "MISS time"
    plus = rows["epsilon_plus"]
    assert plus[4].startswith("1.50x") and plus[5] == "1.60x" and plus[7] == "MISS memory"
    eps = rows[EPSILON_REFERENCE]
    assert eps[4].startswith("1.30x") and eps[6] == "<= 1.3x, <= 1.5x" and eps[7] == "ok"
    assert rows["guided_backprop"][4].startswith("1.25x") and rows["guided_backprop"][7] == "ok"
    assert table.misses == ["vgg16 b8 epsilon_alpha2_beta1: time", "vgg16 b8 epsilon_plus: memory"]


@pytest.mark.parametrize("end_to_end,verdict", [([0.20, 0.21, 0.19], "MISS"), ([0.17, 0.18, 0.16], "ok")])
def test_pipeline_row_compares_end_to_end_with_attribution_alone(end_to_end, verdict):
    result = PipelineResult("demo", 64, 16, "auto: 0", end_to_end=end_to_end, attribution=[0.15, 0.16, 0.14])
    table = bench_run.Table()
    bench_run.pipeline_row(table, result)
    (row,) = table.rows
    share = 0.15 / sorted(end_to_end)[1]
    assert row[4] == f"{share:.0%} of attribution alone (426.7 img/s)" and row[7] == verdict
    assert (table.misses == []) == (verdict == "ok")


def test_unknown_sections_and_composites_are_refused(capsys):
    with pytest.raises(SystemExit):
        bench_run.parse_args(["--only", "vgg16,alexnet"])
    assert "unknown section(s) alexnet" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_run.parse_args(["--composites", "epsilon_plus,nosuch"])
    assert "--composites: unknown nosuch" in capsys.readouterr().err


def test_overhead_bench_takes_the_epsilon_reference():
    """``bench_overhead.py --composites 'epsilon*'``: Epsilon on every weighted layer, the floor of the hooks'
    cost, with the Epsilon-only target; refused against an older package, whose rules it would mix."""
    import bench_overhead
    from torch import nn

    from lrpcli.engine.rules import Epsilon

    composite = bench_overhead.composite_in("lrpcli", EPSILON_REFERENCE)
    assert composite.name == EPSILON_REFERENCE
    assert isinstance(composite.rule_for("conv", nn.Conv2d(1, 1, 1), {}), Epsilon)
    assert bench_overhead.TARGET[EPSILON_REFERENCE] == 1.3
    assert bench_overhead.composite_in("lrpcli", "auto").name == "auto"
    with pytest.raises(SystemExit, match="not with --against"):
        bench_overhead.composite_in("lrpcli_base", EPSILON_REFERENCE)
