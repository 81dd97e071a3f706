"""GeoRAModel on tiny Llama / Qwen2 models: exact at init, only the factors train, rank and alpha patterns, several
adapters, and all-or-nothing injection (a clear error, the model left as it was)."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from peft_geora import GeoRAConfig

from ..conftest import (
    assert_bitwise_equal,
    geora_layers,
    logits,
    make_tiny_model,
    state_snapshot,
    tiny_inputs,
    train_steps,
    trained_geora,
)


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


def test_rank_and_alpha_patterns():
    model = make_tiny_model("llama")
    config = GeoRAConfig(r=4, lora_alpha=8, rank_pattern={"q_proj": 2}, alpha_pattern={"q_proj": 6})
    peft_model = get_peft_model(model, config)
    q = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    v = peft_model.base_model.model.model.layers[0].self_attn.v_proj
    assert q.lora_A["default"].delta.shape[0] == 2 and q.scaling["default"] == 3.0
    assert v.lora_A["default"].delta.shape[0] == 4 and v.scaling["default"] == 2.0
    assert q.lora_A["default"].anchor.shape == (2, 64)


# ---- bad input: a clear error naming the module and value, and the model left as it was ----


def assert_untouched(model, before):
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    assert_bitwise_equal(before, state_snapshot(model))


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


def test_several_adapters_each_exact():
    model = trained_geora()
    inputs = tiny_inputs()
    first = logits(model, inputs)
    with model.disable_adapter():
        base = logits(model, inputs)
    model.add_adapter("second", GeoRAConfig(r=4))
    model.set_adapter("second")
    assert torch.equal(logits(model, inputs), base)  # fresh adapter: exact at init
    model.set_adapter("default")
    assert torch.equal(logits(model, inputs), first)
    model.delete_adapter("second")
    assert torch.equal(logits(model, inputs), first)
    assert all(set(m.lora_A) == {"default"} for m in model.modules() if isinstance(m, LoraLayer))
