"""GeoRA layers: PEFT's LoRA layers whose ``lora_A`` / ``lora_B`` are anchored and GeoRA-initialised.

Forward, merge and unmerge are PEFT's own; the anchor inside the factor modules (see :mod:`peft_geora.tuner.anchor`)
makes them compute ``W x + s (B A x - B0 A0 x)``. This module adds what differs from LoRA: validating the target,
computing (or reusing) the decomposition, and an exact ``get_delta_weight``.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import time
from collections.abc import Iterator
from typing import Any

import torch
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from peft.utils.other import transpose
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..format.fingerprint import weight_fingerprint
from ..functional import GeoRAFactors, decomposition_report, geora_decompose
from .anchor import AnchoredA, AnchoredB
from .bnb_weights import bnb_layer_kind, dequantized_weight
from .config import GeoRAConfig, exact_pattern, lora_alpha_for, lora_scaling
from .distributed import broadcast_from_rank0, check_reachable, gathered, is_zero3_param
from .init_runtime import advance, resolve_init_device

logger = logging.getLogger(__name__)

_HALF = (torch.float16, torch.bfloat16)
_PLAIN_LORA_MODULES: contextvars.ContextVar[bool] = contextvars.ContextVar("geora_plain_lora_modules", default=False)


@contextlib.contextmanager
def plain_lora_modules() -> Iterator[None]:
    """Within the block, new GeoRA adapters get LoRA's plain ``lora_A`` / ``lora_B`` linears (no anchors, no
    decomposition), for a caller that writes their weights and then calls :meth:`GeoRALayer.anchor_combined_adapter`.
    """
    token = _PLAIN_LORA_MODULES.set(True)
    try:
        yield
    finally:
        _PLAIN_LORA_MODULES.reset(token)


def is_quantized_layer(layer: nn.Module) -> bool:
    """True for layers whose weight is stored quantized (bitsandbytes, GPTQ, AWQ, HQQ, torchao, ...)."""
    weight = getattr(layer, "weight", None)
    if type(layer).__module__.split(".")[0] in {"bitsandbytes", "auto_gptq", "gptqmodel", "awq", "hqq", "optimum"}:
        return True
    if weight is not None and (hasattr(weight, "quant_state") or hasattr(weight, "SCB")):
        return True
    return weight is not None and not weight.is_floating_point()


def _all_finite(weight: torch.Tensor) -> bool:
    """No NaN or Inf in ``weight``: two reductions (NaN propagates through both), no full-size temporary."""
    return bool(torch.isfinite(weight.amax()) and torch.isfinite(weight.amin()))


def check_target_type(layer: nn.Module, name: str) -> str | None:
    """Raise a clear error if ``layer`` is of a kind GeoRA cannot wrap; return its bitsandbytes kind (or ``None``)."""
    kind = bnb_layer_kind(layer)
    if kind is None and is_quantized_layer(layer):
        raise TypeError(
            f"GeoRA: target module '{name}' is a quantized layer ({type(layer).__module__}.{type(layer).__name__}); "
            "this quantization is not supported yet. GeoRA supports float nn.Linear / Conv1D and bitsandbytes "
            "Linear4bit / Linear8bitLt base layers: load the model in float or with a BitsAndBytesConfig."
        )
    if kind is None and not isinstance(layer, (nn.Linear, Conv1D)):
        raise TypeError(
            f"GeoRA: target module '{name}' is a {type(layer).__name__}; only float nn.Linear and transformers "
            "Conv1D layers (or their bitsandbytes 4-/8-bit versions) can be targeted. Adjust target_modules / "
            "exclude_modules."
        )
    return kind


def check_target(layer: nn.Module, name: str) -> None:
    """Raise a clear error if GeoRA cannot be applied to ``layer`` (called before anything is modified)."""
    kind = check_target_type(layer, name)
    weight = layer.weight
    if weight.device.type == "meta":
        return
    check_reachable(weight, name)
    if kind is not None:
        weight = dequantized_weight(layer)
    # ZeRO-3: finiteness is checked once gathered (distributed.gathered)
    if not is_zero3_param(weight) and not _all_finite(weight):
        raise ValueError(f"GeoRA: the weight of target module '{name}' contains NaN or Inf values")


class GeoRALayer:
    """Mixin for a PEFT LoRA layer class: GeoRA initialisation on ``update_layer``, exact ``get_delta_weight``.

    ``geora_reports[adapter]`` holds what the initialisation measured for this layer (mask coverage, overlap,
    captured energy, seconds); ``geora_settings[adapter]`` the settings the anchors were computed with.
    """

    other_param_names = LoraLayer.other_param_names + ("geora_settings", "geora_reports", "geora_expected_fingerprint")

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: GeoRAConfig, **kwargs: Any) -> None:
        target_name = self._geora_target_name(kwargs.get("target_name"))
        self._check_geora_target(target_name)
        r, lora_alpha = self._capped_rank(target_name, r, lora_alpha, config)
        super().update_layer(adapter_name, r, lora_alpha, config=config, **kwargs)
        for attr in ("geora_settings", "geora_reports", "geora_expected_fingerprint"):
            if attr not in self.__dict__:
                setattr(self, attr, {})
        if _PLAIN_LORA_MODULES.get():  # filled by the caller, then anchored (see anchor_combined_adapter)
            return
        self._install_anchors(adapter_name, config, target_name)

    def _geora_target_name(self, target_name: str | None) -> str:
        """The name GeoRA keys this target by (fingerprints, messages): PEFT's module key."""
        return target_name or type(self).__name__

    def _check_geora_target(self, target_name: str) -> None:
        check_target(self.get_base_layer(), target_name)

    def geora_target_weight(self) -> torch.Tensor:
        """The base tensor GeoRA decomposes and fingerprints."""
        return self.get_base_layer().weight

    def _capped_rank(self, target_name: str, r: int, lora_alpha: float, config: GeoRAConfig) -> tuple[int, float]:
        """``(r, lora_alpha)`` for this layer: a rank above ``min(out, in)`` is lowered to it, with the alpha that
        keeps the layer's scaling, and recorded in ``config.rank_pattern`` / ``alpha_pattern`` (so the saved adapter
        reloads with the same shapes). A top-r SVD has at most ``min(out, in)`` components, which span the matrix."""
        limit = min(self.in_features, self.out_features)
        if r <= limit:
            return r, lora_alpha
        alpha = lora_alpha_for(lora_scaling(r, lora_alpha, config.use_rslora), limit, config.use_rslora)
        logger.warning(
            "GeoRA: rank r=%d is larger than min(out, in)=%d of target module '%s' (%d x %d); this layer gets "
            "rank %d, with lora_alpha %.6g to keep its scaling",
            r, limit, target_name, self.out_features, self.in_features, limit, alpha,
        )  # fmt: skip
        pattern = exact_pattern(target_name)
        config.rank_pattern = {**(config.rank_pattern or {}), pattern: limit}
        config.alpha_pattern = {**(config.alpha_pattern or {}), pattern: alpha}
        return limit, alpha

    def anchor_combined_adapter(self, adapter_name: str) -> None:
        """Turn ``adapter_name``'s plain LoRA factors ``A_c`` (r x in), ``B_c`` (out x r), written by PEFT's adapter
        combination, into GeoRA's form with the same update: ``dA = A_c``, ``B0 = B_c``, ``A0 = 0``, ``dB = 0``, so
        ``s ((B0 + dB) dA + dB A0) = s B_c A_c``. Keeps the modules' ``requires_grad``."""
        plain_a, plain_b = self.lora_A[adapter_name], self.lora_B[adapter_name]
        a, b = plain_a.weight.detach().float(), plain_b.weight.detach().float()
        trainable = plain_a.weight.requires_grad
        experts = self._geora_experts
        self.lora_A[adapter_name] = AnchoredA(a.clone(), torch.zeros_like(a), experts=experts)
        self.lora_B[adapter_name] = AnchoredB(torch.zeros_like(b), b.clone(), experts=experts)
        for module in (self.lora_A[adapter_name], self.lora_B[adapter_name]):
            module.delta.requires_grad_(trainable)
        self.geora_settings[adapter_name] = (("combined", adapter_name),)  # never reused as a decomposition
        self.geora_reports[adapter_name] = {}
        self.geora_expected_fingerprint[adapter_name] = self.geora_fingerprint()
        self._move_adapter_to_device_of_base_layer(adapter_name)

    def _settings_key(self, adapter_name: str, config: GeoRAConfig) -> tuple:
        scale = config.scale_settings(self.scaling[adapter_name])
        settings = dict(config.init_settings, r=self.r[adapter_name], **scale)
        return tuple(sorted(settings.items()))

    def _install_anchors(self, adapter_name: str, config: GeoRAConfig, target_name: str) -> None:
        """Replace LoRA's freshly made ``lora_A``/``lora_B`` by anchored modules holding GeoRA's factors.

        Meta-device placeholders (``low_cpu_mem_usage``) and configs read from a checkpoint get placeholders that the
        checkpoint fills: no decomposition runs when loading.
        """
        placeholder = self.lora_A[adapter_name].weight
        a_shape, b_shape = placeholder.shape, self.lora_B[adapter_name].weight.shape  # (r x in), (out x r) per expert
        base_weight = self.geora_target_weight()
        key = self._settings_key(adapter_name, config)
        report: dict[str, float] = {}
        awaiting = config.init_from_checkpoint
        expected = config.base_fingerprints.get(target_name)
        if placeholder.device.type == "meta" or base_weight.device.type == "meta":
            a0, b0 = torch.empty(a_shape, device="meta"), torch.empty(b_shape, device="meta")
            da, db = a0, b0
        elif awaiting and not self._reusable(adapter_name, key):
            a0, b0 = torch.full(a_shape, float("nan")), torch.full(b_shape, float("nan"))
            da, db = a0.clone(), b0.clone()
        elif not config.init_weights:
            a0 = torch.randn(a_shape) / math.sqrt(a_shape[1])
            b0 = torch.randn(b_shape) / math.sqrt(self.r[adapter_name])
            da = placeholder.detach().float().clone()
            db = torch.randn(b_shape) / math.sqrt(self.r[adapter_name])
            awaiting = False
        else:
            a0, b0, report = self._decomposition(adapter_name, config, key, target_name)
            da, db = torch.zeros_like(a0), torch.zeros_like(b0)
            awaiting = False
        if not awaiting and base_weight.device.type != "meta":
            expected = self.geora_fingerprint()
            config.base_fingerprints[target_name] = expected
        experts = self._geora_experts
        self.lora_A[adapter_name] = AnchoredA(da, a0, awaiting_checkpoint=awaiting, experts=experts)
        self.lora_B[adapter_name] = AnchoredB(db, b0, awaiting_checkpoint=awaiting, experts=experts)
        self.geora_settings[adapter_name] = key
        self.geora_reports[adapter_name] = report
        self.geora_expected_fingerprint[adapter_name] = expected
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _reusable(self, adapter_name: str, key: tuple) -> str | None:
        """Name of another adapter of this layer whose anchors were computed with the same settings, if any."""
        for other, other_key in self.geora_settings.items():
            if other == adapter_name or other_key != key or other not in self.lora_A:
                continue
            module = self.lora_A[other]
            ready = isinstance(module, AnchoredA) and not module.awaiting_checkpoint
            if ready and module.anchor.device.type != "meta":
                return other
        return None

    def _decomposition(
        self, adapter_name: str, config: GeoRAConfig, key: tuple, target_name: str
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """Anchors for ``adapter_name``: reused from an adapter with the same settings, else computed."""
        other = self._reusable(adapter_name, key)
        if other is not None:
            logger.debug("reusing the GeoRA decomposition of adapter '%s' for '%s'", other, adapter_name)
            report = dict(self.geora_reports.get(other, {}), seconds=0.0, reused=1.0)
            advance(target_name)
            return self.lora_A[other].anchor.clone(), self.lora_B[other].anchor.clone(), report
        start = time.perf_counter()
        with self._geora_weight() as matrix:
            scale = config.scale_settings(self.scaling[adapter_name])
            device = resolve_init_device(config.init_device, matrix, target_name)
            factors, report = self._decompose(matrix.to(device), self.r[adapter_name], config, scale)
        report = dict(report, seconds=time.perf_counter() - start, reused=0.0)
        a0, b0 = broadcast_from_rank0(factors, like=self.geora_target_weight())  # ZeRO-3: rank 0's
        advance(target_name)
        return a0.cpu(), b0.cpu(), report

    @property
    def _geora_experts(self) -> int:
        """How many stacked experts the factors hold (1 for a linear layer)."""
        return 1

    def _decompose(
        self, matrix: torch.Tensor, r: int, config: GeoRAConfig, scale: dict
    ) -> tuple[GeoRAFactors, dict[str, float]]:
        """GeoRA's factors of the (out x in) ``matrix`` in this layer's layout, and the report of the decomposition;
        ``scale`` is :meth:`GeoRAConfig.scale_settings` for this layer."""
        dec = geora_decompose(matrix, r, **scale, **config.prior_settings, **config.solver_settings)
        return dec.factors, decomposition_report(dec)

    @contextlib.contextmanager
    def _geora_weight(self) -> Iterator[torch.Tensor]:
        """The base weight as an (out x in) float matrix for the decomposition (gathered under ZeRO-3).

        Quantized layer classes override this to dequantize; nothing written to the yielded tensor may reach the base.
        """
        weight = self.get_base_layer().weight
        with gathered(weight):
            yield transpose(weight.detach(), self.fan_in_fan_out)

    def geora_fingerprint(self) -> dict:
        """Fingerprint of the base weight (:mod:`peft_geora.format.fingerprint`), recorded at init, checked on load."""
        with gathered(self.geora_target_weight()) as weight:
            return weight_fingerprint(weight)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``s (B A - B0 A0) = s ((B0 + dB) dA + dB A0)``: each product relative to itself, exactly zero at init.

        Shape of the base weight, in the delta's dtype (half precision on the CPU is computed in float32 and cast).
        """
        lora_A, lora_B = self.lora_A[adapter], self.lora_B[adapter]
        if not isinstance(lora_A, AnchoredA):
            return super().get_delta_weight(adapter)
        lora_A.check_ready()
        dtype = lora_B.delta.dtype
        compute = torch.float32 if lora_B.delta.device.type == "cpu" and dtype in _HALF else dtype
        da, a0 = lora_A.delta.to(compute), lora_A.anchor.to(compute)
        db, b0 = lora_B.delta.to(compute), lora_B.anchor.to(compute)
        delta = transpose((b0 + db) @ da + db @ a0, self.fan_in_fan_out) * self.scaling[adapter]
        return delta.to(dtype)

    def __repr__(self) -> str:
        return "geora." + nn.Module.__repr__(self)


class GeoRALinear(GeoRALayer, LoraLinear):
    """GeoRA on a float ``nn.Linear`` or transformers ``Conv1D`` (``fan_in_fan_out``)."""
