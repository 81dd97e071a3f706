"""Check a saved GeoRA checkpoint against the model before anything is injected, so a bad load changes nothing.

PEFT injects adapter layers first and reads the weights afterwards; a missing or damaged file, a checkpoint for
another architecture or a shape mismatch would then fail with the base model already modified (and with messages
that do not name the file). :func:`validate_checkpoint` reads only the safetensors header and compares it with the
model's target modules.
"""

from __future__ import annotations

import re
from pathlib import Path

from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from torch import nn
from transformers.pytorch_utils import Conv1D

WEIGHTS_NAME = "adapter_model.safetensors"
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<side>[AB])\.(?P<kind>factor|anchor)$")


def read_header(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes stored in a safetensors file (no tensor data is read)."""
    if not path.is_file():
        raise FileNotFoundError(
            f"GeoRA: {path.parent / 'adapter_config.json'} describes a trained adapter (init_from_checkpoint=True) "
            f"but {path} is missing. To start a new adapter from this config, set config.init_from_checkpoint=False."
        )
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


def validate_checkpoint(folder: str | Path, model: nn.Module) -> None:
    """Raise a clear error (naming the file and the module) unless ``folder``'s weights fit ``model``."""
    path = Path(folder) / WEIGHTS_NAME
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in read_header(path).items():
        match = _KEY.match(key)
        if match is not None:
            shapes.setdefault(match["module"], {})[f"{match['side']}_{match['kind']}"] = shape
    if not shapes:
        raise ValueError(f"GeoRA: {path} holds no GeoRA factors (lora_A.factor / lora_A.anchor ...)")
    modules = dict(model.named_modules())
    for name, parts in sorted(shapes.items()):
        missing = {"A_factor", "A_anchor", "B_factor", "B_anchor"} - parts.keys()
        if missing:
            raise ValueError(f"GeoRA: {path} is incomplete: module '{name}' lacks {sorted(missing)}")
        if name not in modules:
            raise ValueError(
                f"GeoRA: {path} adapts module '{name}', which this model does not have: the adapter was made for "
                f"another architecture ({type(model).__name__} here)"
            )
        features = _features(modules[name])
        (r, in_features), (out_features, r_b) = parts["A_factor"], parts["B_factor"]
        consistent = parts["A_anchor"] == parts["A_factor"] and parts["B_anchor"] == parts["B_factor"] and r == r_b
        if not consistent:
            raise ValueError(f"GeoRA: {path} has inconsistent factor shapes for module '{name}': {parts}")
        if features != (out_features, in_features):
            raise ValueError(
                f"GeoRA: {path} has factors for a {out_features} x {in_features} weight at module '{name}', but "
                f"the model's module there is {type(modules[name]).__name__} with (out, in) = {features}"
            )
