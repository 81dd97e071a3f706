"""Synthetic arithmetic with verifiable rewards: the RLVR task of the demo and of the benchmark.

Problems are generated from a seed, so train and test sets are reproducible and disjoint. The answer format is
strict ("Reply with only the number."); the reward is 1 for the right final number and a small bonus for replying
with the number alone. Out-of-domain sets use longer numbers or an operation never trained on.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

INSTRUCTION = "Reply with only the number."
FORMAT_BONUS = 0.1
_NUMBER = re.compile(r"(?<![\w.])-?\d{1,3}(?:,\d{3})+(?![\d,])|(?<![\w.])-?\d+(?:\.\d+)?")
_ONLY_NUMBER = re.compile(r"^\s*-?\d[\d,]*(?:\.\d+)?\s*\.?\s*$")

# name -> (operator, digits of a, digits of b); "max" asks which of the two numbers is larger
TASKS: dict[str, tuple[str, int, int]] = {
    "add_1x1": ("+", 1, 1),
    "add_2x1": ("+", 2, 1),
    "add_2x2": ("+", 2, 2),
    "add_3x2": ("+", 3, 2),
    "sub_1x1": ("-", 1, 1),
    "sub_2x1": ("-", 2, 1),
    "mul_1x1": ("*", 1, 1),
    "max_2x2": ("max", 2, 2),
    "max_3x3": ("max", 3, 3),
}
# The demo's training mix: the base model is sometimes right on it, so GRPO gets a signal.
TRAIN_MIX = ("add_1x1", "add_2x1")


@dataclass(frozen=True)
class Problem:
    """One question and its exact integer answer."""

    task: str
    a: int
    b: int
    answer: int

    @property
    def question(self) -> str:
        op = TASKS[self.task][0]
        if op == "max":
            return f"Which number is larger, {self.a} or {self.b}? {INSTRUCTION}"
        return f"What is {self.a} {op} {self.b}? {INSTRUCTION}"

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.question}]


def _operand(rng: random.Random, digits: int) -> int:
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def make_problems(
    tasks: tuple[str, ...] | list[str], n: int, seed: int, exclude: set | None = None, distinct: bool = True
) -> list[Problem]:
    """``n`` problems drawn evenly from ``tasks`` with a seeded generator, none of them in ``exclude``.

    With ``distinct=False`` a problem may repeat (training prompts may; a test set should not).
    """
    unknown = set(tasks) - TASKS.keys()
    if unknown:
        raise ValueError(f"unknown task(s) {sorted(unknown)}; known: {sorted(TASKS)}")
    rng = random.Random(seed)
    seen = set(exclude or ())
    problems: list[Problem] = []
    attempts = 0
    while len(problems) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise ValueError(f"cannot draw {n} distinct problems from {list(tasks)} (space too small)")
        task = tasks[len(problems) % len(tasks)]
        op, da, db = TASKS[task]
        a, b = _operand(rng, da), _operand(rng, db)
        key = (task, a, b)
        if key in seen:
            continue
        if distinct:
            seen.add(key)
        answer = {"+": a + b, "-": a - b, "*": a * b, "max": max(a, b)}[op]
        problems.append(Problem(task, a, b, answer))
    return problems


def split(tasks: tuple[str, ...], n_train: int, n_test: int, seed: int) -> tuple[list[Problem], list[Problem]]:
    """A distinct test set and a training set of the same task mix that never contains a test problem.

    Training problems may repeat (the space of 1-digit additions holds only 100).
    """
    train, _, test = split_with_validation(tasks, n_train, 0, n_test, seed)
    return train, test


def split_with_validation(
    tasks: tuple[str, ...], n_train: int, n_validation: int, n_test: int, seed: int
) -> tuple[list[Problem], list[Problem], list[Problem]]:
    """``(train, validation, test)``: distinct validation and test sets, disjoint from each other, and a training set
    of the same task mix that contains neither (training problems may repeat).

    The test set depends on ``seed`` alone, not on ``n_validation``: a validation split leaves the test set unchanged.

    Raises:
        ValueError: an unknown task, or a space too small for the distinct sets asked for.
    """
    test = make_problems(tasks, n_test, seed=seed + 10_000)
    held_out = {(p.task, p.a, p.b) for p in test}
    validation = make_problems(tasks, n_validation, seed=seed + 20_000, exclude=held_out)
    held_out |= {(p.task, p.a, p.b) for p in validation}
    train = make_problems(tasks, n_train, seed=seed, exclude=held_out, distinct=False)
    return train, validation, test


def completion_text(completion: Any) -> str:
    """The text of a completion, whether TRL passes a string or a list of chat messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        return "".join(m.get("content", "") for m in completion if isinstance(m, dict))
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    return str(completion)


def last_number(text: str) -> float | None:
    """The last number in ``text`` (negatives, thousands separators and decimals understood), or None."""
    matches = _NUMBER.findall(text)
    if not matches:
        return None
    value = float(matches[-1].replace(",", ""))
    return value


def is_correct(text: str, answer: int) -> bool:
    value = last_number(text)
    return value is not None and value == answer


def follows_format(text: str) -> bool:
    """True when the reply is the number alone (surrounding whitespace and a final period allowed)."""
    return bool(_ONLY_NUMBER.match(text))


def correctness_reward(completions: list[Any], answer: list[int], **kwargs: Any) -> list[float]:
    """TRL reward function: 1.0 when the last number of the completion equals the answer, else 0.0."""
    return [1.0 if is_correct(completion_text(c), a) else 0.0 for c, a in zip(completions, answer)]


def format_reward(completions: list[Any], **kwargs: Any) -> list[float]:
    """TRL reward function: a small bonus for replying with the number alone."""
    return [FORMAT_BONUS if follows_format(completion_text(c)) else 0.0 for c in completions]


def to_dataset(problems: list[Problem]):  # noqa: ANN201
    """A ``datasets.Dataset`` with the conversational ``prompt`` column TRL expects and the ``answer``."""
    from datasets import Dataset

    return Dataset.from_dict(
        {
            "prompt": [p.messages() for p in problems],
            "answer": [p.answer for p in problems],
            "task": [p.task for p in problems],
        }
    )


def greedy_replies(
    model, tokenizer, problems: list[Problem], max_new_tokens: int = 16, batch_size: int = 32
) -> list[str]:  # noqa: ANN001
    """Greedy replies of ``model`` to each problem (chat template, left padding, batched)."""
    import torch

    tokenizer.padding_side = "left"
    replies: list[str] = []
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        texts = [
            tokenizer.apply_chat_template(p.messages(), tokenize=False, add_generation_prompt=True) for p in chunk
        ]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with torch.no_grad():
            out = model.generate(
                **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        replies += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    model.train(was_training)
    return replies


def greedy_accuracy(model, tokenizer, problems: list[Problem], max_new_tokens: int = 16) -> float:  # noqa: ANN001
    """Share of problems whose greedy reply ends with the right number."""
    replies = greedy_replies(model, tokenizer, problems, max_new_tokens)
    return sum(is_correct(r, p.answer) for r, p in zip(replies, problems)) / max(1, len(problems))
