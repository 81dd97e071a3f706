"""The checkpoint format: what a saved adapter holds, format 1 upgraded to format 2 on load, and bad checkpoints
refused with clear errors naming the file and module, the base model left as it was."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file

from peft_geora import AnchoredA, AnchoredB, GeoRAConfig, base_check
from peft_geora.format.checkpoint import FORMAT_VERSION, upgrade_state_dict

from ..conftest import ROOT, assert_bitwise_equal, logits, make_tiny_model, state_snapshot, tiny_inputs


def test_saved_files_hold_every_geora_field_and_both_factor_kinds(saved):
    folder, _, _ = saved
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "GEORA"
    for name in GeoRAConfig.__dataclass_fields__:
        assert name in config or name == "runtime_config", name  # PEFT never saves runtime options
    assert config["init_from_checkpoint"] is True and config["geora_format_version"] == FORMAT_VERSION
    assert len(config["base_fingerprints"]) == 14
    keys = load_file(folder / "adapter_model.safetensors").keys()
    for suffix in ("lora_A.delta", "lora_A.anchor", "lora_B.delta", "lora_B.anchor"):
        assert sum(k.endswith(suffix) for k in keys) == 14


def assert_fails_untouched(folder, model, error, match):
    before = state_snapshot(model)
    with pytest.raises(error, match=match):
        PeftModel.from_pretrained(model, folder)
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    assert_bitwise_equal(before, state_snapshot(model))


def test_missing_weights_file(saved, tmp_path):
    folder, _, _ = saved
    (folder / "adapter_model.safetensors").unlink()
    assert_fails_untouched(folder, make_tiny_model(), FileNotFoundError, "adapter_model.safetensors is missing")


def test_corrupt_weights_file(saved):
    folder, _, _ = saved
    path = folder / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert_fails_untouched(folder, make_tiny_model(), ValueError, "cannot read the adapter weights .*safetensors")


def test_config_from_a_newer_incompatible_version(saved):
    folder, _, _ = saved
    config = json.loads((folder / "adapter_config.json").read_text())
    config["geora_format_version"] = FORMAT_VERSION + 1
    (folder / "adapter_config.json").write_text(json.dumps(config))
    newer = f"format version {FORMAT_VERSION + 1}.*upgrade peft-geora"
    assert_fails_untouched(folder, make_tiny_model(), ValueError, newer)


V1_FIXTURE = ROOT / "tests" / "fixtures" / "geora_v1"


@pytest.mark.parametrize("loader", ["from_pretrained", "load_adapter"])
def test_a_format_1_adapter_loads_exactly_and_saves_as_format_2(loader, no_decomposition, tmp_path):
    """An adapter written by format version 1 (``lora_A.factor``: the whole factor) is converted on load and its
    logits are those the old code computed, to float32 rounding; saving it again writes format 2.

    Not bit for bit: format 1's forward used both ``B`` and ``B - B0``; format 2 stores ``dB = B - B0`` and uses
    ``B0 + dB``, which differs from ``B`` by one float32 ulp where ``|B0|`` is small against the update (7 of the
    fixture's 256 entries of one matrix, none where the subtraction is exact)."""
    assert json.loads((V1_FIXTURE / "adapter_config.json").read_text())["geora_format_version"] == 1
    expected = load_file(V1_FIXTURE / "expected_logits.safetensors")["logits"]
    with base_check("raise"):
        if loader == "from_pretrained":
            model = PeftModel.from_pretrained(make_tiny_model(), V1_FIXTURE)
        else:
            model = get_peft_model(
                make_tiny_model(), GeoRAConfig(r=2, target_modules=["k_proj"], init_weights=False), "other"
            )
            model.load_adapter(V1_FIXTURE, adapter_name="default")
            model.set_adapter("default")
        torch.testing.assert_close(logits(model, tiny_inputs()), expected, rtol=1e-6, atol=1e-6)
    old = load_file(V1_FIXTURE / "adapter_model.safetensors")
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    b, b0 = old["base_model.model.model.layers.0.mlp.down_proj.lora_B.factor"], layer.lora_B["default"].anchor
    assert torch.equal(layer.lora_B["default"].delta, b - b0)
    exact = (b * b0 > 0) & (b.abs() <= 2 * b0.abs()) & (b0.abs() <= 2 * b.abs())  # Sterbenz: B - B0 is exact ...
    assert exact.float().mean() > 0.8
    assert torch.equal((b0 + layer.lora_B["default"].delta)[exact], b[exact])  # ... so B0 + dB gives B back
    model.save_pretrained(tmp_path / "v2", selected_adapters=["default"])
    keys = load_file(tmp_path / "v2" / "adapter_model.safetensors").keys()
    assert keys and all(k.endswith((".delta", ".anchor")) for k in keys)
    assert json.loads((tmp_path / "v2" / "adapter_config.json").read_text())["geora_format_version"] == FORMAT_VERSION


def test_shape_mismatch(saved):
    folder, _, _ = saved
    model = make_tiny_model(intermediate_size=128)
    assert_fails_untouched(folder, model, ValueError, r"64 x 96 weight at module 'model.layers.0.mlp.down_proj'")


def test_adapter_for_another_architecture(saved):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder, _, _ = saved
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=32))
    assert_fails_untouched(folder, gpt2, ValueError, "another architecture")


def anchored_pair(r=4, n_in=12, n_out=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a0, b0 = torch.randn(r, n_in, generator=gen), torch.randn(n_out, r, generator=gen)
    da, db = 0.1 * torch.randn(r, n_in, generator=gen), 0.1 * torch.randn(n_out, r, generator=gen)
    return AnchoredA(da, a0), AnchoredB(db, b0)


def test_a_format_1_state_dict_upgrades_to_the_update():
    """Format 1 stored ``A`` itself as ``factor``; the upgrade gives ``dA = A - A0``, bit-exact where the update is
    small against the factor (the subtraction is then exact), and the module computes what format 1 computed."""
    lora_a, lora_b = anchored_pair()
    a = (lora_a.anchor + lora_a.delta).detach()
    b = (lora_b.anchor + lora_b.delta).detach()
    old = {
        "x.lora_A.factor": a,
        "x.lora_A.anchor": lora_a.anchor,
        "x.lora_B.factor": b,
        "x.lora_B.anchor": lora_b.anchor,
    }
    new = upgrade_state_dict(old)
    assert list(new) == ["x.lora_A.delta", "x.lora_A.anchor", "x.lora_B.delta", "x.lora_B.anchor"]
    assert torch.equal(new["x.lora_A.delta"], a - lora_a.anchor) and torch.equal(new["x.lora_B.anchor"], lora_b.anchor)
    assert torch.equal(new["x.lora_B.anchor"] + new["x.lora_B.delta"], b)
    fresh_a, fresh_b = (
        AnchoredA(torch.zeros(4, 12), torch.zeros(4, 12)),
        AnchoredB(torch.zeros(10, 4), torch.zeros(10, 4)),
    )
    fresh_a.load_state_dict({k.removeprefix("x.lora_A."): v for k, v in new.items() if "lora_A" in k})
    fresh_b.load_state_dict({k.removeprefix("x.lora_B."): v for k, v in new.items() if "lora_B" in k})
    x = torch.randn(3, 12, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = x @ a.T @ b.T - x @ lora_a.anchor.T @ lora_b.anchor.T
        torch.testing.assert_close(fresh_b(fresh_a(x)), expected)
    assert upgrade_state_dict(new) is new
