"""One RLVR run: a method, a seed, a learning rate. Trains with TRL's GRPO and writes every metric as JSON.

Run by ``benchmarks/rlvr/run.py`` in a fresh process per run (clean peak memory, no state shared between methods).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.rlvr.metrics import (  # noqa: E402
    continuation_batch,
    effective_linear_weights,
    logits_on,
    peak_rss_mb,
    token_kl,
    update_geometry,
)
from benchmarks.rlvr.probes import GENERAL_PROMPTS, RETAINED_SKILL, skill_correct  # noqa: E402
from peft_geora import GeoRAConfig  # noqa: E402
from peft_geora_apps.default_model import load_default_model  # noqa: E402
from peft_geora_apps.tasks import (  # noqa: E402
    TRAIN_MIX,
    correctness_reward,
    format_reward,
    greedy_accuracy,
    greedy_replies,
    make_problems,
    split_with_validation,
    to_dataset,
)

# task -> (training mix, out-of-domain sets {name: tasks}); the base model is right on part of each training mix
TASK_SETS = {
    "addition": (TRAIN_MIX, {"longer_numbers": ("add_2x2",), "held_out_operation": ("sub_1x1",)}),
    "comparison": (("max_2x2",), {"longer_numbers": ("max_3x3",)}),
}
# LoRA at rank 1 on all linear layers: the recipe of TRL's "LoRA Without Regret" guide for GRPO
RANK_1 = dict(r=1, lora_alpha=32)


def source_commit() -> str:
    """The commit the run's code comes from, with ``+dirty`` when the library or the harness differ from it
    (untracked files, such as the runs' own JSON, do not count)."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "peft_geora", "benchmarks/rlvr/*.py"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def method_config(method: str, r: int, alpha: int):  # noqa: ANN201
    """The PEFT config of a method (None for full fine-tuning); same rank and alpha for every adapter."""
    from peft import LoraConfig

    common = dict(r=r, lora_alpha=alpha, target_modules="all-linear", task_type="CAUSAL_LM")
    configs = {
        "geora": lambda: GeoRAConfig(**common),
        "lora": lambda: LoraConfig(**common),
        "lora_r1": lambda: LoraConfig(**{**common, **RANK_1}),
        "pissa": lambda: LoraConfig(**common, init_lora_weights="pissa_niter_4"),
        "milora": lambda: GeoRAConfig(**common, priors="none", components="tail"),
        "geora_no_spectral": lambda: GeoRAConfig(**common, priors="euclidean"),
        "geora_no_euclidean": lambda: GeoRAConfig(**common, priors="spectral"),
        "geora_orthonormal": lambda: GeoRAConfig(**common, scale_convention="orthonormal"),
        "full_ft": lambda: None,
    }
    if method not in configs:
        raise ValueError(f"unknown method {method!r}; known: {sorted(configs)}")
    return configs[method]()


def evaluate(model, tokenizer, sets: dict, kl_batch: dict, base_logits: torch.Tensor, tokens: int) -> dict:  # noqa: ANN001
    result = {name: greedy_accuracy(model, tokenizer, problems, tokens) for name, problems in sets.items()}
    replies = greedy_replies(model, tokenizer, RETAINED_SKILL, max_new_tokens=10)
    result["retained_skill"] = sum(skill_correct(r, s) for r, s in zip(replies, RETAINED_SKILL)) / len(RETAINED_SKILL)
    result["general_kl"] = token_kl(logits_on(model, kl_batch), base_logits, kl_batch["kl_mask"])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--method", required=True)
    parser.add_argument("--task", default="addition", choices=sorted(TASK_SETS))
    parser.add_argument(
        "--val-size", type=int, default=0, help="also a validation split of this size, disjoint from train and test"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--learning-rate", type=float, required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=10)
    parser.add_argument("--eval-size", type=int, default=48)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--lora-alpha", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default=None)
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--before-cache",
        default=None,
        help="JSON file with the base model's metrics for this seed and evaluation set: read if present, else written",
    )
    args = parser.parse_args(argv)

    from trl import GRPOConfig, GRPOTrainer

    commit = source_commit()  # the code this run starts with
    torch.manual_seed(args.seed)
    model, tokenizer = load_default_model(args.model, device=args.device)
    mix, ood = TASK_SETS[args.task]
    n_train = args.steps * args.prompts_per_step
    train, validation, test = split_with_validation(mix, n_train, args.val_size, args.eval_size, seed=args.seed)
    sets = {"in_domain": test}
    if validation:
        sets["validation"] = validation
    sets.update({name: make_problems(tasks, args.eval_size, seed=99) for name, tasks in ood.items()})
    kl_batch = continuation_batch(model, tokenizer, GENERAL_PROMPTS)
    base_logits = logits_on(model, kl_batch)
    cache = Path(args.before_cache) if args.before_cache else None
    if cache is not None and cache.exists():
        before = json.loads(cache.read_text())  # the base model's scores do not depend on the method
    else:
        before = evaluate(model, tokenizer, sets, kl_batch, base_logits, args.max_new_tokens)
        if cache is not None:
            cache.write_text(json.dumps(before, indent=2))
    weights_before = effective_linear_weights(model)

    trainer_dir = tempfile.TemporaryDirectory(prefix="rlvr_trainer_")  # removed when this process ends
    grpo = GRPOConfig(
        output_dir=trainer_dir.name,  # nothing is saved there (save_strategy="no")
        max_steps=args.steps,
        per_device_train_batch_size=args.prompts_per_step * args.num_generations,
        num_generations=args.num_generations,
        max_completion_length=args.max_new_tokens,
        learning_rate=args.learning_rate,
        beta=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=args.device == "cpu",
        bf16=args.device != "cpu",
        gradient_checkpointing=False,
        seed=args.seed,
        disable_tqdm=True,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[correctness_reward, format_reward],
        args=grpo,
        train_dataset=to_dataset(train),
        processing_class=tokenizer,
        peft_config=method_config(args.method, args.r, args.lora_alpha),
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    policy = trainer.model
    after = evaluate(policy, tokenizer, sets, kl_batch, base_logits, args.max_new_tokens)
    geometry = update_geometry(weights_before, effective_linear_weights(policy), k=args.r)
    history = trainer.state.log_history
    result = {
        "method": args.method,
        "task": args.task,
        "commit": commit,
        "torch_threads": torch.get_num_threads(),
        "seed": args.seed,
        "learning_rate": args.learning_rate,
        "settings": vars(args),
        "before": before,
        "after": after,
        "reward_curve": [float(h["reward"]) for h in history if "reward" in h],
        "step_seconds": seconds / max(1, args.steps),
        "peak_rss_mb": peak_rss_mb(),
        "geometry": geometry,
        "trainable_parameters": sum(p.numel() for p in policy.parameters() if p.requires_grad),
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
