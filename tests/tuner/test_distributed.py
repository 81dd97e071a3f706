"""The distributed helpers in one process: a ZeRO-3 weight without a process group is refused (the model left as it
was), and plain tensors pass through ``gathered``, ``full_shape`` and ``broadcast_from_rank0`` untouched. The
two-process runs under DDP, FSDP2 and ZeRO-3 are in ``tests/integration/test_distributed.py``."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from peft.tuners.lora import LoraLayer

from peft_geora import GeoRAConfig
from peft_geora.tuner.distributed import broadcast_from_rank0, full_shape, gathered

from ..conftest import make_tiny_model


def test_zero3_weight_without_a_process_group_is_refused():
    if torch.distributed.is_initialized():
        pytest.skip("a process group exists in this pytest process")
    model = make_tiny_model()
    weight = model.model.layers[0].self_attn.q_proj.weight
    weight.ds_id, weight.ds_shape = 0, weight.shape  # what ZeRO-3 leaves on a partitioned parameter
    with pytest.raises(RuntimeError, match="'model.layers.0.self_attn.q_proj' is partitioned by DeepSpeed ZeRO-3"):
        get_peft_model(model, GeoRAConfig(r=4))
    assert not any(isinstance(m, LoraLayer) for m in model.modules())


def test_helpers_leave_plain_tensors_alone():
    weight = torch.randn(6, 4)
    with gathered(weight) as full:
        assert full is weight
    assert full_shape(weight) == (6, 4)
    (same,) = broadcast_from_rank0([weight], like=weight)
    assert same is weight
