"""Do two sets of runs of the same jobs agree? Example by example, for every job both sets hold.

    python -m bench.analysis.agreement A B [--out results/crosscheck/NAME]

`A` and `B` are run folders or published archives (anything ``bench.analysis.published.read_jobs`` reads). Jobs
are paired by their config key (what the user asked for: method, task, seed, pool, budgets…), so a re-run on
other hardware or software pairs with the original even where the input digests moved. Per pair: each side's
score, device and git commit, and the share of examples whose generation is identical (the extracted answer, where
a side is a compact published archive, which keeps no generations). Deterministic methods
should agree on every example; a seeded random draw (DARE's masks) or a trained gate (MoLE) may not, because
torch's random streams and floating-point order differ across devices — the table shows by how much, and that
the scores stay inside the leaderboard's intervals. Jobs only one side holds are counted, not compared.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from bench.analysis.published import Job, read_jobs

COLUMNS = ["task", "method", "seed", "n", "identical", "score_a", "score_b", "device_a", "device_b"]


def _by_config(jobs: list[Job]) -> dict[str, Job]:
    return {job.record["config_key"]: job for job in jobs if job.record.get("config_key")}


def _score(job: Job) -> float:
    rows = [row for row in job.record["rows"] if row["subtask"] == "all"] or job.record["rows"]
    return sum(row["value"] for row in rows) / len(rows)


def _example_key(prediction: dict) -> tuple:
    return prediction.get("variant", ""), prediction.get("subtask", ""), prediction.get("input", "")


def compare(a: list[Job], b: list[Job]) -> tuple[pd.DataFrame, int, int]:
    """One row per job both sides hold; also the numbers of jobs only in `a` and only in `b` (records written
    before config keys existed count as unpaired)."""
    left, right = _by_config(a), _by_config(b)
    rows = []
    for key in sorted(set(left) & set(right)):
        ja, jb = left[key], right[key]
        field = "generation" if all("generation" in p for p in ja.predictions + jb.predictions) else "answer"
        outputs = {_example_key(p): p.get(field) for p in jb.predictions}
        shared = [p for p in ja.predictions if _example_key(p) in outputs]
        same = sum(p.get(field) == outputs[_example_key(p)] for p in shared)
        rows.append({"task": ja.record["task"], "method": ja.record["method"], "seed": ja.record["seed"],
                     "n": len(shared), "identical": same / len(shared) if shared else float("nan"),
                     "score_a": _score(ja), "score_b": _score(jb),
                     "device_a": ja.record.get("device", "?"), "device_b": jb.record.get("device", "?")})
    table = pd.DataFrame(rows, columns=COLUMNS).sort_values(["task", "method", "seed"], ignore_index=True)
    return table, len(a) - len(table), len(b) - len(table)


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per task and method: jobs, examples, share of identical generations, largest score difference."""
    grouped = table.assign(diff=(table["score_a"] - table["score_b"]).abs()).groupby(["task", "method"])
    return grouped.agg(jobs=("seed", "size"), examples=("n", "sum"), identical=("identical", "mean"),
                       max_score_diff=("diff", "max")).reset_index()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="write <out>.csv (every pair) and <out>.md")
    args = parser.parse_args(argv)
    table, only_a, only_b = compare(read_jobs([args.a]), read_jobs([args.b]))
    brief = summary(table)
    text = (f"{len(table)} job(s) in both, {only_a} only in {args.a}, {only_b} only in {args.b}\n\n"
            + brief.to_markdown(index=False, floatfmt=".3f"))
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out.with_suffix(".csv"), index=False, float_format="%.4f")
        args.out.with_suffix(".md").write_text(text + "\n")


if __name__ == "__main__":
    main()
