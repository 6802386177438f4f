"""Errors at the command line: click's usage errors end in lrpcli's error line; hostile configs are one line."""

from __future__ import annotations

import textwrap

import pytest
from click.testing import CliRunner

from lrpcli.cli import main


def run(*args: str):
    return CliRunner().invoke(main, list(args), prog_name="lrpcli")


@pytest.mark.parametrize(
    ("args", "usage", "error"),
    [
        (["explain"], "Usage: lrpcli explain [OPTIONS] CONFIG DATA", "Missing argument 'CONFIG'."),
        (["nope"], "Usage: lrpcli [OPTIONS] COMMAND [ARGS]...", "No such command 'nope'."),
        (["--bogus"], "Usage: lrpcli [OPTIONS] COMMAND [ARGS]...", "No such option: --bogus"),
        (["explain", "--batch-size", "0", "c.yaml", "d"], "Usage: lrpcli explain [OPTIONS] CONFIG DATA",
         "Invalid value for '--batch-size': 0 is not in the range 1<=x<=2147483647."),
    ],
)
def test_usage_error_ends_in_lrpcli_error_line(args, usage, error):
    result = run(*args)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert lines[0] == usage
    assert lines[1].startswith("Try '") and lines[1].endswith(" --help' for help.")
    assert lines[-1].replace("No such option '--bogus'.", "No such option: --bogus") == f"lrpcli: error: {error}"
    assert not any(line.startswith("Error:") for line in lines)


HOSTILE = {
    "alias_bomb": "model: {name: resnet18}\n" + "a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 9)),
    "deep_lists": "model: {name: resnet18}\nx: " + "[" * 100_000 + "]" * 100_000 + "\n",
    "deep_mappings": "model: {name: resnet18, kwargs: " + "{a: " * 3000 + "1" + "}" * 3000 + "}\n",
    "seed": f"model: {{name: resnet18}}\nrun: {{seed: {2**70}}}\n",
    "int_key": "model: {name: resnet18}\n1: x\n",
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_config_is_one_line_exit_2(tmp_path, case):
    config = tmp_path / "c.yaml"
    config.write_text(textwrap.dedent(HOSTILE[case]))
    result = run("explain", str(config), str(tmp_path), "-o", str(tmp_path / "o.h5"))
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"lrpcli: error: {config}: "), result.output
    assert "Traceback" not in result.output


def test_debug_on_a_gradient_config_notes_it_shows_the_composite(tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    text = (root / "configs" / "demo.yaml").read_text().replace("../share", str(root / "share"))
    config = tmp_path / "g.yaml"
    config.write_text(text.replace("method: lrp", "method: gradient"))
    result = CliRunner().invoke(main, ["debug", str(config), "-n", "1"])
    assert result.exit_code == 0, result.output
    assert result.stderr.strip().splitlines() == [
        f"lrpcli: note: {config}: attribution.method is gradient; debug shows the config's LRP composite "
        "(epsilon_gamma_box), not the gradient attribution that explain computes"]
    assert "Rule assignment" in result.stdout
