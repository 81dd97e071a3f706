"""transformers' own adapter API (``model.load_adapter`` ... ``delete_adapter``) on a GeoRA adapter, on the locked
versions (transformers 5.23: 5.24's API asks for a peft that is not released)."""

from __future__ import annotations

import torch
from peft import get_peft_model

from peft_geora import GeoRAConfig

from ..conftest import make_tiny_model, tiny_inputs


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def test_the_whole_transformers_adapter_api(tmp_path):
    inputs = tiny_inputs()
    trained = get_peft_model(make_tiny_model(), GeoRAConfig(r=4))
    with torch.no_grad():
        for name, param in trained.named_parameters():
            if name.endswith(".delta"):
                param.add_(0.05 * torch.randn_like(param))
    expected = logits(trained.eval(), inputs)
    trained.save_pretrained(tmp_path / "adapter")

    model = make_tiny_model()
    base = logits(model, inputs)
    model.load_adapter(tmp_path / "adapter", adapter_name="trained")
    assert model.active_adapters() == ["trained"] and torch.equal(logits(model, inputs), expected)
    model.add_adapter(GeoRAConfig(r=2, target_modules=["q_proj", "v_proj"]), adapter_name="fresh")
    model.set_adapter("fresh")
    assert model.active_adapters() == ["fresh"] and torch.equal(logits(model, inputs), base)  # exact at init
    model.set_adapter("trained")
    model.disable_adapters()
    assert torch.equal(logits(model, inputs), base)
    model.enable_adapters()
    assert torch.equal(logits(model, inputs), expected)
    state = model.get_adapter_state_dict("trained")
    assert len(state) == 14 * 4 and all(k.endswith((".delta", ".anchor")) for k in state)
    saved = trained.state_dict()
    assert all(
        torch.equal(
            v,
            saved[
                f"base_model.model.{k.replace('.lora_A.', '.lora_A.default.').replace('.lora_B.', '.lora_B.default.')}"
            ],
        )
        for k, v in state.items()
    )
    model.delete_adapter("fresh")
    assert model.active_adapters() == ["trained"] and torch.equal(logits(model, inputs), expected)
