"""The base-weight fingerprints an adapter records: loading onto another base warns, naming the modules, or raises
under ``base_check("raise")``; the same base, in another dtype too, is silent."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import PeftModel

from peft_geora import BaseModelMismatchError, BaseModelMismatchWarning, base_check

from ..conftest import logits, make_tiny_model


def test_wrong_base_warns_with_module_names_and_can_raise(saved):
    folder, inputs, _ = saved
    with pytest.warns(BaseModelMismatchWarning, match=r"14 adapted module\(s\) differ.*model\.layers\.0\."):
        PeftModel.from_pretrained(make_tiny_model(seed=7), folder)
    other = make_tiny_model(seed=7)
    other.load_adapter(str(folder))
    with pytest.warns(BaseModelMismatchWarning, match="differ"):
        logits(other, inputs)  # transformers' loader: checked before the first forward
    with base_check("raise"), pytest.raises(BaseModelMismatchError, match="model.layers.0.mlp.up_proj"):
        PeftModel.from_pretrained(make_tiny_model(seed=7), folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BaseModelMismatchWarning)
        PeftModel.from_pretrained(make_tiny_model(), folder)  # the right base: silent
        PeftModel.from_pretrained(make_tiny_model(dtype=torch.bfloat16), folder)  # same base in bf16: silent
