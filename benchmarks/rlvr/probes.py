"""Fixed probes of the RLVR benchmark: general prompts for the forgetting KL and a retained skill."""

from __future__ import annotations

import re
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


# A skill the base model has and the arithmetic training does not ask for: naming capital cities. (A first probe,
# naming the next day or month, was dropped: the base model got about half of the days and few months right.)
_CAPITALS = {
    "France": "Paris",
    "Italy": "Rome",
    "Germany": "Berlin",
    "Spain": "Madrid",
    "Japan": "Tokyo",
    "Russia": "Moscow",
    "England": "London",
    "Egypt": "Cairo",
    "Greece": "Athens",
    "Portugal": "Lisbon",
    "Austria": "Vienna",
    "Ireland": "Dublin",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Poland": "Warsaw",
    "Thailand": "Bangkok",
    "Kenya": "Nairobi",
    "Peru": "Lima",
    "Argentina": "Buenos Aires",
    "South Korea": "Seoul",
}

RETAINED_SKILL = [SkillItem(f"What is the capital of {country}?", city) for country, city in _CAPITALS.items()]


def skill_correct(reply: str, item: SkillItem) -> bool:
    """The reply names the right city (as whole words, any case): "The capital of France is Paris." counts."""
    words = re.findall(r"[a-z]+", reply.lower())
    answer = item.answer.lower().split()
    return any(words[i : i + len(answer)] == answer for i in range(len(words)))
