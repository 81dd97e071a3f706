"""GeoRA on bitsandbytes 4-bit / 8-bit bases (CPU): exact at init, packed base untouched, merge, save/load, GRPO,
decomposing from full precision (quantize_base), and clear errors for quantizations GeoRA does not support."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from peft_geora import BaseModelMismatchWarning, GeoRAConfig, GeoRALayer
from peft_geora.functional import geora_init_factors

from .conftest import make_tiny_model, tiny_inputs

bnb = pytest.importorskip("bitsandbytes")

from peft_geora.quantized import (  # noqa: E402  (needs bitsandbytes)
    GeoRALinear4bit,
    GeoRALinear8bitLt,
    dequantized_weight,
    quantize_base,
)

QUANT = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "fp4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True),
    "int8": dict(load_in_8bit=True),
}
# bitsandbytes' CPU 4-bit kernels need every dimension to be a multiple of 64
SIZES = dict(hidden_size=128, intermediate_size=256, head_dim=32)


@pytest.fixture(autouse=True)
def _quiet_single_thread():
    """bitsandbytes' notes are expected here; one torch thread: small matrices, and two threads spin-wait on a busy
    machine (a tiny 4-bit test took 25 s instead of 2 s)."""
    from .grpo_utils import one_torch_thread

    with warnings.catch_warnings(), one_torch_thread():
        warnings.filterwarnings("ignore", message=".*(MatMul8bitLt|[Mm]erge lora module|kernels).*")
        yield


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_float")
    make_tiny_model("llama", **SIZES).save_pretrained(folder)
    return folder


def load(folder, kind: str | None, dtype: torch.dtype = torch.float32):
    """The saved tiny model, quantized by transformers as a user would load it (None: not quantized)."""
    config = BitsAndBytesConfig(**QUANT[kind]) if kind else None
    return AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=config, device_map="cpu", dtype=dtype
    ).eval()


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def packed(layer: nn.Module) -> list[torch.Tensor]:
    """A bitsandbytes layer's stored bytes: packed weight, then quant_state tensors (absmax, nested stats) or SCB."""
    weight = layer.weight
    if isinstance(weight, bnb.nn.Params4bit):
        stats = [v for v in weight.quant_state.as_dict(packed=True).values() if torch.is_tensor(v)]
    else:
        stats = [weight.SCB if weight.SCB is not None else layer.state.SCB]
    return [t.detach().clone() for t in [weight.data, *stats]]


def packed_state(model) -> dict[str, list[torch.Tensor]]:
    """``packed`` of every bitsandbytes layer, by its name in the base model."""
    return {
        name.removeprefix("base_model.model.").removesuffix(".base_layer"): packed(module)
        for name, module in model.named_modules()
        if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
    }


def requantized(like: nn.Module, weight: torch.Tensor) -> list[torch.Tensor]:
    """What PEFT's bnb merge / unmerge store for the float ``weight``: re-quantized with ``like``'s settings."""
    if isinstance(like.weight, bnb.nn.Params4bit):
        settings = {k: getattr(like.weight, k) for k in ("blocksize", "compress_statistics", "quant_type")}
        layer = bnb.nn.Linear4bit(like.in_features, like.out_features, bias=False, device="meta")
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, **settings).to("cpu")
        return packed(layer)
    params = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False).to("cpu")
    return [params.data, params.SCB]


def assert_same_bytes(a: dict, b: dict) -> None:
    assert a and a.keys() == b.keys()
    for key in a:
        assert len(a[key]) == len(b[key]), key
        for x, y in zip(a[key], b[key]):
            assert x.dtype == y.dtype and torch.equal(x.view(torch.uint8), y.view(torch.uint8)), f"{key} changed"


def train_steps(model, inputs, steps=3):
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.mark.parametrize("kind", list(QUANT))
def test_exact_at_init_base_bytes_untouched_and_disabled_adapter_is_the_base(float_dir, kind):
    model = load(float_dir, kind)
    inputs = tiny_inputs()
    base = logits(model, inputs)
    before = packed_state(model)
    peft_model = get_peft_model(model, GeoRAConfig(r=8))
    layers = [m for m in peft_model.modules() if isinstance(m, GeoRALayer)]
    assert len(layers) == 14
    assert all(isinstance(m, GeoRALinear8bitLt if kind == "int8" else GeoRALinear4bit) for m in layers)
    assert torch.equal(logits(peft_model, inputs), base)
    train_steps(peft_model, inputs)
    assert not torch.equal(logits(peft_model, inputs), base)
    with peft_model.disable_adapter():
        assert torch.equal(logits(peft_model, inputs), base)
    assert_same_bytes(before, packed_state(peft_model))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".factor") for n in trainable)


@pytest.mark.parametrize("kind", ["nf4-dq", "int8"])
def test_anchors_decompose_the_dequantized_weight_without_touching_the_layer(float_dir, kind):
    from peft.utils.integrations import dequantize_bnb_weight

    model = load(float_dir, kind)
    logits(model, tiny_inputs())  # an 8-bit forward moves SCB from the weight into the layer state
    base = model.model.layers[1].mlp.down_proj
    weight = dequantized_weight(base)
    assert weight.dtype == torch.float32 and weight.shape == (base.out_features, base.in_features)
    state = getattr(base, "state", None)
    assert torch.equal(weight, dequantize_bnb_weight(base.weight, state=state).float())
    peft_model = get_peft_model(model, GeoRAConfig(r=4))
    layer = peft_model.base_model.model.model.layers[1].mlp.down_proj
    a0, b0 = geora_init_factors(dequantized_weight(layer.get_base_layer()), r=4)
    assert torch.equal(layer.lora_A["default"].anchor, a0) and torch.equal(layer.lora_B["default"].anchor, b0)
    expected = layer.scaling["default"] * (layer.lora_B["default"].factor @ layer.lora_A["default"].factor - b0 @ a0)
    assert torch.equal(layer.get_delta_weight("default"), expected)


@pytest.mark.parametrize("kind", ["nf4", "fp4-dq", "int8"])
def test_save_and_reload_onto_a_fresh_quantized_base_is_bit_identical(float_dir, kind, tmp_path, monkeypatch):
    inputs = tiny_inputs()
    peft_model = get_peft_model(load(float_dir, kind), GeoRAConfig(r=4, lora_dropout=0.1))
    train_steps(peft_model, inputs, steps=2)
    expected = logits(peft_model, inputs)
    peft_model.save_pretrained(tmp_path / "adapter")
    import peft_geora.layer

    monkeypatch.setattr(peft_geora.layer, "geora_decompose", pytest.fail)  # loading runs no decomposition
    with warnings.catch_warnings():
        warnings.simplefilter("error", BaseModelMismatchWarning)
        reloaded = PeftModel.from_pretrained(load(float_dir, kind), tmp_path / "adapter")
        assert torch.equal(logits(reloaded, inputs), expected)
        PeftModel.from_pretrained(load(float_dir, None), tmp_path / "adapter")  # same checkpoint in float: silent
    other = tmp_path / "other"
    make_tiny_model("llama", seed=7, **SIZES).save_pretrained(other)
    # quantized probes are compared within a rounding step, so a module of another model can pass by chance
    with pytest.warns(BaseModelMismatchWarning, match=r"adapted module\(s\) differ.*model\.layers\."):
        PeftModel.from_pretrained(load(other, kind), tmp_path / "adapter")


@pytest.mark.parametrize("kind", ["nf4", "nf4-dq", "int8"])
def test_merge_adds_the_anchored_delta_through_peft_requantization(float_dir, kind):
    inputs = tiny_inputs()
    model = load(float_dir, kind)
    base = logits(model, inputs)
    before = packed_state(model)
    peft_model = get_peft_model(model, GeoRAConfig(r=4))
    peft_model.merge_adapter()  # the delta is exactly zero at init
    if kind == "nf4":  # re-quantizing a dequantized nf4 weight gives back the same bytes
        assert_same_bytes(before, packed_state(peft_model))
        assert torch.equal(logits(peft_model, inputs), base)
    peft_model.unmerge_adapter()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    layer = peft_model.base_model.model.model.layers[0].mlp.up_proj
    delta = layer.get_delta_weight("default")  # s (B A - B0 A0), checked in the test above
    expected = requantized(layer.get_base_layer(), dequantized_weight(layer.get_base_layer()) + delta)
    layer.merge()
    assert_same_bytes({"merged": expected}, {"merged": packed(layer.get_base_layer())})
    expected = requantized(layer.get_base_layer(), dequantized_weight(layer.get_base_layer()) - delta)
    layer.unmerge()
    assert_same_bytes({"unmerged": expected}, {"unmerged": packed(layer.get_base_layer())})


@pytest.mark.parametrize("kind", ["nf4-dq", "int8"])
def test_quantize_base_decomposes_the_float_weights_and_stays_exact(float_dir, kind, tmp_path):
    inputs = tiny_inputs()
    targets = ["q_proj", "v_proj", "down_proj"]  # quantize_base turns the other linears into plain bnb layers
    peft_model = get_peft_model(load(float_dir, None), GeoRAConfig(r=4, target_modules=targets))
    anchors = {n: b.clone() for n, b in peft_model.named_buffers() if n.endswith(".anchor")}
    quantize_base(peft_model, BitsAndBytesConfig(**QUANT[kind]))
    reference = load(float_dir, kind)  # what transformers makes of the same float weights
    assert_same_bytes(packed_state(reference), packed_state(peft_model))
    assert len(packed_state(reference)) == 2 * 7
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, GeoRALinear8bitLt if kind == "int8" else GeoRALinear4bit)
    assert isinstance(peft_model.base_model.model.lm_head, nn.Linear)  # the output head stays in float
    expected = logits(reference, inputs)
    assert torch.equal(logits(peft_model, inputs), expected)  # exact at init, relative to the quantized model
    assert all(torch.equal(b, anchors[n]) for n, b in peft_model.named_buffers() if n.endswith(".anchor"))
    recomputed = get_peft_model(load(float_dir, kind), GeoRAConfig(r=4, target_modules=targets))
    on_quantized = recomputed.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].anchor
    assert not torch.equal(on_quantized, layer.lora_A["default"].anchor)  # the anchors come from the float W
    assert peft_model.peft_config["default"].base_fingerprints["model.layers.0.self_attn.q_proj"]["dtype"] in kind
    train_steps(peft_model, inputs, steps=2)
    with peft_model.disable_adapter():
        assert torch.equal(logits(peft_model, inputs), expected)
    trained = logits(peft_model, inputs)
    peft_model.save_pretrained(tmp_path / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("error", BaseModelMismatchWarning)
        reloaded = PeftModel.from_pretrained(load(float_dir, kind), tmp_path / "adapter")
    assert torch.equal(logits(reloaded, inputs), trained)


def _fake_quantized(module_path: str, class_name: str, layer: nn.Linear) -> nn.Module:
    """A stand-in for another library's quantized linear: its class lives in ``module_path``."""
    cls = type(class_name, (nn.Module,), {"__module__": module_path, "forward": lambda self, x: x})
    fake = cls()
    fake.in_features, fake.out_features = layer.in_features, layer.out_features
    fake.qweight = nn.Parameter(torch.zeros(layer.in_features // 8, layer.out_features, dtype=torch.int32), False)
    return fake


@pytest.mark.parametrize(
    "module_path, class_name",
    [("auto_gptq.nn_modules.qlinear.qlinear_cuda", "QuantLinear"), ("hqq.core.quantize", "HQQLinear")],
)
def test_unsupported_quantized_layers_are_refused_by_name(module_path, class_name):
    model = make_tiny_model("llama")
    layer = model.model.layers[1].mlp.down_proj
    model.model.layers[1].mlp.down_proj = _fake_quantized(module_path, class_name, layer)
    message = f"'model.layers.1.mlp.down_proj' is a quantized layer \\({module_path}.{class_name}\\).*not supported"
    with pytest.raises(TypeError, match=message):
        get_peft_model(model, GeoRAConfig(r=4, target_modules=["down_proj", "up_proj"]))
    assert not any(isinstance(m, GeoRALayer) for m in model.modules())


def test_grpo_on_a_4bit_base_exact_kl_and_bit_identical_reload(float_dir, tmp_path):
    from .grpo_utils import make_grpo_trainer
    from .test_trl import kl_per_step

    inputs = tiny_inputs()
    model = load(float_dir, "nf4")
    base = logits(model, inputs)
    before = packed_state(model)
    trainer = make_grpo_trainer(model, peft_config=GeoRAConfig(r=4), beta=0.1, max_steps=2)
    trainer.train()
    kl = kl_per_step(trainer)
    assert kl[0] == 0.0  # policy == reference at step 1, bit for bit
    policy = trainer.model.eval()
    assert any(isinstance(m, GeoRALinear4bit) for m in policy.modules())
    assert_same_bytes(before, packed_state(policy))
    with policy.disable_adapter():
        assert torch.equal(logits(policy, inputs), base)
    trained = logits(policy, inputs)
    assert not torch.equal(trained, base)
    trainer.save_model(str(tmp_path / "saved"))
    reloaded = PeftModel.from_pretrained(load(float_dir, "nf4"), tmp_path / "saved")
    factors = {n: p for n, p in policy.named_parameters() if n.endswith(".factor")}
    assert {p.dtype for p in factors.values()} == {torch.bfloat16}  # TRL trains a quantized model's adapter in bf16
    for name, param in reloaded.named_parameters():
        if name.endswith(".factor"):  # PEFT loads them into float32 parameters: same values, cast back
            assert torch.equal(param, factors[name].float())
            param.data = param.data.to(torch.bfloat16)
    assert torch.equal(logits(reloaded, inputs), trained)


def test_docs_snippets_run(float_dir, tmp_path, monkeypatch):
    """The "Quantized base models" code blocks as written (README once merged, else docs/quantized.md), in order,
    on the tiny model."""
    import peft_geora.default_model

    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    title = "## Quantized base models"
    text = readme if title in readme else (root / "docs" / "quantized.md").read_text()
    section = text.split(title, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 3
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(peft_geora.default_model, "default_model_path", lambda: float_dir)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/quantized.md", "exec"), namespace)
    inputs = tiny_inputs()
    quantized = logits(load(float_dir, "nf4-dq"), inputs)  # the snippets' BitsAndBytesConfig
    assert torch.equal(logits(namespace["reloaded"], inputs), quantized)
    quantized_bf16 = logits(load(float_dir, "nf4-dq", torch.bfloat16), inputs)  # quantize_base ran on a bf16 model
    assert torch.equal(logits(namespace["model"], inputs), quantized_bf16)
    assert isinstance(namespace["model"].base_model.model.model.layers[0].mlp.up_proj, GeoRALinear4bit)


@pytest.mark.slow
def test_smollm2_in_4bit_is_exact_at_init(smollm2_path):
    model = AutoModelForCausalLM.from_pretrained(
        smollm2_path, quantization_config=BitsAndBytesConfig(**QUANT["nf4"]), device_map="cpu"
    ).eval()
    inputs = {"input_ids": torch.tensor([[1, 504, 3458, 282, 4194, 314, 216, 33, 32, 30]])}
    base = logits(model, inputs)
    before = packed_state(model)
    peft_model = get_peft_model(model, GeoRAConfig())  # one thread (see above): with two, seen up to 120 s
    assert sum(isinstance(m, GeoRALinear4bit) for m in peft_model.modules()) == 30 * 7
    assert torch.equal(logits(peft_model, inputs), base)
    assert_same_bytes(before, packed_state(peft_model))
