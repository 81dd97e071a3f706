"""Combining GeoRA adapters with PEFT's ``add_weighted_adapter``: what PEFT makes of the adapters' LoRA exports."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model

import peft_geora
from peft_geora import GeoRAConfig

from ..conftest import make_tiny_model, tiny_inputs

COMBINATIONS = {"cat": {}, "svd": {}, "linear": {}, "ties": {"density": 0.5}, "magnitude_prune": {"density": 0.5}}


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def two_trained_adapters(rank_pattern: dict | None = None):
    """A GeoRA model with adapters "a" and "b" (different settings), each moved away from its anchors."""
    model = get_peft_model(make_tiny_model(), GeoRAConfig(r=4), "a")
    model.add_adapter("b", GeoRAConfig(r=4, rho=0.3, rank_pattern=rank_pattern or {}))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".delta"):
                param.add_(0.05 * torch.randn(param.shape, generator=gen))
    return model.eval()


def test_cat_is_exactly_both_adapters_at_once():
    model, inputs = two_trained_adapters({"q_proj": 2}), tiny_inputs()
    model.base_model.set_adapter(["a", "b"])
    both = logits(model, inputs)
    model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "ab", combination_type="cat")
    assert model.peft_config["ab"].r == 8 + 8  # the sum of the rank-2r exports
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".ab." in n)  # as PEFT leaves LoRA's
    model.set_adapter("ab")
    torch.testing.assert_close(logits(model, inputs), both, rtol=1e-5, atol=1e-5)
    with model.disable_adapter():
        assert not torch.allclose(logits(model, inputs), both)
    layer = model.base_model.model.model.layers[0].self_attn.v_proj
    expected = layer.get_delta_weight("a") + layer.get_delta_weight("b")
    torch.testing.assert_close(layer.get_delta_weight("ab"), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("combination", sorted(COMBINATIONS))
def test_every_combination_is_what_peft_makes_of_the_lora_exports(combination, tmp_path):
    """PEFT's linear-type combinations need adapters of one rank, so the adapters here have uniform ranks."""
    model, inputs = two_trained_adapters(), tiny_inputs()
    for name in ("a", "b"):
        peft_geora.save_as_lora(model, tmp_path / name, adapter_name=name)
    lora = PeftModel.from_pretrained(make_tiny_model(), tmp_path / "a", adapter_name="a")
    lora.load_adapter(tmp_path / "b", adapter_name="b")
    for peft_model in (model, lora):
        peft_model.add_weighted_adapter(
            ["a", "b"], [0.7, 1.3], "ab", combination_type=combination, **COMBINATIONS[combination]
        )
        peft_model.set_adapter("ab")
    torch.testing.assert_close(logits(model, inputs), logits(lora.eval(), inputs), rtol=1e-4, atol=1e-5)


def test_adapters_loaded_from_disk_combine_and_the_result_round_trips(tmp_path):
    model, inputs = two_trained_adapters({"q_proj": 2}), tiny_inputs()
    model.base_model.set_adapter(["a", "b"])
    both = logits(model, inputs)
    model.save_pretrained(tmp_path / "saved")
    loaded = PeftModel.from_pretrained(make_tiny_model(), tmp_path / "saved" / "a", adapter_name="a")
    loaded.load_adapter(tmp_path / "saved" / "b", adapter_name="b")
    loaded.add_weighted_adapter(["a", "b"], [1.0, 1.0], "ab", combination_type="cat")
    loaded.set_adapter("ab")
    combined = logits(loaded, inputs)
    torch.testing.assert_close(combined, both, rtol=1e-5, atol=1e-5)
    loaded.save_pretrained(tmp_path / "combined", selected_adapters=["ab"])
    with peft_geora.base_check("raise"):
        reloaded = PeftModel.from_pretrained(make_tiny_model(), tmp_path / "combined" / "ab")
    assert torch.equal(logits(reloaded, inputs), combined)


def test_combining_refuses_a_non_geora_or_unknown_adapter_before_changing_anything():
    model = two_trained_adapters()
    with pytest.raises(ValueError, match="'zzz' is not a GeoRA adapter"):
        model.add_weighted_adapter(["a", "zzz"], [1.0, 1.0], "az", combination_type="cat")
    assert "az" not in model.peft_config
