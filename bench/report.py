"""`python -m bench.report [--profile P] [--task T]`: the leaderboard as a table in the terminal."""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from bench.config import PROJECT_ROOT

COLUMNS = ["profile", "task", "method", "variant", "metric", "mean", "std", "normalized", "n_seeds", "n_examples",
           "fit_seconds", "eval_seconds", "trained_params"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", default=str(PROJECT_ROOT / "results" / "leaderboard.csv"))
    parser.add_argument("--profile")
    parser.add_argument("--task")
    args = parser.parse_args(argv)
    if not Path(args.csv).is_file():
        raise SystemExit(f"{args.csv} does not exist; run `make leaderboard` first")
    table = pd.read_csv(args.csv, keep_default_na=False, na_values=[""])
    table["variant"] = table["variant"].fillna("")  # a method without variants
    for key in ("profile", "task"):
        if getattr(args, key):
            table = table[table[key] == getattr(args, key)]
    table = table.sort_values(["profile", "task", "metric", "mean"], ascending=[True, True, True, False])
    print(table[COLUMNS].to_string(index=False, na_rep="", float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
