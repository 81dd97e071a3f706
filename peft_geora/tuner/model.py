"""``GeoRAModel``: PEFT's LoRA tuner with GeoRA layers, all-or-nothing injection and an init report."""

from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Any

from peft.tuners.lora import LoraLayer, LoraModel
from peft.tuners.tuners_utils import BaseTunerLayer, _maybe_include_all_linear_layers, check_target_module_exists
from peft.utils import _get_submodules
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..format.card import TAGS
from ..format.checkpoint import upgrade_state_dict, validate_checkpoint
from .bnb_weights import bnb_layer_kind
from .config import GeoRAConfig
from .experts import GeoRAParamWrapper
from .init_runtime import init_progress
from .layer import GeoRALayer, GeoRALinear, check_target_type, plain_lora_modules
from .load_check import ensure_load_hooks

logger = logging.getLogger(__name__)


class GeoRAModel(LoraModel):
    """Creates a GeoRA model from a transformers (or any torch) model; use it through ``get_peft_model``.

    Target matching, ``rank_pattern``/``alpha_pattern``, dtype handling, merging, unloading and saving are LoRA's.
    Injection is atomic: if any target fails (bad layer type, rank too large, NaN weights ...) every module touched
    by this adapter is restored and the error is re-raised.
    """

    prefix: str = "lora_"
    tuner_layer_cls = LoraLayer

    def _check_new_adapter_config(self, config: GeoRAConfig) -> None:
        if not isinstance(config, GeoRAConfig):
            raise TypeError(f"GeoRAModel needs a GeoRAConfig, got {type(config).__name__}")
        super()._check_new_adapter_config(config)

    @staticmethod
    def _create_new_module(config: GeoRAConfig, adapter_name: str, target: nn.Module, **kwargs: Any) -> nn.Module:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        name = kwargs.get("target_name") or type(base).__name__
        if isinstance(base, nn.Embedding) and getattr(config, "ensure_weight_tying", False):
            raise TypeError(
                f"GeoRA: ensure_weight_tying=True asks for one update shared by the output head and the tied input "
                f"embedding '{name}', but GeoRA adapts linear layers only (an Embedding has no GeoRA form). Leave the "
                "output head out of target_modules (the paper's setting, and GeoRA's default 'all-linear'), or set "
                "ensure_weight_tying=False to adapt the head alone (the input embedding then keeps its weights)."
            )
        parameter_name = kwargs.pop("parameter_name", None)
        if parameter_name is not None:  # target_parameters: a 2-D parameter or 3-D stacked experts
            return GeoRAParamWrapper(target, adapter_name, parameter_name=parameter_name, config=config, **kwargs)
        check_target_type(base, name)  # the weight is checked by update_layer, before anything is modified
        if bnb_layer_kind(base) is not None:
            from .quantized import create_quantized_module  # needs bitsandbytes, an optional dependency

            return create_quantized_module(target, adapter_name, config, **kwargs)
        if isinstance(base, Conv1D):
            config.fan_in_fan_out = True
            return GeoRALinear(target, adapter_name, config=config, is_target_conv_1d_layer=True, **kwargs)
        config.fan_in_fan_out = False
        return GeoRALinear(target, adapter_name, config=config, **kwargs)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        config = self.peft_config[adapter_name]
        checkpoint_dir = config.__dict__.pop("_checkpoint_dir", None)  # checked for this load only: the adapter
        if config.init_from_checkpoint and checkpoint_dir is not None:  # must not depend on its folder afterwards
            validate_checkpoint(checkpoint_dir, model)
        _convert_moe_targets(model, config)
        decomposes = config.init_weights and not config.init_from_checkpoint
        total = _count_targets(self, model, config) if decomposes else 0
        try:
            with init_progress(total, desc=f"GeoRA init ({adapter_name})"):
                super().inject_adapter(model, adapter_name, *args, **kwargs)
        except Exception:
            _remove_adapter_from_modules(model, adapter_name)
            raise
        config.parameter_targets = {
            name: [module.geora_param_key, module.num_experts]
            for name, module in model.named_modules()
            if isinstance(module, GeoRALayer) and adapter_name in module.lora_A and hasattr(module, "geora_param_key")
        }
        ensure_load_hooks(model)
        if hasattr(model, "add_model_tags"):
            model.add_model_tags(list(TAGS))

    def add_weighted_adapter(
        self, adapters: list[str], weights: list[float], adapter_name: str, *args, **kwargs
    ) -> None:
        """PEFT's adapter combination (every ``combination_type``), exact for GeoRA adapters.

        PEFT combines each adapter's LoRA factors and scaling; a GeoRA adapter's are its rank-2r effective factors
        ``[dA; A0]``, ``[B0 + dB, dB]`` with scaling ``s`` (``s B' A' = s (B A - B0 A0)``), so the result is what PEFT
        makes of the adapters' LoRA exports: ``"cat"`` is exactly the weighted sum of the updates. The new adapter
        holds the combined factors in GeoRA's form (``dA = A_c``, ``B0 = B_c``, ``A0 = dB = 0``), saves and loads like
        any GeoRA adapter, and runs no decomposition. Raises ``ValueError`` for an adapter that is not GeoRA or whose
        weights were never loaded, before anything is changed.
        """
        if adapter_name in self.peft_config:  # PEFT's behaviour: a taken name changes nothing
            return super().add_weighted_adapter(adapters, weights, adapter_name, *args, **kwargs)
        for name in adapters:
            config = self.peft_config.get(name)
            if not isinstance(config, GeoRAConfig):
                raise ValueError(f"GeoRA add_weighted_adapter: adapter {name!r} is not a GeoRA adapter of this model")
        for module in self.model.modules():
            if isinstance(module, GeoRALayer):
                for name in adapters:
                    if name in module.lora_A:
                        module.lora_A[name].check_ready()
        originals = {name: self.peft_config[name] for name in adapters}
        for name, config in originals.items():  # PEFT sizes the result from the ranks: present the rank-2r LoRAs
            ranks = {key: 2 * rank for key, rank in (config.rank_pattern or {}).items()}
            self.peft_config[name] = dataclasses.replace(config, r=2 * config.r, rank_pattern=ranks)
        try:
            with plain_lora_modules():
                super().add_weighted_adapter(adapters, weights, adapter_name, *args, **kwargs)
        finally:
            self.peft_config.update(originals)
        config = self.peft_config[adapter_name]
        config.init_from_checkpoint, config.base_fingerprints = False, {}
        for name, module in self.model.named_modules():
            if isinstance(module, GeoRALayer) and adapter_name in module.lora_A:
                module.anchor_combined_adapter(adapter_name)
                config.base_fingerprints[name] = module.geora_expected_fingerprint[adapter_name]

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: GeoRAConfig, adapter_name: str, state_dict: dict
    ) -> dict:
        """PEFT's key remapping, after upgrading a format-1 checkpoint (``factor`` keys) to format 2."""
        return super()._remap_adapter_state_dict_for_load(
            model=model, config=config, adapter_name=adapter_name, state_dict=upgrade_state_dict(state_dict)
        )

    def geora_init_report(self, adapter_name: str = "default") -> dict[str, dict[str, float]]:
        """Per-module statistics of the initialisation of ``adapter_name`` (empty for loaded adapters)."""
        return {
            name: dict(module.geora_reports[adapter_name])
            for name, module in self.model.named_modules()
            if isinstance(module, GeoRALayer) and module.geora_reports.get(adapter_name)
        }


def _convert_moe_targets(model: nn.Module, config: GeoRAConfig) -> None:
    """Target on a mixture-of-experts model what PEFT's LoRA targets with the same ``target_modules``.

    transformers 5 stores the experts of MoE blocks (and some routers) as parameters; for LoRA, PEFT's
    ``inject_adapter`` maps ``target_modules`` (``"all-linear"`` included) to the matching ``target_parameters``
    (PEFT's ``convert_peft_config_for_transformers``), but only for ``PeftType.LORA``. GeoRA applies the same mapping
    to its own config, in place, and logs what it added.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None:
        return
    from peft.utils.transformers_weight_conversion import _convert_peft_config_moe, get_checkpoint_conversion_mapping

    if get_checkpoint_conversion_mapping(model_type) is None:
        return
    before = set(config.target_parameters or [])
    _convert_peft_config_moe(config, model)
    added = set(config.target_parameters or []) - before
    if added:
        logger.info("GeoRA on this %s model also adapts the parameters %s, as LoRA does", model_type, sorted(added))


def _count_targets(tuner: GeoRAModel, model: nn.Module, config: GeoRAConfig) -> int:
    """How many modules ``config`` targets (the length of the progress bar), resolved on a copy as PEFT resolves
    it (the model type's default targets, ``"all-linear"``)."""
    resolved = tuner._prepare_adapter_config(copy.deepcopy(config), tuner.get_model_config(model))
    resolved = _maybe_include_all_linear_layers(resolved, model)
    return sum(bool(check_target_module_exists(resolved, name)) for name, _ in model.named_modules() if name)


def _remove_adapter_from_modules(model: nn.Module, adapter_name: str) -> None:
    """Undo a partial injection: drop ``adapter_name`` everywhere, unwrap layers that held nothing else."""
    for key in [k for k, m in model.named_modules() if isinstance(m, LoraLayer)]:
        parent, layer, target_name = _get_submodules(model, key)
        if adapter_name not in layer.r:
            continue
        if set(layer.r) == {adapter_name}:
            setattr(parent, target_name, layer.get_base_layer())
        else:
            layer.delete_adapter(adapter_name)
    logger.debug("rolled back the partial injection of adapter '%s'", adapter_name)
