"""From records to results: the leaderboard with CIs and paired tests (`python -m bench.analysis.leaderboard`),
the published records, the terminal report and the static page, and the cross-checks against lm-eval.

May import: everything in `bench` except `bench.perf`, plus `methods` and `tasks`.
"""
