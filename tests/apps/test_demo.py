"""The demo's report helpers: the reward curve read from the trainer's logs, drawn as text."""

from __future__ import annotations

from peft_geora_apps.demo import format_curve, reward_curve


def test_reward_curve_from_trainer_logs():
    history = [{"reward": 0.25, "loss": 0.1}, {"loss": 0.2}, {"reward": 0.75}, {"train_runtime": 3.0}]
    assert reward_curve(history) == [0.25, 0.75]
    lines = format_curve([0.0, 1.1]).splitlines()
    assert lines[0].endswith("0.00  ") and lines[1].count("#") == 40
