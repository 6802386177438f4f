"""``lrpcli --help`` and every ``lrpcli <command> --help`` answer without importing torch (it takes seconds)."""

from __future__ import annotations

import subprocess
import sys

COMMANDS = ("explain", "render", "debug", "merge", "evaluate", "analyze", "virelay", "export")


def test_help_of_every_command_imports_no_torch():
    code = (
        "import sys; from click.testing import CliRunner; from lrpcli.cli import main; "
        "assert sorted(main.commands) == sorted(sys.argv[1:]), sorted(main.commands); "
        "codes = [CliRunner().invoke(main, args).exit_code for args in [['--help']] + [[c, '--help'] for c in "
        "sys.argv[1:]]]; "
        "print(codes, sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))"
    )
    result = subprocess.run([sys.executable, "-c", code, *COMMANDS], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == f"{[0] * (len(COMMANDS) + 1)} []"
