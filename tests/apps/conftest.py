"""Saved GeoRA and LoRA adapters of the tiny Llama (with their base), and the diagnostics ``inspect`` must print."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils.other import transpose
from transformers import AutoModelForCausalLM

from peft_geora import GeoRAConfig
from peft_geora.diagnostics import update_diagnostics

from ..conftest import make_tiny_model
from ..grpo_utils import one_torch_thread


@pytest.fixture(autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


def perturb_factors(model: torch.nn.Module, names: tuple[str, ...], scale: float, seed: int = 0) -> None:
    """Stand-in for training: move the trainable factors so that dW != 0."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(part in name for part in names):
                param.add_(scale * torch.randn(param.shape, generator=gen))


def expected_diagnostics(model: torch.nn.Module, top_k: int = 16) -> dict[str, dict[str, float]]:
    """The diagnostics computed directly on the in-memory PeftModel, keyed like the CLI's module column."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            with torch.no_grad():
                weight = transpose(module.get_base_layer().weight, module.fan_in_fan_out)
                delta = transpose(module.get_delta_weight("default"), module.fan_in_fan_out)
            stats = update_diagnostics(weight, delta, top_k)
            out[name.removeprefix("base_model.model.")] = stats
    return out


def saved_adapter(tmp_path, base_model, config, names, scale, folder):
    base_dir = tmp_path / "base"
    if not base_dir.exists():
        base_model.save_pretrained(base_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), config)
    perturb_factors(model, names, scale)
    model.save_pretrained(tmp_path / folder)
    return model, base_dir, tmp_path / folder


@pytest.fixture
def geora_adapter(tmp_path):
    config = GeoRAConfig(r=4, lora_alpha=8, rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 16})
    return saved_adapter(tmp_path, make_tiny_model(), config, ("delta",), 0.01, "geora")


@pytest.fixture
def lora_adapter(tmp_path):
    config = LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules="all-linear")
    return saved_adapter(tmp_path, make_tiny_model(), config, ("lora_B",), 0.01, "lora")


def table_rows(text: str) -> dict[str, list[str]]:
    return {line.split()[0]: line.split() for line in text.splitlines() if line.startswith("model.layers.")}
