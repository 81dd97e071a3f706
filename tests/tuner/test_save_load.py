"""Saving and loading a GeoRA adapter with every loader: bit-identical, without any decomposition, onto a base that
may be reused, with the folder gone, or saved as ``.bin``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model

import peft_geora
from peft_geora import GeoRAConfig, base_check

from ..conftest import ROOT, logits, make_tiny_model, tiny_inputs, trained_geora


def test_reload_in_a_fresh_process_is_bit_identical_without_any_svd(saved, tmp_path):
    folder, inputs, expected = saved
    torch.save(inputs, tmp_path / "inputs.pt")
    script = f"""
        import torch
        from peft import PeftModel
        from tests.conftest import forbid_decomposition, make_tiny_model
        calls = []
        forbid_decomposition(setattr, calls)  # every factorisation and decomposition entry point raises
        inputs = torch.load({str(tmp_path / "inputs.pt")!r})
        for low_cpu_mem_usage in (False, True):
            model = PeftModel.from_pretrained(make_tiny_model(), {str(folder)!r}, low_cpu_mem_usage=low_cpu_mem_usage)
            with torch.no_grad():
                torch.save(model(**inputs).logits, {str(tmp_path)!r} + f"/out_{{low_cpu_mem_usage}}.pt")
        assert calls == [], calls
    """
    subprocess.run([sys.executable, "-c", textwrap.dedent(script)], check=True, cwd=ROOT)
    for flag in (False, True):
        assert torch.equal(torch.load(tmp_path / f"out_{flag}.pt"), expected)


def test_every_loader_restores_exactly_without_svd(saved, no_decomposition, tmp_path):
    folder, inputs, expected = saved
    peft_model = PeftModel.from_pretrained(make_tiny_model(), folder, low_cpu_mem_usage=True)
    assert torch.equal(logits(peft_model, inputs), expected)
    # transformers' own adapter loader assigns tensors directly, bypassing load_state_dict
    plain = make_tiny_model()
    plain.load_adapter(str(folder))
    assert torch.equal(logits(plain, inputs), expected)
    # AutoPeftModel reads the base model from the adapter config
    base_dir = tmp_path / "base"
    make_tiny_model().save_pretrained(base_dir)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base_dir)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    auto = AutoPeftModelForCausalLM.from_pretrained(folder)
    assert torch.equal(logits(auto, inputs), expected)
    # a trainable reload keeps training only the factors
    trainable = PeftModel.from_pretrained(make_tiny_model(), folder, is_trainable=True)
    names = [n for n, p in trainable.named_parameters() if p.requires_grad]
    assert names and all(n.endswith(".delta") for n in names)


def test_a_saved_config_reused_for_a_new_adapter(saved):
    folder, inputs, _ = saved
    config = GeoRAConfig.from_pretrained(folder)
    model = get_peft_model(make_tiny_model(), config)
    with pytest.raises(RuntimeError, match="init_from_checkpoint=False"):
        logits(model, inputs)
    config = GeoRAConfig.from_pretrained(folder)
    config.init_from_checkpoint = False
    base = make_tiny_model()
    expected = logits(base, inputs)
    assert torch.equal(logits(get_peft_model(base, config), inputs), expected)


def test_saved_non_default_adapter_round_trip(tmp_path):
    model = trained_geora()
    model.add_adapter("other", GeoRAConfig(r=2, rho=0.3))
    inputs = tiny_inputs()
    model.set_adapter("other")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".other." in n:
                p.add_(0.05)
    expected = logits(model, inputs)
    model.save_pretrained(tmp_path, selected_adapters=["other"])
    loaded = PeftModel.from_pretrained(make_tiny_model(), tmp_path / "other")
    assert torch.equal(logits(loaded, inputs), expected)


def test_a_loaded_adapter_no_longer_needs_its_folder(saved):
    """TRL's GRPOTrainer (beta > 0) and DPOTrainer (ref_model=None) call ``add_adapter("ref", peft_config["default"])``
    on a loaded adapter and copy "default"'s parameters into it; the source folder may be gone by then."""
    folder, inputs, expected = saved
    model = PeftModel.from_pretrained(make_tiny_model(), folder, is_trainable=True)
    shutil.rmtree(folder)
    model.add_adapter("ref", model.peft_config["default"])
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, param in params.items():
            if ".default." in name:
                params[name.replace(".default.", ".ref.")].copy_(param)
    model.eval()
    model.set_adapter("ref")
    assert torch.equal(logits(model, inputs), expected)  # same anchors (reused), same deltas: the same policy


def test_bin_serialization_round_trips_and_exports(saved, tmp_path, no_decomposition):
    """``save_pretrained(..., safe_serialization=False)`` writes ``adapter_model.bin``: it loads bit for bit, and the
    LoRA export and ``inspect`` read it too."""
    folder, inputs, expected = saved
    model = PeftModel.from_pretrained(make_tiny_model(), folder)
    model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "adapter_model.bin").is_file()
    assert not (tmp_path / "bin" / "adapter_model.safetensors").exists()
    with base_check("raise"):
        reloaded = PeftModel.from_pretrained(make_tiny_model(), tmp_path / "bin")
    assert torch.equal(logits(reloaded, inputs), expected)
    peft_geora.export_lora(tmp_path / "bin", tmp_path / "lora")
    lora = PeftModel.from_pretrained(make_tiny_model(), tmp_path / "lora")
    torch.testing.assert_close(logits(lora, inputs), expected, rtol=1e-5, atol=1e-5)
    from peft_geora_apps.inspect_adapter import load_adapter

    config, modules = load_adapter(tmp_path / "bin")
    assert config["peft_type"] == "GEORA" and len(modules) == 14 and all("A_delta" in m for m in modules.values())
