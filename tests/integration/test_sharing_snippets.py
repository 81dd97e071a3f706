"""The README's "Saving, sharing and serving" code blocks run as written: save, export as LoRA (whole and at rank
16), push to the Hub (intercepted)."""

from __future__ import annotations

import re
import shutil

from ..conftest import ROOT, make_tiny_model, trained_geora


def test_readme_snippets_for_saving_and_sharing(tmp_path, monkeypatch, hub_calls):
    """Run the README's "Saving, sharing and serving" code blocks as written."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Saving, sharing and serving", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks
    monkeypatch.chdir(tmp_path)
    namespace = {"model": trained_geora(), "base_model": make_tiny_model(), "make_base_model": make_tiny_model}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    assert (tmp_path / "my-geora-adapter" / "adapter_config.json").exists()
    assert (tmp_path / "my-geora-as-lora" / "adapter_config.json").exists()
    assert (tmp_path / "my-geora-rank16" / "geora_export.json").exists()
    if any("push_to_hub" in block for block in blocks):  # the upload happened (intercepted): one repo, card included
        assert len(hub_calls["repos"]) == 1 and "README.md" in hub_calls["files"]
    shutil.rmtree(tmp_path / "my-geora-adapter")
