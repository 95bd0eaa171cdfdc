"""bench.analysis.agreement: pairing two runs of the same jobs and counting identical generations."""

import math

from bench.analysis.agreement import compare, summary
from bench.analysis.published import Job


def job(config_key, generations, device="cpu", method="dare", seed=0, score=0.5):
    record = {"config_key": config_key, "job_key": config_key + device, "task": "bbh", "method": method,
              "seed": seed, "device": device, "rows": [{"subtask": "all", "value": score}]}
    predictions = [{"variant": "", "subtask": "s", "input": f"q{i}", "generation": g} for i, g in enumerate(generations)]
    return Job(record, predictions)


def test_jobs_pair_by_config_key_and_count_identical_generations():
    a = [job("k1", ["x", "y", "z", "w"]), job("k2", ["a"], method="linear"), job("only-a", ["a"])]
    b = [job("k1", ["x", "y", "Z", "w"], device="cuda", score=0.25), job("k2", ["a"], device="cuda", method="linear")]
    table, only_a, only_b = compare(a, b)
    assert (only_a, only_b) == (1, 0)
    rows = {r.method: r for r in table.itertuples()}
    assert rows["dare"].identical == 0.75 and rows["dare"].n == 4
    assert (rows["dare"].device_a, rows["dare"].device_b) == ("cpu", "cuda")
    assert rows["linear"].identical == 1.0
    brief = summary(table).set_index("method")
    assert math.isclose(brief.loc["dare", "max_score_diff"], 0.25)


def test_examples_pair_by_input_not_by_position():
    a = [job("k", ["x", "y"])]
    b = [Job(dict(a[0].record), list(reversed(a[0].predictions)))]
    table, _, _ = compare(a, b)
    assert table.loc[0, "identical"] == 1.0


def test_a_compact_side_is_compared_by_extracted_answer():
    """Compact published archives keep no generations: both sides are then compared by their extracted answers."""
    full = job("k", ["True. Because", "False"])
    for p, answer in zip(full.predictions, ["True.", "False"]):
        p["answer"] = answer
    compact = Job(dict(full.record), [{k: v for k, v in p.items() if k != "generation"} for p in full.predictions])
    compact.predictions[1]["answer"] = "True"
    table, _, _ = compare([full], [compact])
    assert table.loc[0, "identical"] == 0.5
