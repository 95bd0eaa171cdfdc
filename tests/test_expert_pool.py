"""Per-subtask answer formats (algorithmic scratchpads, Flan CoT `cot_subtasks`), per-expert training overrides,
and per-expert staleness of trained pools (a tiny pool trained in a temporary folder; manifest backfill)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from bench.config import CONF_DIR, register_resolvers
from bench.errors import AdapterError, ConfigError
from bench.experts.pools import rescore_pool, train_pool
from bench.experts.manifest import (
    backfill_manifest, effective_train, examples_sha256, expert_problem, plan_pool, pool_problem,
    read_manifest, stale_experts,
)
from conftest import CONF, DATA_ROOT
from tasks.algorithmic import FAMILIES, AlgorithmicTask, generate
from tasks.base import Example
from tasks.flan_cot import SUBTASKS as FLAN_SUBTASKS
from tasks.flan_cot import FlanCoTTask
from tasks.metrics import extract_answer, paired_sign_p

register_resolvers()
STEP = re.compile(r"^(-?\d+) ([+*-]) (-?\d+) = (-?\d+)$")


def task_cfg(name, **over):
    return OmegaConf.merge(OmegaConf.load(CONF / "task" / f"{name}.yaml"), over)


class Recorder:
    """A fake composed model: answers with `answer(prompt)` and records each generate call's budget."""

    variant = "rec"

    def __init__(self, answer):
        self.answer, self.calls = answer, []

    def generate(self, prompts, max_new_tokens, **kwargs):
        self.calls.append((len(prompts), max_new_tokens))
        return [self.answer(p) for p in prompts]


# ----------------------------------------------------------------------------- algorithmic scratchpad
def _check_scratchpad(example: Example) -> None:
    *steps, final = example.completion.split(". ")
    assert final == f"So the answer is {example.target}."
    assert len(steps) == 3
    values = []
    for step in steps:
        x, op, y, z = STEP.match(step).groups()
        x, y, z = int(x), int(y), int(z)
        assert z == {"+": x + y, "-": x - y, "*": x * y}[op], step
        values.append((x, op, y, z))
    (a, o1, b, left), (c, o3, d, right), (l2, o2, r2, answer) = values
    assert (l2, r2) == (left, right) and str(answer) == example.target
    assert example.input == f"(({a} {o1} {b}) {o2} ({c} {o3} {d})) ="


def test_scratchpad_arithmetic_is_correct_and_inputs_unchanged():
    for namespace in ("eval", "fit", "train0", "train3"):
        for i in range(500):
            bare = generate("multistep_arithmetic", namespace, i)
            pad = generate("multistep_arithmetic", namespace, i, scratchpad=True)
            assert (pad.input, pad.target, pad.subtask) == (bare.input, bare.target, bare.subtask)
            assert bare.completion is None and pad.train_target == pad.completion
            assert str(eval(bare.input[:-2])) == bare.target  # noqa: S307 - the generated integer expression
            _check_scratchpad(pad)
            assert extract_answer(pad.completion, "after_answer_is") == pad.target
            assert extract_answer(pad.completion + "\nQ: (1 + 2) =", "after_answer_is") == pad.target


def test_scratchpad_task_splits_and_formats():
    plain = AlgorithmicTask(task_cfg("algorithmic", limit=None, scratchpad=[]), None)
    pad = AlgorithmicTask(task_cfg("algorithmic", limit=None, scratchpad=["multistep_arithmetic"]), None)
    for family in FAMILIES:
        for a, b in [(plain.split(family), pad.split(family)), ([plain.train_examples(family, 300, 0)],
                                                               [pad.train_examples(family, 300, 0)])]:
            for xs, ys in zip(a, b):
                assert [(e.input, e.target) for e in xs] == [(e.input, e.target) for e in ys]
                has = family == "multistep_arithmetic"
                assert all((e.completion is not None) == has for e in ys)
                assert all(e.completion is None for e in xs)
        assert plain.answer_mode(family) == "first_line" and plain.max_new_tokens(family) == 24
    assert pad.answer_mode("multistep_arithmetic") == "after_answer_is"
    assert pad.max_new_tokens("multistep_arithmetic") == 48
    assert pad.answer_mode("word_sorting") == "first_line" and pad.max_new_tokens("word_sorting") == 24


def test_scratchpad_scoring_reads_after_answer_is_per_subtask():
    task = AlgorithmicTask(task_cfg("algorithmic", limit=6, scratchpad=["multistep_arithmetic"]), None)
    examples = {task.prompt(e): e for s in task.subtasks() for e in task.eval_examples(s)}

    def answer(prompt):
        e = examples[prompt]
        return e.completion if e.completion else f" {e.target}\nQ: more"

    rec = Recorder(answer)
    scores, rows = task.evaluate(rec, task.subtasks())
    assert [s.value for s in scores] == [1.0] * 5
    assert sorted(rec.calls) == [(6, 48), (24, 24)]  # one generation call per budget across subtasks
    # the bare answer is not read from a scratchpad family (first line of a scratchpad is not the answer) ...
    wrong = Recorder(lambda p: f"{examples[p].target} = {examples[p].target}. extra")
    scores, _ = task.evaluate(wrong, ["multistep_arithmetic"])
    assert scores[0].value < 1.0
    # ... and a mixed set (a joint fit set) is generated per budget, rows in the given order
    mixed = task.eval_examples("word_sorting")[:2] + task.eval_examples("multistep_arithmetic")[:3] \
        + task.eval_examples("word_sorting")[2:4]
    rec = Recorder(answer)
    value, rows = task.score_examples(rec, mixed)
    assert value == 1.0 and [r["input"] for r in rows] == [e.input for e in mixed]
    assert rec.calls == [(4, 24), (3, 48)]


def test_scratchpad_config_errors():
    with pytest.raises(ConfigError, match="nope"):
        AlgorithmicTask(task_cfg("algorithmic", scratchpad=["nope"]), None)
    with pytest.raises(ConfigError, match="word_sorting"):
        AlgorithmicTask(task_cfg("algorithmic", scratchpad=["word_sorting"]), None)


# ----------------------------------------------------------------------------- Flan CoT cot_subtasks
needs_flan = pytest.mark.skipif(not (DATA_ROOT / "flan_cot").is_dir(), reason="Flan CoT data not under ../shared/data")


@needs_flan
def test_flan_cot_subtasks():
    task = FlanCoTTask(task_cfg("flan_cot", cot_subtasks=["gsm8k"]), str(DATA_ROOT))
    plain = FlanCoTTask(task_cfg("flan_cot"), str(DATA_ROOT))
    train = task.train_examples("gsm8k", 50, 0)
    assert all(e.completion.endswith(f"So the answer is {e.target}.") for e in train)
    assert [(e.input, e.target) for e in train] == [(e.input, e.target) for e in plain.train_examples("gsm8k", 50, 0)]
    assert all(e.completion is None for e in plain.train_examples("gsm8k", 50, 0))
    assert all(e.completion is None for e in task.train_examples("qasc", 50, 0))
    assert all(e.completion is not None for part in task.split("gsm8k") for e in part)
    assert task.answer_mode("gsm8k") == "after_answer_is" and task.max_new_tokens("gsm8k") == 160
    assert task.answer_mode("qasc") == "first_line" and task.max_new_tokens("qasc") == 16
    cot = FlanCoTTask(task_cfg("flan_cot", target_format="cot", cot_max_new_tokens=90), str(DATA_ROOT))
    assert all(cot.answer_mode(s) == "after_answer_is" and cot.max_new_tokens(s) == 90 for s in FLAN_SUBTASKS)
    with pytest.raises(ConfigError, match="gsm9k"):
        FlanCoTTask(task_cfg("flan_cot", cot_subtasks=["gsm9k"]), str(DATA_ROOT))


# ----------------------------------------------------------------------------- pools: configs and staleness
def pool_cfg(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[
            "profile=smoke", "device=cpu", f"paths.cache_dir={tmp_path}",
            "experts.train.subtasks=[boolean_expressions,multistep_arithmetic]", "experts.train.examples=32",
            "experts.train.steps=3", "experts.manifest_eval_limit=2", "++experts.train.task_cfg.scratchpad=[]",
            *overrides])
    return cfg.experts


def test_per_expert_effective_config_and_errors(tmp_path):
    cfg = pool_cfg(tmp_path, "+experts.train.per_expert={multistep_arithmetic:{steps:7,lr:0.01,max_len:80}}")
    eff = effective_train(cfg, "multistep_arithmetic")
    assert (eff.steps, eff.lr, eff.max_len, eff.examples, eff.batch_size) == (7, 0.01, 80, 32, 8)
    assert "per_expert" not in eff
    other = effective_train(cfg, "boolean_expressions")
    assert (other.steps, other.lr, other.max_len) == (3, 0.005, 96) and "per_expert" not in other
    assert OmegaConf.to_container(other) == {k: v for k, v in OmegaConf.to_container(cfg.train, resolve=True).items()
                                             if k != "per_expert"}
    with pytest.raises(ConfigError, match="word_sorting"):
        effective_train(pool_cfg(tmp_path, "+experts.train.per_expert={word_sorting:{steps:7}}"), "boolean_expressions")
    with pytest.raises(ConfigError, match="rank"):
        effective_train(pool_cfg(tmp_path, "+experts.train.per_expert={multistep_arithmetic:{rank:2}}"),
                        "boolean_expressions")


def _state(cfg):
    folder = Path(cfg.dir)
    rows = {r["name"]: r for r in json.loads((folder / "manifest.json").read_text())["experts"]}
    files = {n: (folder / n / "adapter_model.safetensors").read_bytes() for n in rows}
    return rows, files


@pytest.fixture(scope="module")
def trained(tiny_lm, tmp_path_factory):
    """A 2-expert smoke pool trained once in a temporary folder: (tmp folder, its manifest)."""
    tmp = tmp_path_factory.mktemp("pool")
    cfg = pool_cfg(tmp)
    assert pool_problem(cfg, tiny_lm) == "not trained yet (no manifest.json) (all 2 experts)"
    manifest = train_pool(cfg, tiny_lm, None)
    return tmp, manifest


def _copy_pool(src: Path, dst: Path) -> None:
    import shutil

    shutil.copytree(src / "experts", dst / "experts")


def test_fresh_pool_rows_and_digest(trained, tiny_lm):
    tmp, manifest = trained
    cfg = pool_cfg(tmp)
    assert pool_problem(cfg, tiny_lm) is None
    _, plans = plan_pool(cfg, None)
    assert [r["name"] for r in manifest["experts"]] == ["boolean_expressions", "multistep_arithmetic"]
    for row, plan in zip(manifest["experts"], plans):
        assert row["data_sha256"] == examples_sha256(plan.examples)
        assert row["train"]["steps"] == 3 and row["train"]["targets"] == ["q_proj", "v_proj"]
        assert row["eval"] == {"answer_mode": "first_line", "max_new_tokens": 24}
        assert row["end_token"] == tiny_lm.tokenizer.eos_token
        # the paired comparison with the base model on the same examples
        assert row["wins"] - row["losses"] == round(row["n_eval"] * (row["expert_score"] - row["base_score"]))
        assert row["wins"] + row["losses"] <= row["n_eval"] and row["p_beats_base"] == paired_sign_p(row["wins"], row["losses"])
    # the pool digest is the recipe before per-expert rows: one sha256 over every expert's examples in order
    assert manifest["data_sha256"] == examples_sha256([e for p in plans for e in p.examples])


@pytest.mark.parametrize("change", [
    ("+experts.train.per_expert={multistep_arithmetic:{steps:4}}", "hyperparameters: steps 3 -> 4"),
    ("++experts.train.task_cfg.scratchpad=[multistep_arithmetic]", "data digest differs"),
])
def test_one_changed_expert_is_the_only_one_retrained(trained, tiny_lm, tmp_path, change):
    override, reason = change
    _copy_pool(trained[0], tmp_path)
    before_rows, before_files = _state(pool_cfg(tmp_path))
    cfg = pool_cfg(tmp_path, override)
    stale = stale_experts(cfg, tiny_lm)
    assert stale["boolean_expressions"] is None and reason in stale["multistep_arithmetic"]
    assert "multistep_arithmetic" in pool_problem(cfg, tiny_lm) and "boolean_expressions" not in pool_problem(cfg, tiny_lm)
    manifest = train_pool(cfg, tiny_lm, None)
    rows, files = _state(cfg)
    assert rows["boolean_expressions"] == before_rows["boolean_expressions"]
    assert files["boolean_expressions"] == before_files["boolean_expressions"]
    assert files["multistep_arithmetic"] != before_files["multistep_arithmetic"]
    assert rows["multistep_arithmetic"] != before_rows["multistep_arithmetic"]
    assert pool_problem(cfg, tiny_lm) is None
    assert manifest["train"] == OmegaConf.to_container(cfg.train, resolve=True)
    _, plans = plan_pool(cfg, None)
    assert manifest["data_sha256"] == examples_sha256([e for p in plans for e in p.examples])
    if "scratchpad" in override:
        assert rows["multistep_arithmetic"]["eval"] == {"answer_mode": "after_answer_is", "max_new_tokens": 48}
        meta = json.loads((Path(cfg.dir) / "multistep_arithmetic" / "bench_metadata.json").read_text())
        assert meta["task_cfg"] == {"scratchpad": ["multistep_arithmetic"]}
    else:
        assert rows["multistep_arithmetic"]["train"]["steps"] == 4 == rows["multistep_arithmetic"]["steps"]
    # the original config now finds that expert stale again, and only it
    assert [n for n, why in stale_experts(pool_cfg(tmp_path), tiny_lm).items() if why] == ["multistep_arithmetic"]


def test_rescore_rewrites_scores_only(trained, tiny_lm, tmp_path):
    """`rescore=true`: every expert scored again with the current manifest_eval_limit; adapters, training records
    and the recorded training command stay; a stale pool is refused."""
    _copy_pool(trained[0], tmp_path)
    before_rows, before_files = _state(pool_cfg(tmp_path))
    before = json.loads((tmp_path / "experts" / pool_cfg(tmp_path).name / "manifest.json").read_text())
    cfg = pool_cfg(tmp_path, "experts.manifest_eval_limit=5")
    manifest = rescore_pool(cfg, tiny_lm, None)
    rows, files = _state(cfg)
    assert files == before_files and manifest["command"] == before["command"] and "rescored_by" in manifest
    for name, row in rows.items():
        assert row["n_eval"] == 5 and before_rows[name]["n_eval"] == 2
        assert {k: v for k, v in row.items() if k not in ("n_eval", "base_score", "expert_score", "wins", "losses",
                                                           "p_beats_base")} == \
               {k: v for k, v in before_rows[name].items() if k not in ("n_eval", "base_score", "expert_score", "wins",
                                                                        "losses", "p_beats_base")}
    assert pool_problem(cfg, tiny_lm) is None
    with pytest.raises(AdapterError, match="multistep_arithmetic: trained with other hyperparameters.*before re-scoring"):
        rescore_pool(pool_cfg(tmp_path, "+experts.train.per_expert={multistep_arithmetic:{steps:4}}"), tiny_lm, None)


def test_missing_adapter_and_other_base_are_stale(trained, tiny_lm, tmp_path):
    _copy_pool(trained[0], tmp_path)
    cfg = pool_cfg(tmp_path)
    (Path(cfg.dir) / "boolean_expressions" / "adapter_config.json").unlink()
    assert stale_experts(cfg, tiny_lm) == {"boolean_expressions": "adapter files missing", "multistep_arithmetic": None}
    (Path(cfg.dir) / "multistep_arithmetic" / "adapter_model.safetensors").unlink()  # a clone without the weights
    assert stale_experts(cfg, tiny_lm)["multistep_arithmetic"] == "adapter files missing"
    path = Path(cfg.dir) / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, "base_fingerprint": "0" * 16}))
    assert set(stale_experts(cfg, tiny_lm).values()) == {"trained on other base-model weights (fingerprint differs)"}


def test_targets_ended_with_another_eos_are_stale(trained, tiny_lm, tmp_path, caplog):
    """An expert whose training targets ended with another token than this tokenizer's EOS (a pool converted by
    another transformers version) is stale; rows from before end tokens were recorded are kept, with a warning."""
    _copy_pool(trained[0], tmp_path)
    cfg = pool_cfg(tmp_path)
    path = Path(cfg.dir) / "manifest.json"
    manifest = json.loads(path.read_text())
    other = "<|im_start|>" if tiny_lm.tokenizer.eos_token != "<|im_start|>" else "<|im_end|>"
    manifest["experts"][0]["end_token"] = other
    path.write_text(json.dumps(manifest))
    stale = stale_experts(cfg, tiny_lm)
    assert stale["multistep_arithmetic"] is None
    assert stale["boolean_expressions"] == f"targets ended with {other!r}; this tokenizer ends them with {tiny_lm.tokenizer.eos_token!r}"
    del manifest["experts"][0]["end_token"]
    path.write_text(json.dumps(manifest))
    with caplog.at_level("WARNING"):
        assert pool_problem(cfg, tiny_lm) is None
    assert "['boolean_expressions'] predate recorded end tokens" in caplog.text


def _old_style(manifest: dict) -> dict:
    """The manifest as written before per-expert records (no train / data_sha256 / eval / created in rows)."""
    keep = ("name", "task", "train_examples", "steps", "seconds", "n_eval", "base_score", "expert_score")
    return {**manifest, "experts": [{k: r[k] for k in keep} for r in manifest["experts"]]}


def test_backfill_is_verified_against_the_pool_digest(trained, tiny_lm, tmp_path):
    _copy_pool(trained[0], tmp_path)
    cfg = pool_cfg(tmp_path)
    path = Path(cfg.dir) / "manifest.json"
    new = json.loads(path.read_text())
    old = _old_style(new)
    filled = json.loads(json.dumps(old))
    assert backfill_manifest(filled, None)
    for row, ref in zip(filled["experts"], new["experts"]):
        assert row.pop("backfilled") is True
        assert {k: row[k] for k in ("train", "data_sha256", "eval")} == {k: ref[k] for k in ("train", "data_sha256", "eval")}
    path.write_text(json.dumps(old))
    assert pool_problem(cfg, tiny_lm) is None  # backfilled on load, nothing rewritten
    assert json.loads(path.read_text()) == old and read_manifest(cfg)["experts"][0]["backfilled"] is True
    # a pool digest that the recomputed examples do not reproduce: no backfill, every expert stale
    tampered = {**old, "data_sha256": "0" * 64}
    assert not backfill_manifest(json.loads(json.dumps(tampered)), None)
    path.write_text(json.dumps(tampered))
    assert all("no training record" in why for why in stale_experts(cfg, tiny_lm).values())
    # recorded config that does not reproduce the examples (another seed) is rejected too
    assert not backfill_manifest({**json.loads(json.dumps(old)), "train": {**old["train"], "seed": 1}}, None)


@pytest.mark.parametrize("pool", ["local_algorithmic", "local_flan_cot"])
def test_committed_manifests_are_current(pool):
    """The committed pools' per-expert records match what the default config would train: no expert is stale."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["profile=local", "device=cpu", f"experts={pool}"]).experts
    data_root = str(DATA_ROOT) if (DATA_ROOT / "flan_cot").is_dir() else None
    if cfg.train.task == "flan_cot" and data_root is None:
        pytest.skip("Flan CoT data not under ../shared/data")
    manifest = read_manifest(cfg, data_root)
    assert all(len(r["data_sha256"]) == 64 for r in manifest["experts"])
    _, plans = plan_pool(cfg, data_root)
    rows = {r["name"]: r for r in manifest["experts"]}
    assert {p.name: expert_problem(p, rows.get(p.name), Path(cfg.dir)) for p in plans} == {p.name: None for p in plans}
    assert manifest["data_sha256"] == examples_sha256([e for p in plans for e in p.examples])


@pytest.mark.parametrize("pool", ["local_algorithmic", "local_flan_cot"])
def test_committed_experts_beat_the_base_by_a_clear_margin(pool):
    """The claim for the committed pools (docs/profiles.md): each expert's paired test against the base model on its own
    eval examples has p < 0.01, and the recorded counts agree with the recorded scores."""
    from bench.config import PROJECT_ROOT
    from bench.run.train_experts import CLEAR_MARGIN_P

    manifest = json.loads((PROJECT_ROOT / "results" / "experts" / pool / "manifest.json").read_text())
    for row in manifest["experts"]:
        assert row["wins"] - row["losses"] == round(row["n_eval"] * (row["expert_score"] - row["base_score"])), row
        assert row["p_beats_base"] == pytest.approx(paired_sign_p(row["wins"], row["losses"]), rel=1e-12)
        assert row["p_beats_base"] < CLEAR_MARGIN_P, row["name"]


def test_pool_judged_without_its_training_data(tiny_lm, tmp_path, caplog):
    """A pool whose training data cannot be read here is judged by its recorded hyperparameters and end token."""
    folder = tmp_path / "data" / "flan_cot"
    folder.mkdir(parents=True)
    rows = [f"Is {i} a number?\\nOptions:\\n- yes\\n- no\tyes\t{i} is a number." for i in range(60)]
    (folder / "qasc_train.tsv").write_text("\n".join(rows) + "\n")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[
            "profile=smoke", "device=cpu", f"paths.cache_dir={tmp_path}", "experts.train.task=flan_cot",
            "experts.train.subtasks=[qasc]", "experts.train.examples=8", "experts.train.steps=2",
            "experts.manifest_eval_limit=2", "+experts.train.task_cfg={target_format: answer}"]).experts
    train_pool(cfg, tiny_lm, str(tmp_path / "data"))
    missing = str(tmp_path / "nowhere")
    with caplog.at_level("WARNING"):
        assert stale_experts(cfg, tiny_lm, missing) == {"qasc": None}
    assert "training data unavailable" in caplog.text
    path = Path(cfg.dir) / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["experts"][0]["end_token"] = "<other>"
    path.write_text(json.dumps(manifest))
    assert stale_experts(cfg, tiny_lm, missing)["qasc"] == \
        f"targets ended with '<other>'; this tokenizer ends them with {tiny_lm.tokenizer.eos_token!r}"
    cfg.train.steps = 3
    assert stale_experts(cfg, tiny_lm, missing)["qasc"] == "trained with other hyperparameters"
