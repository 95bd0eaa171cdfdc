"""The leaderboard's rows outside the build: reading its CSVs back (the report, the page and the papers'
comparison build on them) and naming a row."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def read_table(csv: Path) -> pd.DataFrame:
    """A leaderboard CSV as written by `write` (a method without variants or options keeps an empty string, not
    NaN)."""
    if not csv.is_file():
        raise SystemExit(f"{csv} does not exist; run `make leaderboard` first")
    table = pd.read_csv(csv, keep_default_na=False, na_values=[""])
    for column in ("variant", "options"):
        table[column] = table[column].fillna("") if column in table else ""
    return table


def row_label(method: str, variant: str, options: str = "") -> str:
    """How plots and the page name a row: the method, its options in parentheses, its variant in brackets."""
    return method + (f" ({options})" if options else "") + (f"[{variant}]" if variant else "")
