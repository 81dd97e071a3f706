"""The README's commands are the ones CI runs and the ones the package provides."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    test_commands = [b.strip() for b in bash_blocks(readme) if "pytest" in b]
    assert test_commands, "README has no test command"
    assert test_commands[0] in ci


def test_readme_main_command_is_a_cli_subcommand():
    from peft_geora.cli import build_parser

    readme = (ROOT / "README.md").read_text()
    main = next(b.strip() for b in bash_blocks(readme) if b.strip().startswith("peft-geora "))
    args = build_parser().parse_args(main.split()[1:])
    assert callable(args.func)
