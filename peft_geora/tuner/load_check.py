"""The base-weight check after every adapter load (:mod:`peft_geora.format.fingerprint` holds the fingerprint).

PEFT loads an adapter with ``load_state_dict``; transformers' ``load_adapter`` assigns tensors directly. The hooks
below compare each freshly loaded GeoRA adapter's stored fingerprint with the weight it now sits on, once, right after
the load or before the next forward, and apply the policy (:func:`peft_geora.base_check`).
"""

from __future__ import annotations

import warnings

from torch import nn

from ..format.fingerprint import BaseModelMismatchError, BaseModelMismatchWarning, current_policy, fingerprints_match
from .anchor import AnchoredA
from .layer import GeoRALayer


def check_loaded_adapters(model: nn.Module) -> list[str]:
    """Compare every freshly loaded GeoRA adapter's fingerprint with its base weight; apply the policy.

    Returns the mismatching ``module (adapter)`` names. Runs as a ``load_state_dict`` post-hook of the model.
    """
    mismatched = []
    policy = current_policy()
    for name, module in model.named_modules():
        if not isinstance(module, GeoRALayer):
            continue
        for adapter, lora_a in module.lora_A.items():
            if not isinstance(lora_a, AnchoredA):
                continue
            lora_a.resolve_checkpoint()
            if not lora_a.loaded_unchecked:
                continue
            lora_a.loaded_unchecked = False
            expected = module.geora_expected_fingerprint.get(adapter)
            weight = module.geora_target_weight()
            if policy == "off" or not expected or weight.device.type == "meta":
                continue
            if not fingerprints_match(expected, module.geora_fingerprint()):
                mismatched.append(f"{name} ({adapter})")
    if mismatched:
        shown = ", ".join(mismatched[:10]) + (f" and {len(mismatched) - 10} more" if len(mismatched) > 10 else "")
        message = (
            f"GeoRA: the base weights of {len(mismatched)} adapted module(s) differ from those the adapter was "
            f"initialised on: {shown}. Load the adapter onto the base model (and revision) it was trained from."
        )
        if policy == "raise":
            raise BaseModelMismatchError(message)
        warnings.warn(message, BaseModelMismatchWarning, stacklevel=2)
    return mismatched


def ensure_load_hooks(model: nn.Module) -> None:
    """Check loads on ``model``: right after PEFT's ``load_state_dict``, and before the next forward for loaders
    that assign tensors directly (transformers' ``load_adapter``). Called after every injection."""
    model._geora_check_pending = True
    if getattr(model, "_geora_hooks", None) is None:
        model._geora_hooks = (
            model.register_load_state_dict_post_hook(_post_load_hook),
            model.register_forward_pre_hook(_pre_forward_hook),
        )


def _post_load_hook(module: nn.Module, incompatible_keys: object) -> None:
    module._geora_check_pending = False
    check_loaded_adapters(module)


def _pre_forward_hook(module: nn.Module, args: object) -> None:
    if module._geora_check_pending:
        module._geora_check_pending = False
        check_loaded_adapters(module)
