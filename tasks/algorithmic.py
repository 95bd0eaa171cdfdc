"""`task=algorithmic`: the project's own seeded generators of BBH-style tasks, fully offline.

Every example is a pure function of (family, split, index), so the sets are identical on every machine.
Each family has a fixed eval set (`eval_size`), a fit pool (`fit_pool_size`) and an unlimited stream of
training examples; fit and training examples that coincide with an eval input are dropped.

`scratchpad`: families whose examples carry a step-by-step completion ending in "So the answer is <answer>."
(teacher-forced in training; the answer is read after "the answer is", with `scratchpad_max_new_tokens`). Their
inputs and targets are the same as without it. Families with a scratchpad: those in `SCRATCHPADS`.
"""

from __future__ import annotations

import random
from functools import lru_cache
from typing import Callable

from bench.errors import ConfigError
from bench.registry import register_task
from tasks.base import Example, GenerativeTask

Generator = Callable[[random.Random], tuple[str, str]]
# (question, answer, step-by-step completion ending in "So the answer is <answer>."), drawing from the rng exactly
# as the family's generator does
ScratchpadGenerator = Callable[[random.Random], tuple[str, str, str]]

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


_OPS: dict[str, Callable[[int, int], int]] = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y}


def _multistep_arithmetic(rng: random.Random) -> tuple[str, str, str]:
    """``((a o1 b) o2 (c o3 d))`` with single-digit signed ints, computed with ints; the draws are in the order
    of the original generator (a, b, o1, o2, c, d, o3), so questions and answers are unchanged."""
    a, b = rng.randint(-9, 9), rng.randint(-9, 9)
    o1 = rng.choice("+-*")
    o2 = rng.choice("+-*")
    c, d = rng.randint(-9, 9), rng.randint(-9, 9)
    o3 = rng.choice("+-*")
    left, right = _OPS[o1](a, b), _OPS[o3](c, d)
    answer = _OPS[o2](left, right)
    text = f"(({a} {o1} {b}) {o2} ({c} {o3} {d}))"
    steps = (f"{a} {o1} {b} = {left}. {c} {o3} {d} = {right}. {left} {o2} {right} = {answer}. "
             f"So the answer is {answer}.")
    return f"{text} =", str(answer), steps


def multistep_arithmetic(rng: random.Random) -> tuple[str, str]:
    question, answer, _ = _multistep_arithmetic(rng)
    return question, answer


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


# the BIG-Bench Hard subtask each family imitates (the cross-task protocol withholds a family's expert from its twin)
BBH_TWINS: dict[str, str] = {
    "boolean_expressions": "boolean_expressions",
    "multistep_arithmetic": "multistep_arithmetic_two",
    "word_sorting": "word_sorting",
    "dyck_languages": "dyck_languages",
    "object_counting": "object_counting",
}


SCRATCHPADS: dict[str, ScratchpadGenerator] = {
    "multistep_arithmetic": _multistep_arithmetic,
}


def generate(family: str, namespace: str, index: int, scratchpad: bool = False) -> Example:
    """Example `index` of `family` in `namespace` (eval, fit, train<seed>); with `scratchpad`, its completion is
    the family's step-by-step solution (same input and target)."""
    rng = random.Random(f"{family}:{namespace}:{index}")
    if scratchpad:
        question, answer, completion = SCRATCHPADS[family](rng)
        return Example(question, answer, family, completion)
    question, answer = FAMILIES[family](rng)
    return Example(question, answer, family)


@register_task("algorithmic")
class AlgorithmicTask(GenerativeTask):
    """Generated BBH-style tasks; also the training data of the smallest expert pools."""

    def __init__(self, cfg, data_root=None) -> None:
        super().__init__(cfg, data_root)
        chosen = list(cfg.get("scratchpad") or [])
        unknown = [f for f in chosen if f not in FAMILIES]
        if unknown:
            raise ConfigError(f"task.scratchpad: unknown families {unknown}; known: {list(FAMILIES)}")
        without = [f for f in chosen if f not in SCRATCHPADS]
        if without:
            raise ConfigError(f"task.scratchpad: families {without} have no scratchpad; families with one: "
                              f"{list(SCRATCHPADS)}")
        self.scratchpad = frozenset(chosen)

    def all_subtasks(self) -> list[str]:
        return list(FAMILIES)

    def split(self, subtask: str) -> tuple[list[Example], list[Example]]:
        return _split(subtask, int(self.cfg.eval_size), int(self.cfg.fit_pool_size), subtask in self.scratchpad)

    def answer_mode(self, subtask: str) -> str:
        return "after_answer_is" if subtask in self.scratchpad else super().answer_mode(subtask)

    def max_new_tokens(self, subtask: str) -> int:
        if subtask in self.scratchpad:
            return int(self.cfg.get("scratchpad_max_new_tokens", 48))
        return super().max_new_tokens(subtask)

    def prompt(self, example: Example) -> str:
        return self.cfg.prompt_template.format(input=example.input)

    def train_examples(self, subtask: str, n: int, seed: int) -> list[Example]:
        fit, evals = self.split(subtask)
        taken = {e.input for e in fit} | {e.input for e in evals}
        out, i = [], 0
        while len(out) < n:
            example = generate(subtask, f"train{seed}", i, subtask in self.scratchpad)
            i += 1
            if example.input not in taken:
                out.append(example)
            if i > 50 * n + 1000:
                raise RuntimeError(f"{subtask}: cannot draw {n} training examples disjoint from eval")
        return out


@lru_cache(maxsize=64)
def _split(family: str, eval_size: int, fit_pool_size: int, scratchpad: bool = False
           ) -> tuple[list[Example], list[Example]]:
    evals, seen = [], set()
    i = 0
    while len(evals) < eval_size:
        example = generate(family, "eval", i, scratchpad)
        i += 1
        if example.input not in seen:
            seen.add(example.input)
            evals.append(example)
    fit, i = [], 0
    while len(fit) < fit_pool_size:
        example = generate(family, "fit", i, scratchpad)
        i += 1
        if example.input not in seen:
            seen.add(example.input)
            fit.append(example)
    return fit, evals
