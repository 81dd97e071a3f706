"""Reading the weights of bitsandbytes layers, without importing bitsandbytes for models that have none.

``bitsandbytes`` is optional: these functions look it up in ``sys.modules`` (a model cannot hold its layers unless it
was imported) or import it only when handed one of its layers. :mod:`.quantized` builds GeoRA layers on them.
"""

from __future__ import annotations

import copy
import sys

import torch
from torch import nn


def bnb_layer_kind(layer: nn.Module) -> str | None:
    """``"4bit"`` / ``"8bit"`` for the bitsandbytes layers GeoRA supports (Linear4bit, Linear8bitLt), else None.

    Looks bitsandbytes up in ``sys.modules`` only: a model cannot hold its layers unless it was imported.
    """
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return None
    if isinstance(layer, bnb.nn.Linear4bit):
        return "4bit"
    if isinstance(layer, bnb.nn.Linear8bitLt):
        return "8bit"
    return None


INT8_HALF_STEP = 0.5 / 127  # LLM.int8() rounds each row to multiples of absmax / 127


@torch.no_grad()
def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The weight of a bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` as a new float32 (out x in) tensor.

    4-bit weights are decoded straight to float32 (not to the stored dtype and then up); nothing on ``layer`` changes
    (unlike ``peft.utils.integrations.dequantize_bnb_weight``, which fills in ``state.SCB``). On CPUs with AVX512-BF16,
    bitsandbytes repacks a 4-bit weight into a CPU layout at its first forward (``quant_state.packing_format_for_cpu``:
    the codes interleaved in blocks of 32 rows, the block scales transposed to (in / blocksize, out) and kept in bf16).
    Such a weight is read from a copy put back in the standard layout: the codes with bitsandbytes' own inverse (the
    one its ``.cuda()`` uses), the scales transposed back (that inverse leaves them transposed), so the values are the
    ones the layer computes with, whatever ran before.
    """
    import bitsandbytes as bnb

    weight = layer.weight
    if isinstance(weight, bnb.nn.Params4bit):
        data, state = weight.data, copy.copy(weight.quant_state)
        if getattr(state, "packing_format_for_cpu", False):  # the inverse writes into the state: give it a copy
            scales = state.absmax
            data, state = bnb.functional._convert_weight_packed_for_cpu_inverse(data, copy.deepcopy(state))
            state.absmax, state.nested = scales.T.reshape(-1).float(), False  # (out, in / blocksize), row-major
        state.dtype = torch.float32
        return bnb.functional.dequantize_4bit(data, state).reshape(layer.out_features, layer.in_features)
    if weight.dtype != torch.int8:  # has_fp16_weights: stored in float until moved to an accelerator
        return weight.detach().float().clone()
    scb = weight.SCB if getattr(weight, "SCB", None) is not None else layer.state.SCB
    return bnb.functional.int8_vectorwise_dequant(weight.data, scb.to(weight.device)).float()


def quantization_of(layer: nn.Module) -> tuple[str, int, float]:
    """``(kind, block, half_step)`` of a bitsandbytes layer, for
    :func:`peft_geora.format.fingerprint.weight_fingerprint`: the code book's name, the number of consecutive entries
    sharing one scale, the largest rounding error / scale."""
    import bitsandbytes as bnb

    weight = layer.weight
    if isinstance(weight, bnb.nn.Params4bit):
        codes = bnb.functional.get_4bit_type(weight.quant_type, device="cpu").sort().values
        return weight.quant_type, weight.blocksize, float((codes[1:] - codes[:-1]).max()) / 2
    return "int8", layer.in_features, INT8_HALF_STEP
