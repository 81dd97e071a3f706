"""GeoRA on bitsandbytes 4-bit / 8-bit bases (CPU): exact at init, packed base untouched, merge, save/load, GRPO,
decomposing from full precision (quantize_base), and clear errors for quantizations GeoRA does not support."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from peft_geora import BaseModelMismatchWarning, GeoRAConfig, GeoRALayer
from peft_geora.functional import geora_init_factors

from ..conftest import ROOT, decompositions_forbidden, full_factors, make_tiny_model, tiny_inputs
from ..grpo_utils import kl_per_step, make_grpo_trainer, one_torch_thread

bnb = pytest.importorskip("bitsandbytes")

from peft_geora.tuner.bnb_weights import dequantized_weight  # noqa: E402
from peft_geora.tuner.quantized import GeoRALinear4bit, GeoRALinear8bitLt, quantize_base  # noqa: E402  (needs bitsandbytes)

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


def base_values(model) -> dict[str, torch.Tensor]:
    """The dequantized weight of every bitsandbytes layer, by its name in the base model.

    Values, not stored bytes: how bitsandbytes lays out its packed weight is its own business (on CPUs with bf16
    instructions 0.50 re-packs a 4-bit weight at its first forward), what GeoRA promises is the weight's values.
    """
    return {name: dequantized_weight(module) for name, module in bnb_layers(model)}


def bnb_layers(model) -> list[tuple[str, nn.Module]]:
    """``(name in the base model, layer)`` of every bitsandbytes layer."""
    kinds = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    strip = lambda name: name.removeprefix("base_model.model.").removesuffix(".base_layer")  # noqa: E731
    return [(strip(name), module) for name, module in model.named_modules() if isinstance(module, kinds)]


def requantized(like: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """The values PEFT's bnb merge / unmerge store for the float ``weight``: re-quantized with ``like``'s settings,
    then dequantized."""
    if isinstance(like.weight, bnb.nn.Params4bit):
        settings = {k: getattr(like.weight, k) for k in ("blocksize", "compress_statistics", "quant_type")}
        layer = bnb.nn.Linear4bit(like.in_features, like.out_features, bias=False, device="meta")
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, **settings).to("cpu")
        return dequantized_weight(layer)
    layer = bnb.nn.Linear8bitLt(like.in_features, like.out_features, bias=False, has_fp16_weights=False)
    layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False).to("cpu")
    return dequantized_weight(layer)


def peft_dequantized(layer: nn.Module) -> torch.Tensor:
    """The weight as PEFT's bnb merge reads it: ``dequantize_bnb_weight``, in the stored dtype."""
    from peft.utils.integrations import dequantize_bnb_weight

    weight = layer.weight
    state = weight.quant_state if isinstance(weight, bnb.nn.Params4bit) else layer.state
    return dequantize_bnb_weight(weight, state=state)


def assert_same_values(a: dict, b: dict) -> None:
    assert a and a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} changed"


def write_counters(model) -> dict[str, int]:
    """In-place write counters of every bitsandbytes weight (``Tensor._version``): GeoRA never writes a base weight."""
    return {name: module.weight._version for name, module in bnb_layers(model)}


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
    before = base_values(model)
    peft_model = get_peft_model(model, GeoRAConfig(r=8))
    layers = [m for m in peft_model.modules() if isinstance(m, GeoRALayer)]
    assert len(layers) == 14
    assert all(isinstance(m, GeoRALinear8bitLt if kind == "int8" else GeoRALinear4bit) for m in layers)
    assert torch.equal(logits(peft_model, inputs), base)
    train_steps(peft_model, inputs)
    assert not torch.equal(logits(peft_model, inputs), base)
    with peft_model.disable_adapter():
        assert torch.equal(logits(peft_model, inputs), base)
    assert_same_values(before, base_values(peft_model))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".delta") for n in trainable)


@pytest.mark.parametrize("kind", ["nf4-dq", "int8"])
def test_anchors_decompose_the_dequantized_weight_without_touching_the_layer(float_dir, kind):
    from peft.utils.integrations import dequantize_bnb_weight

    model = load(float_dir, kind)
    base = model.model.layers[1].mlp.down_proj
    # PEFT's reading, in the stored dtype, taken before any forward: afterwards bitsandbytes may have repacked a 4-bit
    # weight for the CPU, which dequantize_bnb_weight does not undo (dequantized_weight does)
    reference = dequantize_bnb_weight(base.weight, state=getattr(base, "state", None)).clone()
    logits(model, tiny_inputs())  # an 8-bit forward moves SCB from the weight into the layer state
    stored = packed(base)
    weight = dequantized_weight(base)
    assert all(torch.equal(x, y) for x, y in zip(stored, packed(base)))  # reading the weight changed nothing
    assert weight.dtype == torch.float32 and weight.shape == (base.out_features, base.in_features)
    repacked = getattr(getattr(base.weight, "quant_state", None), "packing_format_for_cpu", False)
    if reference.dtype == torch.float32 and not repacked:
        assert torch.equal(weight, reference)
    else:  # decoded to the stored half dtype (PEFT) or from block scales repacked in bf16, ours straight to float32
        torch.testing.assert_close(weight, reference.float(), rtol=2**-8, atol=0)
    peft_model = get_peft_model(model, GeoRAConfig(r=4))
    layer = peft_model.base_model.model.model.layers[1].mlp.down_proj
    a0, b0 = geora_init_factors(dequantized_weight(layer.get_base_layer()), r=4)
    assert torch.equal(layer.lora_A["default"].anchor, a0) and torch.equal(layer.lora_B["default"].anchor, b0)
    a, _, b, _ = full_factors(layer)
    expected = layer.scaling["default"] * (b @ a - b0 @ a0)
    assert torch.equal(layer.get_delta_weight("default"), expected)


@pytest.mark.parametrize("kind", ["nf4", "fp4", "nf4-dq", "int8"])
def test_the_dequantized_weight_is_the_checkpoints_after_a_forward(float_dir, kind):
    """bitsandbytes may repack a 4-bit weight for the CPU at its first forward (and keep its block scales in bf16); the
    weight GeoRA decomposes and fingerprints is the same before and after, up to that rounding, and it is the one the
    layer computes with. (Without unpacking, the weight read after a forward was off by more than its own norm.)"""
    model = load(float_dir, kind)
    layers = dict(bnb_layers(model))
    before = {name: dequantized_weight(layer) for name, layer in layers.items()}
    logits(model, tiny_inputs())
    x = torch.randn(3, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    for name, layer in layers.items():
        after = dequantized_weight(layer)
        # the repacked state keeps each block's scale in bf16: the values may move by that rounding, no more
        torch.testing.assert_close(after, before[name], rtol=2**-8, atol=0, msg=name)
        if layer.in_features == x.shape[1]:
            with torch.no_grad():
                out = layer(x).float()
            assert ((out - x @ after.T).norm() / out.norm()).item() < 0.02, name  # bf16 compute on the CPU


@pytest.mark.parametrize("kind", ["nf4", "fp4-dq", "int8"])
def test_save_and_reload_onto_a_fresh_quantized_base_is_bit_identical(float_dir, kind, tmp_path):
    inputs = tiny_inputs()
    peft_model = get_peft_model(load(float_dir, kind), GeoRAConfig(r=4, lora_dropout=0.1))
    train_steps(peft_model, inputs, steps=2)
    expected = logits(peft_model, inputs)
    peft_model.save_pretrained(tmp_path / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("error", BaseModelMismatchWarning)
        quantized = load(float_dir, kind)
        with decompositions_forbidden():  # loading runs no decomposition, by whatever path
            reloaded = PeftModel.from_pretrained(quantized, tmp_path / "adapter")
        assert torch.equal(logits(reloaded, inputs), expected)
        PeftModel.from_pretrained(load(float_dir, None), tmp_path / "adapter")  # same checkpoint in float: silent
    other = tmp_path / "other"
    make_tiny_model("llama", seed=7, **SIZES).save_pretrained(other)
    # quantized probes are compared within a rounding step, so a module of another model can pass by chance
    with pytest.warns(BaseModelMismatchWarning, match=r"adapted module\(s\) differ.*model\.layers\."):
        PeftModel.from_pretrained(load(other, kind), tmp_path / "adapter")


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize(
    ("convention", "scale"), [("pissa", {"scale_divisor": 2.0}), ("orthonormal", {"uniform_scale": True})]
)
def test_every_scale_convention_decomposes_the_dequantized_weight_exactly(float_dir, kind, convention, scale):
    model = load(float_dir, kind)
    inputs = tiny_inputs()
    base = logits(model, inputs)
    config = GeoRAConfig(r=4, lora_alpha=8, scale_convention=convention)
    peft_model = get_peft_model(model, config)
    assert torch.equal(logits(peft_model, inputs), base)
    layer = peft_model.base_model.model.model.layers[1].mlp.down_proj
    a0, b0 = geora_init_factors(dequantized_weight(layer.get_base_layer()), r=4, **scale)
    assert torch.equal(layer.lora_A["default"].anchor, a0) and torch.equal(layer.lora_B["default"].anchor, b0)


@pytest.mark.parametrize("kind", ["nf4", "nf4-dq", "int8"])
def test_merge_adds_the_anchored_delta_through_peft_requantization(float_dir, kind):
    """PEFT merges into a bitsandbytes layer by dequantizing (in the stored dtype), adding the delta and
    re-quantizing: the result is exactly that re-quantization of ``W + s (B A - B0 A0)``, with a delta of exactly zero
    at init. (Whether re-quantizing an unchanged weight gives back its values is bitsandbytes' business: on CPUs with
    bf16 instructions 0.50 stores a 4-bit weight's state in bf16 after the first forward, and it does not.)"""
    inputs = tiny_inputs()
    model = load(float_dir, kind)
    logits(model, inputs)
    peft_model = get_peft_model(model, GeoRAConfig(r=4))
    layer = peft_model.base_model.model.model.layers[0].mlp.up_proj
    assert not layer.get_delta_weight("default").any()
    for scale in (0.0, 0.05):
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in peft_model.parameters():
                if p.requires_grad:
                    p.add_(scale * torch.randn(p.shape, generator=gen))
        delta = layer.get_delta_weight("default")  # s (B A - B0 A0), checked in the test above
        expected = requantized(layer.get_base_layer(), peft_dequantized(layer.get_base_layer()) + delta)
        layer.merge()
        assert torch.equal(dequantized_weight(layer.get_base_layer()), expected)
        expected = requantized(layer.get_base_layer(), peft_dequantized(layer.get_base_layer()) - delta)
        layer.unmerge()
        assert torch.equal(dequantized_weight(layer.get_base_layer()), expected)


@pytest.mark.parametrize("kind", ["nf4-dq", "int8"])
def test_quantize_base_decomposes_the_float_weights_and_stays_exact(float_dir, kind, tmp_path):
    inputs = tiny_inputs()
    targets = ["q_proj", "v_proj", "down_proj"]  # quantize_base turns the other linears into plain bnb layers
    peft_model = get_peft_model(load(float_dir, None), GeoRAConfig(r=4, target_modules=targets))
    anchors = {n: b.clone() for n, b in peft_model.named_buffers() if n.endswith(".anchor")}
    quantize_base(peft_model, BitsAndBytesConfig(**QUANT[kind]))
    reference = load(float_dir, kind)  # what transformers makes of the same float weights
    assert_same_values(base_values(reference), base_values(peft_model))
    assert len(base_values(reference)) == 2 * 7
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
    inputs = tiny_inputs()
    model = load(float_dir, "nf4")
    base = logits(model, inputs)
    before, writes = base_values(model), write_counters(model)
    trainer = make_grpo_trainer(model, peft_config=GeoRAConfig(r=4), beta=0.1, max_steps=2)
    trainer.train()
    kl = kl_per_step(trainer)
    assert kl[0] == 0.0  # policy == reference at step 1, bit for bit
    policy = trainer.model.eval()
    assert any(isinstance(m, GeoRALinear4bit) for m in policy.modules())
    assert_same_values(before, base_values(policy))
    assert write_counters(policy) == writes
    with policy.disable_adapter():
        assert torch.equal(logits(policy, inputs), base)
    trained = logits(policy, inputs)
    assert not torch.equal(trained, base)
    trainer.save_model(str(tmp_path / "saved"))
    reloaded = PeftModel.from_pretrained(load(float_dir, "nf4"), tmp_path / "saved")
    factors = {n: p for n, p in policy.named_parameters() if n.endswith(".delta")}
    assert {p.dtype for p in factors.values()} == {torch.bfloat16}  # TRL trains a quantized model's adapter in bf16
    for name, param in reloaded.named_parameters():
        if name.endswith(".delta"):  # PEFT loads them into float32 parameters: same values, cast back
            assert torch.equal(param, factors[name].float())
            param.data = param.data.to(torch.bfloat16)
    assert torch.equal(logits(reloaded, inputs), trained)


def test_docs_snippets_run(float_dir, tmp_path, monkeypatch):
    """The "Quantized base models" code blocks as written (README once merged, else docs/quantized.md), in order,
    on the tiny model."""
    import peft_geora_apps.default_model

    readme = (ROOT / "README.md").read_text()
    title = "## Quantized base models"
    text = readme if title in readme else (ROOT / "docs" / "quantized.md").read_text()
    section = text.split(title, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 3
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(peft_geora_apps.default_model, "default_model_path", lambda: float_dir)
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
    before = base_values(model)
    peft_model = get_peft_model(model, GeoRAConfig())  # one thread (see above): with two, seen up to 120 s
    assert sum(isinstance(m, GeoRALinear4bit) for m in peft_model.modules()) == 30 * 7
    assert torch.equal(logits(peft_model, inputs), base)
    assert_same_values(before, base_values(peft_model))
