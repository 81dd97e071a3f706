"""``GeoRADiagnosticsCallback``: log where the (RL) update goes, every N steps, through the trainer's own logging.

Every ``every_n_steps`` optimizer steps the callback reads ``dW`` (``get_delta_weight``) and the frozen base weight
``W`` of the model's GeoRA and plain LoRA layers, computes :func:`peft_geora.diagnostics.update_diagnostics`, and
adds the means, overall and per layer type, to that step's log row under ``geora/...``:
``geora/s_head``, ``geora/spectral_shift``, ``geora/principal_angle``, ``geora/relative_norm`` and the same with
``/self_attn.q_proj`` etc. appended, plus ``geora/layers`` and ``geora/seconds`` (the cost of the call).

How the numbers reach the logs: on a diagnostics step the callback asks the trainer to log (``should_log``), then in
``on_log`` adds its numbers to the ``logs`` dict and to the row ``Trainer.log`` has just appended to
``state.log_history``. Callbacks see ``logs`` in list order, and ``Trainer`` puts user callbacks after the
reporting integrations (TensorBoard, W&B, ...); :meth:`GeoRADiagnosticsCallback.attach` moves the callback first so
that those get the numbers too. Passed through ``callbacks=[...]`` it still reaches ``log_history`` and the console.

Stacked mixture-of-experts parameters (PEFT's ``target_parameters``, e.g. ``mlp.experts.gate_up_proj``) are measured
expert by expert on ``W_e``, ``dW_e`` (out x in; gpt-oss's (E, in, out) storage is transposed), kept in
``last_per_expert["<layer>[e]"]``; the parameter counts as one layer (of type ``mlp.experts.gate_up_proj``) whose
row is the mean over its experts. A targeted 2-D parameter (a router) is a layer like a linear one.

Under DeepSpeed ZeRO-3 and FSDP2 every rank gathers the selected layers (:func:`materialized`, collectives) and
rank 0 computes and logs; without an engine nothing is gathered.

Cost is bounded: ``max_layers`` picks a fixed subset (stratified by layer type, evenly spread over depth, chosen
once so curves stay comparable), ``W``'s singular vectors are computed once per layer and cached (``W`` is frozen),
and large layers use the top-k / top-q cheap paths of :mod:`peft_geora.diagnostics`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import torch
from peft.tuners.lora import LoraLayer, ParamWrapper
from peft.utils.other import transpose
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..format.checkpoint import parameter_key
from ..tuner.distributed import full_shape, is_dtensor, is_zero3_param
from .metrics import (
    DEFAULT_TOP_K,
    EXACT_LIMIT,
    WeightSpectrum,
    diagnostics_rank,
    mean_rows,
    update_diagnostics,
    weight_spectrum,
)
from .report import layer_type

logger = logging.getLogger(__name__)

METRICS = ("s_head", "spectral_shift", "principal_angle", "relative_norm")


def _is_param_wrapper(module: nn.Module) -> bool:
    """PEFT's ``ParamWrapper`` (GeoRA's included): an adapter on a parameter (``target_parameters``), not a layer."""
    return isinstance(module, ParamWrapper)


def base_tensor(module: LoraLayer) -> torch.Tensor | None:
    """The frozen tensor an adapted layer updates: the targeted parameter of a ``ParamWrapper``, else the weight."""
    if _is_param_wrapper(module):
        return module.get_param()
    return getattr(module.get_base_layer(), "weight", None)


def layer_key(name: str, module: LoraLayer) -> str:
    """The name a layer is reported under: its module name, plus the parameter's name for a ``ParamWrapper``
    (``model.layers.0.mlp.experts.gate_up_proj``; nested wrappers sit under ``.base_layer``, which is dropped)."""
    if not _is_param_wrapper(module):
        return name
    return parameter_key(name, module.parameter_name)


def stacked_experts(module: LoraLayer) -> int:
    """How many stacked experts a layer's update holds (E for a 3-D expert parameter, else 1)."""
    return int(getattr(module, "num_experts", 1)) if _is_param_wrapper(module) else 1


def adapted_layers(model: nn.Module, adapter_name: str | None = None) -> list[tuple[str, LoraLayer, str]]:
    """``(name, layer, adapter)`` for every LoRA-family layer (GeoRA included) with a float base tensor: a 2-D weight,
    or a targeted parameter (PEFT's ``target_parameters``: a 2-D router, 3-D stacked experts), named by
    :func:`layer_key`. Shapes are read through ZeRO-3 partitioning (``ds_shape``)."""
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        adapter = adapter_name or next(iter(module.active_adapters), None)
        weight = base_tensor(module)
        if adapter not in module.lora_A or weight is None or not weight.is_floating_point():
            continue
        dims = len(full_shape(weight))
        if dims != 2 and not (dims == 3 and _is_param_wrapper(module)):
            continue
        found.append((layer_key(name, module), module, adapter))
    return found


@contextlib.contextmanager
def materialized(module: nn.Module) -> Iterator[None]:
    """Within the block, every parameter of ``module`` (its base tensor, its factors) holds its full values.

    DeepSpeed ZeRO-3 partitions are all-gathered in place (read-only); FSDP2 / tensor-parallel DTensor parameters are
    swapped for their ``full_tensor()`` and put back afterwards. Both are collectives: every rank must enter this
    for the same modules in the same order. Plain parameters are left as they are (no cost without an engine).
    """
    params = list(module.parameters())
    zero3 = [p for p in params if is_zero3_param(p)]
    swapped: list[tuple[nn.Module, str, torch.Tensor]] = []
    with contextlib.ExitStack() as stack:
        if zero3:
            import deepspeed

            stack.enter_context(deepspeed.zero.GatheredParameters(zero3, modifier_rank=None))
        try:
            for owner in module.modules():
                for pname, param in list(owner._parameters.items()):
                    if param is not None and is_dtensor(param):
                        swapped.append((owner, pname, param))
                        owner._parameters[pname] = param.detach().full_tensor()
            yield
        finally:
            for owner, pname, param in reversed(swapped):
                owner._parameters[pname] = param


def layer_update(module: LoraLayer, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W, dW)`` of an adapted layer: (out x in), or (E x out x in) for stacked experts (gpt-oss's (E, in, out)
    storage transposed). Reads the layer's tensors as they are: gather them first under ZeRO-3 / FSDP2."""
    weight = base_tensor(module).detach()
    delta = module.get_delta_weight(adapter).detach()
    if weight.dim() == 3:
        if not module._did_swap_in_out_features:  # stored (E, in, out): PEFT left in/out as stored
            weight, delta = weight.transpose(1, 2), delta.transpose(1, 2)
        return weight, delta
    fan_in_fan_out = getattr(module, "fan_in_fan_out", False) and not _is_param_wrapper(module)
    return transpose(weight, fan_in_fan_out), transpose(delta, fan_in_fan_out)


def is_distributed(model: nn.Module) -> bool:
    """True when some parameter of ``model`` is a ZeRO-3 partition or a DTensor (FSDP2, tensor parallel)."""
    return any(is_zero3_param(p) or is_dtensor(p) for p in model.parameters())


def stratified_subset(names: list[str], max_layers: int | None) -> list[str]:
    """At most ``max_layers`` names: the quota spread over layer types in turn, each type's picks evenly over depth."""
    if max_layers is None or max_layers >= len(names):
        return list(names)
    groups: dict[str, list[str]] = defaultdict(list)
    for name in names:
        groups[layer_type(name)].append(name)
    quota = dict.fromkeys(groups, 0)
    types = list(groups)
    for i in range(max_layers):
        quota[types[i % len(types)]] += 1
    chosen = set()
    for group, count in quota.items():
        members = groups[group]
        count = min(count, len(members))
        if count == 1:
            chosen.add(members[len(members) // 2])
        elif count > 1:
            chosen.update(members[round(i * (len(members) - 1) / (count - 1))] for i in range(count))
    return [name for name in names if name in chosen]


class GeoRADiagnosticsCallback(TrainerCallback):
    """Logs S_head, spectral shift, principal angle and relative update norm of GeoRA/LoRA layers every N steps.

    Args:
        every_n_steps: compute on optimizer steps divisible by this (forcing a log row there).
        max_layers: at most this many layers per call (fixed stratified subset); ``None`` for all.
        top_k: W's directions S_head and the angles use (default 16, the same for every method and rank, so runs
            compare); ``None`` means each layer's adapter rank r.
        top_q: force the cheap top-q spectral shift with this q; ``None``: exact up to ``exact_limit``.
        exact_limit: exact SVDs for layers with ``min(out, in)`` up to this, cheap paths above.
        adapter_name: adapter to inspect; ``None`` means each layer's active adapter.
        per_layer_type: also log the means per layer type (``geora/s_head/self_attn.q_proj`` ...).
        prefix: prefix of every logged key.
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        max_layers: int | None = 16,
        top_k: int | None = DEFAULT_TOP_K,
        top_q: int | None = None,
        exact_limit: int = EXACT_LIMIT,
        adapter_name: str | None = None,
        per_layer_type: bool = True,
        prefix: str = "geora/",
    ) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.max_layers = max_layers
        self.top_k = top_k
        self.top_q = top_q
        self.exact_limit = exact_limit
        self.adapter_name = adapter_name
        self.per_layer_type = per_layer_type
        self.prefix = prefix
        self.layer_names: list[str] | None = None
        self.last_per_layer: dict[str, dict[str, float]] = {}
        self.last_per_expert: dict[str, dict[str, float]] = {}
        self._spectra: dict[tuple[str, int], WeightSpectrum] = {}
        self._pending: dict[str, float] | None = None
        self._attached = False

    def attach(self, trainer: Any) -> GeoRADiagnosticsCallback:
        """Register with ``trainer`` ahead of every other callback, so reporting integrations log our numbers."""
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
        callbacks.insert(0, self)
        self._attached = True
        return self

    @torch.no_grad()
    def compute(self, model: nn.Module, *, measure: bool = True) -> dict[str, float]:
        """Diagnostics of ``model``'s adapted layers now, aggregated into the flat dict that gets logged.

        Under ZeRO-3 / FSDP2 each selected layer is gathered (:func:`materialized`, a collective): every rank must
        call this, with ``measure=False`` on the ranks that only take part in the gathers (returns ``{}``).
        Stacked experts are measured expert by expert (``last_per_expert["<layer>[e]"]``); the layer's row in
        ``last_per_layer`` (and so in the logged means) is the mean over its experts.
        """
        start = time.perf_counter()
        layers = adapted_layers(model, self.adapter_name)
        if self.layer_names is None:
            self.layer_names = stratified_subset([name for name, _, _ in layers], self.max_layers)
        selected = set(self.layer_names)
        gather = is_distributed(model)
        per_layer, per_expert = {}, {}
        for name, module, adapter in layers:
            if name not in selected:
                continue
            with materialized(module) if gather else contextlib.nullcontext():
                if not measure:
                    continue
                weight, delta = layer_update(module, adapter)
                k = self.top_k or module.r[adapter]
                experts = stacked_experts(module)
                # r per expert for LoRA, 2r for GeoRA ([A; A0])
                delta_rank = module.lora_A[adapter].weight.shape[0] // experts
                if weight.dim() == 2:
                    per_layer[name] = self._diagnose(name, weight, delta, k, delta_rank)
                    continue
                rows = {}
                for e in range(weight.shape[0]):
                    rows[f"{name}[{e}]"] = self._diagnose(f"{name}[{e}]", weight[e], delta[e], k, delta_rank)
                per_expert.update(rows)
                per_layer[name] = mean_rows(list(rows.values()))
        if not measure:
            return {}
        self.last_per_layer = per_layer
        self.last_per_expert = per_expert
        metrics = self._aggregate(per_layer)
        metrics[f"{self.prefix}layers"] = float(len(per_layer))
        metrics[f"{self.prefix}seconds"] = time.perf_counter() - start
        return metrics

    def _diagnose(
        self, key: str, weight: torch.Tensor, delta: torch.Tensor, k: int, delta_rank: int
    ) -> dict[str, float]:
        spectrum_key = (key, diagnostics_rank(tuple(weight.shape), k, self.top_q, self.exact_limit))
        if spectrum_key not in self._spectra:
            self._spectra[spectrum_key] = weight_spectrum(weight, spectrum_key[1], exact_limit=self.exact_limit)
        return update_diagnostics(
            weight,
            delta,
            k,
            spectrum=self._spectra[spectrum_key],
            top_q=self.top_q,
            exact_limit=self.exact_limit,
            delta_rank=delta_rank,
        )

    def _aggregate(self, per_layer: dict[str, dict[str, float]]) -> dict[str, float]:
        groups: dict[str, list[dict[str, float]]] = defaultdict(list)
        for name, row in per_layer.items():
            groups[""].append(row)
            if self.per_layer_type:
                groups["/" + layer_type(name)].append(row)
        out = {}
        for suffix, rows in groups.items():
            for metric in METRICS:
                values = [row[metric] for row in rows if not math.isnan(row[metric])]
                if values:  # no NaN in the logs: the angle of a zero update is undefined, so it is left out
                    out[f"{self.prefix}{metric}{suffix}"] = sum(values) / len(values)
        return out

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if args.report_to and not self._attached:
            logger.warning(
                "GeoRADiagnosticsCallback runs after the reporting integrations %s, which will not see its numbers "
                "(they still reach state.log_history); use GeoRADiagnosticsCallback(...).attach(trainer).",
                args.report_to,
            )

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if state.global_step % self.every_n_steps != 0:
            return control
        control.should_log = True  # on every rank: logging gathers the loss across processes
        model = kwargs.get("model")
        if model is None:
            return control
        if state.is_world_process_zero:
            self._pending = self.compute(model)
            logger.debug("GeoRA diagnostics at step %d: %s", state.global_step, self._pending)
        elif is_distributed(model):  # ZeRO-3 / FSDP2: the gathers are collectives, rank 0 alone would hang
            self.compute(model, measure=False)
        return control

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs):
        if not self._pending or logs is None:
            return control
        logs.update(self._pending)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(self._pending)
        self._pending = None
        return control
