"""The main demo: GRPO with GeoRA on SmolLM2-135M-Instruct, learning small additions from a verifiable reward.

Runs TRL's ``GRPOTrainer`` unchanged with ``peft_config=GeoRAConfig(...)``: greedy accuracy on held-out problems
before and after, one line per training step, the adapter saved after every step (an interrupted run keeps the last
one), and the reward curve printed at the end. Importing this module is cheap: torch, PEFT and TRL are imported when
the demo runs, so ``peft-geora demo --help`` answers at once.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .tasks import TRAIN_MIX, correctness_reward, format_reward, greedy_accuracy, split, to_dataset

logger = logging.getLogger(__name__)


@dataclass
class DemoSettings:
    """Everything the demo run depends on (the defaults take about 10 minutes on 2 CPU cores)."""

    steps: int = 20
    model: str | None = None
    device: str = "cpu"
    output_dir: str = "outputs/geora-demo"
    seed: int = 0
    prompts_per_step: int = 4
    num_generations: int = 8
    max_new_tokens: int = 12
    learning_rate: float = 2e-4
    beta: float = 0.0
    r: int = 16
    lora_alpha: int = 32
    eval_size: int = 64


def reward_curve(log_history: list[dict]) -> list[float]:
    """Mean reward of each logged training step."""
    return [float(entry["reward"]) for entry in log_history if "reward" in entry]


def format_curve(curve: list[float], width: int = 40) -> str:
    """A text bar chart of a reward curve (rewards lie in [0, 1.1])."""
    top = max([1.1, *curve])
    return "\n".join(f"step {i + 1:3d}  {r:5.2f}  {'#' * round(width * r / top)}" for i, r in enumerate(curve))


def save_adapter(model, folder: Path) -> None:  # noqa: ANN001
    """``model.save_pretrained(folder)`` that never leaves a half-written folder: written beside, then swapped in."""
    staging = folder.with_name(folder.name + ".saving")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(staging, folder)


def _step_reporter(out: Path, total: int):  # noqa: ANN202
    """A Trainer callback that prints one line per step and saves the adapter to ``out / "adapter"`` after each."""
    from transformers import TrainerCallback

    class StepReporter(TrainerCallback):
        def __init__(self) -> None:
            self.start = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001, ANN201
            if logs and "reward" in logs:
                seconds = time.perf_counter() - self.start
                print(
                    f"step {state.global_step:3d}/{total}  reward {logs['reward']:.3f}  "
                    f"completion length {logs.get('completions/mean_length', float('nan')):.1f}  "
                    f"{seconds:.0f} s elapsed",
                    flush=True,
                )

        def on_step_end(self, args, state, control, model=None, **kwargs):  # noqa: ANN001, ANN201
            if model is not None:
                save_adapter(model, out / "adapter")

    return StepReporter()


def run_demo(settings: DemoSettings) -> dict:
    """Train, evaluate and save; returns (and writes as ``summary.json``) what was measured."""
    import torch
    from transformers import PrinterCallback, ProgressCallback
    from trl import GRPOConfig, GRPOTrainer

    from peft_geora import GeoRAConfig

    from .default_model import load_default_model

    torch.manual_seed(settings.seed)
    out = Path(settings.output_dir)
    model, tokenizer = load_default_model(settings.model, device=settings.device)
    train, test = split(TRAIN_MIX, settings.steps * settings.prompts_per_step, settings.eval_size, settings.seed)
    start = time.perf_counter()
    accuracy_before = greedy_accuracy(model, tokenizer, test, settings.max_new_tokens)
    logger.info("greedy accuracy before training on %d held-out problems: %.3f", len(test), accuracy_before)
    args = GRPOConfig(
        output_dir=str(out / "trainer"),
        max_steps=settings.steps,
        per_device_train_batch_size=settings.prompts_per_step * settings.num_generations,
        num_generations=settings.num_generations,
        max_completion_length=settings.max_new_tokens,
        learning_rate=settings.learning_rate,
        beta=settings.beta,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=settings.device == "cpu",
        bf16=settings.device != "cpu",
        gradient_checkpointing=settings.device != "cpu",
        seed=settings.seed,
        temperature=1.0,
        disable_tqdm=True,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[correctness_reward, format_reward],
        args=args,
        train_dataset=to_dataset(train),
        processing_class=tokenizer,
        peft_config=GeoRAConfig(r=settings.r, lora_alpha=settings.lora_alpha, task_type="CAUSAL_LM"),
    )
    for noisy in (PrinterCallback, ProgressCallback):  # TRL's per-step log dicts; one line per step instead
        trainer.remove_callback(noisy)
    trainer.add_callback(_step_reporter(out, settings.steps))
    train_start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - train_start
    save_adapter(trainer.model, out / "adapter")
    accuracy_after = greedy_accuracy(trainer.model, tokenizer, test, settings.max_new_tokens)
    curve = reward_curve(trainer.state.log_history)
    k = max(1, min(5, len(curve) // 2))
    summary = {
        "settings": asdict(settings),
        "reward_curve": curve,
        "reward_first_steps": sum(curve[:k]) / k,
        "reward_last_steps": sum(curve[-k:]) / k,
        "steps_averaged": k,
        "accuracy_before": accuracy_before,
        "accuracy_after": accuracy_after,
        "train_seconds": train_seconds,
        "total_seconds": time.perf_counter() - start,
        "adapter": str(out / "adapter"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def report(summary: dict) -> str:
    """The text the demo prints at the end."""
    k = summary["steps_averaged"]
    return "\n".join(
        [
            "reward per step (correct answer = 1, number-only reply = +0.1):",
            format_curve(summary["reward_curve"]),
            "",
            f"mean reward, first {k} steps: {summary['reward_first_steps']:.3f}   last {k} steps: "
            f"{summary['reward_last_steps']:.3f}",
            f"greedy accuracy on {summary['settings']['eval_size']} held-out problems: "
            f"{summary['accuracy_before']:.3f} -> {summary['accuracy_after']:.3f}",
            f"training took {summary['train_seconds']:.0f} s ({summary['total_seconds']:.0f} s with evaluation); "
            f"adapter saved to {summary['adapter']}",
        ]
    )
