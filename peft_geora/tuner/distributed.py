"""GeoRA under data-parallel engines: DeepSpeed ZeRO-3 partitioned weights and FSDP2 / tensor-parallel DTensors.

GeoRA's initial factors are a decomposition of the *full* base weight, so each engine needs one thing:

* ZeRO-3 partitions a weight across ranks (locally it is an empty tensor with a ``ds_shape``). :func:`gathered`
  all-gathers it for the decomposition (read-only: nothing is written back), checks that the gather really produced
  the full weight, and :func:`broadcast_from_rank0` makes rank 0's factors the ones every rank keeps. Gathering is a
  collective, so under ZeRO-3 ``get_peft_model`` must run on every rank (as for PEFT's PiSSA).
* FSDP2 (``fully_shard``) and tensor parallelism turn weights into DTensor shards. GeoRA must be applied before
  sharding (as PEFT itself requires); :func:`check_reachable` refuses a DTensor weight at initialisation with that
  advice instead of decomposing one shard. Reading a whole weight later (the base-weight fingerprint checked when a
  checkpoint is loaded, e.g. on ``trainer.train(resume_from_checkpoint=...)``) goes through :func:`gathered`, which
  assembles the shards with ``full_tensor()``: a collective, so every rank of the mesh must read the weight (the load
  hook runs on every rank).
* DDP replicates plain tensors: nothing to do (its constructor broadcasts rank 0's parameters and buffers anyway).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

import torch

logger = logging.getLogger(__name__)

_SHARD_ADVICE = (
    "GeoRA computes its initial factors from the full weight, so apply it before sharding: call "
    "get_peft_model(model, GeoRAConfig(...)) (or pass peft_config= to the trainer) before fully_shard / "
    "parallelize_module / accelerator.prepare."
)


def is_zero3_param(tensor: torch.Tensor) -> bool:
    """True for a parameter managed by DeepSpeed ZeRO-3 (it carries a ``ds_id``)."""
    return hasattr(tensor, "ds_id")


def is_dtensor(tensor: torch.Tensor) -> bool:
    """True for a DTensor (FSDP2 or tensor-parallel shard)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full_shape(weight: torch.Tensor) -> torch.Size:
    """Shape of the whole weight, also for a ZeRO-3 partition (whose local tensor is empty)."""
    return weight.ds_shape if is_zero3_param(weight) else weight.shape


def check_reachable(weight: torch.Tensor, name: str) -> None:
    """Raise if the full values of ``weight`` cannot be had where GeoRA is applied (before anything is changed)."""
    if is_dtensor(weight):
        raise RuntimeError(
            f"GeoRA: the weight of target module '{name}' is already sharded (a DTensor with placements "
            f"{tuple(weight.placements)}, local shard {tuple(weight.to_local().shape)} of {tuple(weight.shape)}). "
            + _SHARD_ADVICE
        )
    if is_zero3_param(weight) and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise RuntimeError(
            f"GeoRA: the weight of target module '{name}' is partitioned by DeepSpeed ZeRO-3 (local numel "
            f"{weight.numel()} of {tuple(weight.ds_shape)}) but no process group is initialized, so it cannot be "
            "gathered for the decomposition. Apply GeoRA on every rank of the DeepSpeed job, after "
            "deepspeed.init_distributed() (or the Accelerator / Trainer) has set up the process group."
        )


@contextlib.contextmanager
def gathered(weight: torch.Tensor) -> Iterator[torch.Tensor]:
    """Yield ``weight`` with its full values, to be read only: all-gathered if ZeRO-3 partitioned it, assembled from
    its shards (a plain tensor) if it is a DTensor (FSDP2, tensor parallel), else ``weight`` itself.

    Both gathers are collectives: every rank of the ZeRO-3 group / of the DTensor's mesh must enter this together.
    For ZeRO-3, raises if the gather did not produce the full, finite weight, instead of decomposing a partition.
    """
    if is_dtensor(weight):
        yield weight.detach().full_tensor()
        return
    if not is_zero3_param(weight):
        yield weight
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters([weight], modifier_rank=None):
        if weight.shape != weight.ds_shape:
            raise RuntimeError(
                f"GeoRA: a target weight partitioned by DeepSpeed ZeRO-3 (ds_id {weight.ds_id}) was not gathered: "
                f"local shape {tuple(weight.shape)}, full shape {tuple(weight.ds_shape)}. GeoRA needs the full "
                "weight for its decomposition; apply it on every rank of the DeepSpeed job, with DeepSpeed's "
                "process group initialized."
            )
        if not torch.isfinite(weight).all():
            raise ValueError(
                f"GeoRA: a target weight of shape {tuple(weight.ds_shape)} (ZeRO-3 ds_id {weight.ds_id}) contains "
                "NaN or Inf values"
            )
        yield weight


def broadcast_from_rank0(tensors: Sequence[torch.Tensor], like: torch.Tensor) -> list[torch.Tensor]:
    """``tensors`` as rank 0 of ``like``'s ZeRO-3 group computed them (unchanged when ``like`` is not ZeRO-3).

    Ranks decompose the same gathered weight with the same seeded solvers, so they normally agree bit for bit;
    broadcasting makes that a guarantee (heterogeneous nodes, other BLAS builds) at the cost of one small collective
    per layer inside a step that is collective anyway.
    """
    if not is_zero3_param(like) or not torch.distributed.is_initialized():
        return list(tensors)
    from deepspeed.accelerator import get_accelerator

    group = like.ds_process_group
    src = torch.distributed.get_global_rank(group, 0)
    device = torch.device(get_accelerator().current_device_name())
    out = []
    for tensor in tensors:
        buffer = tensor.detach().to(device).contiguous()
        torch.distributed.broadcast(buffer, src=src, group=group)
        out.append(buffer.to(tensor.device))
    logger.debug("GeoRA: took rank %d's initial factors (ZeRO-3)", src)
    return out
