"""GeoRADiagnosticsCallback inside a tiny TRL GRPO run: its numbers must land in the trainer's own logs."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.utils.other import transpose
from transformers import TrainerCallback

from peft_geora import GeoRAConfig
from peft_geora.diagnostics import update_diagnostics
from peft_geora.diagnostics.callback import GeoRADiagnosticsCallback, adapted_layers, stratified_subset

from ..conftest import make_tiny_model
from ..grpo_utils import make_grpo_trainer, one_torch_thread
from ..moe_models import build, geora_config, perturb, wrappers

TYPES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj")
AGGREGATES = ("geora/s_head", "geora/spectral_shift", "geora/principal_angle", "geora/relative_norm")


@pytest.fixture(autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


class LogRecorder(TrainerCallback):
    """Stands in for a reporting integration (TensorBoard, W&B): keeps every ``logs`` dict it is shown."""

    def __init__(self) -> None:
        self.seen: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.seen.append(dict(logs or {}))


def _train_rows(trainer) -> dict[int, dict]:
    return {row["step"]: row for row in trainer.state.log_history if "loss" in row}


def test_callback_metrics_reach_log_history(tmp_path):
    callback = GeoRADiagnosticsCallback(every_n_steps=1, max_layers=5)
    trainer = make_grpo_trainer(
        make_tiny_model(), peft_config=GeoRAConfig(r=4, lora_alpha=8), callbacks=[callback], output_dir=str(tmp_path)
    )
    trainer.train()
    rows = _train_rows(trainer)
    assert set(rows) == {1, 2}
    for row in rows.values():
        for key in AGGREGATES:
            assert key in row and math.isfinite(row[key]), key
        assert row["geora/layers"] == 5.0 and row["geora/seconds"] >= 0.0
        assert all(f"geora/s_head/{t}" in row for t in TYPES)
        assert 0.0 < row["geora/s_head"] < 1.0
        assert row["geora/spectral_shift"] > 0.0 and row["geora/relative_norm"] > 0.0  # GRPO moved the factors
    assert rows[2]["geora/relative_norm"] != rows[1]["geora/relative_norm"]
    # the logged per-layer numbers are the diagnostics of the trained layers, computed directly
    model = trainer.model
    layers = {name: (module, adapter) for name, module, adapter in adapted_layers(model)}
    assert len(callback.last_per_layer) == 5 and callback.last_per_layer.keys() <= layers.keys()  # max_layers=5
    for name, logged in callback.last_per_layer.items():
        module, adapter = layers[name]
        with torch.no_grad():
            weight = transpose(module.get_base_layer().weight, module.fan_in_fan_out)
            expected = update_diagnostics(weight, module.get_delta_weight(adapter), 16)
        for key in ("s_head", "spectral_shift", "principal_angle", "relative_norm"):
            assert logged[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), (name, key)


def test_attached_callback_reaches_reporters_only_on_its_steps(tmp_path):
    recorder = LogRecorder()
    callback = GeoRADiagnosticsCallback(every_n_steps=2, max_layers=None, per_layer_type=False)
    trainer = make_grpo_trainer(
        make_tiny_model(), peft_config=GeoRAConfig(r=4, lora_alpha=8), callbacks=[recorder], output_dir=str(tmp_path)
    )
    assert callback.attach(trainer) is callback
    assert trainer.callback_handler.callbacks[0] is callback
    trainer.train()
    rows = _train_rows(trainer)
    assert "geora/s_head" not in rows[1] and "geora/s_head" in rows[2]
    assert rows[2]["geora/layers"] == 14.0  # 7 projections x 2 layers
    assert not any(key.startswith("geora/s_head/") for key in rows[2])
    seen = [logs for logs in recorder.seen if "geora/s_head" in logs]
    assert len(seen) == 1 and seen[0]["geora/s_head"] == rows[2]["geora/s_head"]


def test_plain_lora_layers_are_measured():
    model = get_peft_model(make_tiny_model(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    callback = GeoRADiagnosticsCallback(max_layers=None)
    untrained = callback.compute(model)
    assert untrained["geora/layers"] == 4.0 and untrained["geora/s_head"] == 0.0  # B = 0: no update yet
    assert untrained["geora/spectral_shift"] == 0.0 and "geora/principal_angle" not in untrained  # no NaN logged
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(0))
    trained = callback.compute(model)
    assert 0.0 < trained["geora/s_head"] < 1.0 and trained["geora/spectral_shift"] > 0.0
    assert set(k.split("/", 2)[-1] for k in trained if k.startswith("geora/s_head/")) == {
        "self_attn.q_proj",
        "mlp.down_proj",
    }


def test_stratified_subset_covers_every_type_and_spreads_depth():
    names = [f"model.layers.{i}.{t}" for i in range(10) for t in ("self_attn.q_proj", "mlp.up_proj", "mlp.down_proj")]
    picked = stratified_subset(names, 6)
    assert len(picked) == 6
    for t in ("self_attn.q_proj", "mlp.up_proj", "mlp.down_proj"):
        depths = [int(n.split(".")[2]) for n in picked if n.endswith(t)]
        assert depths == [0, 9]
    assert stratified_subset(names, None) == names
    assert len(stratified_subset(names, 2)) == 2
    with pytest.raises(ValueError):
        GeoRADiagnosticsCallback(every_n_steps=0)


# ---- mixture-of-experts parameters: measured expert by expert ----


def _expert_pairs(wrapper, adapter: str = "default") -> tuple[torch.Tensor, torch.Tensor]:
    """W and dW of a wrapper's stacked experts as (E, out, in), by hand (gpt-oss stores (E, in, out))."""
    with torch.no_grad():
        weight, delta = wrapper.get_param().detach(), wrapper.get_delta_weight(adapter).detach()
    if not wrapper._did_swap_in_out_features:
        weight, delta = weight.transpose(1, 2), delta.transpose(1, 2)
    return weight, delta


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_stacked_experts_are_measured_per_expert(arch):
    model = get_peft_model(build(arch), geora_config(arch))
    perturb(model)
    callback = GeoRADiagnosticsCallback(max_layers=None)
    metrics = callback.compute(model)
    by_key = wrappers(model)
    expert_keys = [k for k in by_key if k.endswith(("gate_up_proj", "down_proj"))]
    assert len(expert_keys) == 4
    for key in expert_keys:
        name = f"base_model.model.{key}"
        assert name in callback.last_per_layer
        weight, delta = _expert_pairs(by_key[key])
        rows = []
        for e in range(weight.shape[0]):
            expected = update_diagnostics(weight[e], delta[e], 16)
            logged = callback.last_per_expert[f"{name}[{e}]"]
            for metric in ("s_head", "spectral_shift", "principal_angle", "relative_norm", "delta_norm"):
                assert logged[metric] == pytest.approx(expected[metric], rel=1e-4, abs=1e-6), (key, e, metric)
            rows.append(logged)
        for metric in ("s_head", "spectral_shift", "relative_norm"):  # the layer's row: the mean over experts
            mean = sum(r[metric] for r in rows) / len(rows)
            assert callback.last_per_layer[name][metric] == pytest.approx(mean, rel=1e-12)
    assert "geora/s_head/mlp.experts.gate_up_proj" in metrics and "geora/s_head/mlp.experts.down_proj" in metrics
    layers = 2 * (7 if arch == "qwen3_moe" else 6)  # attention 4 + gate_up + down (+ router on Qwen3-MoE)
    assert metrics["geora/layers"] == float(layers)
    if arch == "qwen3_moe":  # the router (a 2-D parameter) is a layer of its own
        assert "geora/s_head/mlp.gate.weight" in metrics
    # max_layers: an expert parameter is one layer of its type, picked like any other
    subset = GeoRADiagnosticsCallback(max_layers=6)
    sub = subset.compute(model)
    assert sub["geora/layers"] == 6.0
    assert "geora/s_head/mlp.experts.gate_up_proj" in sub and "geora/s_head/mlp.experts.down_proj" in sub
    assert len(subset.last_per_expert) == 2 * 4  # one gate_up and one down parameter, 4 experts each


def test_trainer_logs_expert_metrics(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = get_peft_model(build("qwen3_moe"), GeoRAConfig(r=4))
    gen = torch.Generator().manual_seed(0)
    data = [{"input_ids": row, "labels": row} for row in torch.randint(0, 96, (4, 12), generator=gen).tolist()]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
        logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    callback = GeoRADiagnosticsCallback(every_n_steps=1, max_layers=None)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train()
    rows = _train_rows(trainer)
    assert set(rows) == {1, 2}
    for row in rows.values():
        assert row["geora/layers"] == 14.0  # 2 layers x (4 attention + gate_up + down + router)
        for layer_type in ("mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"):
            for metric in ("s_head", "spectral_shift", "relative_norm"):
                assert math.isfinite(row[f"geora/{metric}/{layer_type}"]), (layer_type, metric)
        assert row["geora/relative_norm/mlp.experts.gate_up_proj"] > 0.0  # the experts trained
    assert len(callback.last_per_expert) == 2 * 2 * 4  # layers x parameters x experts
