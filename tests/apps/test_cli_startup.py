"""What a user meets before any work starts: ``--help`` answers at once, the output is the command's own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from peft_geora_apps import cli
from peft_geora_apps.demo import DemoSettings, save_adapter

HEAVY = ("torch", "peft", "transformers", "trl", "peft_geora", "bitsandbytes", "deepspeed")


def test_help_imports_nothing_heavy_and_every_option_is_explained():
    code = (
        "import sys, contextlib, io\n"
        "from peft_geora_apps import cli\n"
        "for argv in (['--help'], ['demo', '--help'], ['inspect', '--help'], ['export-lora', '--help']):\n"
        "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "        cli.main(argv)\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]" and result.stderr == ""
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in subparsers.items():
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"peft-geora {name} {action.option_strings[0]} has no help"
    demo_help = subparsers["demo"].format_help()
    assert "about 10 minutes on 2 CPU cores" in " ".join(demo_help.split())
    assert DemoSettings.__doc__ and "about 10 minutes on 2 CPU cores" in DemoSettings.__doc__


def test_commands_print_their_own_output_only(tmp_path, saved):
    """No third-party start-up notices (bitsandbytes' optional kernels, DeepSpeed's accelerator line, deprecation
    warnings) unless --verbose."""
    adapter = saved[0]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "peft_geora_apps.cli", "export-lora", str(adapter), str(tmp_path / "l")]
    quiet = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == "" and quiet.stdout.strip().splitlines() == [
        f"wrote the exact rank-2r LoRA export of {adapter} to {tmp_path / 'l'}"
    ]
    verbose = subprocess.run(
        [sys.executable, "-m", "peft_geora_apps.cli", "--verbose", *command[3:-1], str(tmp_path / "v")],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert verbose.returncode == 0, verbose.stderr
    assert (tmp_path / "v" / "adapter_model.safetensors").is_file()


class _Model:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail

    def save_pretrained(self, folder: Path) -> None:
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_text("new")
        if self.fail:
            raise KeyboardInterrupt


def test_the_demo_adapter_is_swapped_in_whole(tmp_path):
    """The demo saves after every step; an interrupted save leaves the previous adapter as it was."""
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "adapter_model.safetensors").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        save_adapter(_Model(fail=True), target)
    assert (target / "adapter_model.safetensors").read_text() == "old"
    save_adapter(_Model(), target)
    assert (target / "adapter_model.safetensors").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # the interrupted save's leftovers are gone
