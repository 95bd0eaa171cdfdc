"""`tasks.flan_cot.options` and `bench.analysis.mc_ceiling`: Flan multiple-choice inputs split into question, options and
gold; lm-eval builds the inline multiple-choice task from them; the check runs end to end on the tiny Llama."""

import pytest

from bench.analysis.crosscheck import load_lmeval_tasks
from bench.analysis.mc_ceiling import COLUMNS, ceiling, choice_docs, compose_config, lmeval_mc_config
from bench.errors import DataError
from bench.files import write_json_atomic
from conftest import CACHE
from tasks.base import Example
from tasks.flan_cot import options

QASC = Example("What do plants need?\nOptions:\n- (A) rocks\n- (B) light\n- (C) salt", "(B)", "qasc")
ECQA = Example("Where is a bed?\nOptions:\n- kitchen\n- bedroom\n- garage", "bedroom", "ecqa")
AQUA = Example("2 + 2 = ?\nOptions:\n(A) 3\n(B) 4\n(C) 5\n(D) 6", "(B)", "aqua")


def test_options_of_labeled_and_plain_lists():
    assert options(QASC) == ("What do plants need?", ["rocks", "light", "salt"], 1)
    assert options(ECQA) == ("Where is a bed?", ["kitchen", "bedroom", "garage"], 1)
    assert options(AQUA) == ("2 + 2 = ?", ["3", "4", "5", "6"], 1)


def test_options_errors_name_the_problem():
    with pytest.raises(DataError, match="no options listed"):
        options(Example("Are cats mammals?", "yes", "strategyqa"))
    with pytest.raises(DataError, match=r"target '\(D\)' is none of the options"):
        options(Example(QASC.input, "(D)", "qasc"))


def test_lmeval_builds_the_multiple_choice_task(tmp_path):
    docs = choice_docs([QASC, AQUA])
    path = tmp_path / "qasc.json"
    write_json_atomic(path, {"docs": docs})
    task = load_lmeval_tasks([lmeval_mc_config("qasc", path)])["flan_cot_qasc_mc"]
    loaded = list(task.test_docs())
    assert [task.doc_to_text(d) for d in loaded] == ["Q: What do plants need?\nA:", "Q: 2 + 2 = ?\nA:"]
    assert [task.doc_to_choice(d) for d in loaded] == [["rocks", "light", "salt"], ["3", "4", "5", "6"]]
    assert [task.doc_to_target(d) for d in loaded] == [1, 1]
    assert task.OUTPUT_TYPE == "multiple_choice"


def test_ceiling_end_to_end_on_the_tiny_model(tmp_path):
    folder = tmp_path / "data" / "flan_cot"
    folder.mkdir(parents=True)
    rows = [f"Question {i} about plants?\\nOptions:\\n- (A) rock {i}\\n- (B) leaf {i}\\n- (C) sun {i}\\n- (D) salt {i}"
            f"\t(B)\tLeaves are plant parts." for i in range(80)]
    (folder / "qasc_train.tsv").write_text("\n".join(rows) + "\n")
    plain = [f"Where is bed {i}?\\nOptions:\\n- kitchen\\n- bedroom\tbedroom\tBeds are in bedrooms." for i in range(80)]
    (folder / "ecqa_train.tsv").write_text("\n".join(plain) + "\n")
    cfg = compose_config(["qasc", "ecqa"], 3, ["profile=smoke", f"paths.data_root={tmp_path / 'data'}",
                                       f"paths.cache_dir={CACHE}", "device=cpu"])
    table = ceiling(cfg, tmp_path / "out")
    assert list(table.columns) == COLUMNS and table.subtask.tolist() == ["qasc", "ecqa"]
    row = table.iloc[0]
    assert row.n == 3 and row.options == 4 and row.chance == pytest.approx(0.25)
    assert row.acc in (0, 1 / 3, 2 / 3, 1) and row.acc_norm in (0, 1 / 3, 2 / 3, 1)
    assert table.iloc[1].options == 2 and table.iloc[1].chance == pytest.approx(0.5)
    assert (tmp_path / "out" / "flan_mc_ceiling.csv").is_file() and "acc_norm" in (tmp_path / "out" / "flan_mc_ceiling.md").read_text()
