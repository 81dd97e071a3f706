"""GeoRA layers: the anchored formula ``W x + s (B A x - B0 A0 x)`` and its delta, initialised from the functional
core (Linear and Conv1D), the decomposition reused or skipped, ranks capped, anchors kept in float32, and merge /
unmerge / unload exact where the math allows."""

from __future__ import annotations

import math
import re

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer

from peft_geora import AnchoredA, AnchoredB, GeoRAConfig
from peft_geora.functional import geora_init_factors

from ..conftest import (
    assert_bitwise_equal,
    decompositions_forbidden,
    full_factors,
    geora_layers,
    logits,
    make_tiny_model,
    state_snapshot,
    tiny_inputs,
    train_steps,
    trained_geora,
)


@pytest.mark.parametrize("autocast_adapter_dtype", [True, False])
def test_bf16_adapter_dtypes_stay_exact(autocast_adapter_dtype):
    model = make_tiny_model("llama", dtype=torch.bfloat16)
    inputs = tiny_inputs()
    base = logits(model, inputs)
    peft_model = get_peft_model(model, GeoRAConfig(r=8), autocast_adapter_dtype=autocast_adapter_dtype)
    layer = next(iter(geora_layers(peft_model).values()))
    expected = torch.float32 if autocast_adapter_dtype else torch.bfloat16
    assert layer.lora_A["default"].delta.dtype == expected
    assert torch.equal(logits(peft_model, inputs), base)


def test_layer_computes_the_anchored_formula_and_delta():
    model = make_tiny_model("llama")
    peft_model = get_peft_model(model, GeoRAConfig(r=4, lora_alpha=8, lora_dropout=0.0))
    train_steps(peft_model, tiny_inputs())
    layer = peft_model.base_model.model.model.layers[1].mlp.down_proj
    a, a0, b, b0 = full_factors(layer)
    assert isinstance(layer.lora_A["default"], AnchoredA) and isinstance(layer.lora_B["default"], AnchoredB)
    s = layer.scaling["default"]
    assert s == 2.0
    x = torch.randn(3, layer.in_features)
    w = layer.get_base_layer().weight
    with torch.no_grad():
        expected = x @ w.T + s * (x @ a.T @ b.T - x @ a0.T @ b0.T)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
        delta = layer.get_delta_weight("default")
        torch.testing.assert_close(delta, s * (b @ a - b0 @ a0))
        # the effective rank-2r LoRA factors give the same product
        torch.testing.assert_close(layer.lora_B["default"].weight @ layer.lora_A["default"].weight, b @ a - b0 @ a0)


@pytest.mark.parametrize(
    "convention, scale",
    [
        ("paper", {}),
        ("pissa", {"scale_divisor": 2.0}),
        ("orthonormal", {"uniform_scale": True}),
    ],
)
def test_init_equals_the_functional_core(convention, scale):
    model = make_tiny_model("llama")
    inputs = tiny_inputs()
    base = logits(model, inputs)
    w = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    config = GeoRAConfig(r=6, lora_alpha=12, rho=0.3, svd_solver="exact", scale_convention=convention)
    peft_model = get_peft_model(model, config)
    assert torch.equal(logits(peft_model, inputs), base)  # every convention is exact at init
    layer = peft_model.base_model.model.model.layers[0].mlp.up_proj
    a0, b0 = geora_init_factors(w, 6, rho=0.3, svd_solver="exact", **scale)
    assert torch.equal(layer.lora_A["default"].anchor, a0)
    assert torch.equal(layer.lora_B["default"].anchor, b0)
    assert not layer.lora_A["default"].delta.any() and not layer.lora_B["default"].delta.any()


def test_merge_at_init_is_exact_and_merged_matches_adapter():
    model = make_tiny_model("llama")
    inputs = tiny_inputs()
    base = logits(model, inputs)
    peft_model = get_peft_model(model, GeoRAConfig(r=4))
    weights = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "base_layer.weight" in n}
    peft_model.merge_adapter()
    for n, p in peft_model.named_parameters():
        if n in weights:
            assert torch.equal(p, weights[n])  # delta is exactly zero at init
    peft_model.unmerge_adapter()
    train_steps(peft_model, inputs)
    adapted = logits(peft_model, inputs)
    peft_model.merge_adapter()
    torch.testing.assert_close(logits(peft_model, inputs), adapted, rtol=1e-4, atol=1e-5)
    peft_model.unmerge_adapter()
    with peft_model.disable_adapter():
        torch.testing.assert_close(logits(peft_model, inputs), base, rtol=1e-5, atol=1e-6)


def test_conv1d_target_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=32)).eval()
    inputs = tiny_inputs()
    base = logits(model, inputs)
    w = model.transformer.h[0].attn.c_attn.weight.detach().clone()  # Conv1D: (in, out)
    peft_model = get_peft_model(model, GeoRAConfig(r=4, target_modules=["c_attn", "c_fc"], svd_solver="exact"))
    assert torch.equal(logits(peft_model, inputs), base)
    layer = peft_model.base_model.model.transformer.h[0].attn.c_attn
    a0, b0 = geora_init_factors(w.T, 4, svd_solver="exact")
    torch.testing.assert_close(layer.lora_B["default"].anchor @ layer.lora_A["default"].anchor, b0 @ a0)
    assert layer.get_delta_weight("default").shape == w.shape


def test_init_weights_false_gives_a_non_identity_adapter_without_svd():
    model = make_tiny_model("llama")
    inputs = tiny_inputs()
    base = logits(model, inputs)
    with decompositions_forbidden():  # any decomposition, by whatever path, fails
        peft_model = get_peft_model(model, GeoRAConfig(r=4, init_weights=False))
    assert not torch.allclose(logits(peft_model, inputs), base)
    with peft_model.disable_adapter():
        assert torch.equal(logits(peft_model, inputs), base)


def test_second_adapter_reuses_the_decomposition(monkeypatch):
    import peft_geora.tuner.layer as layer_module

    model = make_tiny_model("llama")
    inputs = tiny_inputs()
    peft_model = get_peft_model(model, GeoRAConfig(r=4))
    calls = []
    original = layer_module.geora_decompose
    monkeypatch.setattr(layer_module, "geora_decompose", lambda *a, **k: calls.append(1) or original(*a, **k))
    with decompositions_forbidden():  # the same settings: not one decomposition, by any path
        peft_model.add_adapter("second", GeoRAConfig(r=4))
    assert calls == []
    peft_model.add_adapter("third", GeoRAConfig(r=4, rho=0.3))
    assert len(calls) == 14
    # the paper's factors do not depend on the LoRA scaling, PiSSA's and the orthonormal ones' settings do
    with decompositions_forbidden():
        peft_model.add_adapter("other_alpha", GeoRAConfig(r=4, lora_alpha=16))
    peft_model.add_adapter("pissa_a", GeoRAConfig(r=4, lora_alpha=16, scale_convention="pissa"))
    peft_model.add_adapter("pissa_b", GeoRAConfig(r=4, lora_alpha=32, scale_convention="pissa"))
    peft_model.add_adapter("orthonormal", GeoRAConfig(r=4, scale_convention="orthonormal"))
    assert len(calls) == 14 * 4
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert torch.equal(layer.lora_A["second"].anchor, layer.lora_A["default"].anchor)
    peft_model.set_adapter("third")
    with peft_model.disable_adapter():
        base = logits(peft_model, inputs)
    assert torch.equal(logits(peft_model, inputs), base)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_a_rank_larger_than_a_target_is_capped_with_its_scaling_kept(use_rslora, caplog, tmp_path):
    """As LoRA accepts any rank, GeoRA accepts it too: a layer smaller than r gets rank min(out, in) (a top-r SVD has
    no more components), with the alpha that keeps its scaling, recorded in the config so the adapter reloads."""
    model = make_tiny_model("llama", num_key_value_heads=1, head_dim=16)  # k_proj / v_proj are 16 x 64
    inputs = tiny_inputs()
    base = logits(model, inputs)
    with caplog.at_level("WARNING", logger="peft_geora.tuner.layer"):
        peft_model = get_peft_model(model, GeoRAConfig(r=32, lora_alpha=64, use_rslora=use_rslora))
    assert re.search(
        r"r=32 is larger than min\(out, in\)=16 of target module 'model.layers.0.self_attn.k_proj'", caplog.text
    )
    layers = peft_model.base_model.model.model.layers
    k_proj, q_proj = layers[0].self_attn.k_proj, layers[0].self_attn.q_proj
    assert k_proj.r["default"] == 16 and q_proj.r["default"] == 32
    assert math.isclose(k_proj.scaling["default"], q_proj.scaling["default"], rel_tol=1e-12)
    assert torch.equal(logits(peft_model, inputs), base)
    train_steps(peft_model, inputs)
    expected = logits(peft_model.eval(), inputs)
    peft_model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(make_tiny_model("llama", num_key_value_heads=1, head_dim=16), tmp_path)
    assert reloaded.base_model.model.model.layers[1].self_attn.v_proj.r["default"] == 16
    assert torch.equal(logits(reloaded, inputs), expected)


def test_anchors_stay_float32_through_every_cast_and_placement():
    """``model.to(bf16)``, ``.half()``, ``.float()`` and PEFT's placement on a bf16 base move the anchors but never
    round them; the trainable deltas take the dtype asked for, as LoRA's factors do."""
    peft_model = get_peft_model(make_tiny_model(), GeoRAConfig(r=4))
    anchors = {n: b.clone() for n, b in peft_model.named_buffers() if n.endswith(".anchor")}
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.float()):
        cast(peft_model)
        delta_dtypes = {p.dtype for n, p in peft_model.named_parameters() if n.endswith(".delta")}
        assert len(delta_dtypes) == 1 and delta_dtypes == {peft_model.base_model.model.lm_head.weight.dtype}
        assert all(torch.equal(b, anchors[n]) for n, b in peft_model.named_buffers() if n.endswith(".anchor"))
    on_bf16 = get_peft_model(make_tiny_model(dtype=torch.bfloat16), GeoRAConfig(r=4), autocast_adapter_dtype=False)
    assert {b.dtype for n, b in on_bf16.named_buffers() if n.endswith(".anchor")} == {torch.float32}
    assert {p.dtype for n, p in on_bf16.named_parameters() if n.endswith(".delta")} == {torch.bfloat16}


def test_merge_unmerge_unload_are_exact_where_the_math_allows():
    base = make_tiny_model()
    inputs = tiny_inputs()
    before = state_snapshot(base)
    base_logits = logits(base, inputs)
    model = trained_geora()
    adapted = logits(model, inputs)
    for safe in (False, True):
        model.merge_adapter(safe_merge=safe) if not safe else model.base_model.merge_adapter(safe_merge=True)
        torch.testing.assert_close(logits(model, inputs), adapted, rtol=1e-5, atol=1e-5)
        model.unmerge_adapter()
        torch.testing.assert_close(logits(model, inputs), adapted, rtol=1e-5, atol=1e-5)
    merged = trained_geora().merge_and_unload()
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    torch.testing.assert_close(logits(merged, inputs), adapted, rtol=1e-5, atol=1e-5)
    unloaded = trained_geora().unload()
    assert_bitwise_equal(before, state_snapshot(unloaded))
    assert torch.equal(logits(unloaded, inputs), base_logits)


def _merge_cycle_drift(model, cycles: int = 100) -> float:
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer.weight" in n}
    for _ in range(cycles):
        model.merge_adapter()
        model.unmerge_adapter()
    params = dict(model.named_parameters())
    return sum((params[n].float() - w.float()).abs().sum().item() for n, w in weights.items())


def test_bf16_merge_cycles_drift_no_more_than_lora():
    geora = trained_geora(GeoRAConfig(r=4), dtype=torch.bfloat16)
    lora = get_peft_model(make_tiny_model(dtype=torch.bfloat16), LoraConfig(r=4, target_modules="all-linear"))
    # give LoRA a delta of the same size as GeoRA's in every layer
    with torch.no_grad():
        for g, lo in zip(
            (m for m in geora.modules() if isinstance(m, LoraLayer)),
            (m for m in lora.modules() if isinstance(m, LoraLayer)),
        ):
            lo.lora_B["default"].weight.normal_()
            ratio = g.get_delta_weight("default").float().norm() / lo.get_delta_weight("default").float().norm()
            lo.lora_B["default"].weight.mul_(ratio)
    geora_drift, lora_drift = _merge_cycle_drift(geora), _merge_cycle_drift(lora)
    assert lora_drift > 0
    assert geora_drift <= 1.1 * lora_drift, (geora_drift, lora_drift)
