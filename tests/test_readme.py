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


def test_ci_installs_as_the_readme_says_from_the_lock():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    installs = [line for block in bash_blocks(readme) for line in block.splitlines() if line.startswith("pip install")]
    assert len(installs) == 3 and all(line in ci for line in installs)
    assert all("-c constraints.txt" in line for line in installs)
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line)
    assert {"torch", "peft", "transformers", "trl", "bitsandbytes"} <= pins.keys()
    assert "torch==" + pins["torch"] in installs[0]


def test_readme_main_command_is_a_cli_subcommand():
    from peft_geora_apps.cli import build_parser

    readme = (ROOT / "README.md").read_text()
    main = next(b.strip() for b in bash_blocks(readme) if b.strip().startswith("peft-geora "))
    args = build_parser().parse_args(main.split()[1:])
    assert callable(args.func)
