"""Test-only glue to run accelerate's FSDP2 and DeepSpeed engines with two CPU processes, and to prove they ran.

accelerate 1.15 treats a multi-process launch on a machine without an accelerator as distributed (``MULTI_CPU``,
gloo) only when the CPU flag is set, and it never enables FSDP or DeepSpeed for ``MULTI_CPU``: with such a config it
silently trains one independent model per process, or trips DeepSpeed's batch-size check (one process counted).
:func:`enable_cpu_engines` patches two private spots of accelerate's state (pinned: accelerate 1.15) so that a CPU
launch gets gloo and the engine its config asks for. It also stops DeepSpeed from JIT-compiling its CPU
shared-memory all-reduce kernel (a C++ build of several minutes that these tests do not use), and lets
``TrainingArguments(bf16=True)`` through on a machine without a GPU (transformers asks for ``use_cpu=True`` there,
which would turn DeepSpeed off; torch's CPU kernels and autocast run bf16). None of this is needed on GPUs, and none
of it belongs in the library.

Every fallback above exits 0, so workers record what actually ran (:func:`engine_facts`) and the tests assert it.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import torch
from torch import nn

ACCELERATE_PINNED = "1.15."


def enable_cpu_engines() -> None:
    """Let accelerate run multi-process DDP, FSDP2 and DeepSpeed on CPU with gloo (call before any accelerate use)."""
    import accelerate
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    if not accelerate.__version__.startswith(ACCELERATE_PINNED):
        found = accelerate.__version__
        raise RuntimeError(f"cpu_engines patches accelerate {ACCELERATE_PINNED}x internals, found {found}")
    if getattr(PartialState, "_geora_cpu_engines", False):
        return
    prepare_backend = PartialState._prepare_backend

    def _prepare_backend(self, cpu: bool = False, sagemaker_dp: bool = False, backend: str | None = None):
        found = prepare_backend(self, cpu, sagemaker_dp, backend)
        launched = int(os.environ.get("LOCAL_RANK", -1)) != -1 and int(os.environ.get("WORLD_SIZE", 1)) > 1
        if found[1] == DistributedType.NO and launched and not torch.cuda.is_available():
            return "gloo", DistributedType.MULTI_CPU
        return found

    state_init = AcceleratorState.__init__

    def __init__(self, *args: Any, fsdp_plugin: Any = None, **kwargs: Any) -> None:
        fresh = AcceleratorState._shared_state == {}
        state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fresh and fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":  # what accelerate does for FSDP on GPUs: bf16=True -> param_dtype bf16
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    PartialState._prepare_backend = _prepare_backend
    AcceleratorState.__init__ = __init__
    PartialState._geora_cpu_engines = True
    if not torch.cuda.is_available():
        import transformers.training_args

        transformers.training_args.is_torch_bf16_gpu_available = lambda: True  # only its bf16 argument check uses it
    try:
        import deepspeed.comm.torch as ds_torch
    except ImportError:
        return
    ds_torch.build_shm_op = lambda: None


def digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes (with dtype and shape): equal digests mean bitwise-equal tensors."""
    data = tensor.detach().cpu().contiguous()
    head = f"{data.dtype}{tuple(data.shape)}".encode()
    return hashlib.sha256(head + data.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def shard_facts(tensor: torch.Tensor) -> dict[str, Any]:
    """How ``tensor`` is stored on this rank: ZeRO-3 partition, DTensor shard or a plain full tensor."""
    facts: dict[str, Any] = {"kind": "plain", "local_numel": tensor.numel(), "full_numel": tensor.numel()}
    if hasattr(tensor, "ds_id"):
        facts.update(
            kind="zero3",
            status=str(tensor.ds_status.name),
            local_numel=tensor.numel(),
            partition_numel=tensor.ds_tensor.numel(),
            full_numel=tensor.ds_numel,
        )
        return facts
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        facts.update(
            kind="dtensor",
            placements=[str(p) for p in tensor.placements],
            local_numel=tensor.to_local().numel(),
            full_numel=tensor.numel(),
        )
    return facts


def engine_facts(trainer: Any) -> dict[str, Any]:
    """What engine a (TRL / transformers) trainer really ran: accelerate's type, the wrapper, the process group."""
    import torch.distributed as dist

    wrapped = trainer.model_wrapped
    facts = {
        "distributed_type": str(trainer.accelerator.distributed_type).split(".")[-1],
        "num_processes": trainer.accelerator.num_processes,
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "backend": dist.get_backend() if dist.is_initialized() else None,
        "wrapper": type(wrapped).__name__,
        "fsdp2_module": _is_fsdp2(trainer.model),
    }
    if hasattr(wrapped, "zero_optimization_stage"):
        facts["zero_stage"] = wrapped.zero_optimization_stage()
    return facts


def _is_fsdp2(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state (parameters and persistent buffers), gathered to full tensors on every rank.

    Works on a ZeRO-3 model before and after DeepSpeed's engine exists (parameters partitioned at load or by the
    engine) and on an FSDP2 model; every rank must call it.
    """
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            return {k: v.detach().clone().cpu() for k, v in model.state_dict().items()}
    if _is_fsdp2(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        return {k: v.detach().clone().cpu() for k, v in state.items()}
    return {k: v.detach().clone().cpu() for k, v in model.state_dict().items()}
