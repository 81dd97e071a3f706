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

Cost is bounded: ``max_layers`` picks a fixed subset (stratified by layer type, evenly spread over depth, chosen
once so curves stay comparable), ``W``'s singular vectors are computed once per layer and cached (``W`` is frozen),
and large layers use the top-k / top-q cheap paths of :mod:`peft_geora.diagnostics`.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from typing import Any

import torch
from peft.tuners.lora import LoraLayer
from peft.utils.other import transpose
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .diagnostics import (
    DEFAULT_TOP_K,
    EXACT_LIMIT,
    WeightSpectrum,
    diagnostics_rank,
    update_diagnostics,
    weight_spectrum,
)
from .report import layer_type

logger = logging.getLogger(__name__)

METRICS = ("s_head", "spectral_shift", "principal_angle", "relative_norm")


def adapted_layers(model: nn.Module, adapter_name: str | None = None) -> list[tuple[str, LoraLayer, str]]:
    """``(name, layer, adapter)`` for every LoRA-family layer (GeoRA included) with a 2-D float base weight."""
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        adapter = adapter_name or next(iter(module.active_adapters), None)
        weight = getattr(module.get_base_layer(), "weight", None)
        if adapter not in module.lora_A or weight is None or weight.dim() != 2 or not weight.is_floating_point():
            continue
        found.append((name, module, adapter))
    return found


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
    def compute(self, model: nn.Module) -> dict[str, float]:
        """Diagnostics of ``model``'s adapted layers now, aggregated into the flat dict that gets logged."""
        start = time.perf_counter()
        layers = adapted_layers(model, self.adapter_name)
        if self.layer_names is None:
            self.layer_names = stratified_subset([name for name, _, _ in layers], self.max_layers)
        selected = set(self.layer_names)
        per_layer = {}
        for name, module, adapter in layers:
            if name not in selected:
                continue
            weight = transpose(module.get_base_layer().weight.detach(), module.fan_in_fan_out)
            if weight.numel() == 0:  # partitioned away (DeepSpeed ZeRO-3): nothing to measure on this rank
                continue
            delta = transpose(module.get_delta_weight(adapter).detach(), module.fan_in_fan_out)
            k = self.top_k or module.r[adapter]
            key = (name, diagnostics_rank(tuple(weight.shape), k, self.top_q, self.exact_limit))
            if key not in self._spectra:
                self._spectra[key] = weight_spectrum(weight, key[1], exact_limit=self.exact_limit)
            per_layer[name] = update_diagnostics(
                weight,
                delta,
                k,
                spectrum=self._spectra[key],
                top_q=self.top_q,
                exact_limit=self.exact_limit,
                delta_rank=module.lora_A[adapter].weight.shape[0],  # r for LoRA, 2r for GeoRA ([A; A0])
            )
        self.last_per_layer = per_layer
        metrics = self._aggregate(per_layer)
        metrics[f"{self.prefix}layers"] = float(len(per_layer))
        metrics[f"{self.prefix}seconds"] = time.perf_counter() - start
        return metrics

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
        if state.is_world_process_zero and model is not None:
            self._pending = self.compute(model)
            logger.debug("GeoRA diagnostics at step %d: %s", state.global_step, self._pending)
        return control

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs):
        if not self._pending or logs is None:
            return control
        logs.update(self._pending)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(self._pending)
        self._pending = None
        return control
