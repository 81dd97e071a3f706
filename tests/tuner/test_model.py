"""GeoRA on tiny Llama / Qwen2 models: exact at init, anchored, only A and B train, merge uses s(BA - B0A0)."""

from __future__ import annotations

import math
import re

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from peft_geora import AnchoredA, AnchoredB, GeoRAConfig, GeoRALayer
from peft_geora.functional import geora_init_factors

from .conftest import assert_bitwise_equal, full_factors, make_tiny_model, state_snapshot, tiny_inputs


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def geora_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, GeoRALayer)}


def train_steps(model, inputs, steps=3, lr=1e-2):
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        out = model(**inputs, labels=inputs["input_ids"])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_at_init_equal_base_bitwise(arch, dtype):
    model = make_tiny_model(arch, dtype=dtype)
    inputs = tiny_inputs()
    base = logits(model, inputs)
    before = state_snapshot(model)
    peft_model = get_peft_model(model, GeoRAConfig(r=8))
    assert torch.equal(logits(peft_model, inputs), base)
    # the base weights are the very same bytes
    after = {
        k.replace("base_model.model.", "").replace(".base_layer", ""): v for k, v in peft_model.state_dict().items()
    }
    assert_bitwise_equal(before, {k: after[k] for k in before})
    assert len(geora_layers(peft_model)) == 2 * 7  # all linear projections, not the output head
    assert not isinstance(peft_model.base_model.model.lm_head, LoraLayer)


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


def test_train_mode_with_dropout_is_exact_at_init():
    model = make_tiny_model("llama")
    inputs = tiny_inputs()
    base = logits(model, inputs)
    peft_model = get_peft_model(model, GeoRAConfig(r=8, lora_dropout=0.3))
    peft_model.train()
    torch.manual_seed(123)
    assert torch.equal(logits(peft_model, inputs), base)


def test_after_training_disable_adapter_gives_base_and_only_factors_train():
    model = make_tiny_model("qwen2")
    inputs = tiny_inputs()
    base = logits(model, inputs)
    peft_model = get_peft_model(model, GeoRAConfig(r=4, lora_dropout=0.1))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A.default.delta", "lora_B.default.delta")) for n in trainable)
    buffers_before = {n: b.clone() for n, b in peft_model.named_buffers() if n.endswith(".anchor")}
    factors_before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    base_before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if not p.requires_grad}
    train_steps(peft_model, inputs)
    assert not torch.equal(logits(peft_model, inputs), base)
    with peft_model.disable_adapter():
        assert torch.equal(logits(peft_model, inputs), base)
    for n, p in peft_model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, factors_before[n]), f"{n} did not train"
        else:
            assert torch.equal(p, base_before[n]), f"{n} changed"
    for n, b in peft_model.named_buffers():
        if n in buffers_before:
            assert torch.equal(b, buffers_before[n]), f"{n} changed"


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


def test_init_equals_the_functional_core():
    model = make_tiny_model("llama")
    w = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    config = GeoRAConfig(r=6, lora_alpha=12, rho=0.3, svd_solver="exact", scale_convention="pissa")
    peft_model = get_peft_model(model, config)
    layer = peft_model.base_model.model.model.layers[0].mlp.up_proj
    a0, b0 = geora_init_factors(w, 6, rho=0.3, svd_solver="exact", scale_divisor=2.0)
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


def test_init_weights_false_gives_a_non_identity_adapter_without_svd(monkeypatch):
    import peft_geora.tuner.layer as layer_module

    def boom(*args, **kwargs):
        raise AssertionError("no decomposition with init_weights=False")

    monkeypatch.setattr(layer_module, "geora_decompose", boom)
    model = make_tiny_model("llama")
    inputs = tiny_inputs()
    base = logits(model, inputs)
    peft_model = get_peft_model(model, GeoRAConfig(r=4, init_weights=False))
    assert not torch.allclose(logits(peft_model, inputs), base)
    with peft_model.disable_adapter():
        assert torch.equal(logits(peft_model, inputs), base)


def test_rank_and_alpha_patterns():
    model = make_tiny_model("llama")
    config = GeoRAConfig(r=4, lora_alpha=8, rank_pattern={"q_proj": 2}, alpha_pattern={"q_proj": 6})
    peft_model = get_peft_model(model, config)
    q = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    v = peft_model.base_model.model.model.layers[0].self_attn.v_proj
    assert q.lora_A["default"].delta.shape[0] == 2 and q.scaling["default"] == 3.0
    assert v.lora_A["default"].delta.shape[0] == 4 and v.scaling["default"] == 2.0
    assert q.lora_A["default"].anchor.shape == (2, 64)


def test_second_adapter_reuses_the_decomposition(monkeypatch):
    import peft_geora.tuner.layer as layer_module

    model = make_tiny_model("llama")
    inputs = tiny_inputs()
    peft_model = get_peft_model(model, GeoRAConfig(r=4))
    calls = []
    original = layer_module.geora_decompose
    monkeypatch.setattr(layer_module, "geora_decompose", lambda *a, **k: calls.append(1) or original(*a, **k))
    peft_model.add_adapter("second", GeoRAConfig(r=4))
    assert calls == []
    peft_model.add_adapter("third", GeoRAConfig(r=4, rho=0.3))
    assert len(calls) == 14
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert torch.equal(layer.lora_A["second"].anchor, layer.lora_A["default"].anchor)
    peft_model.set_adapter("third")
    with peft_model.disable_adapter():
        base = logits(peft_model, inputs)
    assert torch.equal(logits(peft_model, inputs), base)


# ---- bad input: a clear error naming the module and value, and the model left as it was ----


def assert_untouched(model, before):
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    assert_bitwise_equal(before, state_snapshot(model))


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


def test_non_linear_target_raises_and_rolls_back():
    model = make_tiny_model("llama")
    before = state_snapshot(model)
    with pytest.raises(TypeError, match="target module 'model.embed_tokens' is a Embedding"):
        get_peft_model(model, GeoRAConfig(r=4, target_modules=["q_proj", "embed_tokens"]))
    assert_untouched(model, before)


def test_quantized_target_is_refused():
    model = make_tiny_model("llama")
    layer = model.model.layers[1].mlp.down_proj
    layer.weight = nn.Parameter(torch.zeros_like(layer.weight, dtype=torch.int8), requires_grad=False)
    before = state_snapshot(model)
    with pytest.raises(TypeError, match="'model.layers.1.mlp.down_proj' is a quantized layer.*not supported yet"):
        get_peft_model(model, GeoRAConfig(r=4))
    assert_untouched(model, before)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weight_raises_and_rolls_back(bad):
    model = make_tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = bad
    before = state_snapshot(model)
    with pytest.raises(ValueError, match="'model.layers.1.mlp.up_proj' contains NaN or Inf"):
        get_peft_model(model, GeoRAConfig(r=4))
    assert_untouched(model, before)


def test_failure_in_a_second_adapter_keeps_the_first():
    model = make_tiny_model("llama")
    peft_model = get_peft_model(model, GeoRAConfig(r=4))
    before = state_snapshot(peft_model)
    with torch.no_grad():
        peft_model.base_model.model.model.layers[1].mlp.up_proj.base_layer.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        peft_model.add_adapter("second", GeoRAConfig(r=4, rho=0.4))
    assert "second" not in peft_model.peft_config
    for m in peft_model.modules():
        if isinstance(m, LoraLayer):
            assert set(m.lora_A) == {"default"} and set(m.r) == {"default"}
    after = state_snapshot(peft_model)
    assert before.keys() == after.keys()


def test_tied_embeddings_with_ensure_weight_tying_are_refused_with_what_to_do():
    model = make_tiny_model(tie_word_embeddings=True)
    before = state_snapshot(model)
    config = GeoRAConfig(r=4, target_modules=["lm_head", "q_proj"], ensure_weight_tying=True)
    with pytest.raises(TypeError, match="ensure_weight_tying=True.*'model.embed_tokens'.*ensure_weight_tying=False"):
        get_peft_model(model, config)
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    assert_bitwise_equal(before, state_snapshot(model))


def test_the_tied_output_head_alone_is_adapted_and_exact_at_init():
    model = make_tiny_model(tie_word_embeddings=True)
    inputs = tiny_inputs()
    base = logits(model, inputs)
    with pytest.warns(UserWarning, match="ensure_weight_tying"):  # PEFT's own note, as for LoRA
        peft_model = get_peft_model(model, GeoRAConfig(r=4, target_modules=["lm_head"]))
    assert isinstance(peft_model.base_model.model.lm_head, LoraLayer)
    assert isinstance(peft_model.base_model.model.model.embed_tokens, torch.nn.Embedding)
    assert torch.equal(logits(peft_model, inputs), base)


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
