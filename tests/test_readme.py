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


def test_readme_main_command_is_the_demo():
    """The README's main command runs ``peft-geora demo`` with options the demo really has."""
    import argparse

    from peft_geora_apps import cli

    readme = (ROOT / "README.md").read_text()
    main = next(b.strip() for b in bash_blocks(readme) if b.strip().startswith("peft-geora "))
    argv = main.split()[1:]
    assert argv and argv[0] == "demo", main
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    demo_options = set(subparsers.choices["demo"]._option_string_actions)
    options = [arg.split("=", 1)[0] for arg in argv[1:] if arg.startswith("-")]
    unknown = [option for option in options if option not in demo_options]
    assert not unknown, f"not options of `peft-geora demo`: {unknown}"
    args = parser.parse_args(argv)  # argparse exits on anything else it does not accept
    assert args.command == "demo"
    assert args.func is cli._demo
