"""Answer extraction and exact match, with LoraHub's normalization (strip, lowercase, drop a trailing period)."""

from __future__ import annotations

import re

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
