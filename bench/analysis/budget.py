"""Budget curves: a trained method's score against its fit budget, where a setting holds it at several budgets.

The budget of a job is read from its method's hyperparameters: ``steps`` (MoLE, CAT, LoRA-Flow: optimizer steps
per fit) or ``budget`` (LoraHub: objective evaluations). `conf/sweep/full_budget*.yaml` run such grids on one fold
of the cross-task protocol; `make leaderboard` then writes ``budget_curves.csv`` (one row per setting, method and
budget, with the setting's subtasks — the fold — and the leaderboard's mean and 95 % CI) and one plot per setting
(``plots/<setting>_budget.png``, its fold in the title), so a reader sees where each method saturates.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from bench.analysis.figures import save as save_figure
from bench.analysis.published import Job
from bench.analysis.settings import short_hash

BUDGET_KEYS = ("steps", "budget")  # method hyperparameters that set a fit budget, in this order
COLUMNS = ["setting", "profile", "task", "subtasks", "metric", "method", "budget_key", "budget", "mean", "ci_low",
           "ci_high", "seeds", "config"]


def budget_of(params: dict) -> tuple[str, int] | None:
    """(key, value) of the first budget hyperparameter set in `params`; None when the method has none."""
    for key in BUDGET_KEYS:
        if params.get(key) is not None:
            return key, int(params[key])
    return None


def curves(overall: pd.DataFrame, per_subtask: pd.DataFrame, jobs: list[Job]) -> pd.DataFrame:
    """The leaderboard rows of every (setting, method, metric) seen at two or more budgets, with the budget (a job's
    row is found by its method and the hash of its hyperparameters, the leaderboard's ``config`` column) and the
    setting's subtasks (from `per_subtask`, space-separated)."""
    budgets = {}
    for job in jobs:
        found = budget_of(job.record.get("method_params") or {})
        if found:
            budgets[(job.record["method"], short_hash(job.record.get("method_params", {})))] = found
    folds = per_subtask.groupby("setting")["subtask"].unique()
    rows = []
    for _, row in overall[overall["variant"] == ""].iterrows():
        found = budgets.get((row["method"], row["config"]))
        if found:
            rows.append({**{c: row[c] for c in COLUMNS if c in row}, "subtasks": " ".join(folds[row["setting"]]),
                         "budget_key": found[0], "budget": found[1]})
    table = pd.DataFrame(rows, columns=COLUMNS)
    if table.empty:
        return table
    counts = table.groupby(["setting", "method", "metric"])["budget"].transform("nunique")
    return table[counts >= 2].sort_values(["setting", "metric", "method", "budget"], ignore_index=True)


def plot_curves(table: pd.DataFrame, out_dir: Path) -> list[Path]:
    """One plot per setting and metric: score (95 % CI) against the budget, a line per method, log budget axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for (setting, metric), group in table.groupby(["setting", "metric"], sort=False):
        fig, ax = plt.subplots(figsize=(6, 4))
        for method, line in group.groupby("method", sort=True):
            x = line["budget"].to_numpy()
            ax.errorbar(x, line["mean"], yerr=[line["mean"] - line["ci_low"], line["ci_high"] - line["mean"]],
                        marker="o", capsize=2, label=f"{method} ({line['budget_key'].iloc[0]})")
        ax.set_xscale("log")
        ax.set_xticks(sorted(set(group["budget"])), [str(b) for b in sorted(set(group["budget"]))], fontsize=7)
        ax.minorticks_off()
        ax.set_xlabel("fit budget per composition (steps or objective evaluations)")
        ax.set_ylabel(f"{metric} (95% CI)")
        first = group.iloc[0]
        ax.set_title(f"budget curve · {first['task']} · {first['profile']} (setting {setting})\n"
                     f"{first['subtasks'].replace(' ', ', ')}", fontsize=8)
        ax.legend(fontsize=7)
        stem = f"{first['profile']}_{first['task']}_{setting}_{metric.replace('/', '-')}_budget.png"
        paths.append(save_figure(fig, out_dir / stem))
    return paths


def write(overall: pd.DataFrame, per_subtask: pd.DataFrame, jobs: list[Job], out_dir: Path,
          plots: bool = True) -> pd.DataFrame:
    """``budget_curves.csv`` in `out_dir` (header only when no setting has a budget grid) and its plots."""
    table = curves(overall, per_subtask, jobs)
    tmp = out_dir / ".budget_curves.csv.tmp"
    table.to_csv(tmp, index=False, float_format="%.6g", lineterminator="\n")
    tmp.replace(out_dir / "budget_curves.csv")
    if plots and not table.empty:
        plot_curves(table, out_dir / "plots")
    return table

