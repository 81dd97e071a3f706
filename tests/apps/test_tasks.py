"""The arithmetic task generator and its verifiable rewards."""

from __future__ import annotations

import pytest

from peft_geora_apps.tasks import (
    FORMAT_BONUS,
    TASKS,
    completion_text,
    correctness_reward,
    follows_format,
    format_reward,
    last_number,
    make_problems,
    split,
    split_with_validation,
    to_dataset,
)


def test_generator_is_seeded_distinct_and_correct():
    a = make_problems(("add_1x1", "sub_2x1", "mul_1x1"), 60, seed=3)
    assert a == make_problems(("add_1x1", "sub_2x1", "mul_1x1"), 60, seed=3)
    assert a != make_problems(("add_1x1", "sub_2x1", "mul_1x1"), 60, seed=4)
    assert len({(p.task, p.a, p.b) for p in a}) == 60
    for p in a:
        op, da, db = TASKS[p.task]
        assert p.answer == eval(f"{p.a} {op} {p.b}")
        assert len(str(p.a)) == da and len(str(p.b)) == db
        assert p.question.endswith("Reply with only the number.")
    assert [p.task for p in a[:3]] == ["add_1x1", "sub_2x1", "mul_1x1"]


def test_train_and_test_split_are_disjoint():
    train, test = split(("add_1x1", "add_2x1"), 400, 64, seed=0)
    assert len(train) == 400 and len(test) == 64 and len(set(test)) == 64
    assert not set(train) & set(test)
    assert len(set(train)) < 400  # training prompts may repeat: only 100 one-digit additions exist


def test_a_validation_split_is_disjoint_and_leaves_the_test_set_and_the_plain_split_unchanged():
    tasks = ("add_1x1", "add_2x1")
    train, validation, test = split_with_validation(tasks, 400, 32, 64, seed=3)
    assert len(validation) == 32 and len(set(validation)) == 32
    assert not set(validation) & set(test) and not set(train) & (set(validation) | set(test))
    plain_train, plain_test = split(tasks, 400, 64, seed=3)
    assert test == plain_test and set(plain_train) & set(validation)  # only the training draw avoids the validation
    assert split_with_validation(tasks, 400, 0, 64, seed=3) == (plain_train, [], plain_test)


def test_generator_refuses_impossible_requests():
    with pytest.raises(ValueError, match="unknown task"):
        make_problems(("div_1x1",), 3, seed=0)
    with pytest.raises(ValueError, match="space too small"):
        make_problems(("add_1x1",), 101, seed=0)  # only 100 distinct 1-digit additions


@pytest.mark.parametrize(
    "text, expected",
    [
        ("19", 19),
        ("The answer is 19.", 19),
        ("12 + 7 = 19", 19),
        ("-5", -5),
        ("It is -12, not 12.", 12),
        ("1,234", 1234),
        ("Total: 12,345,678 apples", 12345678),
        ("3.5", 3.5),
        ("no number here", None),
        ("", None),
        ("x2 is 4", 4),
        ("1,23", 23),
    ],
)
def test_last_number(text, expected):
    assert last_number(text) == expected


@pytest.mark.parametrize(
    "text, ok",
    [
        ("19", True),
        (" 19. ", True),
        ("-3", True),
        ("1,234", True),
        ("19 apples", False),
        ("Answer: 19", False),
        ("", False),
    ],
)
def test_strict_format(text, ok):
    assert follows_format(text) is ok


def test_reward_functions_accept_strings_and_chat_messages():
    completions = ["19", [{"role": "assistant", "content": "It is 19."}], "18", "no idea", "-4", "1,000"]
    answers = [19, 19, 19, 19, -4, 1000]
    assert correctness_reward(completions, answer=answers) == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0]
    assert format_reward(completions) == [FORMAT_BONUS, 0.0, FORMAT_BONUS, 0.0, FORMAT_BONUS, FORMAT_BONUS]
    assert completion_text({"content": "7"}) == "7"


def test_dataset_has_the_columns_trl_expects():
    dataset = to_dataset(make_problems(("add_1x1",), 4, seed=0))
    row = dataset[0]
    assert row["prompt"][0]["role"] == "user" and isinstance(row["answer"], int)
