"""Answer extraction and exact match, with LoraHub's normalization (strip, lowercase, drop a trailing period)."""

from __future__ import annotations

import re
from math import comb

_ANSWER_IS = re.compile(r"the answer is\s*:?\s*(.+?)(?:\.\s*$|\.\s*\n|\n|$)", re.IGNORECASE)


def normalize(text: str) -> str:
    text = text.strip().lower()
    return text[:-1].rstrip() if text.endswith(".") else text


def exact_match(prediction: str, target: str) -> float:
    return float(normalize(prediction) == normalize(target))


def extract_answer(generation: str, mode: str) -> str:
    """`first_line`: the first non-empty line; `after_answer_is`: the text after the last "the answer is"
    (chain-of-thought), falling back to the last line; `full`: everything."""
    if mode == "full":
        return generation
    if mode == "after_answer_is":
        found = _ANSWER_IS.findall(generation)
        if found:
            return found[-1]
        lines = [l for l in generation.strip().splitlines() if l.strip()]
        return lines[-1] if lines else ""
    if mode == "first_line":
        for line in generation.strip().splitlines():
            if line.strip():
                return line
        return ""
    raise ValueError(f"unknown answer extraction mode {mode!r}")


def paired_sign_p(wins: int, losses: int) -> float:
    """One-sided exact McNemar (sign) test on paired per-example outcomes: the probability of at least `wins`
    wins among the ``wins + losses`` examples where exactly one of two systems is right, if neither were
    better (X ~ Binomial(wins + losses, 1/2)). 1.0 when there are no such examples."""
    if wins < 0 or losses < 0:
        raise ValueError(f"wins and losses must be counts, got {wins}, {losses}")
    n = wins + losses
    return sum(comb(n, k) for k in range(wins, n + 1)) / 2**n
