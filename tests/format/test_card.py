"""The model card written next to a saved GeoRA adapter."""

from __future__ import annotations


def test_save_pretrained_writes_the_geora_card(saved):
    folder, _, _ = saved
    card = (folder / "README.md").read_text()
    assert "- geora" in card and "import peft_geora" in card and str(folder) in card
