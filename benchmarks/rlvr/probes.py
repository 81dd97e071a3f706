"""Fixed probes of the RLVR benchmark: general prompts for the forgetting KL and a retained skill."""

from __future__ import annotations

from dataclasses import dataclass

GENERAL_PROMPTS = [
    "Name a colour of the sky.",
    "Write one sentence about cats.",
    "What is the capital of France?",
    "Give me a synonym for happy.",
    "Describe the sun in five words.",
    "What do bees make?",
    "Suggest a name for a dog.",
    "Why do we sleep?",
    "Translate 'hello' into Spanish.",
    "What is water made of?",
    "Tell me a fun fact about space.",
    "How many legs does a spider have?",
    "What season comes after winter?",
    "Write a short greeting for a friend.",
    "What is a triangle?",
    "Name a fruit that is yellow.",
]


@dataclass(frozen=True)
class SkillItem:
    question: str
    answer: str

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.question}]


# A skill the base model has and the arithmetic training does not ask for: naming the next day/month.
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]

RETAINED_SKILL = [
    SkillItem(f"Which day comes after {d}? Reply with one word.", _DAYS[(i + 1) % 7]) for i, d in enumerate(_DAYS)
] + [
    SkillItem(f"Which month comes after {m}? Reply with one word.", _MONTHS[(i + 1) % 12])
    for i, m in enumerate(_MONTHS)
]


def skill_correct(reply: str, item: SkillItem) -> bool:
    """The first word of the reply names the right day or month."""
    words = reply.strip().split()
    return bool(words) and words[0].strip(".,!").lower() == item.answer.lower()
