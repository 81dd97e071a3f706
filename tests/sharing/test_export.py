"""The LoRA export (``save_as_lora``, ``export_lora``, ``peft-geora export-lora``): a stock rank-2r LoRA that loads
without peft_geora and computes what the GeoRA adapter computes, or the best rank-k approximation with its error."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

import peft_geora
import peft_geora_apps.cli
from peft_geora import GeoRAConfig

from ..conftest import logits, make_tiny_model, tiny_inputs, trained_geora

EXPORT_CONFIGS = {
    "plain": GeoRAConfig(r=4),
    "rslora": GeoRAConfig(r=4, lora_alpha=12, use_rslora=True),
    "patterns": GeoRAConfig(r=4, rank_pattern={"q_proj": 2, "down_proj": 6}, alpha_pattern={"v_proj": 20}),
}


@pytest.mark.parametrize("name", sorted(EXPORT_CONFIGS))
def test_lora_export_loads_without_peft_geora(name, tmp_path):
    model = trained_geora(EXPORT_CONFIGS[name])
    inputs = tiny_inputs()
    expected = logits(model, inputs)
    base_dir = tmp_path / "base"
    make_tiny_model().save_pretrained(base_dir)
    peft_geora.save_as_lora(model, tmp_path / "api")
    model.save_pretrained(tmp_path / "geora")
    assert peft_geora_apps.cli.main(["export-lora", str(tmp_path / "geora"), str(tmp_path / "cli")]) == 0
    config = json.loads((tmp_path / "cli" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and not config["use_rslora"]
    torch.save(inputs, tmp_path / "inputs.pt")
    script = f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        from peft import PeftModel
        inputs = torch.load({str(tmp_path / "inputs.pt")!r})
        for name in ("api", "cli"):
            base = AutoModelForCausalLM.from_pretrained({str(base_dir)!r})
            model = PeftModel.from_pretrained(base, {str(tmp_path)!r} + "/" + name)
            plain = AutoModelForCausalLM.from_pretrained({str(base_dir)!r})
            plain.load_adapter({str(tmp_path)!r} + "/" + name)
            with torch.no_grad():
                torch.save([model(**inputs).logits, plain(**inputs).logits], {str(tmp_path)!r} + f"/{{name}}.pt")
        assert "peft_geora" not in sys.modules
    """
    subprocess.run([sys.executable, "-c", textwrap.dedent(script)], check=True, cwd=tmp_path)
    for name in ("api", "cli"):
        for out in torch.load(tmp_path / f"{name}.pt"):
            assert ((out - expected).norm() / expected.norm()).item() < 1e-5


def test_rank_k_export_is_the_best_rank_k_update_and_reports_its_error(tmp_path, capsys):
    """``rank=k`` writes, per module, the Eckart-Young optimum of the update at rank k (checked against a dense SVD of
    ``dW``), its relative error in ``geora_export.json``, and a plain LoraConfig that stock PEFT reads silently."""
    model = trained_geora(GeoRAConfig(r=4, rank_pattern={"q_proj": 2}))
    model.save_pretrained(tmp_path / "geora")
    peft_geora.save_as_lora(model, tmp_path / "api", rank=3)
    assert (
        peft_geora_apps.cli.main(["export-lora", str(tmp_path / "geora"), str(tmp_path / "cli"), "--rank", "3"]) == 0
    )
    assert "--max-lora-rank 3" in capsys.readouterr().out
    for name in ("api", "cli"):
        folder = tmp_path / name
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["r"] == 3 and config["peft_type"] == "LORA" and not config["use_rslora"]
        assert set(config) <= set(LoraConfig.__dataclass_fields__) | {"peft_type"}
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            LoraConfig.from_pretrained(folder)
        errors = json.loads((folder / "geora_export.json").read_text())["relative_error"]
        tensors = load_file(folder / "adapter_model.safetensors")
        assert len(errors) == 14
        for module, layer in model.base_model.model.named_modules():
            if not hasattr(layer, "lora_A"):
                continue
            key = f"base_model.model.{module}"
            delta = layer.get_delta_weight("default").double()
            sigma = torch.linalg.svdvals(delta)
            k = min(3, 2 * layer.r["default"])
            optimum = float(sigma[k:].square().sum().sqrt() / sigma.square().sum().sqrt())
            scaling = config["alpha_pattern"].get(re.escape(module), config["lora_alpha"]) / a_rank(tensors, key)
            approx = scaling * tensors[f"{key}.lora_B.weight"].double() @ tensors[f"{key}.lora_A.weight"].double()
            assert a_rank(tensors, key) == k
            assert math.isclose(errors[key], optimum, rel_tol=1e-6, abs_tol=1e-9)
            assert math.isclose(float((delta - approx).norm() / delta.norm()), optimum, rel_tol=1e-4, abs_tol=1e-7)
    with pytest.raises(ValueError, match="rank must be a positive int"):
        peft_geora.save_as_lora(model, tmp_path / "bad", rank=0)


def a_rank(tensors: dict, key: str) -> int:
    return tensors[f"{key}.lora_A.weight"].shape[0]


def test_export_refuses_a_non_geora_folder(tmp_path):
    get_peft_model(make_tiny_model(), LoraConfig(r=2)).save_pretrained(tmp_path / "lora")
    with pytest.raises(ValueError, match="'LORA' adapter, not GEORA"):
        peft_geora.export_lora(tmp_path / "lora", tmp_path / "out")
