"""`bench.analysis.crosscheck`: lm-eval's BBH task on local data sees exactly our eval examples; both scorers run end to
end on the tiny Llama; the agreement count is right on known answers (CPU, seconds, no SmolLM2)."""

import json

import pytest
from lm_eval.api.model import LM

from bench.analysis.crosscheck import (COLUMNS, FILTERS, VARIANTS, compare, compose_config, crosscheck, example_ids,
                              lmeval_task_config, load_lmeval_tasks, score_lmeval, score_ours, write_eval_json)
from bench.registry import get_task
from conftest import CACHE

SUBTASKS = ["boolean_expressions", "object_counting", "word_sorting"]
WORDS = ["apple", "kiwi", "mango", "pear", "plum", "fig", "lime", "date", "yam", "nut", "oat", "rye"]


def fixture_rows(subtask: str, n: int = 10) -> list[dict]:
    """BBH-format examples in the shape of each real subtask (the lm-eval filters parse the input)."""
    if subtask == "boolean_expressions":
        return [{"input": f"{'not ' * i}True and True is", "target": str(i % 2 == 0)} for i in range(n)]
    if subtask == "object_counting":
        return [{"input": f"I have {i} apples and a pear. How many fruits do I have?", "target": str(i + 1)}
                for i in range(n)]
    return [{"input": f"Sort the following words alphabetically: List: {WORDS[i]} {WORDS[i + 1]} {WORDS[i + 2]}",
             "target": " ".join(sorted(WORDS[i:i + 3]))} for i in range(n)]


@pytest.fixture
def data_root(tmp_path):
    folder = tmp_path / "data" / "bbh" / "bbh"
    folder.mkdir(parents=True)
    for subtask in SUBTASKS:
        (folder / f"{subtask}.json").write_text(json.dumps({"examples": fixture_rows(subtask)}))
    return tmp_path / "data"


@pytest.fixture
def cfg(data_root):
    """The crosscheck's config on the smoke profile (tiny Llama), 3 fit + 4 eval examples per subtask."""
    return compose_config(SUBTASKS, limit=4, overrides=[
        "profile=smoke", f"paths.data_root={data_root}", f"paths.cache_dir={CACHE}", "task.fit_pool_size=3"])


def bbh_task(cfg):
    return get_task("bbh")(cfg.task, cfg.paths.data_root)


class Echo:
    """Our side of a fake model: answers each prompt from a dict (the way `Composed.generate` is called)."""

    variant = ""

    def __init__(self, answers):
        self.answers = answers

    def generate(self, prompts, **kwargs):
        return [self.answers[p] for p in prompts]


class FakeLM(LM):
    """lm-eval's side of a fake model: answers each request from its document."""

    def __init__(self, answer):
        super().__init__()
        self.answer = answer

    def generate_until(self, requests, disable_tqdm=False):
        return [self.answer(req.doc) for req in requests]

    def loglikelihood(self, requests):
        raise NotImplementedError

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError


def test_config_is_the_projects_base_bbh_job(cfg):
    assert cfg.method.name == "base" and cfg.task.name == "bbh" and cfg.task.format == "zeroshot"
    assert list(cfg.task.subtasks) == SUBTASKS and cfg.task.limit == 4
    assert cfg.task.prompt_template == "Q: {input}\nA:"


def test_lmeval_task_reads_exactly_our_eval_examples(cfg, data_root, tmp_path):
    task = bbh_task(cfg)
    for subtask in SUBTASKS:
        fit, _ = task.split(subtask)
        examples = task.eval_examples(subtask)
        ids = example_ids(task, subtask, examples)
        rows = fixture_rows(subtask)
        assert len(ids) == 4 and [rows[i]["input"] for i in ids] == [e.input for e in examples]
        assert not set(ids) & set(example_ids(task, subtask, fit))  # never a fit-pool example
        path = write_eval_json(tmp_path / "lm", subtask, ids, examples)
        config = lmeval_task_config(subtask, path, tmp_path / "hf")
        assert config["dataset_path"] == "json" and "dataset_name" not in config
        lm_task = load_lmeval_tasks([config])[config["task"]]
        docs = list(lm_task.test_docs())
        assert [d["id"] for d in docs] == ids
        assert [d["target"] for d in docs] == [e.target for e in examples]
        # lm-eval's own zero-shot prompt and settings, not ours
        assert lm_task.doc_to_text(docs[0]) == f"Q: {examples[0].input}\nA:"
        assert "Q:" in lm_task.config.generation_kwargs["until"]
        assert [f.name for f in lm_task._filters] == list(FILTERS)


def test_both_scorers_end_to_end_on_the_tiny_model(cfg, tmp_path):
    out = tmp_path / "out"
    table = crosscheck(cfg, out, batch_size=4, max_gen_toks=4)
    assert list(table.columns) == COLUMNS
    assert sorted(table["subtask"].unique()) == sorted(SUBTASKS)
    assert set(table["variant"]) == set(VARIANTS) and set(table["filter"]) == set(FILTERS)
    assert len(table) == 3 * 3 * 2 and (table["n"] == 4).all()
    # lm-eval's own prompts carry the task description; the our-input variant feeds exactly our model input
    same = table[table["filter"] == FILTERS[0]].groupby("variant")[["same_input", "same_output"]].sum()
    assert same.loc["lm-eval", "same_input"] == 0 and same.loc["lm-eval+chat", "same_input"] == 0
    assert same.loc["lm-eval+our-input", "same_input"] == 12
    assert same.loc["lm-eval+our-input", "same_output"] == 12  # same input, same greedy decoding
    assert (table["disagree"] == table["ours_only"] + table["lmeval_only"]).all()
    assert table[["ours", "lmeval"]].apply(lambda c: c.between(0, 1)).all().all()
    for name in ("bbh_lmeval.csv", "bbh_lmeval.md", "bbh_lmeval_examples.jsonl"):
        assert (out / name).is_file() and not list(out.glob(".*.tmp"))
    records = [json.loads(line) for line in (out / "bbh_lmeval_examples.jsonl").read_text().splitlines()]
    assert len(records) == 12 and {f"{v}_raw" for v in VARIANTS} | {"ours_generation"} <= set(records[0])
    md = (out / "bbh_lmeval.md").read_text()
    assert all(f"| {s} | 4 |" in md for s in SUBTASKS)
    assert "<|im_start|>" in md  # the chat variant's prompt went through the tokenizer's chat template


def _score_both(cfg, tmp_path, lm_answer):
    """Our scorer answering every target, and lm-eval with `lm_answer(doc)`, on the same examples."""
    task = bbh_task(cfg)
    answers = {task.prompt(e): e.target for s in SUBTASKS for e in task.eval_examples(s)}
    ours = {s: score_ours(task, Echo(answers), s) for s in SUBTASKS}
    configs = [lmeval_task_config(s, write_eval_json(tmp_path / "lm", s, [r["id"] for r in ours[s]],
                                                     task.eval_examples(s)), tmp_path / "hf") for s in SUBTASKS]
    theirs = score_lmeval(FakeLM(lm_answer), configs, chat=False)
    return ours, {s: theirs[c["task"]] for s, c in zip(SUBTASKS, configs)}


def test_same_answers_agree_and_a_changed_answer_is_counted(cfg, tmp_path):
    wrong = {}

    def answer(doc):  # the target, except for the first doc of each subtask
        key = ("List:" in doc["input"], "How many" in doc["input"])  # one per subtask
        if key not in wrong:
            wrong[key] = doc["id"]
            return "nonsense"
        return doc["target"]

    ours, theirs = _score_both(cfg, tmp_path, lambda doc: doc["target"])
    for s in SUBTASKS:
        assert all(r["correct"] for r in ours[s])
        for flt in FILTERS:
            c = compare(ours[s], theirs[s][flt])
            assert (c.n, c.ours, c.lmeval, c.disagree) == (4, 1.0, 1.0, 0)
    ours, theirs = _score_both(cfg, tmp_path, answer)
    for s in SUBTASKS:
        c = compare(ours[s], theirs[s]["strict-match"])
        assert (c.disagree, c.ours_only, c.lmeval_only, c.lmeval) == (1, 1, 0, 0.75)
        assert c.disagreeing_ids == [next(r["id"] for r in theirs[s]["strict-match"] if not r["correct"])]


def test_lmeval_strict_match_keeps_a_leading_space(cfg, tmp_path):
    """A raw-prompt continuation starts with a space (" True"); lm-eval's strict-match does not strip it, its
    flexible filters and our scorer do."""
    ours, theirs = _score_both(cfg, tmp_path, lambda doc: " " + doc["target"])
    for s in SUBTASKS:
        strict = compare(ours[s], theirs[s]["strict-match"])
        assert (strict.lmeval, strict.disagree, strict.ours_only) == (0.0, 4, 4)
        flex = compare(ours[s], theirs[s]["flexible-extract"])
        assert (flex.lmeval, flex.disagree) == (1.0, 0)


def test_compare_refuses_different_examples():
    with pytest.raises(ValueError, match="different examples"):
        compare([{"id": 1, "correct": True}], [{"id": 2, "correct": True}])
    c = compare([{"id": 1, "correct": True}, {"id": 2, "correct": False}],
                [{"id": 2, "correct": True}, {"id": 1, "correct": True}])
    assert (c.n, c.ours, c.lmeval, c.disagree, c.lmeval_only, c.disagreeing_ids) == (2, 0.5, 1.0, 1, 1, [2])
