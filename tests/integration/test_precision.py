"""A small RL update survives half precision on the paths users take, measured against stock LoRA in the same test.

Both methods train 10 AdamW steps at lr 1e-5 in float32 on the same tiny Llama (see ``benchmarks/precision.py``);
each path's error is the median over layers of ``||dW_path - dW||_F / ||dW||_F``. GeoRA must cost the update no
more than max(3x LoRA's error, 0.01).
"""

from __future__ import annotations

import pytest

from benchmarks.precision import Scenario, relative_error

LR, STEPS = 1e-5, 10


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory):
    folder = tmp_path_factory.mktemp("precision")
    return {method: Scenario(method, LR, STEPS, folder) for method in ("geora", "lora")}


@pytest.mark.parametrize("path", ["cast", "load_bf16", "export_bf16", "train_bf16"])
def test_the_update_survives_bf16_as_loras_does(scenarios, path):
    geora, lora = scenarios["geora"].error(path), scenarios["lora"].error(path)
    assert geora <= max(3 * lora, 0.01), (path, geora, lora)


def test_an_untrained_adapter_loaded_onto_a_bf16_base_is_exact(scenarios):
    assert scenarios["geora"].init_load_bf16() == 0.0
    assert scenarios["lora"].init_load_bf16() == 0.0


def test_bf16_training_differs_from_fp32_training_only_through_the_bf16_base(scenarios):
    """Against the float32 run, bf16 training moves GeoRA's update by ~0.17 (LoRA's ~0.03): the bf16 base changes the
    gradients. Storing the adapter in bf16 adds nothing to that: float32 adapters on the same bf16 base land as far
    from the float32 run, to within 5%."""
    scenario = scenarios["geora"]
    with_bf16_adapters = scenario.error("train_bf16_vs_fp32")
    with_fp32_adapters = relative_error(scenario.trained_on_bf16(True), scenario.reference)
    assert with_bf16_adapters <= 1.05 * with_fp32_adapters
