"""GeoRA on bitsandbytes 4-bit and 8-bit base layers (QLoRA-style), exact at initialisation.

The layers are PEFT's own ``Linear4bit`` / ``Linear8bitLt`` LoRA layers with GeoRA's anchored factors: the forward,
merge (PEFT's dequantize, add, re-quantize) and save/load paths are PEFT's, and the anchors make them compute
``W_q x + s (B A x - B0 A0 x)``, exactly ``W_q x`` at the start. The quantized weight is dequantized to float32 only
to compute the decomposition and the fingerprint; the packed base is never written.

:func:`quantize_base` is the other route: decompose the full-precision weights, then quantize the base.
This module needs ``bitsandbytes``; ``peft_geora`` imports it only when a model holds bitsandbytes layers.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import bitsandbytes as bnb
import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
from peft.tuners.lora.bnb import Linear8bitLt as LoraLinear8bitLt
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import ModulesToSaveWrapper
from peft.utils.other import transpose
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..format.fingerprint import weight_fingerprint
from .anchor import AnchoredA
from .bnb_weights import dequantized_weight, quantization_of
from .config import GeoRAConfig
from .layer import GeoRALayer, GeoRALinear

logger = logging.getLogger(__name__)


class _QuantizedGeoRALayer(GeoRALayer):
    """GeoRA on a bitsandbytes layer: the decomposition and fingerprint read the dequantized float32 weight."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: GeoRAConfig,
        r: int = 0,
        lora_alpha: int = 1,
        **kwargs: Any,
    ) -> None:
        # PEFT's bnb layers do not pass ``target_name`` on to update_layer; GeoRA keys its fingerprints by it
        nn.Module.__init__(self)
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, target_name=kwargs.get("target_name"))

    @contextlib.contextmanager
    def _geora_weight(self) -> Iterator[torch.Tensor]:
        yield dequantized_weight(self.get_base_layer())

    def geora_fingerprint(self) -> dict:
        base = self.get_base_layer()
        return weight_fingerprint(dequantized_weight(base), quantized=quantization_of(base))


class GeoRALinear4bit(_QuantizedGeoRALayer, LoraLinear4bit):
    """GeoRA on a bitsandbytes ``Linear4bit`` (nf4 or fp4, with or without double quantization)."""


class GeoRALinear8bitLt(_QuantizedGeoRALayer, LoraLinear8bitLt):
    """GeoRA on a bitsandbytes ``Linear8bitLt`` (LLM.int8())."""


def create_quantized_module(target: nn.Module, adapter_name: str, config: GeoRAConfig, **kwargs: Any) -> nn.Module:
    """The GeoRA layer for a bitsandbytes target, with the extra arguments PEFT's bnb dispatchers pass."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    config.fan_in_fan_out = False
    if isinstance(base, bnb.nn.Linear4bit):
        kwargs.update(
            compute_dtype=base.compute_dtype,
            compress_statistics=base.weight.compress_statistics,
            quant_type=base.weight.quant_type,
        )
        return GeoRALinear4bit(target, adapter_name, config=config, **kwargs)
    if isinstance(base, bnb.nn.Linear8bitLt):
        kwargs.update(has_fp16_weights=base.state.has_fp16_weights, threshold=base.state.threshold, index=base.index)
        return GeoRALinear8bitLt(target, adapter_name, config=config, **kwargs)
    raise TypeError(f"GeoRA: {type(base).__module__}.{type(base).__name__} is not a supported bitsandbytes layer")


def _bnb_linear(layer: nn.Module, quantization_config: Any, transposed: bool) -> nn.Module:
    """``layer`` (float ``nn.Linear`` / ``Conv1D``) quantized as transformers quantizes it when loading."""
    weight = transpose(layer.weight.detach(), transposed)
    out_features, in_features = weight.shape
    bias = layer.bias is not None
    if quantization_config.load_in_8bit:
        new = bnb.nn.Linear8bitLt(
            in_features,
            out_features,
            bias,
            has_fp16_weights=quantization_config.llm_int8_has_fp16_weight,
            threshold=quantization_config.llm_int8_threshold,
            device="meta",
        )
        new.weight = bnb.nn.Int8Params(
            weight.to("cpu"), requires_grad=False, has_fp16_weights=quantization_config.llm_int8_has_fp16_weight
        ).to(weight.device)
    else:
        new = bnb.nn.Linear4bit(
            in_features,
            out_features,
            bias,
            quantization_config.bnb_4bit_compute_dtype,
            compress_statistics=quantization_config.bnb_4bit_use_double_quant,
            quant_type=quantization_config.bnb_4bit_quant_type,
            quant_storage=quantization_config.bnb_4bit_quant_storage,
            device="meta",
        )
        params = {k: v for k, v in new.weight.__dict__.items() if not k.startswith("_")}
        new.weight = bnb.nn.Params4bit(weight, **dict(params, requires_grad=False)).to(weight.device)
    if bias:
        new.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
    new.source_cls = type(layer)
    return new.requires_grad_(False).train(layer.training)


@torch.no_grad()
def quantize_base(model: nn.Module, quantization_config: Any) -> nn.Module:
    """Quantize the base of a GeoRA model whose anchors were computed from the full-precision weights.

    ``quantization_config`` is a transformers ``BitsAndBytesConfig`` (4-bit or 8-bit). Every GeoRA layer's float base
    is replaced by a bitsandbytes layer and the layer becomes a :class:`GeoRALinear4bit` / :class:`GeoRALinear8bitLt`
    with the same adapters; every other float ``nn.Linear`` / ``Conv1D`` is quantized as transformers would (output
    head, ``llm_int8_skip_modules`` and PEFT's ``modules_to_save`` copies excepted). The packed bytes equal those of
    ``from_pretrained(..., quantization_config=...)`` on the same float weights.

    The model stays exact at its start (the anchor cancels on any base), now relative to the quantized model; the
    anchors are the decomposition of the float ``W``, not of its quantization. Each adapter's recorded base
    fingerprint becomes the quantized one. Returns ``model``, changed in place once every layer is quantized.
    """
    if not (quantization_config.load_in_4bit or quantization_config.load_in_8bit):
        raise ValueError("quantize_base needs a BitsAndBytesConfig with load_in_4bit=True or load_in_8bit=True")
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    layer_cls = GeoRALinear8bitLt if quantization_config.load_in_8bit else GeoRALinear4bit
    plan = [
        (name, module, _bnb_linear(layer, quantization_config, transposed))
        for name, module, (layer, transposed) in _plan(root, quantization_config)
    ]
    for name, module, new_base in plan:  # nothing is changed until every layer is quantized
        if isinstance(module, GeoRALinear):
            module.base_layer = new_base
            module.__class__ = layer_cls  # same LoraLayer state; PEFT's bnb methods now handle the base
            module.fan_in_fan_out = False
            _record_fingerprints(module, name, getattr(model, "peft_config", {}))
        else:
            parent_name, _, child = name.rpartition(".")
            setattr(root.get_submodule(parent_name), child, new_base)
    root.is_loaded_in_8bit = bool(quantization_config.load_in_8bit)
    root.is_loaded_in_4bit = bool(quantization_config.load_in_4bit)
    converted = sum(isinstance(module, GeoRALayer) for _, module, _ in plan)
    logger.info(
        "quantize_base: %d GeoRA layers now on a %s base, %d other layers quantized",
        converted,
        layer_cls.__name__,
        len(plan) - converted,
    )
    return model


def _plan(root: nn.Module, quantization_config: Any) -> list[tuple[str, nn.Module, tuple[nn.Module, bool]]]:
    """``(name, module, (float layer, transposed))`` for every layer :func:`quantize_base` quantizes."""
    head = root.get_output_embeddings() if hasattr(root, "get_output_embeddings") else None
    skip = set(quantization_config.llm_int8_skip_modules or ())
    plan, inside_tuner = [], ()
    for name, module in root.named_modules():
        if isinstance(module, GeoRALinear):
            if module.merged:
                raise ValueError(f"GeoRA: '{name}' has merged adapters; unmerge them before quantize_base")
            plan.append((name, module, (module.get_base_layer(), module.fan_in_fan_out)))
            inside_tuner = (*inside_tuner, name + ".")
        elif isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper)):
            inside_tuner = (*inside_tuner, name + ".")
        elif (
            type(module) in (nn.Linear, Conv1D)
            and module.weight.is_floating_point()
            and module is not head
            and not name.startswith(inside_tuner)
            and not (name in skip or name.rpartition(".")[2] in skip)
        ):
            plan.append((name, module, (module, type(module) is Conv1D)))
    return plan


def _record_fingerprints(layer: GeoRALayer, name: str, configs: dict) -> None:
    """After the base changed: every ready adapter of ``layer`` records the quantized base's fingerprint."""
    fingerprint = layer.geora_fingerprint()
    for adapter, lora_a in layer.lora_A.items():
        if isinstance(lora_a, AnchoredA) and not lora_a.awaiting_checkpoint:
            layer.geora_expected_fingerprint[adapter] = fingerprint
            if adapter in configs:
                configs[adapter].base_fingerprints[name] = fingerprint
