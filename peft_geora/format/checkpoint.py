"""Check a saved GeoRA checkpoint against the model before anything is injected, so a bad load changes nothing.

PEFT injects adapter layers first and reads the weights afterwards; a missing or damaged file, a checkpoint for
another architecture or a shape mismatch would then fail with the base model already modified (and with messages
that do not name the file). :func:`validate_checkpoint` reads only the safetensors header and compares it with the
model's target modules.

The key format lives here too. A GeoRA adapter stores, per adapted module, ``<module>.lora_A.delta`` (``dA``, r x in),
``<module>.lora_A.anchor`` (``A0``), ``<module>.lora_B.delta`` (``dB``, out x r) and ``<module>.lora_B.anchor``
(``B0``, float32). Format version 1 stored ``A = A0 + dA`` and ``B = B0 + dB`` as ``factor``;
:func:`geora_tensors_by_module` converts it.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

# Version of the saved adapter format. A checkpoint with a higher version was written by an incompatible newer
# peft-geora and is refused instead of being loaded half-understood. 1: trainable factors A, B stored whole
# (``lora_A.factor``); 2: their updates dA, dB (``lora_A.delta``), see peft_geora.tuner.anchor. Version 1 still loads.
FORMAT_VERSION = 2

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
BIN_WEIGHTS_NAME = "adapter_model.bin"
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<side>[AB])\.(?P<kind>delta|anchor|factor|weight)$")
PEFT_PREFIX = "base_model.model."
GEORA_PARTS = ("A_delta", "A_anchor", "B_delta", "B_anchor")


def split_key(key: str) -> tuple[str, str, str] | None:
    """``(module, side, kind)`` of an adapter tensor key ``<module>.lora_<A|B>.<kind>``, else None.

    ``module`` is the key's prefix as written (with PEFT's ``base_model.model.`` where the file has it); ``side`` is
    ``"A"`` or ``"B"``; ``kind`` is ``"delta"`` / ``"anchor"`` (GeoRA), ``"factor"`` (GeoRA format 1) or
    ``"weight"`` (LoRA).
    """
    match = _KEY.match(key)
    return None if match is None else (match["module"], match["side"], match["kind"])


def parameter_key(module_path: str, parameter_name: str) -> str:
    """The name of an adapted parameter (``target_parameters``): its module path without the ``.base_layer`` that
    nested parameter wrappers insert, then the parameter's own name (``mlp.experts`` + ``gate_up_proj``)."""
    return re.sub(r"(\.base_layer)+", "", module_path) + "." + parameter_name.rsplit(".", 1)[-1]


def upgrade_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A format-2 copy of a GeoRA state dict: each format-1 ``<m>.lora_<S>.factor`` becomes ``<m>.lora_<S>.delta``
    = ``factor - anchor`` (in the factor's dtype, in place of the factor key); other keys are kept as they are.

    The subtraction is exact wherever the factor is within 2x of its anchor (Sterbenz); there the format-1 adapter
    computes bit for bit what it computed before, elsewhere (an anchor entry small against its update) the factor
    ``B0 + dB`` it now uses can differ from the stored ``B`` by one float32 rounding step. A state dict without
    ``factor`` keys is returned unchanged.
    """
    if not any(key.endswith(".factor") for key in state_dict):
        return state_dict
    upgraded = {}
    for key, value in state_dict.items():
        split = split_key(key)
        anchor = key.removesuffix("factor") + "anchor"
        if split is not None and split[2] == "factor" and anchor in state_dict:
            upgraded[key.removesuffix("factor") + "delta"] = value - state_dict[anchor].to(value.dtype)
        else:
            upgraded[key] = value
    return upgraded


def geora_tensors_by_module(
    tensors: dict[str, torch.Tensor], source: object = "the checkpoint"
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Group a GeoRA state dict by module: ``({module: {"A_delta", "A_anchor", "B_delta", "B_anchor"}}, rest)``.

    Format-1 state dicts are upgraded (:func:`upgrade_state_dict`); ``rest`` holds the keys
    that are not GeoRA factors (``modules_to_save``, ...). Raises ``ValueError`` naming ``source`` and the module
    when a module lacks one of its four tensors.
    """
    parts: dict[str, dict[str, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, value in upgrade_state_dict(tensors).items():
        split = split_key(key)
        if split is None or split[2] == "weight":
            rest[key] = value
            continue
        module, side, kind = split
        parts.setdefault(module, {})[f"{side}_{kind}"] = value
    for module, p in parts.items():
        missing = set(GEORA_PARTS) - p.keys()
        if missing:
            raise ValueError(f"GeoRA: {source} is incomplete: module '{module}' lacks {sorted(missing)}")
    return parts, rest


def weights_file(folder: str | Path) -> Path:
    """The adapter weights in ``folder``: ``adapter_model.safetensors``, else PEFT's ``safe_serialization=False``
    ``adapter_model.bin``. Raises ``FileNotFoundError`` naming the folder when neither exists."""
    folder = Path(folder)
    for name in (WEIGHTS_NAME, BIN_WEIGHTS_NAME):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"GeoRA: {folder} holds neither {WEIGHTS_NAME} nor {BIN_WEIGHTS_NAME}")


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors or ``.bin`` adapter file (CPU); ``ValueError`` naming the file if unreadable."""
    try:
        if path.suffix == ".bin":
            return torch.load(path, map_location="cpu", weights_only=True)
        return load_file(str(path))
    except Exception as exc:  # safetensors and torch raise several types for a damaged file
        raise ValueError(f"GeoRA: cannot read the adapter weights {path}: {exc}") from exc


def read_header(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes stored in an adapter file (for safetensors, no tensor data is read)."""
    if path.suffix == ".bin":
        return {key: tuple(value.shape) for key, value in read_tensors(path).items()}
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise ValueError(f"GeoRA: cannot read the adapter weights {path}: {exc}") from exc


def _features(module: nn.Module) -> tuple[int, int] | None:
    base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
    if isinstance(base, nn.Linear):
        return base.out_features, base.in_features
    if isinstance(base, Conv1D):
        return base.weight.shape[1], base.weight.shape[0]
    return None


def _has_float_parameters(module: nn.Module) -> bool:
    """A module whose own parameters (``target_parameters``: experts, routers) GeoRA may have adapted; their shapes
    are checked when the adapter is built on them."""
    return any(p.is_floating_point() for p in module.parameters(recurse=False))


def validate_checkpoint(folder: str | Path, model: nn.Module) -> None:
    """Raise a clear error (naming the file and the module) unless ``folder``'s weights fit ``model``."""
    try:
        path = weights_file(folder)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"GeoRA: {Path(folder) / 'adapter_config.json'} describes a trained adapter (init_from_checkpoint=True) "
            f"but {Path(folder) / WEIGHTS_NAME} is missing. To start a new adapter from this config, set "
            "config.init_from_checkpoint=False."
        ) from None
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in read_header(path).items():
        split = split_key(key)
        if split is not None and split[0].startswith(PEFT_PREFIX) and split[2] != "weight":
            module, side, kind = split
            kind = "delta" if kind == "factor" else kind  # format 1: same shape
            shapes.setdefault(module.removeprefix(PEFT_PREFIX), {})[f"{side}_{kind}"] = shape
    if not shapes:
        raise ValueError(f"GeoRA: {path} holds no GeoRA factors (lora_A.delta / lora_A.anchor ...)")
    modules = dict(model.named_modules())
    for name, parts in sorted(shapes.items()):
        missing = set(GEORA_PARTS) - parts.keys()
        if missing:
            raise ValueError(f"GeoRA: {path} is incomplete: module '{name}' lacks {sorted(missing)}")
        name = name.replace(".base_layer", "")  # nested parameter wrappers (several parameters of one module)
        if name not in modules:
            raise ValueError(
                f"GeoRA: {path} adapts module '{name}', which this model does not have: the adapter was made for "
                f"another architecture ({type(model).__name__} here)"
            )
        features = _features(modules[name])
        (r, in_features), (out_features, r_b) = parts["A_delta"], parts["B_delta"]
        consistent = parts["A_anchor"] == parts["A_delta"] and parts["B_anchor"] == parts["B_delta"] and r == r_b
        if not consistent:
            raise ValueError(f"GeoRA: {path} has inconsistent factor shapes for module '{name}': {parts}")
        if features is None and not _has_float_parameters(modules[name]):
            raise ValueError(
                f"GeoRA: {path} adapts module '{name}', but the model's module there is a "
                f"{type(modules[name]).__name__} with no float parameter to adapt"
            )
        if features is not None and features != (out_features, in_features):
            raise ValueError(
                f"GeoRA: {path} has factors for a {out_features} x {in_features} weight at module '{name}', but "
                f"the model's module there is {type(modules[name]).__name__} with (out, in) = {features}"
            )
