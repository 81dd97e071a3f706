"""GeoRA on mixture-of-experts models: the experts' 3-D parameters and the router (PEFT's ``target_parameters``).

The tiny Qwen3-MoE, Mixtral and gpt-oss models of ``tests/moe_models.py``.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import peft_geora
from peft_geora import base_check
from peft_geora.functional import geora_decompose

from ..conftest import decompositions_forbidden, logits, tiny_inputs
from ..grpo_utils import kl_per_step, make_grpo_trainer
from ..moe_models import ARCHS, EXPERTS, GPT_OSS_TARGETS, build, expert_matrices, geora_config, perturb, wrappers


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_the_experts_are_targeted_as_lora_targets_them(arch):
    lora_config = LoraConfig(r=4, target_modules="all-linear")
    if arch == "gpt_oss":
        lora_config.target_parameters = GPT_OSS_TARGETS
    lora = get_peft_model(build(arch), lora_config)
    geora = get_peft_model(build(arch), geora_config(arch))
    adapted = {n for n, m in lora.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {n for n, m in geora.named_modules() if hasattr(m, "lora_A")}
    assert set(lora.peft_config["default"].target_parameters) == set(geora.peft_config["default"].target_parameters)
    assert len(wrappers(geora)) == 2 * (2 if arch == "gpt_oss" else 3)  # layers x (gate_up, down[, router])


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exact_at_init_and_each_expert_is_decomposed_on_its_own(arch, dtype):
    inputs = tiny_inputs()
    model = build(arch, dtype)
    base = logits(model, inputs)
    peft_model = get_peft_model(model, geora_config(arch))
    assert torch.equal(logits(peft_model, inputs), base)
    key = "model.layers.1.mlp.experts.down_proj"
    wrapper = wrappers(peft_model)[key]
    r, experts = 4, wrapper.num_experts
    assert experts == EXPERTS
    a0 = wrapper.lora_A["default"].anchor.reshape(experts, r, -1)
    b0 = wrapper.lora_B["default"].anchor.reshape(-1, r, experts).permute(2, 0, 1)
    for e, matrix in enumerate(expert_matrices(wrapper)):
        alone = geora_decompose(matrix, r, svd_solver="exact").factors
        torch.testing.assert_close(b0[e] @ a0[e], alone.B @ alone.A, rtol=1e-4, atol=1e-5)


def test_orthonormal_factors_on_the_experts():
    inputs = tiny_inputs()
    model = build("mixtral", torch.float32)
    base = logits(model, inputs)
    peft_model = get_peft_model(model, geora_config("mixtral", scale_convention="orthonormal"))
    assert torch.equal(logits(peft_model, inputs), base)
    wrapper = wrappers(peft_model)["model.layers.1.mlp.experts.down_proj"]
    r, experts = 4, wrapper.num_experts
    a0 = wrapper.lora_A["default"].anchor.reshape(experts, r, -1)
    for e, matrix in enumerate(expert_matrices(wrapper)):
        alone = geora_decompose(matrix, r, svd_solver="exact", uniform_scale=True).factors
        torch.testing.assert_close(a0[e] @ a0[e].T, alone.A @ alone.A.T, rtol=1e-4, atol=1e-5)  # c^2 times I


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_the_update_merge_disable_reload_and_lora_export(arch, tmp_path):
    inputs = tiny_inputs()
    base = logits(build(arch), inputs)
    peft_model = get_peft_model(build(arch), geora_config(arch))
    perturb(peft_model)
    trained = logits(peft_model, inputs)
    assert not torch.equal(trained, base)
    wrapper = wrappers(peft_model)["model.layers.0.mlp.experts.gate_up_proj"]
    r, experts, s = wrapper.r["default"], EXPERTS, wrapper.scaling["default"]  # Mixtral's fused gate_up: 2r
    lora_a, lora_b = wrapper.lora_A["default"], wrapper.lora_B["default"]
    a = (lora_a.anchor + lora_a.delta).detach().reshape(experts, r, -1)
    a0 = lora_a.anchor.reshape(experts, r, -1)
    b = (lora_b.anchor + lora_b.delta).detach().reshape(-1, r, experts).permute(2, 0, 1)
    b0 = lora_b.anchor.reshape(-1, r, experts).permute(2, 0, 1)
    expected = s * (b @ a - b0 @ a0)  # (E, out, in)
    delta = wrapper.get_delta_weight("default")
    got = delta if wrapper._did_swap_in_out_features else delta.transpose(1, 2)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    with peft_model.disable_adapter():
        assert torch.equal(logits(peft_model, inputs), base)
    peft_model.merge_adapter()
    torch.testing.assert_close(logits(peft_model, inputs), trained, rtol=1e-4, atol=1e-5)
    peft_model.unmerge_adapter()
    torch.testing.assert_close(logits(peft_model, inputs), trained, rtol=1e-5, atol=1e-6)

    peft_model.save_pretrained(tmp_path / "geora")
    fresh = build(arch)
    with decompositions_forbidden(), base_check("raise"):  # loading decomposes nothing, by whatever path
        reloaded = PeftModel.from_pretrained(fresh, tmp_path / "geora")
    assert torch.equal(logits(reloaded, inputs), trained)

    peft_geora.save_as_lora(peft_model, tmp_path / "lora")
    lora = PeftModel.from_pretrained(build(arch), tmp_path / "lora")
    assert all(type(m).__module__.startswith("peft.") for m in lora.modules() if hasattr(m, "lora_A"))
    assert lora.peft_config["default"].r == 8 and lora.peft_config["default"].target_parameters
    torch.testing.assert_close(logits(lora, inputs), trained, rtol=1e-4, atol=1e-5)


def test_a_second_adapter_on_the_experts(tmp_path):
    inputs = tiny_inputs()
    peft_model = get_peft_model(build("qwen3_moe"), geora_config("qwen3_moe"))
    perturb(peft_model)
    first = logits(peft_model, inputs)
    peft_model.add_adapter("second", geora_config("qwen3_moe", rho=0.3))
    peft_model.set_adapter("second")
    base = logits(build("qwen3_moe"), inputs)
    assert torch.equal(logits(peft_model, inputs), base)  # the new adapter starts exact
    peft_model.set_adapter("default")
    assert torch.equal(logits(peft_model, inputs), first)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_grpo_trains_the_experts_with_an_exact_kl_reference(arch):
    trainer = make_grpo_trainer(build(arch), peft_config=geora_config(arch), beta=0.1, max_steps=2)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "experts" in n and "delta" in n}
    assert before
    trainer.train()
    assert kl_per_step(trainer)[0] == 0.0
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(after[n], t) for n, t in before.items())


def test_combining_adapters_on_the_experts_is_refused_as_for_lora():
    """PEFT's add_weighted_adapter refuses adapters on parameters (LoRA's too), before anything is changed."""
    peft_model = get_peft_model(build("qwen3_moe"), geora_config("qwen3_moe"), "a")
    peft_model.add_adapter("b", geora_config("qwen3_moe", rho=0.3))
    with pytest.raises(ValueError, match="does not support targeting nn.Parameter"):
        peft_model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "ab", combination_type="cat")
    assert set(peft_model.peft_config) == {"a", "b"} and peft_model.peft_config["a"].r == 4
