"""The quickstart notebook runs top to bottom (fast mode), so it cannot rot."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def test_quickstart_notebook_executes(tmp_path, smollm2_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    monkeypatch.setenv("PEFT_GEORA_FAST", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    NotebookClient(
        notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = "".join(
        out.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
    )
    assert "logits identical to the base model: True" in outputs
    assert "greedy accuracy:" in outputs
    assert (tmp_path / "outputs" / "notebook-demo" / "reward.png").stat().st_size > 0
    assert (tmp_path / "outputs" / "notebook-demo" / "lora-export" / "adapter_config.json").exists()
