"""`python -m bench.analysis.papers` (part of `make leaderboard`): the papers' BBH tables against the cross-task grid.

The tables are data (`results/papers/`, sources in its README). Three checks, written to
`results/papers/comparison.md`:
1. each printed average against the mean of the table's own rows (a row collapsing several tasks counts for each
   where the paper averages over tasks) — MoLE's Table 3 prints LoraHub and PEMs averages its rows do not give;
2. per task, the paper's gain of its composer over its baseline (LoraHub Table 1: LoraHub − zero-shot; MoLE
   Tables 3 and 8: MoLE − LoraHub) against the same gain in the grid (`task=bbh_cross`, from
   `results/leaderboard_subtasks.csv`): how often the signs agree, and how alike the tasks rank (Spearman); each
   of the grid's gains with its paired 95 % CI and Holm-corrected p-value over the table's rows (the leaderboard's
   bootstrap over examples and seeds, from the grid's published records), so that agreement is also counted
   where the grid's gain is more than noise;
3. each printed row of averages (MoLE Table 6: NLA, LoraHub, MoLE at 8–128 LoRAs) ordered as the grid orders the
   same methods (`COUNTERPARTS`).
The papers compose Flan-T5 LoRAs of other tasks; the grid SmolLM2-135M ones: orderings compare, numbers do not.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from bench.analysis.published import PUBLISHED_DIR, read_jobs
from bench.analysis.settings import Setting, resample, setting_options, settings_of
from bench.analysis.stats import ALPHA, holm, interval, paired_p, replicates
from bench.analysis.tables import read_table
from bench.config import PROJECT_ROOT
from bench.files import write_bytes_atomic

PAPERS_DIR = PROJECT_ROOT / "results" / "papers"
RESULTS_DIR = PROJECT_ROOT / "results"
GRID_TASK = "bbh_cross"
# table -> (the paper's composer column, its baseline column, the grid's composer method, its baseline method)
# a paper's column -> this project's method (PEMs, ICL and LoRA tuning have none)
COUNTERPARTS = {"nla": "linear", "zero_shot": "base", "lorahub": "lorahub", "mole": "mole"}
GAINS = {
    "lorahub_table1": ("lorahub", "zero_shot", "lorahub", "base"),
    "mole_table3": ("mole", "lorahub", "mole", "lorahub"),
    "mole_table8": ("mole", "lorahub", "mole", "lorahub"),
}


def read_tables(papers_dir: Path = PAPERS_DIR) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(rows, printed averages, tables of averages) as committed: `bbh_rows.csv`, `printed_averages.csv` and
    `bbh_averages.csv`."""
    rows = pd.read_csv(papers_dir / "bbh_rows.csv")
    rows["tasks"] = rows["tasks"].str.split(";")
    return rows, pd.read_csv(papers_dir / "printed_averages.csv"), pd.read_csv(papers_dir / "bbh_averages.csv")


# Rows and averages are printed to 0.1: a mean of rounded rows may sit 0.05 from the exact mean, which the
# printed average may round another 0.05 away.
ROUNDING = 0.1


def weights(rows: pd.DataFrame, weighting: str) -> pd.Series:
    """Each printed row's weight in its column's average: the number of tasks it stands for, or 1."""
    return rows["tasks"].str.len() if weighting == "tasks" else pd.Series(1, index=rows.index)


def averages(rows: pd.DataFrame, printed: pd.DataFrame) -> pd.DataFrame:
    """Per table and column: the printed average, the mean of its rows (weighted as `weighting` says) and whether
    the two agree within the rounding of printed values (`ROUNDING`)."""
    out = []
    for p in printed.itertuples():
        col = rows[(rows["table"] == p.table) & (rows["column"] == p.column)]
        if col.empty:
            raise ValueError(f"printed average {p.table}.{p.column} has no rows in bbh_rows.csv")
        w = weights(col, p.weighting)
        mean = float((col["value"] * w).sum() / w.sum())
        out.append({"table": p.table, "column": p.column, "rows": len(col), "tasks": int(col["tasks"].str.len().sum()),
                    "printed": p.printed, "recomputed": round(mean, 2), "difference": round(mean - p.printed, 2),
                    "agrees": abs(mean - p.printed) <= ROUNDING + 1e-9})
    return pd.DataFrame(out)


def grid_scores(subtasks: pd.DataFrame, setting: str) -> pd.DataFrame:
    """(method × subtask) mean exact match in percent of the grid (the leaderboard's `setting`, `grid_setting`'s),
    each method's default config (no options, no variant)."""
    rows = subtasks[(subtasks["setting"] == setting) & (subtasks["metric"] == "exact_match")]
    if rows.empty:
        raise ValueError(f"no rows of the grid setting {setting} in the leaderboard")
    grid = rows[(rows["options"].fillna("") == "") & (rows["variant"].fillna("") == "")]
    return grid.pivot_table(index="subtask", columns="method", values="mean") * 100


def spearman(a: pd.Series, b: pd.Series) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    return float(a.rank().corr(b.rank()))


def gains(rows: pd.DataFrame, grid: pd.DataFrame, table: str) -> pd.DataFrame:
    """Per printed row of `table`: the paper's composer, baseline and gain; the grid's, averaged over the row's
    tasks; and whether the two gains have the same sign (a zero gain agrees with nothing)."""
    paper_comp, paper_base, ours_comp, ours_base = GAINS[table]
    t = rows[rows["table"] == table]
    out = []
    for label, group in t.groupby("row", sort=False):
        values = dict(zip(group["column"], group["value"]))
        tasks = group["tasks"].iloc[0]
        missing = [x for x in tasks if x not in grid.index]
        if missing:
            raise ValueError(f"{table} row {label!r}: the grid has no scores for {missing}")
        ours = grid.loc[tasks, [ours_comp, ours_base]].mean()
        paper_gain, ours_gain = values[paper_comp] - values[paper_base], ours[ours_comp] - ours[ours_base]
        out.append({"row": label, "tasks": len(tasks), f"paper {paper_comp}": values[paper_comp],
                    f"paper {paper_base}": values[paper_base], "paper gain": round(paper_gain, 1),
                    f"ours {ours_comp}": round(ours[ours_comp], 1), f"ours {ours_base}": round(ours[ours_base], 1),
                    "ours gain": round(ours_gain, 1), "same sign": paper_gain * ours_gain > 0})
    return pd.DataFrame(out)


def grid_setting(jobs: list, task: str = GRID_TASK) -> Setting:
    """The `task` setting with the most subtasks among `jobs`' settings (the grid, not a budget curve's fold)."""
    settings = [s for s in settings_of(jobs).values() if s.fields["task"].get("name") == task and s.rows]
    if not settings:
        raise ValueError(f"no {task} records to test the grid's gains on")
    return max(settings, key=lambda s: (len(s.examples), s.key))


def gain_tests(setting: Setting, rows: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per `GAINS` table and printed row: the grid's gain (composer − baseline, the default config of each, in
    percent) over the row's tasks, its paired 95 % CI, and its p-value Holm-corrected over the table's rows."""
    r = resample(setting)
    options = setting_options(setting)

    def row_key(method: str) -> tuple:
        found = [k for k in r.keys
                 if k[0] == method and not k[1] and k[2] == "exact_match" and not options[(k[0], k[3])]]
        if len(found) != 1:
            raise ValueError(f"grid setting {setting.key} has {len(found)} default exact-match rows of {method!r}")
        return found[0]

    out = {}
    for table, (_, _, ours_comp, ours_base) in GAINS.items():
        a, b = row_key(ours_comp), row_key(ours_base)
        tested, p = {}, {}
        for label, group in rows[rows["table"] == table].groupby("row", sort=False):
            tasks = group["tasks"].iloc[0]
            rep_a, rep_b = replicates(r.scores[a], r.draws, tasks), replicates(r.scores[b], r.draws, tasks)
            tested[label], p[label] = interval(100 * (rep_a - rep_b)), paired_p(rep_a, rep_b)
        p_holm = holm(p)
        out[table] = pd.DataFrame([{"row": label, "ours gain 95% CI": f"[{low:+.1f}, {high:+.1f}]",
                                    "p (Holm)": round(p_holm[label], 3),
                                    "significant": p_holm[label] < ALPHA}
                                   for label, (low, high) in tested.items()])
    return out


def orderings(tables: pd.DataFrame, grid: pd.DataFrame) -> pd.DataFrame:
    """Per printed row of averages: the order of its columns that have a counterpart here, lowest first, and the
    grid's order of those counterparts by their mean over the grid's tasks."""
    means = grid.mean()
    out = []
    for (table, label), group in tables.groupby(["table", "row"], sort=False):
        shared = group[group["column"].isin(COUNTERPARTS)]
        missing = [COUNTERPARTS[c] for c in shared["column"] if COUNTERPARTS[c] not in means]
        if missing:
            raise ValueError(f"{table} row {label!r}: the grid has no {missing}")
        paper = " < ".join(shared.sort_values("value")["column"])
        ours = sorted(shared["column"], key=lambda c: means[COUNTERPARTS[c]])
        out.append({"table": table, "row": label, "paper": paper,
                    "grid": " < ".join(f"{COUNTERPARTS[c]} ({means[COUNTERPARTS[c]]:.1f})" for c in ours),
                    "same order": paper == " < ".join(ours)})
    return pd.DataFrame(out)


def render(avg: pd.DataFrame, per_table: dict[str, pd.DataFrame], order: pd.DataFrame) -> str:
    """The comparison as markdown (means over a table's rows count a collapsed row for each of its tasks)."""
    parts = ["# The papers' BBH tables against the cross-task grid", "",
             "Written by `python -m bench.analysis.papers` from `results/papers/*.csv` (sources: its README) and "
             "`results/leaderboard_subtasks.csv`. Exact match in percent. The papers compose Flan-T5 LoRAs, the grid "
             "SmolLM2-135M ones: orderings compare, numbers do not.", "",
             "## Printed averages against the tables' own rows", "",
             avg.to_markdown(index=False), ""]
    for table, frame in per_table.items():
        paper_comp, paper_base, ours_comp, ours_base = GAINS[table]
        agree = int(frame["same sign"].sum())
        significant = frame[frame["significant"]]
        rho = spearman(frame["paper gain"], frame["ours gain"])
        w = frame["tasks"]

        def mean(column: str) -> str:
            return f"{(frame[column] * w).sum() / w.sum():.1f}"

        parts += [f"## {table}: {paper_comp} − {paper_base} (paper) against {ours_comp} − {ours_base} (grid)", "",
                  f"Same sign on {agree} of {len(frame)} rows; Spearman's ρ between the two gains over the rows: "
                  f"{rho:+.2f}. Means over the rows' tasks: paper {paper_comp} {mean(f'paper {paper_comp}')}, "
                  f"{paper_base} {mean(f'paper {paper_base}')}; grid {ours_comp} {mean(f'ours {ours_comp}')}, "
                  f"{ours_base} {mean(f'ours {ours_base}')}. A zero gain agrees in sign with nothing. The grid's gain "
                  f"is significant (paired bootstrap over examples and seeds; p Holm-corrected over the table's rows, "
                  f"each CI for its row alone) on {len(significant)} rows, and has the paper's sign on "
                  f"{int(significant['same sign'].sum())} of them.",
                  "",
                  frame.to_markdown(index=False), ""]
    parts += ["## Orderings of printed averages against the grid's means", "",
              "Lowest first; the grid composes 20 LoRAs a task, and its order is of means (whether its differences "
              "are significant: `python -m bench.analysis.compare`).", "", order.to_markdown(index=False), ""]
    return "\n".join(parts)


def write(papers_dir: Path = PAPERS_DIR, results_dir: Path = RESULTS_DIR, published_dir: Path = PUBLISHED_DIR) -> Path:
    """`papers_dir`/comparison.md from the papers' tables, `results_dir`'s per-subtask leaderboard and the grid's
    published records (`published_dir`/<grid task>)."""
    rows, printed, tables = read_tables(papers_dir)
    setting = grid_setting(read_jobs([published_dir / GRID_TASK]))
    grid = grid_scores(read_table(results_dir / "leaderboard_subtasks.csv"), setting.key)
    tests = gain_tests(setting, rows)
    per_table = {table: gains(rows, grid, table).merge(tests[table], on="row", validate="one_to_one")
                 for table in GAINS}
    path = papers_dir / "comparison.md"
    write_bytes_atomic(path, render(averages(rows, printed), per_table, orderings(tables, grid)).encode())
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--papers-dir", type=Path, default=PAPERS_DIR)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--published-dir", type=Path, default=PUBLISHED_DIR)
    args = parser.parse_args(argv)
    print(f"wrote {write(args.papers_dir, args.results_dir, args.published_dir)}")


if __name__ == "__main__":
    main()
