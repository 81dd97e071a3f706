"""TRL's experimental adapter-only vLLM sync, made correct for GeoRA.

``trl.experimental.async_grpo`` can push just the LoRA adapter to a vLLM server instead of merged weights. It
accepts any ``LoraConfig`` (GeoRAConfig is one) and saves the adapter with ``save_pretrained``, which for GeoRA is
the anchored format (``lora_A.delta`` / ``lora_A.anchor`` ...) that vLLM's LoRA loader does not understand. vLLM
would then serve something other than the policy. So when that module is imported, its two helpers are wrapped:

* ``validate_lora_for_vllm_sync`` reports a GeoRA adapter as the rank-2r LoRA it is (so the server's
  ``--max-lora-rank`` is checked against 2r);
* ``save_lora_adapter`` writes a GeoRA adapter as its rank-2r LoRA export (``B' = [B0 + dB, dB]``, ``A' = [dA; A0]``),
  which vLLM serves exactly; other adapters go through TRL's own code unchanged.

The wrapping happens through an import hook, so it does not matter whether TRL or peft-geora is imported first,
and it never imports TRL itself.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import logging
import os
import shutil
import sys
from copy import deepcopy
from typing import Any

from ..tuner.config import GeoRAConfig
from .export import lora_export_config, write_lora_export

logger = logging.getLogger(__name__)

ASYNC_GRPO_MODULE = "trl.experimental.async_grpo.async_grpo_trainer"
_PATCHED = "_peft_geora_patched"


def save_geora_lora_adapter(model: Any, accelerator: Any, adapter_name: str, dest_dir: str) -> None:
    """Publish ``adapter_name`` of a GeoRA model to ``dest_dir`` as its rank-2r LoRA export (atomic rename)."""
    from torch.distributed.tensor import DTensor

    tensors = {}
    for name, param in model.state_dict().items():
        if "lora_" not in name or f".{adapter_name}." not in name:
            continue
        if param.is_cpu:
            param = param.to(accelerator.device)
        if isinstance(param, DTensor):  # FSDP2: gathering is a collective, every rank takes part
            param = param.full_tensor()
        tensors[name.replace(f".{adapter_name}.", ".")] = param.detach().cpu()
    if not accelerator.is_main_process:
        return
    config = model.peft_config[adapter_name].to_dict()
    tmp_dir = os.path.join(os.path.dirname(dest_dir), f".{os.path.basename(dest_dir)}.tmp")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    write_lora_export(config, tensors, tmp_dir)
    shutil.rmtree(dest_dir, ignore_errors=True)
    os.rename(tmp_dir, dest_dir)


def patch_async_grpo(module: Any) -> None:
    """Wrap the adapter-sync helpers of TRL's async GRPO module (idempotent)."""
    if getattr(module, _PATCHED, False):
        return
    validate, save = module.validate_lora_for_vllm_sync, module.save_lora_adapter

    @functools.wraps(validate)
    def validate_lora_for_vllm_sync(model: Any) -> Any:
        config = validate(model)
        if not isinstance(config, GeoRAConfig):
            return config
        return lora_export_config(model, model.active_adapters[0])

    @functools.wraps(save)
    def save_lora_adapter(model: Any, accelerator: Any, adapter_name: str, dest_dir: str) -> None:
        if isinstance(model.peft_config.get(adapter_name), GeoRAConfig):
            return save_geora_lora_adapter(model, accelerator, adapter_name, dest_dir)
        return save(model, accelerator, adapter_name, dest_dir)

    module.validate_lora_for_vllm_sync = validate_lora_for_vllm_sync
    module.save_lora_adapter = save_lora_adapter
    setattr(module, _PATCHED, True)
    logger.debug("peft-geora: TRL's async GRPO adapter sync now exports GeoRA adapters as rank-2r LoRA")


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Meta-path finder that patches the async GRPO module right after it is executed."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != ASYNC_GRPO_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_patch(module: Any) -> None:
            exec_module(module)
            patch_async_grpo(module)

        spec.loader = deepcopy(spec.loader)
        spec.loader.exec_module = exec_and_patch
        return spec


def install() -> None:
    """Patch the async GRPO module now if it is loaded, else as soon as it is imported (idempotent)."""
    if ASYNC_GRPO_MODULE in sys.modules:
        patch_async_grpo(sys.modules[ASYNC_GRPO_MODULE])
    elif not any(isinstance(finder, _PatchOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())
