"""`task=algorithmic`: the project's own seeded generators of BBH-style tasks, fully offline.

Every example is a pure function of (family, split, index), so the sets are identical on every machine.
Each family has a fixed eval set (`eval_size`), a fit pool (`fit_pool_size`) and an unlimited stream of
training examples; fit and training examples that coincide with an eval input are dropped.
"""

from __future__ import annotations

import random
from functools import lru_cache
from typing import Callable

from bench.registry import register_task
from tasks.base import Example, GenerativeTask

Generator = Callable[[random.Random], tuple[str, str]]

WORDS = (
    "apple banana cherry delta echo falcon garden harbor island jungle kettle lemon mango nectar orbit "
    "pepper quartz river saddle tiger umbrella velvet walnut xenon yellow zebra anchor breeze canyon dragon "
    "ember forest glacier hollow ivory jasper kayak lantern meadow nickel oyster prism quiver rocket silver "
    "thunder unicorn violet willow yonder zephyr bishop castle dinner engine fabric guitar hammer insect "
    "jacket kitten ladder magnet needle office pencil quilt rabbit spider tunnel vessel window"
).split()
ANIMALS = ["cat", "dog", "rabbit", "goat", "snake", "duck", "fish", "mouse", "cow", "pig"]
INSTRUMENTS = ["piano", "flute", "violin", "trumpet", "drum", "guitar", "clarinet", "trombone"]
FRUITS = ["apple", "banana", "peach", "plum", "grape", "orange", "strawberry", "nectarine"]
NUMBER_WORDS = ["a", "two", "three", "four"]
CATEGORIES = {"animals": ANIMALS, "musical instruments": INSTRUMENTS, "fruits": FRUITS}
BRACKETS = {"(": ")", "[": "]", "{": "}", "<": ">"}


def boolean_expressions(rng: random.Random) -> tuple[str, str]:
    def expr(depth: int) -> str:
        if depth == 0 or rng.random() < 0.3:
            return rng.choice(["True", "False"])
        kind = rng.choice(["not", "and", "or", "paren"])
        if kind == "not":
            return f"not {expr(depth - 1)}"
        if kind == "paren":
            return f"( {expr(depth - 1)} )"
        return f"{expr(depth - 1)} {kind} {expr(depth - 1)}"

    text = expr(3)
    return f"{text} is", str(eval(text))  # noqa: S307 - our own generated boolean literal expression


def multistep_arithmetic(rng: random.Random) -> tuple[str, str]:
    def term() -> str:
        a, b = rng.randint(-9, 9), rng.randint(-9, 9)
        return f"({a} {rng.choice('+-*')} {b})"

    text = f"({term()} {rng.choice('+-*')} {term()})"
    return f"{text} =", str(eval(text))  # noqa: S307 - integers and + - * only


def word_sorting(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, rng.randint(3, 6))
    return "Sort the following words alphabetically: List: " + " ".join(words), " ".join(sorted(words))


def dyck_languages(rng: random.Random) -> tuple[str, str]:
    stack, seq = [], []
    for _ in range(rng.randint(3, 8)):
        if stack and rng.random() < 0.4:
            seq.append(BRACKETS[stack.pop()])
        else:
            opener = rng.choice(list(BRACKETS))
            stack.append(opener)
            seq.append(opener)
    if not stack:
        opener = rng.choice(list(BRACKETS))
        stack.append(opener)
        seq.append(opener)
    closing = " ".join(BRACKETS[b] for b in reversed(stack))
    prompt = ("Complete the rest of the sequence, making sure that the parentheses are closed properly. "
              f"Input: {' '.join(seq)}")
    return prompt, closing


def object_counting(rng: random.Random) -> tuple[str, str]:
    category = rng.choice(list(CATEGORIES))
    items, total = [], 0
    for other, pool in CATEGORIES.items():
        for name in rng.sample(pool, rng.randint(1, 3) if other == category else rng.randint(0, 2)):
            count = rng.randint(1, 4)
            total += count if other == category else 0
            items.append(f"{NUMBER_WORDS[count - 1]} {_plural(name) if count > 1 else name}")
    rng.shuffle(items)
    listing = items[0] if len(items) == 1 else ", ".join(items[:-1]) + f", and {items[-1]}"
    return f"I have {listing}. How many {category} do I have?", str(total)


def _plural(noun: str) -> str:
    if noun.endswith(("ch", "sh", "s")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


FAMILIES: dict[str, Generator] = {
    "boolean_expressions": boolean_expressions,
    "multistep_arithmetic": multistep_arithmetic,
    "word_sorting": word_sorting,
    "dyck_languages": dyck_languages,
    "object_counting": object_counting,
}


def generate(family: str, namespace: str, index: int) -> Example:
    question, answer = FAMILIES[family](random.Random(f"{family}:{namespace}:{index}"))
    return Example(question, answer, family)


@register_task("algorithmic")
class AlgorithmicTask(GenerativeTask):
    """Generated BBH-style tasks; also the training data of the smallest expert pools."""

    def all_subtasks(self) -> list[str]:
        return list(FAMILIES)

    def split(self, subtask: str) -> tuple[list[Example], list[Example]]:
        return _split(subtask, int(self.cfg.eval_size), int(self.cfg.fit_pool_size))

    def prompt(self, example: Example) -> str:
        return self.cfg.prompt_template.format(input=example.input)

    def train_examples(self, subtask: str, n: int, seed: int) -> list[Example]:
        fit, evals = self.split(subtask)
        taken = {e.input for e in fit} | {e.input for e in evals}
        out, i = [], 0
        while len(out) < n:
            example = generate(subtask, f"train{seed}", i)
            i += 1
            if example.input not in taken:
                out.append(example)
            if i > 50 * n + 1000:
                raise RuntimeError(f"{subtask}: cannot draw {n} training examples disjoint from eval")
        return out


@lru_cache(maxsize=64)
def _split(family: str, eval_size: int, fit_pool_size: int) -> tuple[list[Example], list[Example]]:
    evals, seen = [], set()
    i = 0
    while len(evals) < eval_size:
        example = generate(family, "eval", i)
        i += 1
        if example.input not in seen:
            seen.add(example.input)
            evals.append(example)
    fit, i = [], 0
    while len(fit) < fit_pool_size:
        example = generate(family, "fit", i)
        i += 1
        if example.input not in seen:
            seen.add(example.input)
            fit.append(example)
    return fit, evals
