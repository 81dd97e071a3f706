"""TRL's GRPOTrainer with GeoRA, unchanged: trains the factors only, exact KL reference, vLLM weight sync."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from peft_geora import GeoRAConfig

from ..conftest import full_factors, make_tiny_model, tiny_inputs
from ..grpo_utils import kl_per_step, make_grpo_trainer


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def snapshot(model, keep):
    return {n: t.detach().clone() for n, t in list(model.named_parameters()) + list(model.named_buffers()) if keep(n)}


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_peft_config_path_trains_factors_with_exact_kl_reference(tmp_path, dropout):
    base = make_tiny_model()
    inputs = tiny_inputs()
    base_logits = logits(base, inputs)
    trainer = make_grpo_trainer(base, peft_config=GeoRAConfig(r=4, lora_dropout=dropout), beta=0.1, max_steps=3)
    model = trainer.model
    factors = snapshot(model, lambda n: n.endswith(".delta"))
    frozen = snapshot(model, lambda n: n.endswith((".anchor", "base_layer.weight")))
    trainer.train()
    kl = kl_per_step(trainer)
    assert kl[0] == 0.0  # the policy equals the reference at step 1, bit for bit
    assert any(k > 0 for k in kl[1:])
    after = dict(list(model.named_parameters()) + list(model.named_buffers()))
    assert all(not torch.equal(after[n], t) for n, t in factors.items() if "lora_B" in n)
    assert all(torch.equal(after[n], t) for n, t in frozen.items())
    model.eval()
    with model.disable_adapter():  # TRL's reference: the model as it was at trainer start
        assert torch.equal(logits(model, inputs), base_logits)
    trainer.save_model(str(tmp_path / "saved"))
    assert json.loads((tmp_path / "saved" / "adapter_config.json").read_text())["peft_type"] == "GEORA"
    reloaded = PeftModel.from_pretrained(make_tiny_model(), tmp_path / "saved")
    assert torch.equal(logits(reloaded, inputs), logits(model, inputs))


def test_peft_model_path_ref_adapter_is_the_start_adapter():
    model = get_peft_model(make_tiny_model(), GeoRAConfig(r=4))
    with torch.no_grad():  # a pretrained (non-identity) adapter, as when re-training one
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    inputs = tiny_inputs()
    start = logits(model.eval(), inputs)
    trainer = make_grpo_trainer(model, beta=0.1, max_steps=3)
    assert set(model.peft_config) == {"default", "ref"}
    trainer.train()
    kl = kl_per_step(trainer)
    assert kl[0] == 0.0 and any(k > 0 for k in kl[1:])
    model.eval()
    model.set_adapter("ref")
    assert torch.equal(logits(model, inputs), start)
    model.set_adapter("default")
    assert not torch.equal(logits(model, inputs), start)


def test_a_loaded_adapter_trains_with_a_ref_adapter_after_its_folder_is_gone(tmp_path):
    """``PeftModel.from_pretrained(..., is_trainable=True)`` from a scratch folder that is deleted before training:
    GRPOTrainer's "ref" adapter (beta > 0) needs nothing from it, and starts as the loaded policy."""
    import shutil

    from peft import PeftModel

    model = get_peft_model(make_tiny_model(), GeoRAConfig(r=4))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "adapter")
    inputs = tiny_inputs()
    start = logits(model.eval(), inputs)
    loaded = PeftModel.from_pretrained(make_tiny_model(), tmp_path / "adapter", is_trainable=True)
    shutil.rmtree(tmp_path / "adapter")
    trainer = make_grpo_trainer(loaded, beta=0.1, max_steps=2)
    trainer.train()
    assert kl_per_step(trainer)[0] == 0.0
    loaded.eval()
    loaded.set_adapter("ref")
    assert torch.equal(logits(loaded, inputs), start)


def test_peft_pissa_gets_the_reference_wrong_where_geora_does_not():
    """The contrast the anchored design exists for: PEFT's PiSSA mutates W, so its 'disabled' model, TRL's KL
    reference, is W_res and not the model training started from; GeoRA leaves W alone, so its reference is the base
    model bit for bit and the KL at step 1 (policy == reference) is exactly 0. Same model, data and settings."""
    inputs = tiny_inputs()
    base = logits(make_tiny_model(), inputs)
    methods = {"pissa": LoraConfig(r=4, init_lora_weights="pissa"), "geora": GeoRAConfig(r=4)}
    kl, disabled = {}, {}
    for name, config in methods.items():
        trainer = make_grpo_trainer(make_tiny_model(), peft_config=config, beta=0.1)
        trainer.train()
        kl[name] = kl_per_step(trainer)
        model = trainer.model.eval()
        with model.disable_adapter():
            disabled[name] = logits(model, inputs)
    assert len(kl["pissa"]) == len(kl["geora"]) == 2
    assert kl["pissa"][0] > 0 and not torch.equal(disabled["pissa"], base)  # PiSSA's reference is W_res
    assert kl["geora"][0] == 0.0 and torch.equal(disabled["geora"], base)  # GeoRA's reference is the base model


@pytest.mark.parametrize("bf16", [False, True])
def test_gradient_checkpointing_and_bf16_autocast(bf16):
    trainer = make_grpo_trainer(
        make_tiny_model(), peft_config=GeoRAConfig(r=4), beta=0.1, gradient_checkpointing=True, bf16=bf16
    )
    assert trainer.args.gradient_checkpointing
    before = snapshot(trainer.model, lambda n: n.endswith("lora_B.default.delta"))
    trainer.train()
    assert kl_per_step(trainer)[0] == 0.0
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(after[n], t) for n, t in before.items())


def test_quantized_base_fails_at_trainer_construction():
    model = make_tiny_model()
    layer = model.model.layers[0].self_attn.q_proj
    layer.weight = nn.Parameter(torch.zeros_like(layer.weight, dtype=torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match="'model.layers.0.self_attn.q_proj' is a quantized layer"):
        make_grpo_trainer(model, peft_config=GeoRAConfig(r=4))


# ---- vLLM ----


def _trl_weight_sync(model):
    """Run TRL's own merged-weight sync loop (merge, yield vLLM names and weights, unmerge) without vLLM."""
    from accelerate import Accelerator
    from trl.distributed import DistributedBackend
    from trl.generation.vllm_generation import VLLMGeneration

    sync = VLLMGeneration.__new__(VLLMGeneration)
    sync.model = model
    sync._dist = DistributedBackend(Accelerator(cpu=True))
    return {name: tensor.clone() for name, tensor in sync._iter_named_params()}


def test_vllm_merged_weight_sync_sends_the_anchored_weights():
    model = get_peft_model(make_tiny_model(), GeoRAConfig(r=4))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sent = _trl_weight_sync(model)
    base_names = set(make_tiny_model().state_dict())
    assert set(sent) == base_names  # vLLM's names; no adapter tensor, no anchor
    checked = 0
    for module_name, module in model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            a, a0, b, b0 = full_factors(module)
            w = module.get_base_layer().weight
            expected = w + module.scaling["default"] * (b @ a - b0 @ a0)
            torch.testing.assert_close(sent[f"{module_name}.weight"], expected, rtol=1e-6, atol=1e-6)
            checked += 1
    assert checked == 14  # every adapted projection was sent merged
    after = dict(model.named_parameters())
    assert not any(m.merged for m in model.modules() if hasattr(m, "merged_adapters"))
    for n, p in before.items():
        torch.testing.assert_close(after[n], p, rtol=0, atol=1e-6)
