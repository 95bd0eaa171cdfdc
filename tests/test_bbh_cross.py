"""The cross-task protocol (`task=bbh_cross`): folds by task family, each unit's experts (none trained on its fold,
N drawn per fold and seed), BBH experts' training data, joined pools, pools trained in shards, and jobs end to
end on the smoke profile. The expectations are written from the protocol (LoraHub's setting, issue text), not
from the implementation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from bench.config import CONF_DIR, register_resolvers
from bench.errors import ConfigError
from bench.lora.pool import ExpertPool
from bench.registry import get_method, make_task
from conftest import CACHE, CONF, DATA_ROOT, random_adapter
from tasks.algorithmic import FAMILIES
from tasks.bbh import SUBTASKS
from tasks.bbh_cross import BBHCrossTask
from test_cli import bench, records

register_resolvers()
needs_bbh = pytest.mark.skipif(not (DATA_ROOT / "bbh").is_dir(), reason="BBH data not under ../shared/data")
# the BBH task each algorithmic family imitates (the families were written as twins of these five)
TWIN = {"boolean_expressions": "boolean_expressions", "multistep_arithmetic": "multistep_arithmetic_two",
        "word_sorting": "word_sorting", "dyck_languages": "dyck_languages", "object_counting": "object_counting"}
FAMILY_PREFIXES = ("logical_deduction", "tracking_shuffled_objects")


def family(subtask: str) -> str:
    """A BBH task's family: the tasks that differ only in their number of objects are one."""
    return next((p for p in FAMILY_PREFIXES if subtask.startswith(p)), subtask)


def cross_cfg(**over):
    base = OmegaConf.load(CONF / "task" / "bbh_cross.yaml")
    return OmegaConf.merge(base, {"limit": None, "max_new_tokens": 16}, over)


def compose_with(overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides)


@pytest.fixture(scope="module")
def labelled_pool(tiny_lm):
    """One tiny adapter per BBH task, per algorithmic family, two Flan CoT tasks, and one without metadata (a hub
    adapter), each named ``<task>.<subtask>`` after its metadata."""
    specs = [("bbh", s) for s in SUBTASKS] + [("algorithmic", f) for f in FAMILIES] + [("flan_cot", "gsm8k"),
                                                                                       ("flan_cot", "creak")]
    adapters = []
    for i, (task, subtask) in enumerate(specs):
        adapter = random_adapter(tiny_lm.model, f"{task}.{subtask}", tiny_lm.model_id, targets=("q_proj",), rank=1,
                                 seed=i)
        adapter.metadata = {"task": task, "subtask": subtask}
        adapters.append(adapter)
    adapters.append(random_adapter(tiny_lm.model, "hub.adapter", tiny_lm.model_id, targets=("q_proj",), rank=1,
                                   seed=99))
    return ExpertPool(tiny_lm.model_id, adapters)


def trained_on_fold(name: str, fold: set[str]) -> bool:
    task, subtask = name.split(".", 1)
    return (task == "bbh" and subtask in fold) or (task == "algorithmic" and TWIN[subtask] in fold)


# ----------------------------------------------------------------------------- folds and each unit's experts
def test_folds_are_task_families():
    task = BBHCrossTask(cross_cfg(), None)
    folds: dict[str, set[str]] = {}
    for subtask, fold in task.fold_of.items():
        folds.setdefault(fold, set()).add(subtask)
    expected: dict[str, set[str]] = {}
    for subtask in SUBTASKS:
        expected.setdefault(family(subtask), set()).add(subtask)
    assert sorted(map(sorted, folds.values())) == sorted(map(sorted, expected.values()))
    assert len(folds) == 23 and sum(map(len, folds.values())) == 27


@pytest.mark.parametrize("over,message", [
    ({"folds": {"x": ["not_a_task"]}}, "unknown BBH subtask 'not_a_task'"),
    ({"folds": {"a": ["navigate"], "b": ["navigate"]}}, "'navigate' is in two folds"),
    ({"fit_scope": "joint"}, "fit_scope='joint'"),
    ({"n_experts": 0}, "task.n_experts=0"),
])
def test_bad_protocol_configs_name_the_problem(over, message):
    with pytest.raises(ConfigError, match=message):
        BBHCrossTask(cross_cfg(**over), None)


def test_each_unit_composes_only_experts_trained_outside_its_fold(labelled_pool):
    task = BBHCrossTask(cross_cfg(n_experts=None), None)
    assert not task.samples_experts()
    for subtask in SUBTASKS:
        fold = {s for s in SUBTASKS if family(s) == family(subtask)}
        chosen = task.unit_pool([subtask], labelled_pool, seed=0).names
        assert chosen == [n for n in labelled_pool.names if not trained_on_fold(n, fold)], subtask
    sizes = {s: len(task.picked[s]) for s in ("navigate", "logical_deduction_five_objects", "object_counting")}
    # 27 BBH + 5 algorithmic + 2 Flan + 1 unlabelled: minus the fold's BBH tasks and algorithmic twins
    assert sizes == {"navigate": 34, "logical_deduction_five_objects": 32, "object_counting": 33}


def test_n_experts_are_drawn_once_per_fold_and_seed(labelled_pool):
    task = BBHCrossTask(cross_cfg(n_experts=20), None)
    assert task.samples_experts()
    three = task.unit_pool(["logical_deduction_three_objects"], labelled_pool, seed=0).names
    seven = task.unit_pool(["logical_deduction_seven_objects"], labelled_pool, seed=0).names
    assert three == seven and len(three) == 20  # one draw for the whole fold
    assert three == [n for n in labelled_pool.names if n in three]  # kept in pool order
    assert not any(trained_on_fold(n, {s for s in SUBTASKS if family(s) == "logical_deduction"}) for n in three)
    again = BBHCrossTask(cross_cfg(n_experts=20), None).unit_pool(["logical_deduction_three_objects"],
                                                                  labelled_pool, seed=0).names
    assert again == three  # a pure function of (seed, fold)
    draws = {tuple(task.unit_pool(["navigate"], labelled_pool, seed=s).names) for s in range(5)}
    assert len(draws) == 5  # each seed its own draw
    assert task.record_info()["unit_experts"]["logical_deduction_three_objects"] == three
    everything = BBHCrossTask(cross_cfg(n_experts=100), None).unit_pool(["navigate"], labelled_pool, seed=0)
    assert len(everything) == 34  # fewer eligible than N: all of them


def test_word_sorting_gets_the_budget_of_its_long_answers():
    task = BBHCrossTask(cross_cfg(), None)
    assert task.max_new_tokens("word_sorting") == 64 and task.max_new_tokens("navigate") == 16


def test_the_protocol_is_seeded_for_every_method_and_refuses_a_pool_level_draw():
    from bench.run.runner import identity, prepare

    def key(*extra):
        cfg = compose_with(["profile=smoke", "task=bbh_cross", "experts=smoke_cross", "method=linear", *extra])
        method, task = prepare(cfg)
        return identity(cfg, method, task)

    assert key("seed=0") != key("seed=1")  # the experts are drawn with the seed, even for a seed-free merge
    assert key("seed=0", "task.n_experts=null") == key("seed=1", "task.n_experts=null")
    assert key("seed=0") == key("seed=0", "experts.members.bbh.dir=/elsewhere")  # where a member lies is not what it is
    with pytest.raises(ConfigError, match="experts.n=null"):
        key("experts.n=3")
    assert not get_method("linear")(compose_with(["method=linear"]).method).uses_seed()  # seeded by the draw alone


# ----------------------------------------------------------------------------- BBH experts' training data
@needs_bbh
def test_bbh_experts_never_train_on_their_heldout_examples():
    task = make_task("bbh", {"expert_holdout": 50}, str(DATA_ROOT))
    for subtask in ("navigate", "penguins_in_a_table"):
        fit, evals = task.split(subtask)
        train = task.train_examples(subtask, 1000, seed=0)
        assert {e.input for e in train} == {e.input for e in fit + evals[50:]}
        assert len(train) == len(fit) + len(evals) - 50
        assert not {e.input for e in evals[:50]} & {e.input for e in train}
    few = task.train_examples("navigate", 10, seed=0)
    assert len(few) == 10 and few != task.train_examples("navigate", 10, seed=1)


@needs_bbh
def test_a_manifest_scored_beyond_the_holdout_is_refused():
    from bench.experts.manifest import plan_pool

    cfg = compose_with(["profile=smoke", "experts=smoke_bbh", "experts.manifest_eval_limit=5"]).experts
    with pytest.raises(ConfigError, match="manifest_eval_limit=5 exceeds the 4 examples"):
        plan_pool(cfg, str(DATA_ROOT))


# ----------------------------------------------------------------------------- joined pools, shards, end to end
@needs_bbh
def test_a_pool_trained_in_shards_is_the_whole_pool(tiny_lm, tmp_path):
    from bench.experts.manifest import pool_problem, read_manifest
    from bench.experts.pools import load_pool, train_pool

    cfg = compose_with(["profile=smoke", "experts=smoke_cross", f"experts.members.bbh.dir={tmp_path / 'bbh'}",
                        f"paths.cache_dir={CACHE}"]).experts
    bbh = cfg.members.bbh
    first = train_pool(bbh, tiny_lm, str(DATA_ROOT), only={"navigate", "logical_deduction_five_objects"})
    assert [r["name"] for r in first["experts"]] == ["navigate", "logical_deduction_five_objects"]
    assert "logical_deduction_three_objects: not trained" in pool_problem(bbh, tiny_lm, str(DATA_ROOT))
    second = train_pool(bbh, tiny_lm, str(DATA_ROOT), only={"logical_deduction_three_objects"})
    assert [r["name"] for r in second["experts"]] == list(bbh.train.subtasks)  # the other shard's rows kept, pool order
    assert second["experts"][0] == first["experts"][0] and pool_problem(bbh, tiny_lm, str(DATA_ROOT)) is None
    assert read_manifest(bbh, str(DATA_ROOT))["data_sha256"] == second["data_sha256"]
    joined = load_pool(cfg, tiny_lm, str(DATA_ROOT))
    assert joined.names == [f"bbh.{s}" for s in bbh.train.subtasks] + [f"algorithmic.{f}" for f in FAMILIES]
    assert joined[0].metadata["task"] == "bbh" and joined[-1].metadata["subtask"] == "object_counting"


@needs_bbh
def test_make_experts_in_shards(tmp_path):
    folder = tmp_path / "smoke_bbh"
    bench("experts=smoke_bbh", f"experts.dir={folder}", "+shards=2", runs=tmp_path / "runs",
          cmd=("-m", "bench.run.train_experts"))
    manifest = json.loads((folder / "manifest.json").read_text())
    assert [r["name"] for r in manifest["experts"]] == ["navigate", "logical_deduction_three_objects",
                                                        "logical_deduction_five_objects"]
    assert all((folder / r["name"] / "adapter_model.safetensors").is_file() for r in manifest["experts"])
    again = bench("experts=smoke_bbh", f"experts.dir={folder}", runs=tmp_path / "runs",
                  cmd=("-m", "bench.run.train_experts"))
    assert "nothing to do" in again.stdout + again.stderr


@needs_bbh
def test_a_cross_task_job_end_to_end(tmp_path):
    runs = tmp_path / "runs"
    subtasks = ["navigate", "logical_deduction_three_objects"]
    bench("-m", "method=linear,oracle", "task=bbh_cross", "experts=smoke_cross", f"task.subtasks=[{','.join(subtasks)}]",
          "task.n_experts=4", "seed=0,1", "fit_examples=2", runs=runs)
    done = records(runs)
    assert sorted((r["method"], r["seed"], r["status"]) for r in done) == [
        ("linear", 0, "ok"), ("linear", 1, "ok"), ("oracle", 0, "ok"), ("oracle", 1, "ok")]
    for record in done:
        units = record["task_info"]["unit_experts"]
        assert set(units) == set(subtasks) and all(len(v) == 4 for v in units.values())
        assert "bbh.navigate" not in units["navigate"]
        assert not [n for n in units["logical_deduction_three_objects"] if n.startswith("bbh.logical_deduction")]
        assert record["task_info"]["folds"]["logical_deduction_three_objects"] == "logical_deduction"
        assert {r["subtask"]: r["n"] for r in record["rows"]} == {"navigate": 4, "logical_deduction_three_objects": 4,
                                                                 "all": 8}
    by_seed = {(r["method"], r["seed"]): r["task_info"]["unit_experts"] for r in done}
    assert by_seed[("linear", 0)] == by_seed[("oracle", 0)]  # every method of a seed composes the same experts
    oracle = next(r for r in done if r["method"] == "oracle" and r["seed"] == 0)
    for row in oracle["rows"]:
        if row["subtask"] != "all":
            assert row["fit_info"]["expert"] in by_seed[("oracle", 0)][row["subtask"]]


# ----------------------------------------------------------------------------- the committed cross-task pool
@needs_bbh
def test_committed_bbh_pool_is_current_and_documented():
    """The committed manifest vouches for what the default config trains (hyperparameters, each expert's training
    data digest, answer format), its paired counts agree with its scores, and docs/cross_task.md lists every expert
    with those scores (the ones that do not beat the base included). The weights are not committed: where they are
    absent the only problem is the missing adapter files."""
    from bench.config import PROJECT_ROOT
    from bench.experts.manifest import expert_problem, plan_pool, read_manifest
    from bench.run.train_experts import CLEAR_MARGIN_P
    from tasks.metrics import paired_sign_p

    cfg = compose_with(["profile=full", "device=cpu", "experts=local_bbh"]).experts
    manifest = read_manifest(cfg, str(DATA_ROOT))
    rows = {r["name"]: r for r in manifest["experts"]}
    _, plans = plan_pool(cfg, str(DATA_ROOT))
    assert [p.name for p in plans] == list(rows) == list(SUBTASKS)
    for plan in plans:
        problem = expert_problem(plan, rows[plan.name], Path(cfg.dir))
        weights = Path(cfg.dir) / plan.name / "adapter_model.safetensors"
        assert problem is None if weights.is_file() else problem == "adapter files missing", (plan.name, problem)
    doc = (PROJECT_ROOT / "docs" / "cross_task.md").read_text()
    for row in manifest["experts"]:
        assert row["wins"] - row["losses"] == round(row["n_eval"] * (row["expert_score"] - row["base_score"]))
        assert row["p_beats_base"] == pytest.approx(paired_sign_p(row["wins"], row["losses"]), rel=1e-12)
        unclear = " (not clear)" if row["p_beats_base"] >= CLEAR_MARGIN_P else ""
        line = (f"| {row['name']} | {row['train_examples']} | {row['base_score']:.2f} | {row['expert_score']:.2f} | "
                f"{row['wins']} / {row['losses']} | {row['p_beats_base']:.2g}{unclear} |")
        assert line in doc, line


@needs_bbh
def test_every_nlp_method_runs_the_cross_task_protocol(tmp_path):
    """The whole grid of conf/sweep/full_bbh_cross.yaml on the smoke profile: every method composes each unit's
    own fold experts and lands in one leaderboard setting."""
    from bench.analysis.leaderboard import build
    from bench.analysis.published import read_jobs

    from bench.registry import METHODS

    grid = OmegaConf.load(CONF / "sweep" / "full_bbh_cross.yaml").hydra.sweeper.params.method.split(",")
    get_method("linear")  # imports every method module
    assert set(grid) == {n for n, cls in METHODS.items() if "nlp" in cls.domains} - {"single"}  # every method
    runs = tmp_path / "runs"
    bench("-m", "task=bbh_cross", "experts=smoke_cross", "task.subtasks=[navigate,logical_deduction_three_objects]",
          "task.n_experts=5", "fit_examples=2", f"method={','.join(grid)}", runs=runs, check=False)
    assert {r["method"]: r["status"] for r in records(runs)} == {m: "ok" for m in grid}
    overall, _ = build(read_jobs([runs]))
    assert set(overall["method"]) == set(grid) and overall["setting"].nunique() == 1


def test_shards_refuse_a_dreambooth_pool(tmp_path):
    proc = bench("experts=smoke_dreambooth", "+shards=2", runs=tmp_path / "runs", check=False,
                 cmd=("-m", "bench.run.train_experts"))
    assert proc.returncode != 0 and "+shards=2 trains language-model pools" in proc.stderr + proc.stdout
