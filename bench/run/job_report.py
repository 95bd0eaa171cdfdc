"""What a finished job prints last: its scores per subtask beside the base model's on the same examples (when a
base record exists), and where its record is."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from bench.run.records import iter_records

SAME_EXAMPLES = ("task", "model", "profile")  # config groups that fix the evaluated examples and the base model


def base_record(runs_dir: str | Path, record: dict) -> dict | None:
    """The newest ok `method=base` record scored on the same examples (same task, model and profile config)."""
    mine = record.get("config", {})
    found = [r for r in iter_records(runs_dir) if r.get("method") == "base" and r.get("status") == "ok"
             and all(r.get("config", {}).get(k) == mine.get(k) for k in SAME_EXAMPLES)]
    return max(found, key=lambda r: r.get("finished_at", ""), default=None)


def score_table(record: dict, base: dict | None) -> str:
    """Subtask × (variant, metric) values with n, and a `base` column when `base` is given."""
    def frame(rec: dict, label: str | None) -> pd.DataFrame:
        rows = pd.DataFrame(rec["rows"])
        rows["column"] = label or rows["variant"].fillna("").replace("", rec["method"])
        return rows

    own = frame(record, None)
    columns = list(dict.fromkeys(own["column"]))  # the job's own columns (a base job's is called "base" too)
    rows = own if base is None else pd.concat([own, frame(base, "base")])
    table = rows.pivot_table(index=["metric", "subtask"], columns="column", values="value", aggfunc="first",
                             sort=False)
    table.insert(0, "n", own.groupby(["metric", "subtask"], sort=False)["n"].first())
    table = table[["n", *columns, *(["base"] if base is not None else [])]]
    subtasks = [s for s in table.index.get_level_values("subtask").unique() if s != "all"] + ["all"]
    table = table.reindex(subtasks, level="subtask")
    table.columns.name = None
    return table.to_string(float_format=lambda v: f"{v:.3f}", na_rep="")


def job_report(record: dict, record_path: str | Path, runs_dir: str | Path) -> str:
    """The closing lines of a job: the score table and the record's folder."""
    base = None if record.get("method") == "base" else base_record(runs_dir, record)
    note = ("this job is the base model" if record.get("method") == "base" else
            "base: the base model on the same examples" if base is not None else
            "no base-model record on these examples yet; run method=base to compare")
    folder = Path(record_path).parent
    return (f"{score_table(record, base)}\n({note})\nrecord: {folder}/record.json "
            f"(predictions.jsonl beside it)")
