"""``push_to_hub``: the adapter (or its LoRA export) and a model card, uploaded in one commit (Hub API intercepted)."""

from __future__ import annotations

import pytest

import peft_geora

from ..conftest import card_and_config, trained_geora


@pytest.mark.parametrize("export_lora", [False, True])
def test_push_to_hub(hub_calls, export_lora):
    model = trained_geora()
    model.peft_config["default"].base_model_name_or_path = "org/base-model"
    peft_geora.push_to_hub(model, "user/my-geora", export_lora=export_lora)
    assert hub_calls["repos"] == ["user/my-geora"]
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors"} <= hub_calls["files"].keys()
    card, config = card_and_config(hub_calls["files"])
    assert config["peft_type"] == ("LORA" if export_lora else "GEORA")
    assert "- geora" in card and "base_model: org/base-model" in card
    assert 'from_pretrained("user/my-geora")' in card
    assert ("import peft_geora" in card) != export_lora
