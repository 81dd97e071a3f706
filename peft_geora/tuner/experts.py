"""GeoRA on parameters (PEFT's ``target_parameters``): mixture-of-experts weights stored as 3-D tensors, routers.

transformers 5 stores the experts of a mixture-of-experts block as one 3-D parameter per projection, e.g.
``Qwen3MoeExperts.gate_up_proj`` (E x 2I x H, experts x out x in) or gpt-oss's transposed (E x in x out), and some
routers as a bare 2-D parameter. PEFT's LoRA reaches them with ``ParamWrapper``; :class:`GeoRAParamWrapper` is that
wrapper with GeoRA's anchored factors: every expert gets its own GeoRA initialisation (both priors and the top-r of
that expert's matrix, batched over the experts by :func:`peft_geora.functional.geora_decompose_experts`), and the
update of expert ``e`` is ``s (B_e A_e - B0_e A0_e)``, trained as the deltas ``dA``, ``dB``. The factors use PEFT's
layout for stacked experts (``lora_A`` E r x in, ``lora_B`` out x r E), so PEFT's forward, merge and unmerge apply
the rank-2r effective factors (:func:`peft_geora.tuner.anchor.effective_weight`) unchanged, and the LoRA export is
a stock ``target_parameters`` LoRA of rank 2r per expert.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from peft.tuners.lora import ParamWrapper
from torch import nn

from ..functional import GeoRAFactors, geora_decompose_experts
from .config import GeoRAConfig
from .distributed import check_reachable, gathered, is_zero3_param
from .layer import GeoRALayer


class GeoRAParamWrapper(GeoRALayer, ParamWrapper):
    """GeoRA on one targeted ``nn.Parameter`` (2-D, or 3-D stacked experts); nested for several on one module."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, parameter_name: str, **kwargs: Any) -> None:
        key = kwargs.get("target_name") or parameter_name  # PEFT passes the parameter's full name
        self.geora_param_key = key if key.endswith(parameter_name) else f"{key}.{parameter_name}"
        super().__init__(base_layer, adapter_name, parameter_name=parameter_name, **kwargs)

    def _geora_target_name(self, target_name: str | None) -> str:
        return self.geora_param_key  # module key + parameter: several parameters of one module are told apart

    def geora_target_weight(self) -> torch.Tensor:
        return self.get_param()

    @property
    def _geora_experts(self) -> int:
        return self.num_experts

    def _check_geora_target(self, target_name: str) -> None:
        param = self.get_param()
        if not param.is_floating_point():
            raise TypeError(f"GeoRA: target parameter '{target_name}' is not a float tensor ({param.dtype})")
        if param.device.type == "meta":
            return
        check_reachable(param, target_name)
        finite = is_zero3_param(param) or bool(torch.isfinite(param.amax()) and torch.isfinite(param.amin()))
        if not finite:
            raise ValueError(f"GeoRA: the target parameter '{target_name}' contains NaN or Inf values")

    def _capped_rank(self, target_name: str, r: int, lora_alpha: float, config: GeoRAConfig) -> tuple[int, float]:
        limit = min(self.in_features, self.out_features)
        if r > limit:
            raise ValueError(
                f"GeoRA: rank r={r} is larger than min(out, in)={limit} of the experts of target parameter "
                f"'{target_name}'. Lower r, or give this module a smaller rank with rank_pattern."
            )
        return r, lora_alpha

    @contextlib.contextmanager
    def _geora_weight(self) -> Iterator[torch.Tensor]:
        """The targeted parameter as (out x in), or (E x out x in) for stacked experts (gathered under ZeRO-3)."""
        with gathered(self.get_param()) as param:
            param = param.detach()
            if param.dim() == 3 and not self._did_swap_in_out_features:  # stored (E, in, out), as gpt-oss does
                param = param.transpose(1, 2)
            yield param

    def _decompose(
        self, matrix: torch.Tensor, r: int, config: GeoRAConfig, scale: dict
    ) -> tuple[GeoRAFactors, dict[str, float]]:
        if matrix.dim() == 2:
            return super()._decompose(matrix, r, config, scale)
        factors, report = geora_decompose_experts(matrix, r, **scale, **config.prior_settings)
        experts, out_features = matrix.shape[0], matrix.shape[1]
        a0 = factors.A.reshape(experts * r, -1)  # PEFT's layout: expert e's rows e r .. e r + r - 1
        b0 = factors.B.permute(1, 2, 0).reshape(out_features, r * experts)  # column j E + e
        return GeoRAFactors(A=a0.contiguous(), B=b0.contiguous()), report

    def get_delta_weight(self, adapter_name: str, *args: Any, **kwargs: Any) -> torch.Tensor:
        """PEFT's per-expert ``s B' A'`` on the rank-2r effective factors: ``s (B A - B0 A0)`` for each expert."""
        self.lora_A[adapter_name].check_ready()
        return ParamWrapper.get_delta_weight(self, adapter_name, *args, **kwargs)

    def get_delta_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        self.lora_A[adapter_name].check_ready()
        return ParamWrapper.get_delta_factors(self, adapter_name)


# PEFT finds existing wrappers (a second adapter, a second parameter of one module) by the class name
GeoRAParamWrapper.__name__ = ParamWrapper.__name__
