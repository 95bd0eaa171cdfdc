"""`python -m bench.analysis.report [--csv PATH] [--profile P] [--task T] [--html]`: the leaderboard in the terminal (per
setting: ● tied with the best, mean with its 95 % CI, paired p-values), and with ``--html`` (``make report``) the
static page ``results/site/index.html`` too (`bench.analysis.site`)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from bench.analysis.tables import read_table
from bench.config import PROJECT_ROOT


def terminal(table: pd.DataFrame) -> str:
    parts = []
    for key, group in table.groupby("setting", sort=False):
        first = group.iloc[0]
        parts.append(f"{first['task']} · {first['profile']} · experts {first['experts']} · K={first['fit_examples']}"
                     f" · limit {first['limit']} (setting {key}; ● = tied with the best, p ≥ 0.05)")
        view = pd.DataFrame({
            "": ["●" if str(t) == "True" else "" for t in group["tied_with_best"]],
            "method": group["method"], "options": group["options"], "variant": group["variant"],
            "metric": group["metric"],
            "mean": group["mean"].map("{:.3f}".format),
            "95% CI": [f"[{lo:.3f}, {hi:.3f}]" for lo, hi in zip(group["ci_low"], group["ci_high"])],
            "p vs linear": group["p_vs_reference"].map(lambda v: "" if pd.isna(v) else f"{v:.3f}"),
            "p vs best single": group["p_vs_best_single"].map(lambda v: "" if pd.isna(v) else f"{v:.3f}"),
            "seeds": group["seeds"], "n": group["n"],
        })
        parts.append(view.to_string(index=False))
        parts.append("")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", default=str(PROJECT_ROOT / "results" / "leaderboard.csv"))
    parser.add_argument("--profile")
    parser.add_argument("--task")
    parser.add_argument("--html", nargs="?", const=str(PROJECT_ROOT / "results" / "site"), default=None,
                        metavar="DIR", help="also write the static page (default folder results/site)")
    args = parser.parse_args(argv)
    table = read_table(Path(args.csv))
    for key in ("profile", "task"):
        if getattr(args, key):
            table = table[table[key] == getattr(args, key)]
    print(terminal(table))
    if args.html:
        from bench.analysis.site import write_site

        print(f"page: {write_site(Path(args.csv).parent, Path(args.html))}")


if __name__ == "__main__":
    main()
