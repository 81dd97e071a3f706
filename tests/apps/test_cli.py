"""The ``peft-geora`` command line run as users run it: ``python -m peft_geora_apps.cli`` in its own process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from .conftest import expected_diagnostics, table_rows


def test_subprocess_cli(geora_adapter, tmp_path):
    model, base_dir, adapter_dir = geora_adapter
    png = tmp_path / "sub.png"
    command = [sys.executable, "-m", "peft_geora_apps.cli", "inspect", str(adapter_dir), "--base", str(base_dir)]
    env = dict(os.environ, OMP_NUM_THREADS="1")  # see one_torch_thread
    result = subprocess.run(command + ["--png", str(png)], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    table = table_rows(result.stdout)
    q_proj = "model.layers.1.self_attn.q_proj"
    assert float(table[q_proj][6]) == pytest.approx(expected_diagnostics(model)[q_proj]["s_head"], rel=1e-4)
    assert png.stat().st_size > 5000
