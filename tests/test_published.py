"""The committed leaderboard is reproducible from the repository: `make leaderboard` on the published records
(results/published/) rebuilds results/leaderboard.csv, leaderboard_subtasks.csv, leaderboard.md and budget_curves.csv byte for byte."""

from __future__ import annotations

import pytest

from bench.analysis.leaderboard import main
from bench.analysis.published import PUBLISHED_DIR, read_jobs
from bench.config import PROJECT_ROOT

RESULTS = PROJECT_ROOT / "results"


def test_every_published_job_is_complete():
    skipped: list[tuple[str, str]] = []
    jobs = read_jobs([PUBLISHED_DIR], skipped)
    assert jobs and skipped == []
    for job in jobs:
        assert job.predictions, job.source
        assert {p["subtask"] for p in job.predictions} >= {r["subtask"] for r in job.record["rows"]} - {"all"}


@pytest.mark.parametrize("name", ["leaderboard.csv", "leaderboard_subtasks.csv", "leaderboard.md", "budget_curves.csv"])
def test_the_committed_tables_rebuild_byte_for_byte(tmp_path, name, capsys):
    main(["--runs-dir", str(PUBLISHED_DIR), "--out", str(tmp_path), "--no-plots"])
    rebuilt = (tmp_path / name).read_bytes()
    committed = (RESULTS / name).read_bytes()
    assert rebuilt == committed, f"results/{name} differs from `make leaderboard`'s; run it and commit"


def test_the_committed_page_shows_the_committed_tables(tmp_path):
    """results/site/index.html is what the committed tables and plots give (`make leaderboard` rebuilds all three)."""
    from bench.analysis.site import write_site

    rebuilt = write_site(RESULTS, tmp_path).read_bytes()
    assert rebuilt == (RESULTS / "site" / "index.html").read_bytes(), \
        "results/site/index.html lags results/leaderboard*.csv; run `make leaderboard` and commit"
