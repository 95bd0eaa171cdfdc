"""Unit-level resume (bench/run/resume.py): an attempt that fails or is killed after some fit units leaves them to
the next run of the same job, which fits and scores only the others and ends with the rows an uninterrupted run
gives; a line cut off mid-write is ignored; force=true starts over."""

from __future__ import annotations

import json

import pytest

from bench.config import compose_config
from bench.registry import get_method
from bench.run.resume import UNITS_FILE
from bench.run.runner import run

SUBTASKS = ["boolean_expressions", "word_sorting", "object_counting"]


def job(tmp_path, *extra):
    return compose_config(["method=oracle", "task=bbh", "profile=smoke", "task.limit=3", "fit_examples=2",
                           f"task.subtasks=[{','.join(SUBTASKS)}]", f"paths.runs_dir={tmp_path / 'runs'}", *extra])


@pytest.fixture
def units_fitted(monkeypatch):
    """The units the oracle composes in this test, in order; `stop_at[0]` (1-based) raises `stop_with[0]` there."""
    cls = get_method("oracle")
    original = cls.compose
    calls: list[str] = []
    stop = {"at": None, "with": None}

    def counted(self, ctx):
        calls.append(ctx.unit)
        if stop["at"] == len(calls):
            raise stop["with"]
        yield from original(self, ctx)

    monkeypatch.setattr(cls, "compose", counted)
    return calls, stop


def scores(record: dict) -> dict[str, float]:
    return {r["subtask"]: r["value"] for r in record["rows"]}


@pytest.mark.parametrize("interruption, status", [(RuntimeError("boom"), "failed"),
                                                  (KeyboardInterrupt(), "running")])
def test_the_next_run_takes_the_finished_units(tmp_path, units_fitted, interruption, status):
    calls, stop = units_fitted
    runs = tmp_path / "runs"
    stop.update({"at": 3, "with": interruption})
    with pytest.raises(type(interruption)):
        run(job(tmp_path), runs / "first")
    first = json.loads((runs / "first" / "record.json").read_text())
    assert first["status"] == status and calls == SUBTASKS
    # a kill while writing a line leaves a partial one: ignored
    with (runs / "first" / UNITS_FILE).open("a") as f:
        f.write('{"unit": "object_counting", "rows": [')

    calls.clear()
    stop["at"] = None
    resumed = run(job(tmp_path), runs / "second")
    assert resumed["status"] == "ok" and calls == ["object_counting"]
    assert resumed["resumed_units"] == {"from": str(runs / "first"), "units": ["boolean_expressions", "word_sorting"]}
    lines = (runs / "second" / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 3 * len(SUBTASKS)

    calls.clear()
    clean = run(job(tmp_path, "force=true"), runs / "clean")  # force: every unit again, nothing carried
    assert calls == SUBTASKS and "resumed_units" not in clean
    assert scores(resumed) == scores(clean)


def test_a_finished_job_is_skipped_not_resumed(tmp_path, units_fitted):
    calls, _ = units_fitted
    runs = tmp_path / "runs"
    run(job(tmp_path), runs / "done")
    calls.clear()
    again = run(job(tmp_path), runs / "again")
    assert again.get("skipped") and calls == [] and not (runs / "again" / "record.json").exists()


def test_a_resumed_job_has_the_files_its_carried_units_wrote(tmp_path, units_fitted):
    """With save_composed, each unit writes its composed model; the resumed run folder holds every unit's, the
    carried ones copied from the earlier attempt, as an uninterrupted run's does."""
    calls, stop = units_fitted
    runs = tmp_path / "runs"
    stop.update({"at": 3, "with": RuntimeError("boom")})
    with pytest.raises(RuntimeError):
        run(job(tmp_path, "save_composed=true"), runs / "first")
    stop["at"] = None
    run(job(tmp_path, "save_composed=true"), runs / "second")
    clean = runs / "clean"
    run(job(tmp_path, "save_composed=true", "force=true"), clean)
    names = sorted(p.name for p in (clean / "composed").iterdir())
    assert len(names) == len(SUBTASKS)
    assert sorted(p.name for p in (runs / "second" / "composed").iterdir()) == names
    for name in names:
        assert sorted(f.name for f in (runs / "second" / "composed" / name).iterdir()) == \
            sorted(f.name for f in (clean / "composed" / name).iterdir())
