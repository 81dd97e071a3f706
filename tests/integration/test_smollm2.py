"""GeoRA on the real SmolLM2-135M-Instruct: the adapted model generates exactly what the base model does."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_geora import GeoRAConfig, GeoRALayer

pytestmark = pytest.mark.slow

PROMPTS = ["What is 12 + 7? Reply with only the number.", "Name a colour of the sky."]


def greedy(model, tokenizer, prompt: str, new_tokens: int = 20) -> torch.Tensor:
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return out[0, ids.shape[1] :]


def test_greedy_generation_identical_to_base(smollm2_path):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    base = [greedy(model, tokenizer, p) for p in PROMPTS]
    peft_model = get_peft_model(model, GeoRAConfig()).eval()
    assert sum(isinstance(m, GeoRALayer) for m in peft_model.modules()) == 30 * 7
    adapted = [greedy(peft_model, tokenizer, p) for p in PROMPTS]
    for b, a in zip(base, adapted):
        assert b.numel() == 20
        assert torch.equal(a, b)


def test_the_built_in_model_is_recorded_by_its_name_not_its_cache_folder(smollm2_path, tmp_path):
    """Adapters, their LoRA exports and model cards name the built-in model as the Hub model it comes from."""
    import json

    from huggingface_hub import ModelCard

    import peft_geora
    from peft_geora_apps.default_model import DEFAULT_MODEL_ID, load_default_model

    model, _ = load_default_model()
    assert model.name_or_path == DEFAULT_MODEL_ID
    config = GeoRAConfig(r=2, target_modules=["q_proj"], layers_to_transform=[0])
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(tmp_path / "geora")
    peft_geora.save_as_lora(peft_model, tmp_path / "lora")
    for folder in ("geora", "lora"):
        saved = json.loads((tmp_path / folder / "adapter_config.json").read_text())
        assert saved["base_model_name_or_path"] == DEFAULT_MODEL_ID
        assert ModelCard.load(tmp_path / folder / "README.md").data.base_model == DEFAULT_MODEL_ID
