"""Export a GeoRA adapter as a plain, stock PEFT LoRA of rank 2r on the original base weights.

``s (B A - B0 A0) = s [B, -B0] [A; A0]``, so with ``A' = [A; A0]`` (2r x in) and ``B' = [B, -B0]`` (out x 2r) and
an alpha that keeps each module's scaling, any LoRA loader (stock PEFT, transformers' ``load_adapter``, vLLM)
reproduces the GeoRA model without this package. rsLoRA and rank/alpha patterns are resolved per module: the export
uses plain scaling ``alpha' / r'`` with ``alpha' = s * 2r`` and spells out every module that differs from the default.
"""

from __future__ import annotations

import enum
import json
import math
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .hub import write_model_card

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_GEORA_ONLY_FIELDS = (
    "rho",
    "spectral_rank",
    "priors",
    "components",
    "scale_convention",
    "svd_solver",
    "svd_niter",
    "svd_oversample",
    "svd_seed",
    "init_weights",
    "init_from_checkpoint",
    "base_fingerprints",
    "geora_format_version",
)
_FACTOR_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<side>[AB])\.(?P<kind>factor|anchor)$")


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    """PEFT's pattern lookup: the first key that matches the end of the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


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
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"GeoRA export: no {CONFIG_NAME} in {folder}")
    if not weights_path.is_file():
        raise FileNotFoundError(f"GeoRA export: no {WEIGHTS_NAME} in {folder}")
    config = json.loads(config_path.read_text())
    if config.get("peft_type") != "GEORA":
        raise ValueError(f"GeoRA export: {config_path} is a {config.get('peft_type')!r} adapter, not GEORA")
    try:
        tensors = load_file(str(weights_path))
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise ValueError(f"GeoRA export: cannot read {weights_path}: {exc}") from exc
    return config, tensors


def geora_to_lora(config: dict, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """Convert a GeoRA config dict and state dict to a rank-2r LoRA config dict and state dict."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        match = _FACTOR_KEY.match(key)
        if match is None:
            out[key] = value  # e.g. modules_to_save, trainable token indices: LoRA saves them the same way
            continue
        parts.setdefault(match["module"], {})[f"{match['side']}_{match['kind']}"] = value
    rank_pattern, alpha_pattern = {}, {}
    base_r, base_alpha = config["r"], config["lora_alpha"]

    def scaling(r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r

    new_r, new_alpha = 2 * base_r, scaling(base_r, base_alpha) * 2 * base_r
    for module, p in sorted(parts.items()):
        missing = {"A_factor", "A_anchor", "B_factor", "B_anchor"} - p.keys()
        if missing:
            raise ValueError(f"GeoRA export: module '{module}' lacks {sorted(missing)} in the checkpoint")
        a, b = p["A_factor"], p["B_factor"]
        out[f"{module}.lora_A.weight"] = torch.cat([a, p["A_anchor"].to(a.dtype)], dim=0).contiguous()
        out[f"{module}.lora_B.weight"] = torch.cat([b, -p["B_anchor"].to(b.dtype)], dim=1).contiguous()
        r = a.shape[0]
        name = module.removeprefix("base_model.model.")
        alpha = _pattern_value(config.get("alpha_pattern") or {}, name, base_alpha)
        r_m, alpha_m = 2 * r, scaling(r, alpha) * 2 * r
        if r_m != new_r:
            rank_pattern[re.escape(name)] = r_m
        if not math.isclose(alpha_m, new_alpha, rel_tol=1e-12):
            alpha_pattern[re.escape(name)] = alpha_m
    lora_config = {k: _jsonable(v) for k, v in config.items() if k not in _GEORA_ONLY_FIELDS}
    lora_config.update(
        peft_type="LORA",
        r=new_r,
        lora_alpha=new_alpha,
        use_rslora=False,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        init_lora_weights=True,
    )
    return lora_config, out


def write_lora_export(config: dict, tensors: dict[str, torch.Tensor], dst: str | os.PathLike) -> Path:
    """Convert (see :func:`geora_to_lora`) and write a stock PEFT LoRA folder: config, weights and model card."""
    lora_config, lora_tensors = geora_to_lora(config, tensors)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    save_file(lora_tensors, str(dst / WEIGHTS_NAME), metadata={"format": "pt"})
    (dst / CONFIG_NAME).write_text(json.dumps(lora_config, indent=2, sort_keys=True))
    write_model_card(dst, base_model=config.get("base_model_name_or_path"), export=True)
    return dst


def export_lora(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Write the rank-2r LoRA export of the GeoRA adapter saved in ``src`` to ``dst`` (created)."""
    config, tensors = read_adapter(src)
    return write_lora_export(config, tensors, dst)


def save_as_lora(peft_model, dst: str | os.PathLike, adapter_name: str = "default") -> Path:  # noqa: ANN001
    """Save ``adapter_name`` of a GeoRA ``PeftModel`` (or ``GeoRAModel``) as a stock rank-2r LoRA in ``dst``."""
    from peft import PeftModel

    tuner = peft_model.base_model if isinstance(peft_model, PeftModel) else peft_model
    return tuner.save_as_lora(dst, adapter_name)
