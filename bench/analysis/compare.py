"""`python -m bench.analysis.compare --task bbh_cross mole lorahub linear`: planned pairwise comparisons of chosen
methods within each setting of a task — every pair's difference of means, its 95 % CI and the paired bootstrap
p-value, Holm-corrected over the pairs asked for (a small planned family keeps its power; the leaderboard tests each
row against linear, the best single expert and the best only). ``--subtasks a,b`` compares the macro average over
those subtasks only (a task family of the grid, say), with the same paired draws.

Rows, replicates and draws are the leaderboard's (`bench.analysis.settings.resample`), so a CI or p-value here
agrees with the leaderboard's for the same pair. Reads the published records (or ``--runs-dir``); ``--out`` writes
the table as CSV too.
"""

from __future__ import annotations

import argparse
from itertools import combinations
from pathlib import Path

import pandas as pd

from bench.analysis.published import PUBLISHED_DIR, read_jobs
from bench.analysis.settings import resample, setting_columns, setting_options, settings_of
from bench.analysis.stats import ALPHA, holm, interval, paired_p, replicates
from bench.analysis.tables import row_label
from bench.errors import ConfigError


def compare(jobs, task: str, methods: list[str], metric: str | None = None, setting_prefix: str = "",
            subtasks: list[str] | None = None) -> pd.DataFrame:
    """One row per pair of `methods` (higher mean first) in every setting of `task` (those whose key starts with
    `setting_prefix`) holding at least two of them; on the macro average over `subtasks` when given."""
    out = []
    for setting in settings_of(jobs).values():
        if setting.fields["task"].get("name") != task or not setting.rows or not setting.key.startswith(setting_prefix):
            continue
        if subtasks and (unknown := [t for t in subtasks if t not in setting.examples]):
            raise ConfigError(f"setting {setting.key} of task {task!r} has no subtask {', '.join(unknown)}; "
                              f"it has {', '.join(setting.examples)}")
        r = resample(setting)
        options = setting_options(setting)
        chosen = [k for k in r.keys if k[0] in methods and not k[1] and (metric is None or k[2] == metric)]
        reps = {k: replicates(r.scores[k], r.draws, subtasks) for k in chosen} if subtasks else r.reps
        means = {k: r.scores[k].statistic(subtasks) for k in chosen} if subtasks else r.means
        by_metric: dict[str, list[tuple]] = {}
        for k in chosen:
            by_metric.setdefault(k[2], []).append(k)
        for m, rows in by_metric.items():
            pairs = [tuple(sorted(p, key=lambda k: (means[k], k), reverse=True)) for p in combinations(rows, 2)]
            p_adj = holm({i: paired_p(reps[a], reps[b]) for i, (a, b) in enumerate(pairs)})
            for i, (a, b) in enumerate(pairs):
                low, high = interval(reps[a] - reps[b])
                out.append({**setting_columns(setting), "subtasks": ", ".join(subtasks) if subtasks else "all",
                            "metric": m,
                            "higher": row_label(a[0], "", options[(a[0], a[3])]),
                            "lower": row_label(b[0], "", options[(b[0], b[3])]),
                            "difference": means[a] - means[b],
                            "ci_low": low, "ci_high": high,
                            "p_holm": p_adj[i], "significant": p_adj[i] < ALPHA,
                            "seeds": f"{len(r.scores[a].values)}/{len(r.scores[b].values)}"})
    return pd.DataFrame(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("methods", nargs="+", help="two or more method names")
    parser.add_argument("--task", required=True)
    parser.add_argument("--metric", default=None)
    parser.add_argument("--setting", default="", help="only the settings whose key starts with this (the leaderboard's"
                        " 'setting' column, e.g. ad3ea371)")
    parser.add_argument("--subtasks", default=None, help="comma-separated: compare the macro average over these "
                        "subtasks only (e.g. formal_fallacies,causal_judgement)")
    parser.add_argument("--runs-dir", type=Path, action="append", default=None)
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this CSV")
    args = parser.parse_args(argv)
    if len(set(args.methods)) < 2:
        raise ConfigError(f"compare needs two or more distinct methods, got {args.methods}")
    subtasks = [t.strip() for t in args.subtasks.split(",") if t.strip()] if args.subtasks else None
    table = compare(read_jobs(args.runs_dir or [PUBLISHED_DIR]), args.task, list(dict.fromkeys(args.methods)),
                    args.metric, args.setting, subtasks)
    if table.empty:
        where = f"setting {args.setting}* of task {args.task!r}" if args.setting else f"setting of task {args.task!r}"
        raise SystemExit(f"no {where} has two of {args.methods} (published records"
                         f"{'' if not args.runs_dir else ' in ' + ', '.join(map(str, args.runs_dir))})")
    view = table.assign(**{"difference [95% CI]": [f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]" for d, lo, hi in
                                                    zip(table["difference"], table["ci_low"], table["ci_high"])]})
    print(view[["setting", *(["subtasks"] if subtasks else []), "metric", "higher", "lower", "difference [95% CI]",
                "p_holm", "significant", "seeds"]]
          .to_markdown(index=False, floatfmt=".3f"))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out, index=False, float_format="%.6g", lineterminator="\n")


if __name__ == "__main__":
    main()
