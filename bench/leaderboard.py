"""`python -m bench.leaderboard` (`make leaderboard`): records -> tidy tables and plots (DESIGN §7).

Outputs in `--out` (default `results/`):
- `leaderboard.csv`: one row per profile × task × method × variant × metric (macro average over subtasks),
  mean ± std over seeds, n_seeds, n_examples, cost columns, the score normalized by the best single
  expert of the same profile, task and metric (`normalized`), and for in-domain tasks, whose subtasks are
  the experts' own tasks, the mean over subtasks of the score ÷ that subtask's own expert's score
  (`normalized_own`, the MoLE / LoRA-LEGO convention: 1.0 = every expert's own quality kept; a subtask
  whose own expert scores 0 cannot normalize and is left out of that mean);
- `leaderboard_subtasks.csv`: the same per subtask (`own_expert`: the `single` score of the expert named
  after the subtask);
- `leaderboard.md`: a Markdown table per profile and domain; `plots/*.png`: a bar chart per task and a
  quality-vs-cost scatter.
Only records with status ok count; when a job was run more than once, its newest record wins.

`--update` re-runs part of a committed leaderboard without the other records: every (profile, task, method)
that has records under `--runs-dir` replaces that method's rows in the CSVs already in `--out`; all other rows
are kept as they are, and the normalized columns are recomputed from the merged tables (the best single
expert and own-expert scores come from whichever `single` rows the merged tables hold).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from bench.config import PROJECT_ROOT
from bench.records import iter_records

KEYS = ["profile", "domain", "task", "method", "variant", "metric"]
COSTS = ["fit_seconds", "eval_seconds", "peak_memory_mb", "trained_params", "fit_examples"]


def load_rows(runs_dir: str | Path, skipped: list[tuple[str, str]] | None = None) -> pd.DataFrame:
    """One row per (job, variant, subtask, metric) from the newest ok record of each job; records that fail
    validation are left out (and listed in `skipped`: `bench.records.iter_records`)."""
    newest: dict[str, dict] = {}
    for record in iter_records(runs_dir, skipped):
        if record.get("status") != "ok":
            continue
        key = record["job_key"]
        if key not in newest or record.get("finished_at", "") > newest[key].get("finished_at", ""):
            newest[key] = record
    rows = []
    for record in newest.values():
        for row in record.get("rows", []):
            rows.append({
                "job_key": record["job_key"], "profile": record["profile"], "domain": record.get("domain", "nlp"),
                "task": record["task"], "method": record["method"], "variant": row.get("variant") or "",
                "subtask": row["subtask"], "metric": row["metric"], "value": float(row["value"]),
                "n": int(row["n"]), "seed": record["seed"], "meaningful": record.get("meaningful", True),
                "fit_seconds": row.get("fit_seconds"), "eval_seconds": row.get("eval_seconds"),
                "trained_params": row.get("trained_params"), "fit_examples": row.get("fit_examples"),
                "peak_memory_mb": record.get("peak_memory_mb"),
            })
    return pd.DataFrame(rows)


def aggregate(rows: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Mean, sample std (0 for one seed) and count over seeds, with mean costs."""
    grouped = rows.groupby(by, sort=True, dropna=False)
    table = grouped.agg(
        mean=("value", "mean"), std=("value", "std"), n_seeds=("seed", "nunique"), n_examples=("n", "mean"),
        meaningful=("meaningful", "all"),
        **{c: (c, "max" if c == "trained_params" else "mean") for c in COSTS},
    ).reset_index()
    table["std"] = table["std"].fillna(0.0)
    return table


def normalize(table: pd.DataFrame, scope: list[str]) -> pd.DataFrame:
    """Add `best_single` (the best `single` variant's mean within `scope`) and `normalized` = mean ÷ it."""
    singles = table[table["method"] == "single"].groupby(scope)["mean"].max().rename("best_single")
    out = table.merge(singles, left_on=scope, right_index=True, how="left")
    out["normalized"] = out["mean"] / out["best_single"].where(out["best_single"] > 0)
    return out


def normalize_own(overall: pd.DataFrame, per_subtask: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """In-domain normalization: per subtask, mean ÷ the mean of ``single`` with ``expert=<subtask>``
    (`own_expert`); per leaderboard row, the mean of those ratios when every subtask has its own expert."""
    scope = ["profile", "task", "subtask", "metric"]
    own = per_subtask[(per_subtask["method"] == "single") & (per_subtask["variant"] == "expert=" + per_subtask["subtask"])]
    own = own.set_index(scope)["mean"].rename("own_expert")
    per_subtask = per_subtask.merge(own, left_on=scope, right_index=True, how="left")
    per_subtask["normalized_own"] = per_subtask["mean"] / per_subtask["own_expert"].where(per_subtask["own_expert"] > 0)
    keys = ["profile", "domain", "task", "method", "variant", "metric"]
    grouped = per_subtask.groupby(keys, dropna=False)
    in_domain = grouped["own_expert"].agg(lambda own: own.notna().all())
    ratio = grouped["normalized_own"].mean().where(in_domain).rename("normalized_own")
    overall = overall.merge(ratio, left_on=keys, right_index=True, how="left")
    return overall, per_subtask


def build(rows: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(leaderboard over the macro "all" rows, per-subtask leaderboard)."""
    overall = aggregate(rows[rows["subtask"] == "all"], KEYS)
    overall = normalize(overall, ["profile", "task", "metric"])
    per_subtask = aggregate(rows[rows["subtask"] != "all"], KEYS[:3] + ["subtask"] + KEYS[3:])
    per_subtask = normalize(per_subtask, ["profile", "task", "subtask", "metric"])
    return normalize_own(overall, per_subtask)


DERIVED = ["best_single", "normalized", "own_expert", "normalized_own"]
REPLACED = ["profile", "task", "method"]


def read_table(path: Path) -> pd.DataFrame:
    """A leaderboard CSV as written by `write` (empty variants stay empty strings)."""
    table = pd.read_csv(path)
    table["variant"] = table["variant"].fillna("").astype(str)
    return table


def merge_tables(old: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    """`old` without the (profile, task, method) cells present in `new`, then `new`; derived columns dropped."""
    cells = new[REPLACED].drop_duplicates()
    kept = old.merge(cells, on=REPLACED, how="left", indicator=True)
    kept = kept[kept["_merge"] == "left_only"].drop(columns="_merge")
    merged = pd.concat([kept, new], ignore_index=True)
    return merged.drop(columns=[c for c in DERIVED if c in merged.columns])


def update(rows: pd.DataFrame, out_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The committed tables in `out_dir` with the cells of `rows` replaced, normalized again."""
    overall = aggregate(rows[rows["subtask"] == "all"], KEYS)
    per_subtask = aggregate(rows[rows["subtask"] != "all"], KEYS[:3] + ["subtask"] + KEYS[3:])
    overall = merge_tables(read_table(out_dir / "leaderboard.csv"), overall)
    per_subtask = merge_tables(read_table(out_dir / "leaderboard_subtasks.csv"), per_subtask)
    overall = normalize(overall, ["profile", "task", "metric"])
    per_subtask = normalize(per_subtask, ["profile", "task", "subtask", "metric"])
    return normalize_own(overall, per_subtask)


def markdown(overall: pd.DataFrame) -> str:
    parts = ["# Leaderboard", "", "Mean ± std over seeds of the macro average over subtasks; `norm` = ÷ best single expert; `own norm` "
             "(in-domain tasks) = mean over subtasks of the score ÷ that subtask's own expert's score.",
             "Rows of profiles marked not meaningful (smoke) come from random tiny models.", ""]
    for (profile, domain), group in overall.groupby(["profile", "domain"]):
        meaningful = "" if group["meaningful"].all() else " (random tiny models: scores are meaningless)"
        parts += [f"## {profile} · {domain}{meaningful}", ""]
        view = pd.DataFrame({
            "task": group["task"], "method": group["method"], "variant": group["variant"], "metric": group["metric"],
            "score": [f"{m:.3f} ± {s:.3f}" for m, s in zip(group["mean"], group["std"])],
            "norm": group["normalized"].map(lambda v: "" if pd.isna(v) else f"{v:.2f}"),
            "own norm": group["normalized_own"].map(lambda v: "" if pd.isna(v) else f"{v:.2f}"),
            "seeds": group["n_seeds"], "n": group["n_examples"].round().astype(int),
            "fit s": group["fit_seconds"].round(1), "eval s": group["eval_seconds"].round(1),
            "trained params": group["trained_params"].astype(int),
        }).sort_values(["task", "metric", "score"], ascending=[True, True, False])
        parts += [view.to_markdown(index=False), ""]
    return "\n".join(parts)


def plot(overall: pd.DataFrame, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for (profile, task, metric), group in overall.groupby(["profile", "task", "metric"]):
        group = group.sort_values("mean", ascending=False)
        labels = [m if not v else f"{m}[{v}]" for m, v in zip(group["method"], group["variant"])]
        fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(group) + 2), 4))
        ax.bar(range(len(group)), group["mean"], yerr=group["std"], capsize=3, color="tab:blue")
        ax.set_xticks(range(len(group)), labels, rotation=60, ha="right", fontsize=8)
        ax.set_ylabel(metric)
        ax.set_title(f"{task} · {profile}")
        stem = f"{profile}_{task}_{metric.replace('/', '-')}"
        paths.append(_save(fig, out_dir / f"{stem}.png"))
        fig, ax = plt.subplots(figsize=(6, 4))
        cost = group["fit_seconds"] + group["eval_seconds"]
        ax.scatter(cost, group["mean"])
        for x, y, label in zip(cost, group["mean"], labels):
            ax.annotate(label, (x, y), fontsize=7)
        ax.set_xscale("symlog")
        ax.set_xlabel("fit + eval seconds (mean per job)")
        ax.set_ylabel(metric)
        ax.set_title(f"quality vs cost · {task} · {profile}")
        paths.append(_save(fig, out_dir / f"{stem}_cost.png"))
    return paths


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write(runs_dir: str | Path, out_dir: str | Path, plots: bool = True, replace: bool = False,
          skipped: list[tuple[str, str]] | None = None) -> pd.DataFrame:
    """Build (or with `replace`, update: module docstring) the leaderboard files in `out_dir`; records left out
    are appended to `skipped`."""
    out_dir = Path(out_dir)
    rows = load_rows(runs_dir, skipped)
    if rows.empty:
        raise SystemExit(f"no finished records under {runs_dir}")
    if replace and not (out_dir / "leaderboard.csv").exists():
        raise SystemExit(f"--update needs an existing {out_dir / 'leaderboard.csv'}")
    overall, per_subtask = update(rows, out_dir) if replace else build(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    for frame, name in ((overall, "leaderboard.csv"), (per_subtask, "leaderboard_subtasks.csv")):
        tmp = out_dir / f".{name}.tmp"
        frame.to_csv(tmp, index=False, float_format="%.6g")
        tmp.replace(out_dir / name)
    (out_dir / "leaderboard.md").write_text(markdown(overall))
    if plots:
        plot(overall, out_dir / "plots")
    return overall


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs-dir", default=str(PROJECT_ROOT / "results" / "runs"))
    parser.add_argument("--out", default=str(PROJECT_ROOT / "results"))
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--update", action="store_true",
                        help="replace only the (profile, task, method) cells found in --runs-dir in the existing CSVs")
    args = parser.parse_args(argv)
    skipped: list[tuple[str, str]] = []
    try:
        overall = write(args.runs_dir, args.out, plots=not args.no_plots, replace=args.update, skipped=skipped)
        print(markdown(overall))
    finally:
        if skipped:
            print(f"\n{len(skipped)} record(s) left out:")
            for path, reason in skipped:
                print(f"  {path}: {reason}")


if __name__ == "__main__":
    main()
