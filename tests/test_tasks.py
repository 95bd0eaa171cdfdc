"""Algorithmic generators and the BBH loader/scorer (on the real files when present)."""

import random

import pytest
from omegaconf import OmegaConf

from bench.errors import ConfigError
from conftest import CONF, DATA_ROOT
from methods.base import Composed, FitReport
from tasks.algorithmic import FAMILIES, AlgorithmicTask, generate
from tasks.bbh import SUBTASKS, BBHTask
from tasks.metrics import exact_match, extract_answer, normalize, paired_sign_p


def task_cfg(name, **over):
    cfg = OmegaConf.load(CONF / "task" / f"{name}.yaml")
    return OmegaConf.merge(cfg, over)


class Echo:
    """A fake composed model answering with a fixed function of the prompt."""

    def __init__(self, answer):
        self.answer, self.variant = answer, "echo"

    def generate(self, prompts, **kwargs):
        return [self.answer(p) for p in prompts]


def test_normalization_is_lorahubs():
    assert normalize("  The Answer. ") == "the answer"
    assert exact_match("(B).", "(B)") == 1.0 and exact_match("(B)", "(C)") == 0.0
    assert extract_answer("\n  True\nmore", "first_line") == "True"
    assert extract_answer("step... So the answer is (A).", "after_answer_is") == "(A)"
    assert extract_answer("a\nthe answer is 12\nmore text", "after_answer_is") == "12"



def test_paired_sign_p_is_the_one_sided_exact_binomial():
    """McNemar's exact one-sided test: P(X >= wins), X ~ Binomial(wins + losses, 1/2)."""
    assert paired_sign_p(7, 0) == 1 / 128 and paired_sign_p(0, 0) == 1.0 and paired_sign_p(0, 5) == 1.0
    assert paired_sign_p(2, 1) == pytest.approx(4 / 8)  # P(X >= 2), n = 3: (3 + 1) / 8
    stats = pytest.importorskip("scipy.stats")
    for wins, losses in [(1, 0), (12, 3), (30, 22), (5, 9)]:
        ref = stats.binomtest(wins, wins + losses, 0.5, alternative="greater").pvalue
        assert paired_sign_p(wins, losses) == pytest.approx(ref, rel=1e-12)
    with pytest.raises(ValueError, match="counts"):
        paired_sign_p(-1, 2)

@pytest.mark.parametrize("family", list(FAMILIES))
def test_generators_are_deterministic_and_correct(family):
    assert generate(family, "eval", 3) == generate(family, "eval", 3)
    ex = generate(family, "eval", 7)
    if family in ("boolean_expressions", "multistep_arithmetic"):
        assert str(eval(ex.input.rsplit(" ", 1)[0])) == ex.target  # noqa: S307
    if family == "word_sorting":
        words = ex.input.split("List: ")[1].split()
        assert ex.target.split() == sorted(words)
    if family == "dyck_languages":
        seq = ex.input.split("Input: ")[1].split() + ex.target.split()
        stack = []
        for b in seq:
            if b in "([{<":
                stack.append(b)
            else:
                assert {"(": ")", "[": "]", "{": "}", "<": ">"}[stack.pop()] == b
        assert not stack


def test_algorithmic_splits_disjoint_and_seeded():
    task = AlgorithmicTask(task_cfg("algorithmic", limit=None), None)
    for subtask in task.subtasks():
        fit, evals = task.split(subtask)
        train = task.train_examples(subtask, 100, seed=0)
        eval_inputs = {e.input for e in evals}
        assert len(evals) == 200 and len(eval_inputs) == 200
        assert not eval_inputs & {e.input for e in fit} and not eval_inputs & {e.input for e in train}
    a = task.fit_examples(5, seed=1, subtasks=["word_sorting"])
    assert a == task.fit_examples(5, seed=1, subtasks=["word_sorting"]) != task.fit_examples(5, 2, ["word_sorting"])


def test_scoring_with_a_perfect_model():
    task = AlgorithmicTask(task_cfg("algorithmic", limit=10), None)
    answers = {task.prompt(e): e.train_target for s in task.subtasks() for e in task.eval_examples(s)}  # scratchpads too
    scores, predictions = task.evaluate(Echo(lambda p: f" {answers[p]}\nQ: next"), task.subtasks())
    assert all(s.value == 1.0 and s.n == 10 for s in scores) and len(predictions) == 50


def test_bad_task_config():
    with pytest.raises(ConfigError, match="limit=0"):
        AlgorithmicTask(task_cfg("algorithmic", limit=0), None)
    with pytest.raises(ConfigError, match="unknown subtasks"):
        AlgorithmicTask(task_cfg("algorithmic", subtasks=["nope"]), None).subtasks()
    with pytest.raises(ConfigError, match="format"):
        BBHTask(task_cfg("bbh", format="twoshot"), None)


needs_bbh = pytest.mark.skipif(not (DATA_ROOT / "bbh" / "bbh").is_dir(), reason="BBH data not under ../shared/data")


@needs_bbh
def test_bbh_loader_on_real_files():
    task = BBHTask(task_cfg("bbh", subtasks=None, limit=None), str(DATA_ROOT))
    assert task.subtasks() == SUBTASKS and len(SUBTASKS) == 27
    total = 0
    for subtask in SUBTASKS:
        fit, evals = task.split(subtask)
        assert len(fit) == 25 and not {e.input for e in fit} & {e.input for e in evals}
        total += len(fit) + len(evals)
    assert total == 6511
    assert task.fit_examples(5, 0, ["snarks"]) == task.fit_examples(5, 0, ["snarks"])
    assert set(task.fit_examples(5, 0, ["snarks"])) <= set(task.split("snarks")[0])


@needs_bbh
@pytest.mark.parametrize("fmt", ["zeroshot", "fewshot", "cot"])
def test_bbh_prompts_and_scorer(fmt):
    task = BBHTask(task_cfg("bbh", subtasks=["boolean_expressions", "date_understanding"], limit=12, format=fmt),
                   str(DATA_ROOT))
    eval_inputs = {e.input for e in task.split("date_understanding")[1]}
    example = task.eval_examples("date_understanding")[0]
    prompt = task.prompt(example)
    assert prompt.rstrip().endswith(("A:", "A: Let's think step by step."))
    if fmt == "fewshot":  # demonstrations only from the fit pool
        demos = [line[3:] for line in prompt.split("\n") if line.startswith("Q: ")][:-1]
        assert demos and not any(d in eval_inputs for d in demos)
    if fmt == "cot":
        assert "BENCHMARK DATA" not in prompt and "So the answer is" in prompt
    targets = {task.prompt(e): e.target for s in task.subtasks() for e in task.eval_examples(s)}
    wrap = (lambda t: f"Let's see. So the answer is {t}.") if fmt == "cot" else (lambda t: f" {t}.\n")
    scores, _ = task.evaluate(Echo(lambda p: wrap(targets[p])), task.subtasks())
    assert [s.value for s in scores] == [1.0, 1.0] and [s.n for s in scores] == [12, 12]
    rng = random.Random(0)
    scores, _ = task.evaluate(Echo(lambda p: rng.choice(["(A)", "True"])), task.subtasks())
    assert all(s.value < 1.0 for s in scores)
