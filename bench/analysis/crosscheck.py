"""Cross-check our BBH scorer against lm-eval's BBH zero-shot task on the same model and the same examples.

    python -m bench.analysis.crosscheck [--subtasks a,b,c] [--limit N] [--out results/crosscheck] [hydra overrides ...]
    make crosscheck ARGS="--limit 40"

For each subtask (default: boolean_expressions, object_counting, word_sorting) this scores the base model

1. with our scorer, exactly as the job ``method=base task=bbh profile=local`` does (the project's Hydra config,
   `BBHTask` zero-shot prompt, `LanguageModel.generate`, first-line answer, LoraHub's normalization), and
2. with lm-eval: ``HFLM(pretrained=<the same transformers model>, tokenizer=<its tokenizer>)`` and
   ``simple_evaluate`` on lm-eval's own ``bbh/zeroshot/<subtask>.yaml`` (prompt, stop sequences, filters
   ``strict-match`` and ``flexible-extract``, exact-match settings unchanged) whose data source is swapped for a
   local JSON file holding exactly our eval examples (the hub data set cannot be reached offline). Variants:
   ``lm-eval`` (its defaults: raw prompt with the task description, 256 new tokens), ``lm-eval+chat``
   (``apply_chat_template=True``; the description becomes the system message) and ``lm-eval+our-input``
   (chat template as our scorer uses it, no description, our token budget: the model reads the very string
   our scorer feeds it, so what differs is only lm-eval's stopping, answer filters and metric).

Per subtask, lm-eval variant and filter it writes n, both accuracies, the number of examples whose
correctness differs, and how many model inputs / raw outputs are identical to ours, to
``<out>/bbh_lmeval.csv`` and ``.md`` (with a few disagreeing examples side by side), and every example's
generations to ``<out>/bbh_lmeval_examples.jsonl``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pandas as pd
from omegaconf import DictConfig

from bench.config import PROJECT_ROOT
from bench.config import compose_config as project_config
from tasks.base import Example, GenerativeTask

log = logging.getLogger("bench.analysis.crosscheck")

DEFAULT_SUBTASKS = ("boolean_expressions", "object_counting", "word_sorting")
FILTERS = ("strict-match", "flexible-extract")
COLUMNS = ["subtask", "variant", "filter", "n", "ours", "lmeval", "disagree", "ours_only", "lmeval_only",
           "same_input", "same_output"]


@dataclass(frozen=True)
class Variant:
    """How lm-eval is run: `chat` is ``apply_chat_template`` (None: as our scorer, i.e. the model's `chat`);
    `our_input` drops lm-eval's task description and uses our generation budget."""

    chat: bool | None
    our_input: bool = False


VARIANTS = {"lm-eval": Variant(chat=False), "lm-eval+chat": Variant(chat=True),
            "lm-eval+our-input": Variant(chat=None, our_input=True)}


# ----------------------------------------------------------------------------------------------- config
def compose_config(subtasks: list[str], limit: int | None = None, overrides: list[str] = ()) -> DictConfig:
    """The project's config of ``method=base task=bbh profile=local`` restricted to `subtasks` (zero-shot)."""
    base = ["method=base", "task=bbh", "profile=local", "task.format=zeroshot", f"task.subtasks=[{','.join(subtasks)}]"]
    if limit is not None:
        base.append(f"task.limit={int(limit)}")
    return project_config([*base, *overrides])


# ----------------------------------------------------------------------------------------------- data
def example_ids(task: GenerativeTask, subtask: str, examples: list[Example]) -> list[int]:
    """Each example's position in the subtask's data file: a stable id shared by both scorers."""
    from tasks.bbh import load_subtask

    position = {(e.input, e.target): i for i, e in reversed(list(enumerate(load_subtask(subtask, task.local_dir()))))}
    return [position[(e.input, e.target)] for e in examples]


def write_eval_json(folder: Path, subtask: str, ids: list[int], examples: list[Example]) -> Path:
    """`examples` as a BBH-format JSON file (``{"examples": [{"id", "input", "target"}]}``), written atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{subtask}.json"
    rows = [{"id": i, "input": e.input, "target": e.target} for i, e in zip(ids, examples)]
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"examples": rows}, ensure_ascii=False))
    tmp.replace(path)
    return path


# ----------------------------------------------------------------------------------------------- lm-eval task
def lmeval_task_config(subtask: str, data_file: Path, cache_dir: Path | None = None) -> dict[str, Any]:
    """lm-eval's own BBH zero-shot task config for `subtask`, reading `data_file` instead of the hub.

    Everything but the data source (``dataset_path``/``dataset_name``/``dataset_kwargs``) is lm-eval's YAML
    (``lm_eval/tasks/bbh/zeroshot/<subtask>.yaml`` with its ``_zeroshot_template_yaml`` and ``utils.py`` filters).
    """
    import lm_eval
    from lm_eval.tasks._yaml_loader import load_yaml

    yaml_path = Path(lm_eval.__file__).parent / "tasks" / "bbh" / "zeroshot" / f"{subtask}.yaml"
    cfg = load_yaml(yaml_path, resolve_func=True)
    cfg.pop("dataset_name", None)
    kwargs: dict[str, Any] = {"data_files": {cfg["test_split"]: str(data_file)}, "field": "examples"}
    if cache_dir is not None:
        kwargs["cache_dir"] = str(cache_dir)
    cfg.update(dataset_path="json", dataset_kwargs=kwargs)
    return cfg


def load_lmeval_tasks(configs: list[dict[str, Any]]) -> dict[str, Any]:
    """lm-eval Task objects by task name, built from inline configs (lm-eval's own task index not scanned)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=False).load(copy.deepcopy(configs))["tasks"]


# ----------------------------------------------------------------------------------------------- scoring
def score_ours(task: GenerativeTask, composed: Any, subtask: str,
               format_prompt: Callable[[str], str] = lambda p: p) -> list[dict]:
    """Our prediction rows for `subtask` (``task.evaluate`` as the runner calls it), each with its example id and
    the model input (`format_prompt`: the model's formatting of a task prompt, e.g. its chat template)."""
    examples = task.eval_examples(subtask)
    _, rows = task.evaluate(composed, [subtask])
    ids = example_ids(task, subtask, examples)
    assert [r["input"] for r in rows] == [e.input for e in examples]
    return [{**r, "id": i, "model_input": format_prompt(task.prompt(e))} for i, r, e in zip(ids, rows, examples)]


def variant_configs(configs: list[dict[str, Any]], variant: Variant) -> list[dict[str, Any]]:
    """The task configs a variant runs: lm-eval's, or without the task description for `our_input`."""
    configs = copy.deepcopy(configs)
    if variant.our_input:
        for config in configs:
            config["description"] = ""
    return configs


def score_lmeval(lm: Any, configs: list[dict[str, Any]], chat: bool, max_gen_toks: int | None = None
                 ) -> dict[str, dict[str, list[dict]]]:
    """lm-eval's per-example results: {task name: {filter: [{"id", "prompt", "raw", "answer", "correct"}]}}."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    results = simple_evaluate(
        model=lm, tasks=copy.deepcopy(configs), task_manager=TaskManager(include_defaults=False),
        apply_chat_template=chat, log_samples=True, bootstrap_iters=0,
        gen_kwargs={"max_gen_toks": max_gen_toks} if max_gen_toks else None,
    )
    out: dict[str, dict[str, list[dict]]] = {}
    for name, samples in results["samples"].items():
        per_filter: dict[str, list[dict]] = {}
        for s in sorted(samples, key=lambda s: s["doc_id"]):
            per_filter.setdefault(s["filter"], []).append({
                "id": s["doc"]["id"], "prompt": s["arguments"][0][0], "raw": s["resps"][0][0],
                "answer": s["filtered_resps"][0], "correct": bool(s["exact_match"]),
            })
        for flt, rows in per_filter.items():  # lm-eval's own aggregate must equal the mean of its samples
            expected = results["results"][name][f"exact_match,{flt}"]
            assert abs(expected - sum(r["correct"] for r in rows) / len(rows)) < 1e-9, (name, flt)
        out[name] = per_filter
    return out


@dataclass
class Comparison:
    n: int
    ours: float
    lmeval: float
    disagree: int  # examples that one scorer counts correct and the other wrong
    ours_only: int  # ... correct for us only
    lmeval_only: int  # ... correct for lm-eval only
    disagreeing_ids: list[int]


def compare(ours: list[dict], theirs: list[dict]) -> Comparison:
    """Per-example agreement of two scorers' correctness on the same example ids (rows with "id", "correct")."""
    mine = {r["id"]: bool(r["correct"]) for r in ours}
    other = {r["id"]: bool(r["correct"]) for r in theirs}
    if set(mine) != set(other) or len(mine) != len(ours) or len(other) != len(theirs):
        raise ValueError(f"the scorers saw different examples: {sorted(set(mine) ^ set(other))[:5]}")
    ours_only = [i for i in mine if mine[i] and not other[i]]
    lmeval_only = [i for i in mine if other[i] and not mine[i]]
    n = len(mine)
    return Comparison(n, sum(mine.values()) / max(n, 1), sum(other.values()) / max(n, 1),
                      len(ours_only) + len(lmeval_only), len(ours_only), len(lmeval_only),
                      sorted(ours_only + lmeval_only))


# ----------------------------------------------------------------------------------------------- report
def same_io(ours: list[dict], theirs: list[dict]) -> tuple[int, int]:
    """How many examples got exactly our model input, and exactly our raw generation, from lm-eval."""
    by_id = {r["id"]: r for r in theirs}
    same_input = sum(r.get("model_input") == by_id[r["id"]]["prompt"] for r in ours)
    same_output = sum(r["generation"] == by_id[r["id"]]["raw"] for r in ours)
    return same_input, same_output


def summary_rows(ours: dict[str, list[dict]], lmeval: dict[str, dict[str, dict[str, list[dict]]]],
                 names: dict[str, str]) -> list[dict]:
    """One row per subtask × lm-eval variant × filter. `lmeval[variant][task name][filter]`; `names`: subtask ->
    lm-eval task name."""
    rows = []
    for subtask, our_rows in ours.items():
        for variant, by_task in lmeval.items():
            same_input, same_output = same_io(our_rows, by_task[names[subtask]]["strict-match"])
            for flt in FILTERS:
                c = compare(our_rows, by_task[names[subtask]][flt])
                rows.append({"subtask": subtask, "variant": variant, "filter": flt, "n": c.n, "ours": c.ours,
                             "lmeval": c.lmeval, "disagree": c.disagree, "ours_only": c.ours_only,
                             "lmeval_only": c.lmeval_only, "same_input": same_input, "same_output": same_output})
    return rows


def example_records(ours: dict[str, list[dict]], lmeval: dict[str, dict[str, dict[str, list[dict]]]],
                    names: dict[str, str]) -> list[dict]:
    """Every example with our generation/answer and each lm-eval variant's raw output and filtered answers."""
    records = []
    for subtask, our_rows in ours.items():
        for r in our_rows:
            rec = {"subtask": subtask, "id": r["id"], "target": r["target"], "ours_generation": r["generation"],
                   "ours_answer": r["answer"], "ours_correct": bool(r["correct"])}
            for variant, by_task in lmeval.items():
                per_filter = {f: {x["id"]: x for x in rows} for f, rows in by_task[names[subtask]].items()}
                strict = per_filter["strict-match"][r["id"]]
                rec[f"{variant}_raw"] = strict["raw"]
                for flt in FILTERS:
                    rec[f"{variant}_{flt}_answer"] = per_filter[flt][r["id"]]["answer"]
                    rec[f"{variant}_{flt}_correct"] = per_filter[flt][r["id"]]["correct"]
            records.append(rec)
    return records


def markdown(table: pd.DataFrame, records: list[dict], prompts: dict[str, str], show: int = 3) -> str:
    """The summary table (one row per subtask), the prompts each scorer feeds the model, and a few disagreements."""
    wide = table.pivot_table(index=["subtask", "n", "ours"], columns=["variant", "filter"],
                             values=["lmeval", "disagree", "same_input", "same_output"], sort=False)
    lines = ["# BBH: our scorer vs lm-eval (same model, same examples)", "",
             "Accuracy (exact match); `disagree`: examples one scorer counts correct and the other wrong; "
             "`same input/output`: examples where lm-eval fed the model exactly our input / got exactly our raw "
             "generation.", "",
             "| subtask | n | ours | " + " | ".join(f"{v} {_short(f)}" for v, f in _pairs(table))
             + " | disagree (" + " / ".join(f"{v} {_short(f)}" for v, f in _pairs(table)) + ") | same input / "
             "output (" + " / ".join(_variants(table)) + ") |",
             "|---|---|---|" + "---|" * (len(_pairs(table)) + 2)]
    for (subtask, n, ours), row in wide.iterrows():
        accs = " | ".join(f"{row[('lmeval', v, f)]:.2f}" for v, f in _pairs(table))
        dis = " / ".join(f"{int(row[('disagree', v, f)])}" for v, f in _pairs(table))
        same = " · ".join(f"{int(row[('same_input', v, FILTERS[0])])}/{int(row[('same_output', v, FILTERS[0])])}"
                          for v in _variants(table))
        lines.append(f"| {subtask} | {n} | {ours:.2f} | {accs} | {dis} | {same} |")
    lines += ["", "## What each scorer feeds the model (first example of the first subtask)", ""]
    for name, prompt in prompts.items():
        lines += [f"**{name}**", "", "```", prompt, "```", ""]
    lines += ["## Disagreeing examples (a few per subtask)", ""]
    for subtask in table["subtask"].unique():
        shown = [r for r in records if r["subtask"] == subtask and _disagrees(r)][:show]
        for r in shown:
            lines.append(f"- `{subtask}` #{r['id']}, target `{r['target']}`; ours {_mark(r['ours_correct'])} "
                         f"{_cut(r['ours_generation'])} → {_cut(r['ours_answer'])}")
            for variant in VARIANTS:
                if f"{variant}_raw" in r:
                    answers = ", ".join(f"{_short(f)} {_mark(r[f'{variant}_{f}_correct'])} "
                                        f"{_cut(r[f'{variant}_{f}_answer'], 40)}" for f in FILTERS)
                    lines.append(f"  - {variant}: {_cut(r[f'{variant}_raw'])} → {answers}")
    return "\n".join(lines) + "\n"


def _pairs(table: pd.DataFrame) -> list[tuple[str, str]]:
    return list(dict.fromkeys(zip(table["variant"], table["filter"])))


def _variants(table: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(table["variant"]))


def _cut(text: str, width: int = 90) -> str:
    """`text` as a short inline code span (repr, so newlines and leading spaces show)."""
    text = repr(text)
    return "`" + (text if len(text) <= width else text[: width - 1] + "…").replace("`", "'") + "`"


def _short(flt: str) -> str:
    return {"strict-match": "strict", "flexible-extract": "flex"}.get(flt, flt)


def _disagrees(record: dict) -> bool:
    flags = [v for k, v in record.items() if k.endswith("_correct") and k != "ours_correct"]
    return any(f != record["ours_correct"] for f in flags)


def _mark(correct: bool) -> str:
    return "✓" if correct else "✗"


def write_report(out: Path, table: pd.DataFrame, records: list[dict], md: str) -> None:
    """``bbh_lmeval.csv``, ``bbh_lmeval.md`` and ``bbh_lmeval_examples.jsonl`` under `out`, each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    texts = {"bbh_lmeval.csv": table.to_csv(index=False, float_format="%.4f"), "bbh_lmeval.md": md,
             "bbh_lmeval_examples.jsonl": "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)}
    for name, text in texts.items():
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)


# ----------------------------------------------------------------------------------------------- driver
def crosscheck(cfg: DictConfig, out: Path, variants: tuple[str, ...] = tuple(VARIANTS), batch_size: int = 8,
               max_gen_toks: int | None = None) -> pd.DataFrame:
    """Load the model of `cfg`, score it with both scorers, write the report under `out`; return the table."""
    from lm_eval.models.huggingface import HFLM

    from bench.run.runner import load_model, prepare
    from methods.base import Composed, FitReport

    _, task = prepare(cfg)
    if cfg.method.name != "base" or cfg.task.name != "bbh":
        raise ValueError(f"crosscheck compares the base model on BBH, not {cfg.method.name}/{cfg.task.name}")
    subtasks = task.subtasks()
    log.info("loading %s", cfg.model.id)
    model = load_model(cfg)
    composed = Composed(model, FitReport())  # what `method=base` yields (methods/base_model.py)
    ours: dict[str, list[dict]] = {}
    for subtask in subtasks:
        log.info("our scorer: %s (%d examples)", subtask, len(task.eval_examples(subtask)))
        ours[subtask] = score_ours(task, composed, subtask, model.format_prompt)

    with tempfile.TemporaryDirectory(prefix="crosscheck_bbh_") as tmp:
        configs = []
        for subtask in subtasks:
            ids = [r["id"] for r in ours[subtask]]
            path = write_eval_json(Path(tmp) / "bbh", subtask, ids, task.eval_examples(subtask))
            configs.append(lmeval_task_config(subtask, path, Path(tmp) / "hf_datasets"))
        names = {s: c["task"] for s, c in zip(subtasks, configs)}
        lm = HFLM(pretrained=model.model, tokenizer=model.tokenizer, batch_size=batch_size)
        lmeval = {}
        for name in variants:
            variant = VARIANTS[name]
            chat = model.chat if variant.chat is None else variant.chat
            budget = int(cfg.task.max_new_tokens) if variant.our_input else max_gen_toks
            log.info("lm-eval %s (apply_chat_template=%s, max_gen_toks=%s)", name, chat, budget or "lm-eval's")
            lmeval[name] = score_lmeval(lm, variant_configs(configs, variant), chat=chat, max_gen_toks=budget)

    table = pd.DataFrame(summary_rows(ours, lmeval, names), columns=COLUMNS)
    records = example_records(ours, lmeval, names)
    prompts = {"ours": ours[subtasks[0]][0]["model_input"]}
    for variant, by_task in lmeval.items():
        prompts[variant] = by_task[names[subtasks[0]]]["strict-match"][0]["prompt"]
    write_report(Path(out), table, records, markdown(table, records, prompts))
    return table


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subtasks", default=",".join(DEFAULT_SUBTASKS), help="comma-separated BBH subtasks")
    parser.add_argument("--limit", type=int, default=None, help="eval examples per subtask (default: the profile's)")
    parser.add_argument("--out", default=str(PROJECT_ROOT / "results" / "crosscheck"))
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"lm-eval variants among {list(VARIANTS)}")
    parser.add_argument("--max-gen-toks", type=int, default=None, help="lm-eval generation budget (default: its 256)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. paths.data_root=/data model=hf_local")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))
    variants = tuple(v for v in args.variants.split(",") if v)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose among {list(VARIANTS)}")
    cfg = compose_config([s for s in args.subtasks.split(",") if s], args.limit, args.overrides)
    table = crosscheck(cfg, Path(args.out), variants, args.batch_size, args.max_gen_toks)
    print((Path(args.out) / "bbh_lmeval.md").read_text().split("\n## ")[0])
    return table


if __name__ == "__main__":
    main()
