"""Tiny, offline TRL GRPO set-ups for tests: a character tokenizer built in code, a toy prompt set, a reward.

Everything fits the tiny decoders of ``tests/conftest.py`` (vocabulary of ``VOCAB`` = 96 ids, special ids 0-3 as in
``LlamaConfig``'s defaults), so a GRPO step on CPU takes well under a second. Import these helpers from other test
modules of the ``tests`` package: ``from ..grpo_utils import make_grpo_trainer``.
"""

from __future__ import annotations

import string
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from datasets import Dataset
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0-3: pad, bos (LlamaConfig 1), eos (LlamaConfig 2), unk
CHARACTERS = string.digits + string.ascii_lowercase + " +-=?.,:!'\n" + string.ascii_uppercase


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch on one thread inside the block: tiny models gain nothing from more, and on a busy 2-core machine
    OpenMP's waiting between two threads made a tiny GRPO step take seconds instead of ~50 ms."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def make_tiny_tokenizer(vocab_size: int = 96) -> PreTrainedTokenizerFast:
    """A character-level tokenizer (one id per character, ``<unk>`` otherwise), every id below ``vocab_size``."""
    tokens = list(SPECIAL_TOKENS) + list(dict.fromkeys(CHARACTERS))
    tokens = tokens[:vocab_size]
    backend = Tokenizer(models.WordLevel({tok: i for i, tok in enumerate(tokens)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.padding_side = "left"
    return tokenizer


def tiny_prompt_dataset(n: int = 8) -> Dataset:
    """Plain-text prompts (no chat template): ``"3+4="`` style, as the ``prompt`` column GRPO expects."""
    return Dataset.from_dict({"prompt": [f"{i % 10}+{(3 * i) % 10}=" for i in range(n)]})


def distinct_chars_reward(completions: list[str], **kwargs: Any) -> list[float]:
    """A deterministic reward with variance across samples (number of distinct characters), so GRPO gets signal."""
    return [float(len(set(c))) for c in completions]


def make_grpo_trainer(
    model: Any,
    peft_config: Any = None,
    beta: float = 0.0,
    callbacks: list[TrainerCallback] | None = None,
    **args: Any,
) -> GRPOTrainer:
    """A CPU GRPOTrainer: 2 steps of 2 prompts x 2 completions of 4 tokens; ``args`` override the GRPOConfig fields."""
    config = dict(
        output_dir=args.pop("output_dir", None) or tempfile.mkdtemp(prefix="grpo_tiny_"),
        max_steps=2,
        per_device_train_batch_size=2,
        num_generations=2,
        max_completion_length=4,
        learning_rate=1e-2,
        beta=beta,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    config.update(args)
    tokenizer = make_tiny_tokenizer(model.config.vocab_size)
    return GRPOTrainer(
        model=model,
        reward_funcs=distinct_chars_reward,
        args=GRPOConfig(**config),
        train_dataset=tiny_prompt_dataset(),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )


def kl_per_step(trainer: GRPOTrainer) -> list[float]:
    """The KL to the reference that GRPOTrainer logged at each step (``beta > 0``)."""
    return [float(entry["kl"]) for entry in trainer.state.log_history if "kl" in entry]
