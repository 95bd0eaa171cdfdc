"""`task=bbh`: BIG-Bench Hard, 27 subtasks, exact match (DESIGN §5).

Data: ``<data_root>/bbh/bbh/<subtask>.json`` (``{"examples": [{"input", "target"}]}``) and the official
chain-of-thought prompts ``<data_root>/bbh/cot-prompts/<subtask>.txt``; without a data root, the hub data
set ``lukaemon/bbh`` (same content). Formats: `zeroshot` (LoraHub's protocol), `fewshot` (demonstrations
drawn from the subtask's fit pool, never from the eval set) and `cot` (the official 3-shot prompts; the
answer is read after "the answer is").
"""

from __future__ import annotations

import json
import random
from functools import lru_cache
from pathlib import Path

from bench.errors import ConfigError, DataError
from bench.registry import register_task
from tasks.base import Example, GenerativeTask, stable_order

SUBTASKS = [
    "boolean_expressions", "causal_judgement", "date_understanding", "disambiguation_qa", "dyck_languages",
    "formal_fallacies", "geometric_shapes", "hyperbaton", "logical_deduction_five_objects",
    "logical_deduction_seven_objects", "logical_deduction_three_objects", "movie_recommendation",
    "multistep_arithmetic_two", "navigate", "object_counting", "penguins_in_a_table",
    "reasoning_about_colored_objects", "ruin_names", "salient_translation_error_detection", "snarks",
    "sports_understanding", "temporal_sequences", "tracking_shuffled_objects_five_objects",
    "tracking_shuffled_objects_seven_objects", "tracking_shuffled_objects_three_objects", "web_of_lies",
    "word_sorting",
]
FORMATS = ("zeroshot", "fewshot", "cot")
HUB_DATASET = "lukaemon/bbh"


@register_task("bbh")
class BBHTask(GenerativeTask):
    def __init__(self, cfg, data_root=None) -> None:
        super().__init__(cfg, data_root)
        if cfg.format not in FORMATS:
            raise ConfigError(f"task.format={cfg.format!r}; choose one of {FORMATS}")

    def all_subtasks(self) -> list[str]:
        return list(SUBTASKS)

    def answer_mode(self, subtask: str) -> str:
        return "after_answer_is" if self.cfg.format == "cot" else self.cfg.get("answer_extraction", "first_line")

    def max_new_tokens(self, subtask: str) -> int:
        """``max_new_tokens``, or the subtask's own budget from ``max_new_tokens_per_subtask`` (e.g. word sorting,
        whose answers run to 60 tokens)."""
        own = (self.cfg.get("max_new_tokens_per_subtask") or {}).get(subtask)
        return int(own) if own is not None else super().max_new_tokens(subtask)

    @property
    def expert_holdout(self) -> int:
        """Eval examples per subtask kept out of expert training (`train_examples`): an expert's manifest scores it
        on these, so a pool's ``manifest_eval_limit`` must not exceed it."""
        return int(self.cfg.get("expert_holdout", 50))

    def train_examples(self, subtask: str, n: int, seed: int) -> list[Example]:
        """Training data of an expert on `subtask`, for the cross-task protocol (`task=bbh_cross`), where no expert is
        ever composed for its own task family: `n` examples (all when fewer) of the subtask's fit pool and of its eval
        set after the first `expert_holdout`, drawn with `seed`."""
        fit, evals = self.split(subtask)
        available = fit + evals[self.expert_holdout:]
        return random.Random(f"train{seed}:{subtask}").sample(available, min(int(n), len(available)))

    def split(self, subtask: str) -> tuple[list[Example], list[Example]]:
        examples = stable_order(load_subtask(subtask, self.local_dir()))
        n_fit = int(self.cfg.fit_pool_size)
        return examples[:n_fit], examples[n_fit:]

    def local_dir(self) -> str | None:
        """``<data_root>/bbh``; None (read from the hub) only when no data root is set."""
        if not self.data_root:
            return None
        self.check_data()
        return str(Path(self.data_root) / "bbh")

    def data_files(self) -> list[Path]:
        if not self.data_root:
            return []
        root = Path(self.data_root) / "bbh"
        files = [root / "bbh" / f"{s}.json" for s in self.subtasks()]
        return files + ([root / "cot-prompts" / f"{s}.txt" for s in self.subtasks()] if self.cfg.format == "cot" else [])

    def check_data(self) -> None:
        if self.data_root and not (Path(self.data_root) / "bbh" / "bbh").is_dir():
            raise DataError(f"paths.data_root={self.data_root} holds no bbh/bbh/ (BBH's JSON files); fix the path, "
                            f"or set paths.data_root=null to read the hub data set {HUB_DATASET}")

    def prompt(self, example: Example) -> str:
        question = self.cfg.prompt_template.format(input=example.input)
        if self.cfg.format == "zeroshot":
            return question
        if self.cfg.format == "cot":
            return f"{cot_prompt(example.subtask, self.local_dir())}\n\nQ: {example.input}\nA: Let's think step by step."
        fit_pool = self.split(example.subtask)[0]
        shots = random.Random(f"shots:{example.subtask}").sample(fit_pool, int(self.cfg.n_shots))
        demos = "".join(f"{self.cfg.prompt_template.format(input=s.input)} {s.target}\n\n" for s in shots)
        return demos + question


@lru_cache(maxsize=64)
def load_subtask(subtask: str, local_dir: str | None) -> list[Example]:
    if subtask not in SUBTASKS:
        raise ConfigError(f"unknown BBH subtask {subtask!r}")
    if local_dir is not None:
        path = Path(local_dir) / "bbh" / f"{subtask}.json"
        if not path.is_file():
            raise DataError(f"BBH file {path} is missing")
        try:
            rows = json.loads(path.read_text())["examples"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise DataError(f"BBH file {path} is malformed ({exc})") from exc
    else:
        try:
            from datasets import load_dataset

            rows = list(load_dataset(HUB_DATASET, subtask, split="test"))
        except Exception as exc:
            raise DataError(
                f"BBH {subtask}: no local data (set paths.data_root) and the hub data set {HUB_DATASET} "
                f"could not be loaded ({type(exc).__name__}: {exc})"
            ) from exc
    return [Example(r["input"], r["target"], subtask) for r in rows]


@lru_cache(maxsize=64)
def cot_prompt(subtask: str, local_dir: str | None) -> str:
    """The official 3-shot chain-of-thought prompt, without its canary header."""
    if local_dir is None:
        raise DataError("BBH format=cot needs the official prompts under <data_root>/bbh/cot-prompts")
    path = Path(local_dir) / "cot-prompts" / f"{subtask}.txt"
    if not path.is_file():
        raise DataError(f"BBH chain-of-thought prompt {path} is missing")
    text = path.read_text()
    return text.split("-----", 1)[1].strip() if "-----" in text else text.strip()
