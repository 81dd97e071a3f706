"""Helpers the workers share: logits on the tiny inputs, state-dict key mapping, writing each rank's result."""

from __future__ import annotations

import json
import os
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tests.conftest import tiny_inputs


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**tiny_inputs()).logits.detach().cpu()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def anchors_of(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.endswith(".anchor")}


def peft_key(base_key: str, state: dict[str, torch.Tensor]) -> str:
    """Name of a base model tensor in the PEFT model's state dict (adapted weights move under ``base_layer``)."""
    key = "base_model.model." + base_key
    wrapped = key.rsplit(".", 1)[0] + ".base_layer." + key.rsplit(".", 1)[1]
    return wrapped if wrapped in state else key


def write_result(out_dir: Path, run: Callable[[], dict[str, Any]]) -> None:
    """Run one rank's work; write ``rank<k>.json`` to ``out_dir`` (the traceback under ``"error"`` if it raised)."""
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", 0))
    try:
        result = run()
    except Exception:
        result = {"error": traceback.format_exc()}
        (out_dir / f"rank{rank}.json").write_text(json.dumps(result, indent=1))
        raise
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result, indent=1))
