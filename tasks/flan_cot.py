"""`task=flan_cot`: the 7 Flan v2 chain-of-thought tasks (aqua, creak, ecqa, gsm8k, qasc, sensemaking,
strategyqa), exact match on the final answer (DESIGN §5).

Data: ``<data_root>/flan_cot/<task>_train.tsv`` (question, answer, rationale; no header; ``\\n`` escaped).
Splits are fixed by a hash of the question: 10% test (scored), 5% dev (the fit pool), the rest train
(expert training). `target_format`: `answer` trains and prompts for the bare answer; `cot` trains on
"<rationale> So the answer is <answer>." and reads the answer after "the answer is". `cot_subtasks`: subtasks
that take the `cot` format even when `target_format: answer` (the others stay bare). Subtasks in the `cot` format
generate up to `cot_max_new_tokens` tokens.
"""

from __future__ import annotations

import csv
import hashlib
import re
from functools import lru_cache
from pathlib import Path

from bench.errors import ConfigError, DataError
from bench.registry import register_task
from tasks.base import Example, GenerativeTask, stable_order

SUBTASKS = ["aqua", "creak", "ecqa", "gsm8k", "qasc", "sensemaking", "strategyqa"]
FORMATS = ("answer", "cot")
_LABELED = re.compile(r"^\(([A-Z])\)\s*(.*)$")


def options(example: Example) -> tuple[str, list[str], int]:
    """A multiple-choice input split into (question, option texts, index of the gold option): the lines after
    "Options:", a leading "- " and an "(X) " label stripped; the gold option is the one whose label or text is
    the target. DataError when the input lists no options or none of them is the target."""
    question, sep, listed = example.input.partition("Options:")
    lines = [line.strip().removeprefix("- ").strip() for line in listed.splitlines() if line.strip()]
    if not sep or not lines:
        raise DataError(f"{example.subtask}: no options listed in {example.input[:80]!r}")
    texts, gold = [], None
    for i, line in enumerate(lines):
        labeled = _LABELED.match(line)
        label, text = (f"({labeled[1]})", labeled[2]) if labeled else (None, line)
        texts.append(text)
        if example.target in (label, text):
            gold = i
    if gold is None:
        raise DataError(f"{example.subtask}: target {example.target!r} is none of the options {lines}")
    return question.strip(), texts, gold


def split_of(question: str) -> str:
    bucket = int(hashlib.sha1(question.encode()).hexdigest(), 16) % 20
    return "test" if bucket < 2 else "dev" if bucket == 2 else "train"


@lru_cache(maxsize=16)
def load_splits(subtask: str, data_root: str) -> dict[str, list[Example]]:
    path = Path(data_root) / "flan_cot" / f"{subtask}_train.tsv"
    if not path.is_file():
        raise DataError(f"Flan CoT file {path} is missing (set paths.data_root to a folder holding flan_cot/)")
    splits: dict[str, list[Example]] = {"train": [], "dev": [], "test": []}
    seen = set()
    with path.open(newline="") as f:
        for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            if len(row) != 3:
                raise DataError(f"{path}: expected 3 tab-separated fields, got {len(row)}: {row[:1]}")
            question, answer, rationale = (c.replace("\\n", "\n").strip() for c in row)
            if question in seen:
                continue
            seen.add(question)
            completion = f"{rationale} So the answer is {answer}."
            splits[split_of(question)].append(Example(question, answer, subtask, completion))
    return {k: stable_order(v) for k, v in splits.items()}


@register_task("flan_cot")
class FlanCoTTask(GenerativeTask):
    def __init__(self, cfg, data_root=None) -> None:
        super().__init__(cfg, data_root)
        if cfg.target_format not in FORMATS:
            raise ConfigError(f"task.target_format={cfg.target_format!r}; choose one of {FORMATS}")
        if not data_root:
            raise DataError("task=flan_cot reads <data_root>/flan_cot/*.tsv; set paths.data_root")
        chosen = list(cfg.get("cot_subtasks") or [])
        unknown = [s for s in chosen if s not in SUBTASKS]
        if unknown:
            raise ConfigError(f"task.cot_subtasks: unknown subtasks {unknown}; known: {SUBTASKS}")
        self.cot_subtasks = frozenset(chosen)

    def data_files(self) -> list[Path]:
        return [Path(self.data_root) / "flan_cot" / f"{s}_train.tsv" for s in self.subtasks()]

    def check_data(self) -> None:
        if not (Path(self.data_root) / "flan_cot").is_dir():
            raise DataError(f"paths.data_root={self.data_root} holds no flan_cot/ (the Flan CoT TSV files)")

    def is_cot(self, subtask: str) -> bool:
        """Whether `subtask` is trained on rationales and read after "the answer is"."""
        return self.cfg.target_format == "cot" or subtask in self.cot_subtasks

    def all_subtasks(self) -> list[str]:
        return list(SUBTASKS)

    def _splits(self, subtask: str) -> dict[str, list[Example]]:
        splits = load_splits(subtask, str(self.data_root))
        if not self.is_cot(subtask):
            splits = {k: [Example(e.input, e.target, e.subtask) for e in v] for k, v in splits.items()}
        return splits

    def split(self, subtask: str) -> tuple[list[Example], list[Example]]:
        splits = self._splits(subtask)
        return splits["dev"], splits["test"]

    def answer_mode(self, subtask: str) -> str:
        return "after_answer_is" if self.is_cot(subtask) else "first_line"

    def max_new_tokens(self, subtask: str) -> int:
        return int(self.cfg.get("cot_max_new_tokens", 160)) if self.is_cot(subtask) else super().max_new_tokens(subtask)

    def prompt(self, example: Example) -> str:
        return self.cfg.prompt_template.format(input=example.input)

    def train_examples(self, subtask: str, n: int, seed: int) -> list[Example]:
        import random

        train = self._splits(subtask)["train"]
        return random.Random(f"{seed}:{subtask}").sample(train, min(n, len(train)))
