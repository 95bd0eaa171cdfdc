"""How much of a multiple-choice Flan CoT subtask the base model knows: lm-eval's multiple-choice scoring (the
log-likelihood of each option's text given the question alone, `acc` and length-normalized `acc_norm`) of the
base model on the subtask's eval examples, beside chance. A ceiling check for experts that stay weak: an expert
that generates one option cannot be expected far above what the base model's option likelihoods rank first.

    python -m bench.analysis.mc_ceiling [--subtasks qasc,ecqa,aqua] [--limit 200] [--out results/crosscheck] [overrides ...]

Writes ``<out>/flan_mc_ceiling.csv`` and ``.md``. The subtasks must list their answers as options
(`tasks.flan_cot.options`): qasc, ecqa and aqua do; creak, sensemaking, strategyqa and gsm8k do not.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig

from bench.config import PROJECT_ROOT
from bench.config import compose_config as project_config
from bench.files import write_json_atomic
from tasks.base import Example

DEFAULT_SUBTASKS = ("qasc", "ecqa", "aqua")
COLUMNS = ["subtask", "n", "options", "chance", "acc", "acc_norm"]

log = logging.getLogger(__name__)


def compose_config(subtasks: list[str], limit: int, overrides: list[str] = ()) -> DictConfig:
    """The project's ``task=flan_cot profile=local`` config restricted to `subtasks`, `limit` examples each."""
    base = ["method=base", "task=flan_cot", "profile=local", f"task.subtasks=[{','.join(subtasks)}]",
            f"task.limit={int(limit)}"]
    return project_config([*base, *overrides])


def choice_docs(examples: list[Example]) -> list[dict]:
    """One lm-eval document per example: question (options removed), option texts, gold index."""
    from tasks.flan_cot import options

    docs = []
    for i, example in enumerate(examples):
        question, texts, gold = options(example)
        docs.append({"id": i, "question": question, "choices": texts, "gold": gold})
    return docs


def lmeval_mc_config(subtask: str, data_file: Path) -> dict[str, Any]:
    """An inline lm-eval multiple-choice task over `data_file` (JSON with the `choice_docs` fields)."""
    return {
        "task": f"flan_cot_{subtask}_mc", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}, "field": "docs"}, "test_split": "test",
        "output_type": "multiple_choice", "doc_to_text": "Q: {{question}}\nA:", "doc_to_choice": "choices",
        "doc_to_target": "gold", "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
    }


def ceiling(cfg: DictConfig, out: Path, batch_size: int = 8) -> pd.DataFrame:
    """lm-eval's option-likelihood accuracy of the base model per subtask, written to `out`."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from bench.registry import get_task
    from bench.run.runner import load_model

    task = get_task("flan_cot")(cfg.task, cfg.paths.data_root)
    model = load_model(cfg)
    lm = HFLM(pretrained=model.model, tokenizer=model.tokenizer, batch_size=batch_size)
    subtasks = task.subtasks()
    docs = {subtask: choice_docs(task.eval_examples(subtask)) for subtask in subtasks}
    with tempfile.TemporaryDirectory() as tmp:
        configs = {}
        for subtask in subtasks:
            path = Path(tmp) / f"{subtask}.json"
            write_json_atomic(path, {"docs": docs[subtask]})
            configs[subtask] = lmeval_mc_config(subtask, path)
        results = simple_evaluate(model=lm, tasks=copy.deepcopy(list(configs.values())), apply_chat_template=model.chat,
                                  task_manager=TaskManager(include_defaults=False), bootstrap_iters=0)
    rows = []
    for subtask in subtasks:
        scores, listed = results["results"][configs[subtask]["task"]], docs[subtask]
        rows.append({"subtask": subtask, "n": len(listed), "options": sum(len(d["choices"]) for d in listed) / len(listed),
                     "chance": sum(1 / len(d["choices"]) for d in listed) / len(listed),
                     "acc": scores["acc,none"], "acc_norm": scores["acc_norm,none"]})
        log.info("%s: %s", subtask, rows[-1])
    table = pd.DataFrame(rows, columns=COLUMNS)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "flan_mc_ceiling.csv", index=False)
    header = (f"Base model {cfg.model.get('name', '')}: lm-eval multiple-choice accuracy on the Flan CoT eval examples "
              f"(options' log-likelihood given the question alone; chat template {model.chat}).\n\n")
    (out / "flan_mc_ceiling.md").write_text(header + table.to_markdown(index=False, floatfmt=".3f") + "\n")
    return table


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subtasks", default=",".join(DEFAULT_SUBTASKS), help="comma-separated Flan CoT subtasks")
    parser.add_argument("--limit", type=int, default=200, help="eval examples per subtask (the first ones)")
    parser.add_argument("--out", default=str(PROJECT_ROOT / "results" / "crosscheck"))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. paths.data_root=/data device=cuda")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = compose_config([s for s in args.subtasks.split(",") if s], args.limit, args.overrides)
    table = ceiling(cfg, Path(args.out), args.batch_size)
    print(json.dumps(table.to_dict("records"), indent=1))
    return table


if __name__ == "__main__":
    main()
