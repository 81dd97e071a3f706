"""TRL's async GRPO with vLLM adapter sync (``sharing/vllm_sync.py`` patches it): a GeoRA policy is served as its
rank-2r LoRA export, which computes the policy; a plain LoRA still goes through TRL's own code."""

from __future__ import annotations

import json

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from peft_geora import GeoRAConfig

from ..conftest import logits, make_tiny_model, tiny_inputs


def test_async_adapter_only_sync_serves_the_rank_2r_export(tmp_path):
    from accelerate import Accelerator
    from trl.experimental.async_grpo import async_grpo_trainer as async_grpo

    model = get_peft_model(make_tiny_model(), GeoRAConfig(r=4))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    inputs = tiny_inputs()
    expected = logits(model.eval(), inputs)
    config = async_grpo.validate_lora_for_vllm_sync(model)
    assert type(config) is LoraConfig and config.r == 8  # what the server must be able to hold
    async_grpo.save_lora_adapter(model, Accelerator(cpu=True), "default", str(tmp_path / "policy-v1"))
    saved = json.loads((tmp_path / "policy-v1" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == 8
    served = PeftModel.from_pretrained(make_tiny_model(), tmp_path / "policy-v1")
    torch.testing.assert_close(logits(served, inputs), expected, rtol=1e-5, atol=1e-5)
    # a plain LoRA still goes through TRL's own code
    lora = get_peft_model(make_tiny_model(), LoraConfig(r=4, target_modules="all-linear"))
    async_grpo.save_lora_adapter(lora, Accelerator(cpu=True), "default", str(tmp_path / "lora-v1"))
    assert json.loads((tmp_path / "lora-v1" / "adapter_config.json").read_text())["r"] == 4
