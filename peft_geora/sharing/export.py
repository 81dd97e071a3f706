"""Export a GeoRA adapter as a plain, stock PEFT LoRA on the original base weights.

``s (B A - B0 A0) = s [B0 + dB, dB] [dA; A0]``, so with ``A' = [dA; A0]`` (2r x in) and ``B' = [B0 + dB, dB]``
(out x 2r) and an alpha that keeps each module's scaling, any LoRA loader (stock PEFT, transformers'
``load_adapter``, vLLM) reproduces the GeoRA model without this package. Each block rounds relative to itself, so
the small update survives a bf16 copy of the export as a LoRA's does. rsLoRA and rank/alpha patterns are resolved
per module: the export uses plain scaling ``alpha' / r'`` with ``alpha' = s * r'`` and spells out every module that
differs from the default.

Serving engines cap the LoRA rank (vLLM's ``--max-lora-rank``, default 16). ``rank=k`` writes instead the best
rank-k approximation of each module's update (:func:`peft_geora.functional.truncate_product`: QR of the rank-2r
factors and a (2r x 2r) SVD, never a dense out x in matrix), and records each module's relative error
``||dW - dW_k||_F / ||dW||_F`` in ``geora_export.json`` beside the weights.
"""

from __future__ import annotations

import enum
import json
import logging
import math
import os
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import save_file

from ..format.card import write_model_card
from ..format.checkpoint import (
    CONFIG_NAME,
    PEFT_PREFIX,
    WEIGHTS_NAME,
    geora_tensors_by_module,
    read_tensors,
    weights_file,
)
from ..functional import truncate_product
from ..tuner.anchor import effective_weight
from ..tuner.config import GeoRAConfig, exact_pattern, lora_alpha_for, lora_scaling, pattern_value
from ..tuner.layer import GeoRALayer

logger = logging.getLogger(__name__)

REPORT_NAME = "geora_export.json"
_LORA_FIELDS = frozenset(LoraConfig.__dataclass_fields__) - {"runtime_config"}


def _jsonable(value: object) -> object:
    """Config values as PEFT writes them: sets as sorted lists, enums as their value."""
    if isinstance(value, set):
        return sorted(value)
    if isinstance(value, enum.Enum):
        return value.value
    return value


def read_adapter(folder: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """The config dict and tensors of a saved GeoRA adapter, with errors that name the file."""
    folder = Path(folder)
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"GeoRA export: no {CONFIG_NAME} in {folder}")
    weights_path = weights_file(folder)
    config = json.loads(config_path.read_text())
    if config.get("peft_type") != "GEORA":
        raise ValueError(f"GeoRA export: {config_path} is a {config.get('peft_type')!r} adapter, not GEORA")
    return config, read_tensors(weights_path)


def geora_to_lora(
    config: dict, tensors: dict[str, torch.Tensor], rank: int | None = None
) -> tuple[dict, dict[str, torch.Tensor], dict[str, float]]:
    """Convert a GeoRA config dict and state dict to a LoRA config dict, state dict and per-module error.

    ``rank=None``: the exact rank-2r LoRA (errors all 0.0). ``rank=k``: each module's best rank-``min(k, 2r)``
    approximation, with its relative Frobenius error. Factors keep the dtype of the saved deltas; ``B0 + dB`` and the
    truncation are computed in float32 / float64 first. Format-1 state dicts are converted. Raises ``ValueError``
    for a module that lacks one of its four tensors, or ``rank < 1``.
    """
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"GeoRA export: rank must be a positive int or None, got {rank!r}")
    parts, out = geora_tensors_by_module(tensors)
    ranks, errors = {}, {}
    for module, p in sorted(parts.items()):
        name, experts = _pattern_key_and_experts(config, module.removeprefix(PEFT_PREFIX))
        dtype = p["A_delta"].dtype
        a = effective_weight(p["A_delta"].float(), p["A_anchor"].float(), "A", experts)
        b = effective_weight(p["B_delta"].float(), p["B_anchor"].float(), "B", experts)
        errors[module] = 0.0
        if rank is not None:
            if experts > 1:
                raise ValueError(
                    f"GeoRA export: module '{name}' holds {experts} stacked experts; a rank-k export of experts is "
                    "not supported (export them exactly, at rank 2r per expert)"
                )
            b, a, errors[module] = truncate_product(b, a, rank)
        out[f"{module}.lora_A.weight"] = a.to(dtype).contiguous()
        out[f"{module}.lora_B.weight"] = b.to(dtype).contiguous()
        ranks[name] = (p["A_anchor"].shape[0] // experts, a.shape[0] // experts)
    return lora_config_dict(config, ranks, rank), out, errors


def lora_config_dict(config: dict, ranks: dict[str, tuple[int, int]], rank: int | None = None) -> dict:
    """The config dict of a GeoRA adapter's LoRA export (the one conversion of configs, used by every export).

    ``ranks`` maps each module's pattern name (its path, or the parameter's name for ``target_parameters``) to
    ``(r, r')``: its GeoRA rank and its rank in the export. The export's default rank is ``rank`` (``2r`` if None);
    each module keeps its GeoRA scaling ``s`` (rank/alpha patterns and rsLoRA resolved): plain LoRA scaling
    ``alpha' / r'`` with ``alpha' = s r'``, and every module whose ``r'`` or ``alpha'`` differs from the default is
    spelled out in ``rank_pattern`` / ``alpha_pattern`` with an exact key.
    """
    base_r, base_alpha, rslora = config["r"], config["lora_alpha"], bool(config.get("use_rslora"))
    default_scaling = lora_scaling(base_r, base_alpha, rslora)
    new_r = rank if rank is not None else 2 * base_r
    rank_pattern, alpha_pattern = {}, {}
    for name, (r, r_export) in sorted(ranks.items()):
        scaling = lora_scaling(r, pattern_value(config.get("alpha_pattern") or {}, name, base_alpha), rslora)
        if r_export != new_r:
            rank_pattern[name] = r_export
        alpha = lora_alpha_for(scaling, r_export, use_rslora=False)
        if not math.isclose(alpha, lora_alpha_for(default_scaling, new_r, use_rslora=False), rel_tol=1e-12):
            alpha_pattern[name] = alpha
    lora_config = {k: _jsonable(v) for k, v in config.items() if k in _LORA_FIELDS}
    lora_config.update(
        peft_type="LORA",
        r=new_r,
        lora_alpha=lora_alpha_for(default_scaling, new_r, use_rslora=False),
        use_rslora=False,
        rank_pattern={exact_pattern(k): v for k, v in rank_pattern.items()},
        alpha_pattern={exact_pattern(k): v for k, v in alpha_pattern.items()},
        init_lora_weights=True,
    )
    return lora_config


def _pattern_key_and_experts(config: dict, module: str) -> tuple[str, int]:
    """The name PEFT resolves a saved module's rank and alpha patterns by, and its number of stacked experts: for an
    adapted parameter (the config's ``parameter_targets``) the parameter's name and E, else the module path and 1."""
    key, experts = (config.get("parameter_targets") or {}).get(module, (module, 1))
    return key, experts


def write_lora_export(
    config: dict, tensors: dict[str, torch.Tensor], dst: str | os.PathLike, rank: int | None = None
) -> Path:
    """Convert (see :func:`geora_to_lora`) and write a stock PEFT LoRA folder: config, weights and model card.

    With ``rank``, also ``geora_export.json``: ``{"rank": k, "relative_error": {module: error}}``.
    """
    lora_config, lora_tensors, errors = geora_to_lora(config, tensors, rank)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    save_file(lora_tensors, str(dst / WEIGHTS_NAME), metadata={"format": "pt"})
    (dst / CONFIG_NAME).write_text(json.dumps(lora_config, indent=2, sort_keys=True))
    if rank is not None:
        (dst / REPORT_NAME).write_text(json.dumps({"rank": rank, "relative_error": errors}, indent=2))
        worst = max(errors, key=errors.get, default=None)
        if worst is not None:
            logger.info("GeoRA rank-%d export: largest relative error %.3g (%s)", rank, errors[worst], worst)
    write_model_card(dst, base_model=config.get("base_model_name_or_path"), export=True)
    return dst


def export_lora(src: str | os.PathLike, dst: str | os.PathLike, rank: int | None = None) -> Path:
    """Write the LoRA export of the GeoRA adapter saved in ``src`` to ``dst`` (created): rank 2r exact, or ``rank``."""
    config, tensors = read_adapter(src)
    return write_lora_export(config, tensors, dst, rank)


def save_as_lora(peft_model, dst: str | os.PathLike, adapter_name: str = "default", rank: int | None = None) -> Path:  # noqa: ANN001
    """Save ``adapter_name`` of a GeoRA ``PeftModel`` (or ``GeoRAModel``) as a stock LoRA in ``dst`` (created).

    ``rank=None`` (default): the exact rank-2r LoRA (``B' = [B0 + dB, dB]``, ``A' = [dA; A0]``). ``rank=k``: the best
    rank-k approximation of each module's update, with per-module relative errors in ``dst/geora_export.json``. The
    folder loads with stock PEFT and transformers' ``load_adapter`` without peft-geora. Raises ``ValueError`` for an
    adapter that is not GeoRA.
    """
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    tuner = peft_model.base_model if isinstance(peft_model, PeftModel) else peft_model
    config = tuner.peft_config[adapter_name]
    if not isinstance(config, GeoRAConfig):
        raise ValueError(f"GeoRA export: adapter {adapter_name!r} is a {type(config).__name__} adapter, not GeoRA")
    state = get_peft_model_state_dict(tuner, adapter_name=adapter_name, save_embedding_layers=False)
    tensors = {f"base_model.{key}": value.detach().cpu() for key, value in state.items()}
    config_dict = config.to_dict()
    config_dict["base_model_name_or_path"] = config.base_model_name_or_path or tuner.model.name_or_path or None
    return write_lora_export(config_dict, tensors, dst, rank)


def lora_export_config(peft_model, adapter_name: str) -> LoraConfig:  # noqa: ANN001
    """The ``LoraConfig`` that :func:`save_as_lora` would write for ``adapter_name`` (ranks 2r, each module's scaling
    kept, plain LoRA scaling), read off the model's layers without copying weights. TRL's vLLM sync checks the server's
    ``--max-lora-rank`` against it."""
    tuner = getattr(peft_model, "base_model", peft_model)
    ranks = {}
    for name, module in tuner.model.named_modules():
        if isinstance(module, GeoRALayer) and adapter_name in module.lora_A:
            key = getattr(module, "geora_param_key", name)
            ranks[key] = (module.r[adapter_name], 2 * module.r[adapter_name])
    data = lora_config_dict(tuner.peft_config[adapter_name].to_dict(), ranks)
    return LoraConfig(**{k: v for k, v in data.items() if k != "peft_type"})
