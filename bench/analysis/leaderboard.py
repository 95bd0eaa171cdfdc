"""`python -m bench.analysis.leaderboard` (`make leaderboard`): finished jobs -> tables with uncertainty, paired tests, plots, page.

Sources: by default the published records (`bench.analysis.published`: ``results/published/``), into ``results/`` — the
committed tables, reproducible byte for byte from the repository; ``--runs-dir DIR`` reads run folders instead
and writes to ``--out`` (default ``results/local/``: a user's own runs never overwrite the committed tables).
``--publish DIR…`` copies finished jobs into the published records first.

**Settings** (`bench.analysis.settings`). A row is one method (and variant, metric) in one *setting*: profile,
task and its whole config, model config, expert pool and `fit_examples`; jobs of one setting must have been scored
on the same eval examples (a job whose examples differ is left out with a message). A method run with two different
configs in one setting gives two rows (`config` column: a hash of `method_params`; ``options``: the method
parameters in which its configs differ, e.g. ``normalize=True`` or ``steps=50``; empty for a method run with one
config).

**Columns** (`leaderboard.csv`, one row per setting × method × variant × metric; macro average over subtasks):
``mean`` (over seeds of the macro average), ``ci_low``/``ci_high`` (95 % bootstrap over examples and seeds, paired
across the methods of a setting: `bench.analysis.stats`), ``seeds``, ``n`` (eval examples per seed),
``p_vs_reference`` (against `linear`, MoLE's NLA baseline), ``p_vs_best_single`` (against the best `single` expert),
``p_vs_best`` (against the setting's best row), each Holm-corrected over the setting's rows; ``tied_with_best``
(p_vs_best ≥ 0.05: not significantly below the best); ``subtasks_best`` / ``subtasks_tied`` (the subtasks where the
row has the highest mean / is not significantly below that subtask's best, Holm within the subtask: the per-task
wins); ``best_single``/``normalized`` (÷ the best single expert's mean) and, for in-domain tasks, ``normalized_own``
(mean over subtasks of ÷ that subtask's own expert); cost columns (fit and eval seconds, peak memory, trained
parameters, fit examples, per job) and the ``hardware`` they were measured on (the GPU's name or the CPU's model and
threads; ``cuda``/``cpu`` for records older than that field); the ``command`` that re-runs the row (`bench.analysis.rerun`) and its
``config_key``. ``leaderboard_subtasks.csv``: the same per subtask (CIs from the same draws; ``p_vs_best``, ``best``,
``tied_with_best`` against that subtask's best row). ``leaderboard.md``: one table per setting; ``plots/``: per
setting a ranking plot (means with CIs, the group tied with the best joined) and a quality-vs-cost plot;
``budget_curves.csv`` and its plots: methods run at several fit budgets in one setting (`bench.analysis.budget`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from bench.analysis import budget, papers
from bench.analysis.figures import save as save_figure
from bench.analysis.published import PUBLISHED_DIR, Job, publish, read_jobs
from bench.analysis.rerun import command
from bench.analysis.settings import Setting, resample, setting_columns, setting_options, settings_of
from bench.analysis.site import write_site
from bench.analysis.stats import ALPHA, Draws, Scores, holm, interval, paired_p, replicates
from bench.analysis.tables import row_label
from bench.config import PROJECT_ROOT

REFERENCE = "linear"
LOCAL_OUT = PROJECT_ROOT / "results" / "local"
COSTS = ["fit_seconds", "eval_seconds", "peak_memory_mb", "trained_params", "fit_examples_used", "fit_steps"]


def build_setting(setting: Setting) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(overall rows, per-subtask rows) of one setting with CIs and Holm-corrected paired p-values."""
    subtasks = list(setting.examples)
    r = resample(setting)
    keys, scores, draws, reps, means = r.keys, r.scores, r.draws, r.reps, r.means
    overall, per_subtask = [], []
    options = setting_options(setting)
    for metric in sorted({k[2] for k in keys}):
        rows = [k for k in keys if k[2] == metric]
        best = max(rows, key=lambda k: (means[k], k))
        singles = [k for k in rows if k[0] == "single"]
        best_single = max(singles, key=lambda k: (means[k], k)) if singles else None
        reference = next((k for k in rows if k[0] == REFERENCE and not k[1]), None)

        def family(against):
            if against is None:
                return {}
            return holm({k: paired_p(reps[k], reps[against]) for k in rows if k != against})

        p_ref, p_single, p_best = family(reference), family(best_single), family(best)
        by_subtask = subtask_stats(rows, scores, draws)
        for k in rows:
            low, high = interval(reps[k])
            costs = pd.DataFrame(setting.rows[k]["costs"]).mean(numeric_only=True)
            seed_means = [np.mean([v.mean() for v in seed]) for seed in scores[k].values]
            record = setting.rows[k]["record"]
            overall.append({
                **setting_columns(setting), "method": k[0], "variant": k[1], "metric": metric, "config": k[3],
                "options": options[(k[0], k[3])], "mean": means[k], "ci_low": low, "ci_high": high,
                "seeds": len(seed_means),
                "n": sum(len(v) for v in setting.examples.values()),
                "std_seeds": float(np.std(seed_means, ddof=1)) if len(seed_means) > 1 else 0.0,
                "p_vs_reference": p_ref.get(k), "p_vs_best_single": p_single.get(k), "p_vs_best": p_best.get(k),
                "tied_with_best": k == best or p_best.get(k, 0.0) >= ALPHA,
                "subtasks_best": sum(s["best"] for s in by_subtask[k].values()),
                "subtasks_tied": sum(s["tied_with_best"] for s in by_subtask[k].values()),
                **{c: costs.get(c) for c in COSTS}, "hardware": "; ".join(sorted(setting.rows[k]["hardware"] - {""})),
                "meaningful": record.get("meaningful", True),
                "command": command(record), "config_key": record.get("config_key", record["job_key"]),
            })
            for t in subtasks:
                per_subtask.append({
                    **setting_columns(setting), "subtask": t, "method": k[0], "variant": k[1], "metric": metric,
                    "config": k[3], "options": options[(k[0], k[3])], **by_subtask[k][t], "seeds": len(scores[k].values), "n": len(setting.examples[t]),
                })
    return pd.DataFrame(overall), pd.DataFrame(per_subtask)


def subtask_stats(rows: list[tuple], scores: dict[tuple, Scores], draws: Draws) -> dict[tuple, dict[str, dict]]:
    """Per row and subtask: mean over seeds, 95 % CI, and the Holm-corrected paired p-value against that subtask's
    best row (``best``: the highest mean, exact ties included; ``tied_with_best``: not significantly below it)."""
    out: dict[tuple, dict[str, dict]] = {k: {} for k in rows}
    for i, t in enumerate(scores[rows[0]].subtasks):
        reps = {k: replicates(scores[k], draws, [t]) for k in rows}
        means = {k: float(np.mean([seed[i].mean() for seed in scores[k].values])) for k in rows}
        top = max(rows, key=lambda k: (means[k], k))
        p_top = holm({k: paired_p(reps[k], reps[top]) for k in rows if k != top})
        for k in rows:
            low, high = interval(reps[k])
            out[k][t] = {"mean": means[k], "ci_low": low, "ci_high": high, "p_vs_best": p_top.get(k),
                         "best": means[k] == means[top], "tied_with_best": k == top or p_top[k] >= ALPHA}
    return out


def normalize(overall: pd.DataFrame, per_subtask: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``best_single``/``normalized`` per setting and metric, and the in-domain ``normalized_own``."""
    if overall.empty:
        return overall, per_subtask
    scope = ["setting", "metric"]
    singles = overall[overall["method"] == "single"].groupby(scope)["mean"].max().rename("best_single")
    overall = overall.merge(singles, left_on=scope, right_index=True, how="left")
    overall["normalized"] = overall["mean"] / overall["best_single"].where(overall["best_single"] > 0)
    own_scope = ["setting", "subtask", "metric"]
    own = per_subtask[(per_subtask["method"] == "single")
                      & (per_subtask["variant"] == "expert=" + per_subtask["subtask"])]
    own = own.set_index(own_scope)["mean"].rename("own_expert")
    per_subtask = per_subtask.merge(own, left_on=own_scope, right_index=True, how="left")
    per_subtask["normalized_own"] = per_subtask["mean"] / per_subtask["own_expert"].where(per_subtask["own_expert"] > 0)
    keys = ["setting", "method", "variant", "metric", "config"]
    grouped = per_subtask.groupby(keys, dropna=False)
    in_domain = grouped["own_expert"].agg(lambda o: o.notna().all())
    ratio = grouped["normalized_own"].mean().where(in_domain).rename("normalized_own")
    overall = overall.merge(ratio, left_on=keys, right_index=True, how="left")
    return overall, per_subtask


def build(jobs: list[Job], left_out: list[tuple[str, str]] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(overall, per-subtask) tables of `jobs`, settings in key order, rows by mean within a setting."""
    settings = settings_of(jobs)
    overall, per_subtask = [], []
    for key in sorted(settings):
        setting = settings[key]
        if left_out is not None:
            left_out.extend(setting.left_out)
        if setting.rows:
            o, p = build_setting(setting)
            overall.append(o)
            per_subtask.append(p)
    if not overall:
        return pd.DataFrame(), pd.DataFrame()
    overall, per_subtask = normalize(pd.concat(overall, ignore_index=True), pd.concat(per_subtask, ignore_index=True))
    order = ["profile", "task", "setting", "metric", "mean", "method", "variant", "config"]
    overall = overall.sort_values(order, ascending=[True, True, True, True, False, True, True, True])
    per_subtask = per_subtask.sort_values(["profile", "task", "setting", "subtask", "metric", "mean", "method",
                                           "variant"], ascending=[True] * 5 + [False, True, True])
    return overall.reset_index(drop=True), per_subtask.reset_index(drop=True)


def _p(value) -> str:
    return "" if value is None or pd.isna(value) else ("<0.001" if value < 0.001 else f"{value:.3f}")


def _count(value) -> str:
    """A budget count (examples, steps; a mean over seeds) as an integer where it is one."""
    return "" if pd.isna(value) else f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


def markdown(overall: pd.DataFrame) -> str:
    parts = ["# Leaderboard", "",
             "Per setting: mean over seeds of the macro average over subtasks, 95 % CI (bootstrap over examples and "
             "seeds, paired across methods), paired p-values (Holm-corrected within the setting) against the linear "
             "merge and the best single expert; ● = not significantly below the setting's best (p ≥ 0.05), so "
             "rows marked ● are tied and not ranked among themselves. Tasks best / tied: the subtasks where the row "
             "has the highest mean, and where it is not significantly below that subtask's best (Holm within the "
             "subtask). Generated by `python -m bench.analysis.leaderboard`.",
             ""]
    for key, group in overall.groupby("setting", sort=False):
        first = group.iloc[0]
        note = "" if group["meaningful"].all() else " — random tiny models: scores are meaningless"
        parts += [f"## {first['task']} · {first['profile']} · experts {first['experts']} · "
                  f"K={first['fit_examples']} · limit {first['limit']} (setting {key}){note}", ""]
        view = pd.DataFrame({
            "": ["●" if t else "" for t in group["tied_with_best"]],
            "method": group["method"], "options": group["options"], "variant": group["variant"],
            "metric": group["metric"], "score [95% CI]": [f"{m:.3f} [{lo:.3f}, {hi:.3f}]" for m, lo, hi in
                               zip(group["mean"], group["ci_low"], group["ci_high"])],
            "p vs linear": group["p_vs_reference"].map(_p), "p vs best single": group["p_vs_best_single"].map(_p),
            "norm": group["normalized"].map(lambda v: "" if pd.isna(v) else f"{v:.2f}"),
            "tasks best / tied": [f"{b} / {t}" for b, t in zip(group["subtasks_best"], group["subtasks_tied"])],
            "seeds": group["seeds"], "n": group["n"],
            "fit ex": group["fit_examples_used"].map(_count), "steps": group["fit_steps"].map(_count),
            "fit s": group["fit_seconds"].map(lambda v: "" if pd.isna(v) else f"{v:.1f}"),
            "eval s": group["eval_seconds"].map(lambda v: "" if pd.isna(v) else f"{v:.1f}"),
        })
        parts += [view.to_markdown(index=False), ""]
    return "\n".join(parts)


def plot(overall: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Per setting and metric: a ranking plot and a quality-vs-cost plot (labels kept apart)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for (key, metric), group in overall.groupby(["setting", "metric"], sort=False):
        group = group.sort_values("mean")
        labels = [row_label(m, v, o) for m, v, o in zip(group["method"], group["variant"], group["options"])]
        first = group.iloc[0]
        stem = f"{first['profile']}_{first['task']}_{key}_{metric.replace('/', '-')}"
        fig, ax = plt.subplots(figsize=(7, 0.32 * len(group) + 1.5))
        y = np.arange(len(group))
        tied = group["tied_with_best"].to_numpy(bool)
        ax.errorbar(group["mean"], y, xerr=[group["mean"] - group["ci_low"], group["ci_high"] - group["mean"]],
                    fmt="o", color="tab:blue", ecolor="tab:gray", capsize=2)
        if tied.any():
            ax.axhspan(y[tied].min() - 0.4, y[tied].max() + 0.4, color="tab:green", alpha=0.12,
                       label="tied with the best (p ≥ 0.05)")
            ax.legend(loc="lower right", fontsize=7)
        ax.set_yticks(y, labels, fontsize=7)
        ax.set_xlabel(f"{metric} (95% CI)")
        ax.set_title(f"{first['task']} · {first['profile']} · {first['experts']}", fontsize=9)
        paths.append(save_figure(fig, out_dir / f"{stem}_rank.png"))
        fig, ax = plt.subplots(figsize=(7, 4.5))
        cost = (group["fit_seconds"].fillna(0) + group["eval_seconds"].fillna(0)).to_numpy()
        ax.scatter(cost, group["mean"], color=np.where(tied, "tab:green", "tab:blue"))
        ax.set_xscale("symlog")
        ax.xaxis.set_major_locator(matplotlib.ticker.SymmetricalLogLocator(base=10, linthresh=1, subs=[1, 2, 5]))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.set_xlabel("fit + eval seconds per job")
        ax.set_ylabel(metric)
        ax.set_title(f"quality vs cost · {first['task']} · {first['profile']}", fontsize=9)
        fig.tight_layout()  # fix the frame before placing labels in it
        place_labels(ax, cost, group["mean"].to_numpy(), labels)
        paths.append(save_figure(fig, out_dir / f"{stem}_cost.png"))
    return paths


def place_labels(ax, xs: np.ndarray, ys: np.ndarray, labels: list[str], step: float = 7.0,
                 tries: int = 12) -> list:
    """Annotate each point with its label, right of the point when that spot is free, else the nearest free
    spot up or down (in `step`-point moves; a thin line then joins label and point), so that no two labels and
    no label and point overlap and every label stays inside the axes. Returns the text objects."""
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    pad = 2.0 * fig.dpi / 72  # two points around each marker
    markers = [ax.transData.transform((x, y)) for x, y in zip(xs, ys)]
    taken = [(mx - pad * 2, my - pad * 2, mx + pad * 2, my + pad * 2) for mx, my in markers]

    def free(box) -> bool:
        inside = box.x0 >= frame.x0 and box.x1 <= frame.x1 and box.y0 >= frame.y0 and box.y1 <= frame.y1
        return inside and not any(box.x0 < x1 and box.x1 > x0 and box.y0 < y1 and box.y1 > y0
                                  for x0, y0, x1, y1 in taken)

    texts = []
    for i in np.argsort(-np.asarray(ys), kind="stable"):
        moves = [0.0] + [sign * k * step for k in range(1, tries + 1) for sign in (1, -1)]
        for dx in (5.0, -5.0):
            for dy in moves:
                text = ax.annotate(labels[i], (xs[i], ys[i]), xytext=(dx, dy), textcoords="offset points",
                                   fontsize=6, va="center", ha="left" if dx > 0 else "right")
                box = text.get_window_extent(renderer)
                if free(box):
                    break
                text.remove()
            else:
                continue
            break
        else:  # nowhere free: keep the plain spot (readable beats absent)
            text = ax.annotate(labels[i], (xs[i], ys[i]), xytext=(5, 0), textcoords="offset points",
                               fontsize=6, va="center")
            box = text.get_window_extent(renderer)
        if dy:
            ax.annotate("", (xs[i], ys[i]), xytext=(dx, dy), textcoords="offset points",
                        arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.5})
        taken.append((box.x0, box.y0, box.x1, box.y1))
        texts.append(text)
    return texts


def write(sources: list[Path], out_dir: Path, plots: bool = True,
          skipped: list[tuple[str, str]] | None = None) -> tuple[pd.DataFrame, int]:
    """Build the tables of the jobs in `sources` into `out_dir`; returns the overall table and the number of
    jobs read; records and jobs left out are appended to `skipped`."""
    jobs = read_jobs(sources, skipped)
    overall, per_subtask = build(jobs, skipped)
    if overall.empty:
        raise SystemExit(f"no finished jobs with predictions in {', '.join(map(str, sources))}")
    out_dir.mkdir(parents=True, exist_ok=True)
    for frame, name in ((overall, "leaderboard.csv"), (per_subtask, "leaderboard_subtasks.csv")):
        tmp = out_dir / f".{name}.tmp"
        frame.to_csv(tmp, index=False, float_format="%.6g", lineterminator="\n")
        tmp.replace(out_dir / name)
    (out_dir / "leaderboard.md").write_text(markdown(overall))
    if plots:
        for stale in (out_dir / "plots").glob("*.png"):  # the plots are exactly this build's
            stale.unlink()
        plot(overall, out_dir / "plots")
    budget.write(overall, per_subtask, jobs, out_dir, plots)
    if plots:  # the page embeds the plots: rebuilt with them, it never lags the tables
        write_site(out_dir, out_dir / "site")
    return overall, len(jobs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs-dir", action="append", default=None,
                        help="read these run folders (repeatable) instead of the published records")
    parser.add_argument("--out", default=None, help="default: results/ (published) or results/local/ (--runs-dir)")
    parser.add_argument("--publish", nargs="+", default=None, metavar="RUNS_DIR",
                        help="first copy the finished jobs under these run folders into results/published/")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    if args.publish:
        written = publish([Path(p) for p in args.publish])
        print(f"published {len(written)} job(s) into {PUBLISHED_DIR}")
    sources = [Path(p) for p in args.runs_dir] if args.runs_dir else [PUBLISHED_DIR]
    out = Path(args.out) if args.out else (LOCAL_OUT if args.runs_dir else PROJECT_ROOT / "results")
    skipped: list[tuple[str, str]] = []
    try:
        overall, n_jobs = write(sources, out, plots=not args.no_plots, skipped=skipped)
        print(markdown(overall))
        print(f"read {n_jobs} job(s) from {', '.join(map(str, sources))}; wrote {out}/leaderboard*.csv, .md"
              + ("" if args.no_plots else ", plots/, site/index.html"))
        if out.resolve() == papers.RESULTS_DIR.resolve():  # the committed tables: the papers' comparison follows
            print(f"wrote {papers.write()}")
    finally:
        if skipped:
            print(f"\n{len(skipped)} record(s) left out:")
            for path, reason in skipped:
                print(f"  {path}: {reason}")


if __name__ == "__main__":
    main()
